//! The counter's atomic steps as store [`Operation`]s: its Redis scripts and its memory twin.
//!
//! On Redis a counter is a decimal string with a TTL. While a recount runs, the key holds `""`
//! and `{<key>}:~lease` holds the recount's token, as a cache load's lease does (other clients
//! read `""` as a miss). An update that finds a recount in flight deletes the key instead of
//! counting: the recount, which may have read the database before or after that update, is then
//! not stored, and the next read recounts. An update never creates a counter: a missing counter
//! is recounted from the database on its next read, so an update can be neither lost nor counted
//! twice.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::key::Key;
use crate::store::{MemoryEntry, MemoryLayer, MemoryUpdate, Operation, lease_key};
use crate::ttl::Ttl;

/// Reads a counter; when it is missing (or holds another client's data, or a number of more
/// than 17 digits), takes the recount lease: `KEYS[1]` the counter, `KEYS[2]` its lease key, `ARGV[1]` the token, `ARGV[2]` the lease
/// (ms). Answers `{1, value}`, `{0}` (another recount is in flight) or `{2}` (the lease is this
/// caller's: recount).
pub const READ_SCRIPT: &str = r"
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'string' then
  if string.match(v, '^%-?%d+$') and #v <= 18 then return {1, v} end
  if v == '' and redis.call('PTTL', KEYS[1]) > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
    return {0}
  end
end
redis.call('SET', KEYS[1], '', 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {2}
";

/// Takes the recount lease whatever the counter holds (a reconciliation): `KEYS[1]`, `KEYS[2]`,
/// `ARGV[1]` the token, `ARGV[2]` the lease (ms). Answers the value it replaced, if it was a
/// count.
pub const FORCE_SCRIPT: &str = r"
local v = redis.pcall('GET', KEYS[1])
redis.call('SET', KEYS[1], '', 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if type(v) == 'string' and string.match(v, '^%-?%d+$') and #v <= 18 then return v end
return false
";

/// Stores a recount if the lease is still the caller's and no update came meanwhile: `KEYS[1]`,
/// `KEYS[2]`, `ARGV[1]` the token, `ARGV[2]` the count, `ARGV[3]` the TTL (ms). Answers 1 or 0.
pub const FILL_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.pcall('GET', KEYS[1]) ~= '' then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
";

/// Adds `ARGV[1]` to a live counter and refreshes its TTL (`ARGV[2]`, ms); answers the new value.
/// A missing counter stays missing (`false`); a recount in flight (`""`), or another client's
/// data, is deleted (`false`), so that the next read recounts.
pub const ADD_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local n = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(n) == 'number' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return n
end
redis.call('DEL', KEYS[1])
return false
";

/// Gives up a recount's lease (its loader failed, or its caller went away): `KEYS[1]`,
/// `KEYS[2]`, `ARGV[1]` the token. Answers 1 or 0.
pub const RELEASE_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if redis.pcall('GET', KEYS[1]) == '' then redis.call('DEL', KEYS[1]) end
return 1
";

#[cfg(feature = "redis")]
static SCRIPTS: std::sync::LazyLock<[redis::Script; 5]> = std::sync::LazyLock::new(|| {
    [
        redis::Script::new(READ_SCRIPT),
        redis::Script::new(FORCE_SCRIPT),
        redis::Script::new(FILL_SCRIPT),
        redis::Script::new(ADD_SCRIPT),
        redis::Script::new(RELEASE_SCRIPT),
    ]
});

fn parse(text: &str) -> Result<i64> {
    text.parse().map_err(|_| {
        Error::new(
            ErrorKind::Script,
            "a counter script returned something that is not a count",
        )
    })
}

/// The memory twin keeps the counter in the memory layer's entry for its key, as Redis keeps
/// it in the key: a count is its decimal text, a recount in flight is an empty value holding
/// the recount's lease token. Deletes and invalidations of the key reach it on both backends.
fn count_of(entry: &MemoryEntry) -> Option<i64> {
    if entry.lease != 0 {
        return None;
    }
    let text = std::str::from_utf8(&entry.value).ok()?;
    // As the scripts read it: at most 18 characters, so that any count read fits an i64.
    if text.len() > 18 {
        return None;
    }
    text.parse().ok()
}

/// What a read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    Count(i64),
    /// Another recount is in flight: count from the database, do not store.
    Busy,
    /// This caller holds the recount lease.
    Recount,
}

pub(super) struct ReadOp<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
    pub(super) lease: Ttl,
    /// Take the lease whatever the key holds (a reconciliation); the output is then the count
    /// it replaced, if any.
    pub(super) force: bool,
}

