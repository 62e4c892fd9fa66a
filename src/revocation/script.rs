//! The blacklist's two steps as store operations: a Redis command each (wrapped in a script so
//! that they run through the same path as every capability) and the memory twin.

use std::sync::LazyLock;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::key::Key;
use crate::store::{CacheLayer, MemoryLayer, Operation};
use crate::ttl::Ttl;

/// The scripts, loaded once per process.
struct Scripts {
    #[cfg(feature = "redis")]
    revoke: redis::Script,
    #[cfg(feature = "redis")]
    check: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    #[cfg(feature = "redis")]
    revoke: redis::Script::new(REVOKE_SCRIPT),
    #[cfg(feature = "redis")]
    check: redis::Script::new(CHECK_SCRIPT),
});

/// Records a revocation: `KEYS[1]` holds `1` for `ARGV[1]` ms, whatever was there.
pub const REVOKE_SCRIPT: &str = r"
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
";

/// Whether anything is recorded under `KEYS[1]`: 1 or 0.
pub const CHECK_SCRIPT: &str = r"
return redis.call('EXISTS', KEYS[1])
";

pub(crate) struct RevokeOp<'a> {
    pub(crate) key: &'a Key,
    pub(crate) ttl: Ttl,
}

#[async_trait]
impl Operation for RevokeOp<'_> {
    type Output = ();

    fn name(&self) -> &'static str {
        "revoke"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<()> {
        let mut invocation = SCRIPTS.revoke.prepare_invoke();
        invocation.key(self.key.as_str()).arg(self.ttl.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|_| ())
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<()> {
        memory
            .set(self.key, Bytes::from_static(b"1"), self.ttl)
            .await
    }
}

pub(super) struct CheckOp<'a> {
    pub(super) key: &'a Key,
}

#[async_trait]
impl Operation for CheckOp<'_> {
    type Output = bool;

    fn name(&self) -> &'static str {
        "revocation check"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<bool> {
        let mut invocation = SCRIPTS.check.prepare_invoke();
        invocation.key(self.key.as_str());
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        Ok(memory.get(self.key).await?.is_some())
    }
}
