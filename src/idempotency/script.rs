//! The idempotency record's atomic steps as store [`Operation`]s: its Redis scripts and its
//! memory twin (the memory layer's entry for the record's key, as Redis keeps it in the key).
//!
//! A record is a JSON string. While the request runs it is the in-progress record, unique to
//! that run (it carries a random token), with the lease as its TTL; once the response is known
//! it is the completed record, for the retention time. The scripts compare whole records, so
//! only the run that wrote the in-progress record can complete it.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::key::Key;
use crate::store::{MemoryLayer, MemoryUpdate, Operation};
use crate::ttl::Ttl;

/// Starts a run unless a record exists: `KEYS[1]` the record, `ARGV[1]` the in-progress record,
/// `ARGV[2]` the lease (ms). Answers 1 (started) or the record found. Another client's value of
/// another type at the key is replaced.
pub const BEGIN_SCRIPT: &str = r"
local found = redis.pcall('GET', KEYS[1])
if type(found) == 'string' then return found end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Replaces the in-progress record `ARGV[1]` by the completed record `ARGV[2]` for `ARGV[3]` ms,
/// if it is still there. Answers 1 or 0.
pub const COMPLETE_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

#[cfg(feature = "redis")]
static SCRIPTS: std::sync::LazyLock<[redis::Script; 2]> = std::sync::LazyLock::new(|| {
    [
        redis::Script::new(BEGIN_SCRIPT),
        redis::Script::new(COMPLETE_SCRIPT),
    ]
});

/// What [`BeginOp`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Began {
    /// The run is this caller's.
    Started,
    /// A record exists (in progress or completed).
    Found(Bytes),
}

pub(super) struct BeginOp<'a> {
    pub(super) key: &'a Key,
    pub(super) in_progress: &'a Bytes,
    pub(super) lease: Ttl,
}

#[async_trait]
impl Operation for BeginOp<'_> {
    type Output = Began;

    fn name(&self) -> &'static str {
        "idempotency begin"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Began> {
        let mut invocation = SCRIPTS[0].prepare_invoke();
        invocation
            .key(self.key.as_str())
            .arg(self.in_progress.as_ref())
            .arg(self.lease.as_millis());
        Ok(match redis.invoke::<redis::Value>(&invocation).await? {
            redis::Value::BulkString(found) => Began::Found(Bytes::from(found)),
            _ => Began::Started,
        })
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Began> {
        let (record, lease) = (self.in_progress.clone(), self.lease);
        memory
            .compute(self.key, move |entry| match entry {
                Some(found) => (MemoryUpdate::Keep, Began::Found(found.value)),
                None => (
                    MemoryUpdate::Put {
                        value: record,
                        lease: 0,
                        ttl: lease,
                    },
                    Began::Started,
                ),
            })
            .await
    }
}

pub(super) struct CompleteOp<'a> {
    pub(super) key: &'a Key,
    pub(super) in_progress: &'a Bytes,
    pub(super) completed: &'a Bytes,
    pub(super) retention: Ttl,
}

#[async_trait]
impl Operation for CompleteOp<'_> {
    type Output = bool;

    fn name(&self) -> &'static str {
        "idempotency complete"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<bool> {
        let mut invocation = SCRIPTS[1].prepare_invoke();
        invocation
            .key(self.key.as_str())
            .arg(self.in_progress.as_ref())
            .arg(self.completed.as_ref())
            .arg(self.retention.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        let (mine, completed, retention) = (
            self.in_progress.clone(),
            self.completed.clone(),
            self.retention,
        );
        memory
            .compute(self.key, move |entry| match entry {
                Some(found) if found.value == mine => (
                    MemoryUpdate::Put {
                        value: completed,
                        lease: 0,
                        ttl: retention,
                    },
                    true,
                ),
                _ => (MemoryUpdate::Keep, false),
            })
            .await
    }
}
