//! The scratch hash's atomic steps as store operations: its Redis scripts and its memory twin.
//!
//! On Redis a scratch hash is up to three keys in one hash slot: the hash itself (`<key>`), the
//! batch being flushed (`{<key>}:~flushing`, a hash moved aside by `RENAME`, which carries its
//! own id in the field `~batch`) and the claim of the flusher working on it
//! (`{<key>}:~flush-claim`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::key::Key;
use crate::store::{MemoryLayer, Operation, TwinTable, sibling_key};
use crate::ttl::Ttl;

struct Scripts {
    #[cfg(feature = "redis")]
    mark: redis::Script,
    #[cfg(feature = "redis")]
    read: redis::Script,
    #[cfg(feature = "redis")]
    begin: redis::Script,
    #[cfg(feature = "redis")]
    commit: redis::Script,
    #[cfg(feature = "redis")]
    abort: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    #[cfg(feature = "redis")]
    mark: redis::Script::new(MARK_SCRIPT),
    #[cfg(feature = "redis")]
    read: redis::Script::new(READ_SCRIPT),
    #[cfg(feature = "redis")]
    begin: redis::Script::new(BEGIN_SCRIPT),
    #[cfg(feature = "redis")]
    commit: redis::Script::new(COMMIT_SCRIPT),
    #[cfg(feature = "redis")]
    abort: redis::Script::new(ABORT_SCRIPT),
});

/// Writes fields of the hash `KEYS[1]`: `ARGV[1]` the safety TTL (ms), then field, value pairs.
/// The safety TTL is set when the hash has none (its first mark). Answers the hash's remaining
/// TTL (ms). Another client's key of another type is an error, and is left as it is.
pub const MARK_SCRIPT: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE the scratch key holds another type')
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return redis.call('PTTL', KEYS[1])
";

/// Everything written: the batch being flushed (`KEYS[2]`), overwritten by the hash (`KEYS[1]`,
/// newer). Answers `{ttl of the hash (ms), field, value, ...}`; keys of another type read as
/// empty, and the batch's own id field (`~batch`) is left out.
pub const READ_SCRIPT: &str = r"
local out = {-2}
local seen = {}
local function add(key)
  if redis.call('TYPE', key)['ok'] ~= 'hash' then return end
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i] ~= '~batch' then
      if seen[all[i]] then
        out[seen[all[i]] + 1] = all[i + 1]
      else
        out[#out + 1] = all[i]
        out[#out + 1] = all[i + 1]
        seen[all[i]] = #out - 1
      end
    end
  end
end
add(KEYS[2])
add(KEYS[1])
out[1] = redis.call('PTTL', KEYS[1])
return out
";

/// Starts a flush. `KEYS`: the hash, the batch aside, the claim. `ARGV`: the flusher's token,
/// the claim TTL (ms), a new batch id, the batch's TTL (ms). Another live claim: `{'busy'}`. A
/// batch left by a failed or crashed flush is handed out again, with its id (kept inside the
/// batch, field `~batch`, so that the two cannot be separated): `{'batch', id, 1, field, value,
/// ...}`. Otherwise the hash is moved aside in one step (`RENAME`: marks written from then on go
/// to a new hash) and becomes the batch: `{'batch', id, 0, ...}`. Nothing to flush: `{'empty'}`.
/// Every start gives the batch its TTL again: a batch a sink keeps refusing lives as long as
/// flushes keep trying.
pub const BEGIN_SCRIPT: &str = r"
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'busy'} end
local leftover = 1
if redis.call('TYPE', KEYS[2])['ok'] ~= 'hash' then
  leftover = 0
  redis.call('DEL', KEYS[2])
  local kind = redis.call('TYPE', KEYS[1])['ok']
  if kind ~= 'hash' then
    redis.call('DEL', KEYS[3])
    if kind == 'none' then return {'empty'} end
    return redis.error_reply('WRONGTYPE the scratch key holds another type')
  end
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[2], '~batch', ARGV[3])
end
local id = redis.call('HGET', KEYS[2], '~batch')
if not id then
  id = ARGV[3]
  redis.call('HSET', KEYS[2], '~batch', id)
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local out = {'batch', id, leftover}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  if all[i] ~= '~batch' then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
";

/// Ends a flush whose sink succeeded: removes the batch (`KEYS[1]`) if it is still the one
/// delivered (`ARGV[2]`, its id), and the claim (`KEYS[2]`) if it is still the flusher's
/// (`ARGV[1]`). Answers 1 when the batch was removed.
pub const COMMIT_SCRIPT: &str = r"
local done = 0
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' and redis.call('HGET', KEYS[1], '~batch') == ARGV[2] then
  redis.call('DEL', KEYS[1])
  done = 1
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return done
";

