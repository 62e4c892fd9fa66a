//! The read that fills L1: the value and its remaining TTL, in one round trip.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::key::Key;
use crate::store::{CacheLayer, MemoryLayer, Operation, Remaining};

/// `GET` and `PTTL` of one key (one pipeline on Redis): a copy in L1 never outlives the entry.
pub(crate) struct TierRead<'a> {
    pub(crate) key: &'a Key,
}

#[async_trait]
impl Operation for TierRead<'_> {
    /// The value, and how long it has left (`None`: no expiry, another client's key).
    type Output = (Option<Bytes>, Option<Duration>);

    fn name(&self) -> &'static str {
        "GET"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Self::Output> {
        redis.get_with_ttl(self.key).await
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Self::Output> {
        let value = memory.get(self.key).await?;
        let remaining = match memory.remaining_ttl(self.key).await? {
            Remaining::Expires(left) => Some(left),
            Remaining::Missing => Some(Duration::ZERO),
            Remaining::NoExpiry => None,
        };
        Ok((value, remaining))
    }
}
