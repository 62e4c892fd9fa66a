//! The idempotency record's atomic steps as store [`Operation`]s: its Redis scripts and its
//! memory twin. The twin keeps records in a table of their own, never evicted before they
//! expire: a record lost to a cache's byte budget would let a retry run a second time.
//!
//! A record is a JSON string. While the request runs it is the in-progress record, unique to
//! that run (it carries a random token), with the lease as its TTL; once the response is known
//! it is the completed record, for the retention time. The scripts compare whole records, so
//! only the run that wrote the in-progress record can complete it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::key::Key;
use crate::store::{MemoryLayer, Operation, TwinTable};
use crate::ttl::Ttl;

/// The memory twin's records: until when each lives. Expired records are dropped whenever the
/// table has doubled since it was last pruned.
#[derive(Default)]
struct Table {
    records: HashMap<String, (Bytes, Instant)>,
    pruned_len: usize,
}

impl Table {
    fn prune(&mut self, now: Instant) {
        if self.records.len() < (2 * self.pruned_len).max(1024) {
            return;
        }
        self.records.retain(|_, (_, until)| *until > now);
        self.pruned_len = self.records.len();
    }
}

fn twin(memory: &MemoryLayer) -> Arc<TwinTable<Table>> {
    memory.twin_table()
}

/// Starts a run unless a record exists: `KEYS[1]` the record, `ARGV[1]` the in-progress record,
/// `ARGV[2]` the lease (ms). Answers 1 (started) or the record found. Another client's value of
/// another type at the key is replaced; a string without TTL gets the lease as its TTL (it guards
/// nothing, and must not block the key for good).
pub const BEGIN_SCRIPT: &str = r"
local found = redis.pcall('GET', KEYS[1])
if type(found) == 'string' then
  if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return found
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Replaces the in-progress record `ARGV[1]` by the completed record `ARGV[2]` for `ARGV[3]` ms,
/// if it is still there, or if the key is empty (the run outlived its lease, and no other run
/// started since: one would have written its own record). Answers 1 or 0.
pub const COMPLETE_SCRIPT: &str = r"
local current = redis.pcall('GET', KEYS[1])
if current ~= ARGV[1] and current ~= false then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

#[cfg(feature = "redis")]
static SCRIPTS: std::sync::LazyLock<(redis::Script, redis::Script)> =
    std::sync::LazyLock::new(|| {
        (
            redis::Script::new(BEGIN_SCRIPT),
            redis::Script::new(COMPLETE_SCRIPT),
        )
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
        let mut invocation = SCRIPTS.0.prepare_invoke();
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
        let twin = twin(memory);
        let mut table = twin.lock();
        let now = Instant::now();
        table.prune(now);
        if let Some((found, until)) = table.records.get(self.key.as_str())
            && *until > now
        {
            return Ok(Began::Found(found.clone()));
        }
        table.records.insert(
            self.key.as_str().to_owned(),
            (self.in_progress.clone(), now + self.lease.as_duration()),
        );
        Ok(Began::Started)
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
        let mut invocation = SCRIPTS.1.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .arg(self.in_progress.as_ref())
            .arg(self.completed.as_ref())
            .arg(self.retention.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        let twin = twin(memory);
        let mut table = twin.lock();
        let now = Instant::now();
        let current = table
            .records
            .get(self.key.as_str())
            .filter(|(_, until)| *until > now)
            .map(|(record, _)| record);
        if current.is_some_and(|record| record != self.in_progress) {
            return Ok(false);
        }
        table.records.insert(
            self.key.as_str().to_owned(),
            (self.completed.clone(), now + self.retention.as_duration()),
        );
        Ok(true)
    }
}