/// Gives up a flush whose sink failed: the batch stays for the next flush; the claim
/// (`KEYS[1]`) is removed if it is still the flusher's (`ARGV[1]`).
pub const ABORT_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Fields starting with this are the scratch hash's own (the batch id); marks cannot use them.
pub const RESERVED_FIELD_PREFIX: char = '~';

fn aside_key(key: &Key) -> String {
    sibling_key(key, "flushing")
}

fn claim_key(key: &Key) -> String {
    sibling_key(key, "flush-claim")
}

/// The memory twin: the same four parts per scratch hash, changed under one lock.
#[derive(Default)]
struct Table {
    slots: HashMap<String, Slot>,
}

#[derive(Default)]
struct Slot {
    hash: Option<(BTreeMap<String, String>, Instant)>,
    aside: Option<(BTreeMap<String, String>, String, Instant)>,
    claim: Option<(u64, Instant)>,
}

impl Slot {
    fn expire(&mut self, now: Instant) {
        if self.hash.as_ref().is_some_and(|(_, until)| *until <= now) {
            self.hash = None;
        }
        if self
            .aside
            .as_ref()
            .is_some_and(|(_, _, until)| *until <= now)
        {
            self.aside = None;
        }
        if self.claim.is_some_and(|(_, until)| until <= now) {
            self.claim = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.hash.is_none() && self.aside.is_none() && self.claim.is_none()
    }
}

fn twin(memory: &MemoryLayer) -> Arc<TwinTable<Table>> {
    memory.twin_table()
}

/// Runs `f` on the slot of `key` (expired parts dropped first), removing the slot once empty.
fn with_slot<R>(memory: &MemoryLayer, key: &Key, f: impl FnOnce(&mut Slot, Instant) -> R) -> R {
    let twin = twin(memory);
    let mut table = twin.lock();
    let now = Instant::now();
    let slot = table.slots.entry(key.as_str().to_owned()).or_default();
    slot.expire(now);
    let out = f(slot, now);
    if slot.is_empty() {
        table.slots.remove(key.as_str());
    }
    out
}

fn remaining(ms: i64) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

/// A reply item as text. Bytes that are not UTF-8 (another client's binary value) are replaced
/// (U+FFFD) rather than refused, so that they cannot block a batch.
#[cfg(feature = "redis")]
fn lossy_text(v: redis::Value) -> Result<String> {
    match v {
        redis::Value::BulkString(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        redis::Value::SimpleString(s) => Ok(s),
        redis::Value::Int(n) => Ok(n.to_string()),
        _ => Err(unexpected()),
    }
}

fn unexpected() -> Error {
    Error::new(
        ErrorKind::Script,
        "the scratch script returned an unexpected reply",
    )
}

pub(super) struct Mark<'a> {
    pub(super) key: &'a Key,
    pub(super) fields: &'a [(String, String)],
    pub(super) safety: Ttl,
}

#[async_trait]
impl Operation for Mark<'_> {
    /// The hash's remaining TTL.
    type Output = Option<Duration>;

    fn name(&self) -> &'static str {
        "scratch mark"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Option<Duration>> {
        let mut invocation = SCRIPTS.mark.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .arg(self.safety.as_millis());
        for (field, value) in self.fields {
            invocation.arg(field).arg(value);
        }
        Ok(remaining(redis.invoke::<i64>(&invocation).await?))
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Option<Duration>> {
        Ok(with_slot(memory, self.key, |slot, now| {
            let (hash, until) = slot
                .hash
                .get_or_insert_with(|| (BTreeMap::new(), now + self.safety.as_duration()));
            for (field, value) in self.fields {
                hash.insert(field.clone(), value.clone());
            }
            Some(until.saturating_duration_since(now))
        }))
    }
}

pub(super) struct Read<'a> {
    pub(super) key: &'a Key,
}