#[async_trait]
impl Operation for ReadOp<'_> {
    type Output = (Read, Option<i64>);

    fn name(&self) -> &'static str {
        "counter read"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(
        &self,
        redis: &crate::store::redis::RedisLayer,
    ) -> Result<(Read, Option<i64>)> {
        let script = if self.force { &SCRIPTS[1] } else { &SCRIPTS[0] };
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(lease_key(self.key))
            .arg(self.token)
            .arg(self.lease.as_millis());
        if self.force {
            let previous: Option<String> = redis.invoke(&invocation).await?;
            return Ok((Read::Recount, previous.as_deref().map(parse).transpose()?));
        }
        let reply: Vec<String> = redis.invoke(&invocation).await?;
        Ok(match reply.as_slice() {
            [code, value] if code == "1" => (Read::Count(parse(value)?), None),
            [code] if code == "0" => (Read::Busy, None),
            _ => (Read::Recount, None),
        })
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<(Read, Option<i64>)> {
        let (token, lease, force) = (self.token, self.lease, self.force);
        memory
            .compute(self.key, move |entry| {
                let count = entry.as_ref().and_then(count_of);
                match (&entry, count) {
                    (_, Some(n)) if !force => return (MemoryUpdate::Keep, (Read::Count(n), None)),
                    (Some(e), None) if e.lease != 0 && !force => {
                        return (MemoryUpdate::Keep, (Read::Busy, None));
                    }
                    _ => {}
                }
                let take = MemoryUpdate::Put {
                    value: Bytes::new(),
                    lease: token,
                    ttl: lease,
                };
                (take, (Read::Recount, count))
            })
            .await
    }
}

pub(super) struct FillOp<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
    pub(super) count: i64,
    pub(super) ttl: Ttl,
}

#[async_trait]
impl Operation for FillOp<'_> {
    type Output = bool;

    fn name(&self) -> &'static str {
        "counter fill"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<bool> {
        let mut invocation = SCRIPTS[2].prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(lease_key(self.key))
            .arg(self.token)
            .arg(self.count)
            .arg(self.ttl.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        let (token, count, ttl) = (self.token, self.count, self.ttl);
        memory
            .compute(self.key, move |entry| match entry {
                Some(e) if e.lease == token => (
                    MemoryUpdate::Put {
                        value: Bytes::from(count.to_string()),
                        lease: 0,
                        ttl,
                    },
                    true,
                ),
                _ => (MemoryUpdate::Keep, false),
            })
            .await
    }
}

pub(super) struct AddOp<'a> {
    pub(super) key: &'a Key,
    pub(super) delta: i64,
    pub(super) ttl: Ttl,
}

#[async_trait]
impl Operation for AddOp<'_> {
    type Output = Option<i64>;

    fn name(&self) -> &'static str {
        "counter add"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Option<i64>> {
        let mut invocation = SCRIPTS[3].prepare_invoke();
        invocation
            .key(self.key.as_str())
            .arg(self.delta)
            .arg(self.ttl.as_millis());
        redis.invoke::<Option<i64>>(&invocation).await
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Option<i64>> {
        let (delta, ttl) = (self.delta, self.ttl);
        memory
            .compute(self.key, move |entry| {
                let Some(entry) = entry else {
                    return (MemoryUpdate::Keep, None);
                };
                match count_of(&entry).and_then(|n| n.checked_add(delta)) {
                    Some(next) => (
                        MemoryUpdate::Put {
                            value: Bytes::from(next.to_string()),
                            lease: 0,
                            ttl,
                        },
                        Some(next),
                    ),
                    // A recount in flight, something that is not a count, or out of range:
                    // removed, and recounted on the next read, as on Redis.
                    None => (MemoryUpdate::Remove, None),
                }
            })
            .await
    }
}

pub(super) struct ReleaseOp<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
}

#[async_trait]
impl Operation for ReleaseOp<'_> {
    type Output = bool;

    fn name(&self) -> &'static str {
        "counter release"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<bool> {
        let mut invocation = SCRIPTS[4].prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(lease_key(self.key))
            .arg(self.token);
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        let token = self.token;
        memory
            .compute(self.key, move |entry| match entry {
                Some(e) if e.lease == token => (MemoryUpdate::Remove, true),
                _ => (MemoryUpdate::Keep, false),
            })
            .await
    }
}
