//! The lock's atomic steps as store [`Operation`]s: its Redis scripts and its memory twin, with
//! the same rules.
//!
//! On Redis a lock is two keys in one hash slot: the lock key, holding the holder's fencing token
//! for the lease (`SET NX PX`), and the fence key beside it (`{<lock key>}:~fence`), holding the
//! last token issued. A token is `max(last + 1, Redis server time in microseconds)`: it strictly
//! increases per lock name while the fence key lives, and after the fence key was lost (a
//! restart without persistence, a failover to a replica that had not received it) it starts
//! again above every token issued before, from the server's clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::key::Key;
use crate::store::{MemoryLayer, Operation, TwinTable, sibling_key};
use crate::ttl::Ttl;

/// Takes the lock if it is free and issues a token: `KEYS[1]` the lock, `KEYS[2]` its fence,
/// `ARGV[1]` the lease (ms), `ARGV[2]` how long the fence key lives (ms). Answers `{1, token}`,
/// or `{0, remaining lease of the holder (ms)}`. A fence that is not a number below 2^53 (another
/// client's value) is ignored; at the lock key another client's value is respected as a holder
/// until its TTL ends (a value without TTL gets the lease as its TTL, so a foreign key cannot
/// block the lock for good).
pub const ACQUIRE_SCRIPT: &str = r"
local held = redis.call('PTTL', KEYS[1])
if held ~= -2 then
  if held == -1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
    held = tonumber(ARGV[1])
  end
  return {0, string.format('%d', held)}
end
local t = redis.call('TIME')
local token = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = redis.pcall('GET', KEYS[2])
if type(last) == 'string' then
  last = tonumber(last)
  if last and last == last and last + 1 > token and last < 9007199254740991 then
    token = last + 1
  end
end
token = string.format('%d', token)
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
redis.call('SET', KEYS[2], token, 'PX', ARGV[2])
return {1, token}
";

/// Releases the lock if `ARGV[1]` (a token) still holds it: compare-and-delete. Answers 1 or 0.
pub const RELEASE_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// Extends the lease to `ARGV[2]` ms if `ARGV[1]` (a token) still holds the lock:
/// compare-and-`PEXPIRE`. Answers 1 or 0.
pub const EXTEND_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// How long a fence key lives after its last token: tokens keep increasing for the lock's
/// whole life, and after that they start again from the server's clock, above every token it
/// issued (a token is at least the time it was issued, in microseconds).
pub(super) const FENCE_TTL: Ttl = Ttl::MAX;

/// The fence key of a lock key: `{<lock key>}:~fence`, in the same Redis Cluster slot.
pub(super) fn fence_key(lock: &Key) -> String {
    sibling_key(lock, "fence")
}

/// The scripts, loaded once.
#[cfg(feature = "redis")]
struct Scripts {
    acquire: redis::Script,
    release: redis::Script,
    extend: redis::Script,
}

#[cfg(feature = "redis")]
static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    acquire: redis::Script::new(ACQUIRE_SCRIPT),
    release: redis::Script::new(RELEASE_SCRIPT),
    extend: redis::Script::new(EXTEND_SCRIPT),
});

/// The memory twin: one table per memory layer, shared by every [`Locks`](super::Locks) on it.
/// Bounded: whenever it has doubled, slots that hold nothing are dropped (the next token of a
/// dropped name still exceeds the last one, since tokens are at least the clock).
#[derive(Default)]
struct Table {
    slots: HashMap<String, Slot>,
    /// Slots after the last prune.
    pruned_len: usize,
}

struct Slot {
    /// The holder's token, until when it holds (`None`: free).
    holder: Option<(u64, Instant)>,
    /// The last token issued.
    last: u64,
}

impl Table {
    /// Drops the slots that hold nothing and whose last token is behind the clock, once the
    /// table has doubled since the last prune (amortized O(1) per acquisition).
    fn prune(&mut self, now: Instant) {
        if self.slots.len() < (2 * self.pruned_len).max(1024) {
            return;
        }
        let floor = epoch_micros();
        self.slots.retain(|_, slot| {
            slot.holder.is_some_and(|(_, until)| until > now) || slot.last >= floor
        });
        self.pruned_len = self.slots.len();
    }
}

fn twin(memory: &MemoryLayer) -> Arc<TwinTable<Table>> {
    memory.twin_table()
}

/// Microseconds since the Unix epoch: the memory twin's token floor, as Redis's `TIME` is.
fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// What an acquisition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// Granted, with this token.
    Token(u64),
    /// Held by another, for this long still.
    Held(Duration),
}

pub(super) struct Acquire<'a> {
    pub(super) key: &'a Key,
    pub(super) lease: Ttl,
}

#[async_trait]
impl Operation for Acquire<'_> {
    type Output = Taken;

    fn name(&self) -> &'static str {
        "lock acquire"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Taken> {
        let mut invocation = SCRIPTS.acquire.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .key(fence_key(self.key))
            .arg(self.lease.as_millis())
            .arg(FENCE_TTL.as_millis());
        let (granted, value): (i64, String) = redis.invoke(&invocation).await?;
        let value: u64 = value.parse().map_err(|_| {
            Error::new(
                ErrorKind::Script,
                "the lock script returned an unexpected reply",
            )
        })?;
        Ok(if granted == 1 {
            Taken::Token(value)
        } else {
            Taken::Held(Duration::from_millis(value))
        })
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Taken> {
        let twin = twin(memory);
        let mut table = twin.lock();
        let now = Instant::now();
        table.prune(now);
        let slot = table
            .slots
            .entry(self.key.as_str().to_owned())
            .or_insert(Slot {
                holder: None,
                last: 0,
            });
        if let Some((_, until)) = slot.holder
            && until > now
        {
            return Ok(Taken::Held(until - now));
        }
        let token = (slot.last + 1).max(epoch_micros());
        slot.last = token;
        slot.holder = Some((token, now + self.lease.as_duration()));
        Ok(Taken::Token(token))
    }
}

pub(super) struct Release<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
}

#[async_trait]
impl Operation for Release<'_> {
    type Output = bool;

    fn name(&self) -> &'static str {
        "lock release"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<bool> {
        let mut invocation = SCRIPTS.release.prepare_invoke();
        invocation.key(self.key.as_str()).arg(self.token);
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        let twin = twin(memory);
        let mut table = twin.lock();
        let now = Instant::now();
        Ok(match table.slots.get_mut(self.key.as_str()) {
            Some(slot) if matches!(slot.holder, Some((t, until)) if t == self.token && until > now) =>
            {
                slot.holder = None;
                true
            }
            _ => false,
        })
    }
}

pub(super) struct Extend<'a> {
    pub(super) key: &'a Key,
    pub(super) token: u64,
    pub(super) lease: Ttl,
}

#[async_trait]
impl Operation for Extend<'_> {
    type Output = bool;

    fn name(&self) -> &'static str {
        "lock extend"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<bool> {
        let mut invocation = SCRIPTS.extend.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .arg(self.token)
            .arg(self.lease.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        let twin = twin(memory);
        let mut table = twin.lock();
        let now = Instant::now();
        Ok(match table.slots.get_mut(self.key.as_str()) {
            Some(slot) => match &mut slot.holder {
                Some((t, until)) if *t == self.token && *until > now => {
                    *until = now + self.lease.as_duration();
                    true
                }
                _ => false,
            },
            None => false,
        })
    }
}
