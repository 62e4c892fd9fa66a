//! The counter's atomic steps as store [`Operation`]s: its Redis scripts and its memory twin.
//!
//! On Redis a counter is a decimal string with a TTL. While a recount runs, the key holds `""`
//! and `{<key>}:~lease` holds the recount's token, as a cache load's lease does (other clients
//! read `""` as a miss). Each update marks itself in `{<key>}:~writes` (a sorted set of update
//! tokens scored by their deadline, in the counter's hash slot) before the database write, and
//! unmarks itself when it adds its delta after the write. A recount is stored only if no update
//! was marked when it ends and no update came while it ran: an update in flight may or may not be
//! in the database's count, so the recount is returned but not stored, and the next read
//! recounts. An update never creates a counter, and an update whose mark was lost (a Redis
//! restart) or expired deletes the counter instead of counting: an update is neither lost nor
//! counted twice.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::key::Key;
use crate::store::{
    MemoryEntry, MemoryLayer, MemoryUpdate, Operation, TwinTable, lease_key, sibling_key,
};
use crate::ttl::Ttl;
use std::time::Instant;

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

/// Stores a recount if the lease is still the caller's, no update came meanwhile and none is in
/// flight: `KEYS[1]`, `KEYS[2]`, `KEYS[3]` the update marks, `ARGV[1]` the token, `ARGV[2]` the
/// count, `ARGV[3]` the TTL (ms). Marks past their deadline are dropped first. When an update is
/// in flight the lease is given up (the next read recounts). Answers 1 or 0.
pub const FILL_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.pcall('GET', KEYS[1]) ~= '' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.pcall('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local writes = redis.pcall('ZCARD', KEYS[3])
if type(writes) ~= 'number' then
  -- Another client's value: no mark of ours can be there.
  redis.call('DEL', KEYS[3])
  writes = 0
end
if writes > 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
";

/// Marks an update in flight, before its database write: `KEYS[1]` the counter, `KEYS[2]` the
/// update marks, `ARGV[1]` the update's token, `ARGV[2]` how long it may take (ms). Answers 1.
pub const BEGIN_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.pcall('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
if type(added) ~= 'number' then
  redis.call('DEL', KEYS[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
";

/// Adds `ARGV[1]` to a live counter and refreshes its TTL (`ARGV[2]`, ms), once the update's
/// database write is done; `KEYS[2]` the update marks, `ARGV[3]` the update's token. Answers the
/// new value. A missing counter stays missing (`false`). A recount in flight (`""`), another
/// client's data, or an update whose mark is gone (expired, or lost by a restart: a recount may
/// have counted its row) deletes the counter (`false`), so that the next read recounts.
pub const ADD_SCRIPT: &str = r"
if redis.pcall('ZREM', KEYS[2], ARGV[3]) ~= 1 then
  redis.call('DEL', KEYS[1])
  return false
end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local n = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(n) == 'number' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return n
end
redis.call('DEL', KEYS[1])
return false
";

/// Ends an update without counting: `KEYS[1]` the counter, `KEYS[2]` the update marks,
/// `ARGV[1]` the update's token, `ARGV[2]` `1` when the write may have happened (the counter is
/// then deleted, and recounted on the next read) or `0` when it did not. Answers 1.
pub const ABORT_SCRIPT: &str = r"
redis.pcall('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[1]) end
return 1
";

/// The scripts, loaded once.
#[cfg(feature = "redis")]
struct Scripts {
    read: redis::Script,
    force: redis::Script,
    fill: redis::Script,
    begin: redis::Script,
    add: redis::Script,
    abort: redis::Script,
}

#[cfg(feature = "redis")]
static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    read: redis::Script::new(READ_SCRIPT),
    force: redis::Script::new(FORCE_SCRIPT),
    fill: redis::Script::new(FILL_SCRIPT),
    begin: redis::Script::new(BEGIN_SCRIPT),
    add: redis::Script::new(ADD_SCRIPT),
    abort: redis::Script::new(ABORT_SCRIPT),
});

/// The key of the update marks of counter `key`: `{<key>}:~writes`, in its hash slot.
pub fn writes_key(key: &Key) -> String {
    sibling_key(key, "writes")
}

/// The memory twin of the update marks: per counter, the tokens of the updates in flight and
/// their deadlines. It is only touched inside a `compute` on the counter's entry, so that each
/// step sees the marks and the entry together, as a script does.
#[derive(Default)]
struct Marks {
    by_key: std::collections::HashMap<String, std::collections::HashMap<u64, Instant>>,
    pruned_len: usize,
}

impl Marks {
    /// The marks of `key` still before their deadline.
    fn live(&mut self, key: &str, now: Instant) -> usize {
        let Some(marks) = self.by_key.get_mut(key) else {
            return 0;
        };
        marks.retain(|_, deadline| *deadline > now);
        let n = marks.len();
        if n == 0 {
            self.by_key.remove(key);
        }
        n
    }

    fn mark(&mut self, key: &str, token: u64, deadline: Instant) {
        let now = Instant::now();
        if self.by_key.len() >= (2 * self.pruned_len).max(1024) {
            self.by_key.retain(|_, marks| {
                marks.retain(|_, d| *d > now);
                !marks.is_empty()
            });
            self.pruned_len = self.by_key.len();
        }
        self.by_key
            .entry(key.to_owned())
            .or_default()
            .insert(token, deadline);
    }

    /// Removes the mark of `token`; true when it was there. A mark past its deadline that no
    /// recount dropped yet is still there, as on Redis: no recount ignored it.
    fn unmark(&mut self, key: &str, token: u64) -> bool {
        let Some(marks) = self.by_key.get_mut(key) else {
            return false;
        };
        let found = marks.remove(&token).is_some();
        if marks.is_empty() {
            self.by_key.remove(key);
        }
        found
    }
}

fn twin(memory: &MemoryLayer) -> std::sync::Arc<TwinTable<Marks>> {
    memory.twin_table()
}

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
    // As the scripts read it (`^-?%d+$`, at most 18 characters, so that any count read fits an
    // i64): no sign but `-`.
    let digits = text.strip_prefix('-').unwrap_or(text);
    if text.len() > 18 || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
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
        let script = if self.force {
            &SCRIPTS.force
        } else {
            &SCRIPTS.read
        };
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
        let mut invocation = SCRIPTS.fill.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(lease_key(self.key))
            .key(writes_key(self.key))
            .arg(self.token)
            .arg(self.count)
            .arg(self.ttl.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        let (token, count, ttl) = (self.token, self.count, self.ttl);
        let twin = twin(memory);
        let name = self.key.as_str();
        memory
            .compute(self.key, move |entry| match entry {
                Some(e) if e.lease == token => {
                    if twin.lock().live(name, Instant::now()) > 0 {
                        // An update is in flight: its row may or may not be in the count.
                        return (MemoryUpdate::Remove, false);
                    }
                    (
                        MemoryUpdate::Put {
                            value: Bytes::from(count.to_string()),
                            lease: 0,
                            ttl,
                        },
                        true,
                    )
                }
                _ => (MemoryUpdate::Keep, false),
            })
            .await
    }
}

pub(super) struct AddOp<'a> {
    pub(super) key: &'a Key,
    pub(super) delta: i64,
    pub(super) ttl: Ttl,
    /// The update's token, marked by its [`BeginOp`].
    pub(super) token: u64,
}

#[async_trait]
impl Operation for AddOp<'_> {
    type Output = Option<i64>;

    fn name(&self) -> &'static str {
        "counter add"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Option<i64>> {
        let mut invocation = SCRIPTS.add.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(writes_key(self.key))
            .arg(self.delta)
            .arg(self.ttl.as_millis())
            .arg(self.token);
        redis.invoke::<Option<i64>>(&invocation).await
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Option<i64>> {
        let (delta, ttl, token) = (self.delta, self.ttl, self.token);
        let twin = twin(memory);
        let name = self.key.as_str();
        memory
            .compute(self.key, move |entry| {
                if !twin.lock().unmark(name, token) {
                    // The mark is gone: a recount may have counted this update's row.
                    let update = match entry {
                        Some(_) => MemoryUpdate::Remove,
                        None => MemoryUpdate::Keep,
                    };
                    return (update, None);
                }
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

pub(super) struct BeginOp<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
    /// How long the update may take between its mark and its add.
    pub(super) window: Ttl,
}

#[async_trait]
impl Operation for BeginOp<'_> {
    type Output = ();

    fn name(&self) -> &'static str {
        "counter begin"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<()> {
        let mut invocation = SCRIPTS.begin.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(writes_key(self.key))
            .arg(self.token)
            .arg(self.window.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|_| ())
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<()> {
        let (token, window) = (self.token, self.window.as_duration());
        let twin = twin(memory);
        let name = self.key.as_str();
        memory
            .compute(self.key, move |_| {
                twin.lock().mark(name, token, Instant::now() + window);
                (MemoryUpdate::Keep, ())
            })
            .await
    }
}

pub(super) struct AbortOp<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
    /// The write may have happened: the counter goes.
    pub(super) invalidate: bool,
}

#[async_trait]
impl Operation for AbortOp<'_> {
    type Output = ();

    fn name(&self) -> &'static str {
        "counter abort"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<()> {
        let mut invocation = SCRIPTS.abort.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(writes_key(self.key))
            .arg(self.token)
            .arg(u8::from(self.invalidate));
        redis.invoke::<i64>(&invocation).await.map(|_| ())
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<()> {
        let (token, invalidate) = (self.token, self.invalidate);
        let twin = twin(memory);
        let name = self.key.as_str();
        memory
            .compute(self.key, move |entry| {
                twin.lock().unmark(name, token);
                let update = match entry {
                    Some(_) if invalidate => MemoryUpdate::Remove,
                    _ => MemoryUpdate::Keep,
                };
                (update, ())
            })
            .await
    }
}