#[async_trait]
impl Operation for Read<'_> {
    /// The hash's remaining TTL, and every field (the batch being flushed, then newer marks).
    type Output = (Option<Duration>, BTreeMap<String, String>);

    fn name(&self) -> &'static str {
        "scratch read"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(
        &self,
        redis: &crate::store::redis::RedisLayer,
    ) -> Result<(Option<Duration>, BTreeMap<String, String>)> {
        let mut invocation = SCRIPTS.read.prepare_invoke();
        invocation.key(self.key.as_str()).key(aside_key(self.key));
        let reply: Vec<redis::Value> = redis.invoke(&invocation).await?;
        let mut items = reply.into_iter();
        let ttl = match items.next() {
            Some(redis::Value::Int(ms)) => remaining(ms),
            _ => return Err(unexpected()),
        };
        let texts: Vec<String> = items.map(lossy_text).collect::<Result<_>>()?;
        let fields = texts
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        Ok((ttl, fields))
    }

    async fn on_memory(
        &self,
        memory: &MemoryLayer,
    ) -> Result<(Option<Duration>, BTreeMap<String, String>)> {
        Ok(with_slot(memory, self.key, |slot, now| {
            let mut fields = BTreeMap::new();
            if let Some((aside, _, _)) = &slot.aside {
                fields.extend(aside.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            let mut ttl = None;
            if let Some((hash, until)) = &slot.hash {
                fields.extend(hash.iter().map(|(k, v)| (k.clone(), v.clone())));
                ttl = Some(until.saturating_duration_since(now));
            }
            (ttl, fields)
        }))
    }
}

/// What starting a flush found.
#[derive(Debug)]
pub(super) enum Begun {
    /// Another flusher holds the claim.
    Busy,
    /// Nothing to flush.
    Empty,
    /// A batch to deliver: its id, whether a failed or crashed flush left it, its fields.
    Batch {
        id: String,
        leftover: bool,
        fields: Vec<(String, String)>,
    },
}

pub(super) struct Begin<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
    pub(super) claim: Ttl,
    pub(super) batch_id: &'a str,
    pub(super) batch_ttl: Ttl,
}

#[async_trait]
impl Operation for Begin<'_> {
    type Output = Begun;

    fn name(&self) -> &'static str {
        "scratch flush"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Begun> {
        let mut invocation = SCRIPTS.begin.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(aside_key(self.key))
            .key(claim_key(self.key))
            .arg(self.token)
            .arg(self.claim.as_millis())
            .arg(self.batch_id)
            .arg(self.batch_ttl.as_millis());
        let reply: Vec<redis::Value> = redis.invoke(&invocation).await?;
        let text = lossy_text;
        let mut items = reply.into_iter();
        let head = text(items.next().ok_or_else(unexpected)?)?;
        match head.as_str() {
            "busy" => Ok(Begun::Busy),
            "empty" => Ok(Begun::Empty),
            "batch" => {
                let id = text(items.next().ok_or_else(unexpected)?)?;
                let leftover = matches!(items.next(), Some(redis::Value::Int(1)));
                let rest: Vec<String> = items.map(text).collect::<Result<_>>()?;
                let fields = rest
                    .chunks_exact(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect();
                Ok(Begun::Batch {
                    id,
                    leftover,
                    fields,
                })
            }
            _ => Err(unexpected()),
        }
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Begun> {
        Ok(with_slot(memory, self.key, |slot, now| {
            if slot.claim.is_some() {
                return Begun::Busy;
            }
            let leftover = slot.aside.is_some();
            if !leftover {
                let Some((hash, _)) = slot.hash.take() else {
                    return Begun::Empty;
                };
                slot.aside = Some((
                    hash,
                    self.batch_id.to_owned(),
                    now + self.batch_ttl.as_duration(),
                ));
            }
            slot.claim = Some((self.token, now + self.claim.as_duration()));
            if let Some((_, _, until)) = slot.aside.as_mut() {
                *until = now + self.batch_ttl.as_duration();
            }
            let (fields, id, _) = slot.aside.as_ref().expect("set above");
            Begun::Batch {
                id: id.clone(),
                leftover,
                fields: fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            }
        }))
    }
}

pub(super) struct Commit<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
    pub(super) batch_id: &'a str,
}

#[async_trait]
impl Operation for Commit<'_> {
    /// True when the batch was removed.
    type Output = bool;

    fn name(&self) -> &'static str {
        "scratch flush commit"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<bool> {
        let mut invocation = SCRIPTS.commit.prepare_invoke();
        invocation
            .key(aside_key(self.key))
            .key(claim_key(self.key))
            .arg(self.token)
            .arg(self.batch_id);
        Ok(redis.invoke::<i64>(&invocation).await? == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        Ok(with_slot(memory, self.key, |slot, _| {
            let done = slot
                .aside
                .as_ref()
                .is_some_and(|(_, id, _)| id == self.batch_id);
            if done {
                slot.aside = None;
            }
            if slot.claim.is_some_and(|(token, _)| token == self.token) {
                slot.claim = None;
            }
            done
        }))
    }
}

pub(super) struct Abort<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
}

#[async_trait]
impl Operation for Abort<'_> {
    type Output = ();

    fn name(&self) -> &'static str {
        "scratch flush abort"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<()> {
        let mut invocation = SCRIPTS.abort.prepare_invoke();
        invocation.key(claim_key(self.key)).arg(self.token);
        redis.invoke::<i64>(&invocation).await.map(|_| ())
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<()> {
        with_slot(memory, self.key, |slot, _| {
            if slot.claim.is_some_and(|(token, _)| token == self.token) {
                slot.claim = None;
            }
        });
        Ok(())
    }
}
