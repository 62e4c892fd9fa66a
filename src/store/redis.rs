//! The Redis backend.
//!
//! The default transport is one redis-rs `ConnectionManager`: a multiplexed connection (every
//! task pipelines its commands onto one socket) that reconnects by itself after the server
//! drops it. The opt-in `bb8` feature adds a pooled transport. Both connect lazily, so a service
//! starts even while Redis is down.
//!
//! Values are stored as plain Redis strings (`SET key value PX ttl`), readable with
//! `redis-cli GET`. Multi-key operations are one round trip: `MGET`, a pipeline of `SET`s, one
//! `UNLINK`. Counters are one Lua script (`INCRBY` + `PEXPIRE`) so that the TTL refresh cannot be
//! lost between two commands.
//!
//! Errors come back as [`Error`]s with the password scrubbed; timeouts are applied by the
//! [`Store`](super::Store) wrapper, not here.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisError, Script};

use super::{BackendKind, CacheLayer, Entry, Leased, RateCheck, Remaining, is_lease, lease_marker};
use crate::config::{RedisConfig, Transport};
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Key, KeyPattern, Tag};
use crate::ratelimit::{Algorithm, Decision};
use crate::ttl::Ttl;

// Lua numbers are doubles: returning INCRBY's reply would round counters above 2^53. The new
// value is read back as the exact decimal string Redis stores.
const INCREMENT_SCRIPT: &str = r"
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('GET', KEYS[1])
";

// Reads the key; when it is absent, puts the caller's lease marker in it (one atomic step). A
// value equal to ARGV[3] (one the caller could not decode), or a key of another type than
// string, counts as absent and is replaced.
const GET_OR_LEASE_SCRIPT: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  local value = redis.call('GET', KEYS[1])
  if ARGV[3] == nil or value ~= ARGV[3] then return value end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

// Stores the loaded value only if the key still holds this caller's lease marker.
const SET_LEASED_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

// Adds a member to a tag index (a sorted set scored by the time, in Redis server milliseconds,
// until which the member can live), prunes members past that time, and keeps the index alive at
// least as long as its longest-lived member. Touches only the index key.
const TAG_ADD_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local life = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], 'GT', now + life, ARGV[1])
if redis.call('PTTL', KEYS[1]) < life then
  redis.call('PEXPIRE', KEYS[1], life)
end
return 1
";

// After a tag's members were removed, drops them from the index, but only those whose score
// is still the one that was read: a member registered again meanwhile (a new load) stays.
// ARGV holds member, score pairs. Touches only the index key.
const TAG_FORGET_SCRIPT: &str = r"
local forgotten = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    forgotten = forgotten + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return forgotten
";

// Rate limiting: every layer of one check in one script, on Redis server time (microseconds).
// ARGV holds five values per layer: algorithm (1 fixed window, 2 sliding log, 3 sliding window,
// 4 GCRA), limit, window (us), burst, and a unique member for the log. Every layer is evaluated
// first; only if all admit are their states written, so a denied request counts nowhere.
// Returns four integers per layer: admitted (0/1), remaining, reset (us), retry (us, -1 if none).
// Integers are written with %d: Lua's tostring would round microsecond timestamps.
const RATE_LIMIT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function int(x) return string.format('%d', x) end
local function ms(us) return int(math.ceil(us / 1000) + 1) end
local function sliding_retry(prev, cur, limit, w, elapsed)
  if cur < limit and prev > 0 then
    local room = limit * w - (cur + 1) * w
    local e_min = w - math.min(math.floor(room / prev), w)
    if e_min < w then return math.max(e_min, elapsed + 1) - elapsed end
  end
  local to_next = w - elapsed
  if cur == 0 then return to_next end
  local e_min = w - math.min(math.floor((limit - 1) * w / cur), w)
  return to_next + e_min
end
local out, writes, all = {}, {}, true
for i = 1, #KEYS do
  local b = (i - 1) * 5
  local algo, limit, w = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local burst, member, key = tonumber(ARGV[b + 4]), ARGV[b + 5], KEYS[i]
  local ok, remaining, reset, retry = 0, 0, 0, -1
  if algo == 1 then
    local idx, count = math.floor(now / w), 0
    local v = redis.call('GET', key)
    if v then
      local si, sc = string.match(v, '^(%d+):(%d+)$')
      if tonumber(si) == idx then count = tonumber(sc) end
    end
    reset = (idx + 1) * w - now
    if count < limit then
      ok, remaining = 1, limit - count - 1
      writes[i] = {'SET', key, int(idx) .. ':' .. int(count + 1), 'PX', ms(reset)}
    else
      retry = reset
    end
  elseif algo == 2 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - w))
    local count = redis.call('ZCARD', key)
    if count < limit then
      ok, remaining, reset = 1, limit - count - 1, w
      writes[i] = {'LOG', key, int(now), member, ms(w)}
    else
      local oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
      local newest = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
      retry, reset = math.max(oldest + w - now, 1), math.max(newest + w - now, 1)
    end
  elseif algo == 3 then
    local idx, prev, cur = math.floor(now / w), 0, 0
    local v = redis.call('GET', key)
    if v then
      local si, sp, sc = string.match(v, '^(%d+):(%d+):(%d+)$')
      si = tonumber(si)
      if si == idx then prev, cur = tonumber(sp), tonumber(sc)
      elseif si == idx - 1 then prev = tonumber(sc) end
    end
    local elapsed = now - idx * w
    local weighted = prev * (w - elapsed) + (cur + 1) * w
    if weighted <= limit * w then
      ok, remaining, reset = 1, math.floor((limit * w - weighted) / w), (idx + 2) * w - now
      writes[i] = {'SET', key, int(idx) .. ':' .. int(prev) .. ':' .. int(cur + 1), 'PX', ms(2 * w)}
    else
      retry = sliding_retry(prev, cur, limit, w, elapsed)
      if cur > 0 then reset = (idx + 2) * w - now else reset = (idx + 1) * w - now end
      reset = math.max(reset, retry)
    end
  else
    local tick = w / limit
    local tau = tick * (burst - 1)
    local tat = now
    local v = redis.call('GET', key)
    if v then tat = math.max(tonumber(v), now) end
    if tat - now > tau then
      retry, reset = math.max(tat - tau - now, 1), tat - now
    else
      local nxt = tat + tick
      ok, reset = 1, nxt - now
      if now + tau >= nxt then remaining = math.floor((now + tau - nxt) / tick) + 1 end
      writes[i] = {'SET', key, string.format('%.3f', nxt), 'PX', ms(nxt - now)}
    end
  end
  if ok == 0 then all = false end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = ok, remaining, math.ceil(reset), retry
end
if all then
  for i = 1, #KEYS do
    local wr = writes[i]
    if wr then
      if wr[1] == 'LOG' then
        redis.call('ZADD', wr[2], wr[3], wr[4])
        redis.call('PEXPIRE', wr[2], wr[5])
      else
        redis.call('SET', wr[2], wr[3], 'PX', wr[5])
      end
    end
  end
end
for i = 1, #out do out[i] = math.ceil(out[i]) end
return out
";

// The most common check, one GCRA layer, with nothing else to evaluate: the same rule as the
// general script, in the fewest Lua steps. ARGV: emission interval and burst tolerance (us).
// A Lua number passed to redis.call is written with 17 significant digits, so the TAT keeps its
// sub-microsecond part; numbers in the reply are truncated to integers.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tick, tau = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > tau then
  return {0, 0, tat - now, tat - tau - now}
end
local nxt = tat + tick
redis.call('SET', KEYS[1], nxt, 'PX', math.floor((nxt - now) / 1000) + 2)
local remaining = 0
if now + tau >= nxt then remaining = math.floor((now + tau - nxt) / tick) + 1 end
return {1, remaining, nxt - now, -1}
";

/// Members removed per `UNLINK` when a tag is invalidated.
const UNLINK_BATCH: usize = 512;

enum Conn {
    Multiplexed(ConnectionManager),
    #[cfg(feature = "bb8")]
    Pooled(bb8_redis::bb8::Pool<pool::Manager>),
}

/// Redis [`CacheLayer`].
///
/// ```no_run
/// use speedlayer::config::RedisConfig;
/// use speedlayer::store::redis::RedisLayer;
///
/// # async fn demo() -> speedlayer::Result<()> {
/// let redis = RedisLayer::connect(&RedisConfig::from_url("redis://127.0.0.1:6379")?).await?;
/// # Ok(()) }
/// ```
pub struct RedisLayer {
    conn: Conn,
    config: RedisConfig,
    increment: Script,
    get_or_lease: Script,
    set_leased: Script,
    tag_forget: Script,
    rate_limit: Script,
    gcra: Script,
}

impl RedisLayer {
    /// Prepares the connection. It is made lazily: this succeeds while the server is down, and
    /// the first operations then fail (and reconnect) until it is up. Fails only for invalid
    /// configuration.
    pub async fn connect(config: &RedisConfig) -> Result<RedisLayer> {
        let info = config.connection_info()?;
        let client = redis::Client::open(info).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "cannot use Redis at {config}: {}",
                    config.scrub(&e.to_string())
                ),
            )
        })?;
        let conn = match config.get_transport() {
            Transport::Multiplexed => {
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.get_connect_timeout()))
                    // The Store bounds every call; a driver-side timeout would only race it.
                    .set_response_timeout(None)
                    // Reconnect quickly and give up soon: while a reconnect is pending every
                    // call waits on it, and the next failing call starts a new one anyway.
                    .set_min_delay(Duration::from_millis(20))
                    .set_max_delay(Duration::from_millis(500))
                    .set_number_of_retries(2);
                let manager = ConnectionManager::new_lazy_with_config(client, manager_config)
                    .map_err(|e| map_error(config, e))?;
                Conn::Multiplexed(manager)
            }
            #[cfg(feature = "bb8")]
            Transport::Pooled { size } => Conn::Pooled(pool::build(client, config, size)),
            #[cfg(not(feature = "bb8"))]
            Transport::Pooled { .. } => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "the pooled transport needs speedlayer's `bb8` feature",
                ));
            }
        };
        Ok(RedisLayer {
            conn,
            config: config.clone(),
            increment: Script::new(INCREMENT_SCRIPT),
            get_or_lease: Script::new(GET_OR_LEASE_SCRIPT),
            set_leased: Script::new(SET_LEASED_SCRIPT),
            tag_forget: Script::new(TAG_FORGET_SCRIPT),
            rate_limit: Script::new(RATE_LIMIT_SCRIPT),
            gcra: Script::new(GCRA_SCRIPT),
        })
    }

    /// Runs one command.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let result = match &self.conn {
            Conn::Multiplexed(manager) => cmd.query_async(&mut manager.clone()).await,
            #[cfg(feature = "bb8")]
            Conn::Pooled(p) => pool::run(p, async |c| cmd.query_async(c).await).await,
        };
        result.map_err(|e| map_error(&self.config, e))
    }

    /// Runs a pipeline (one round trip).
    async fn query_pipeline<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        let result = match &self.conn {
            Conn::Multiplexed(manager) => pipe.query_async(&mut manager.clone()).await,
            #[cfg(feature = "bb8")]
            Conn::Pooled(p) => pool::run(p, async |c| pipe.query_async(c).await).await,
        };
        result.map_err(|e| map_error(&self.config, e))
    }

    /// Runs a script (`EVALSHA`, loading it once if the server does not know it).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let result = match &self.conn {
            Conn::Multiplexed(manager) => invocation.invoke_async(&mut manager.clone()).await,
            #[cfg(feature = "bb8")]
            Conn::Pooled(p) => pool::run(p, async |c| invocation.invoke_async(c).await).await,
        };
        result.map_err(|e| map_error(&self.config, e))
    }
}

/// Maps a driver error to a crate error: data errors (wrong type, not an integer) stay the
/// caller's, everything else is an availability error.
fn map_error(config: &RedisConfig, e: RedisError) -> Error {
    let text = config.scrub(&e.to_string());
    let code = e.code().unwrap_or_default();
    let lower = text.to_ascii_lowercase();
    let kind = if code == "WRONGTYPE" || lower.contains("not an integer") {
        ErrorKind::WrongType
    } else if lower.contains("overflow") {
        ErrorKind::Overflow
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        ErrorKind::Connection
    } else {
        ErrorKind::Backend
    };
    let message = match kind {
        ErrorKind::WrongType => {
            format!("the Redis value has a type this operation cannot use ({text})")
        }
        ErrorKind::Connection => format!("cannot reach Redis at {config} ({text})"),
        _ => format!("Redis at {config}: {text}"),
    };
    Error::new(kind, message)
}

fn bytes_of(value: Option<Vec<u8>>) -> Option<Bytes> {
    value.map(Bytes::from)
}

impl fmt::Debug for RedisLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transport = match &self.conn {
            Conn::Multiplexed(_) => "multiplexed",
            #[cfg(feature = "bb8")]
            Conn::Pooled(_) => "pooled",
        };
        f.debug_struct("RedisLayer")
            .field("target", &format_args!("{}", self.config))
            .field("transport", &transport)
            .finish()
    }
}

#[async_trait]
impl CacheLayer for RedisLayer {
    fn kind(&self) -> BackendKind {
        BackendKind::Redis
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key.as_str());
        self.query::<Option<Vec<u8>>>(&cmd).await.map(bytes_of)
    }

    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(key.as_str());
        }
        let values: Vec<Option<Vec<u8>>> = self.query(&cmd).await?;
        Ok(values.into_iter().map(bytes_of).collect())
    }

    async fn set(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key.as_str())
            .arg(value.as_ref())
            .arg("PX")
            .arg(ttl.as_millis());
        self.query::<()>(&cmd).await
    }

    async fn set_many(&self, entries: &[Entry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for entry in entries {
            pipe.cmd("SET")
                .arg(entry.key.as_str())
                .arg(entry.value.as_ref())
                .arg("PX")
                .arg(entry.ttl.as_millis())
                .ignore();
        }
        self.query_pipeline::<()>(&pipe).await
    }

    async fn delete(&self, key: &Key) -> Result<bool> {
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(key.as_str());
        self.query::<u64>(&cmd).await.map(|n| n > 0)
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("UNLINK");
        for key in keys {
            cmd.arg(key.as_str());
        }
        self.query(&cmd).await
    }

    async fn remaining_ttl(&self, key: &Key) -> Result<Remaining> {
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(key.as_str());
        Ok(match self.query::<i64>(&cmd).await? {
            -2 => Remaining::Missing,
            -1 => Remaining::NoExpiry,
            ms => Remaining::Expires(Duration::from_millis(ms.max(0) as u64)),
        })
    }

    async fn set_if_absent(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key.as_str())
            .arg(value.as_ref())
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis());
        self.query::<Option<String>>(&cmd)
            .await
            .map(|reply| reply.is_some())
    }

    async fn increment(&self, key: &Key, delta: i64, ttl: Ttl) -> Result<i64> {
        let mut invocation = self.increment.prepare_invoke();
        invocation.key(key.as_str()).arg(delta).arg(ttl.as_millis());
        self.invoke(&invocation).await
    }

    async fn get_or_lease(
        &self,
        key: &Key,
        token: u64,
        lease_ttl: Ttl,
        replace: Option<&[u8]>,
    ) -> Result<Leased> {
        let mut invocation = self.get_or_lease.prepare_invoke();
        invocation
            .key(key.as_str())
            .arg(lease_marker(token).as_ref())
            .arg(lease_ttl.as_millis());
        if let Some(replace) = replace {
            invocation.arg(replace);
        }
        Ok(match self.invoke::<redis::Value>(&invocation).await? {
            redis::Value::BulkString(bytes) if is_lease(&bytes) => Leased::Denied,
            redis::Value::BulkString(bytes) => Leased::Value(Bytes::from(bytes)),
            redis::Value::Int(1) => Leased::Granted,
            _ => Leased::Denied,
        })
    }

    async fn set_leased(&self, key: &Key, token: u64, value: Bytes, ttl: Ttl) -> Result<bool> {
        let mut invocation = self.set_leased.prepare_invoke();
        invocation
            .key(key.as_str())
            .arg(lease_marker(token).as_ref())
            .arg(value.as_ref())
            .arg(ttl.as_millis());
        self.invoke::<i64>(&invocation)
            .await
            .map(|stored| stored == 1)
    }

    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        // One round trip for all tags. Each script touches one index key; EVAL (not EVALSHA)
        // so that a pipeline needs no NOSCRIPT handling.
        let mut pipe = redis::pipe();
        for tag in tags {
            pipe.cmd("EVAL")
                .arg(TAG_ADD_SCRIPT)
                .arg(1)
                .arg(tag.as_str())
                .arg(member.as_str())
                .arg(ttl.as_millis())
                .ignore();
        }
        self.query_pipeline::<()>(&pipe).await
    }

    async fn invalidate_tag(&self, tag: &Tag) -> Result<u64> {
        // Read the members, remove them, then drop them from the index. The index goes last, so
        // that an invalidation cut short (timeout, restart) leaves the rest findable and can be
        // run again; a load that registers after the read began after the database write, so it
        // reads fresh data and may be cached.
        let mut range = redis::cmd("ZRANGE");
        range.arg(tag.as_str()).arg(0).arg(-1).arg("WITHSCORES");
        let members: Vec<(Vec<u8>, String)> = self.query(&range).await?;
        let mut removed = 0;
        for batch in members.chunks(UNLINK_BATCH) {
            let mut unlink = redis::cmd("UNLINK");
            for (member, _) in batch {
                unlink.arg(member.as_slice());
            }
            removed += self.query::<u64>(&unlink).await?;
            let mut forget = self.tag_forget.prepare_invoke();
            forget.key(tag.as_str());
            for (member, score) in batch {
                forget.arg(member.as_slice()).arg(score.as_str());
            }
            self.invoke::<i64>(&forget).await?;
        }
        Ok(removed)
    }

    async fn sweep(&self, pattern: &KeyPattern, batch: usize, max_removed: u64) -> Result<u64> {
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern.glob())
                .arg("COUNT")
                .arg(batch.max(1));
            let (next, keys): (u64, Vec<String>) = self.query(&scan).await?;
            let victims: Vec<&String> = keys
                .iter()
                .filter(|k| pattern.matches_str(k))
                .take((max_removed - removed).min(usize::MAX as u64) as usize)
                .collect();
            if !victims.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                for key in &victims {
                    unlink.arg(key.as_str());
                }
                removed += self.query::<u64>(&unlink).await?;
            }
            cursor = next;
            if cursor == 0 || removed >= max_removed {
                return Ok(removed);
            }
        }
    }

    async fn rate_limit(&self, checks: &[RateCheck]) -> Result<Vec<Decision>> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let single_gcra = match checks {
            [check] => match check.limit.algorithm() {
                Algorithm::Gcra { burst } => Some((check, burst)),
                _ => None,
            },
            _ => None,
        };
        let invocation = match single_gcra {
            Some((check, burst)) => {
                let tick = check.limit.window().as_micros() as f64 / f64::from(check.limit.limit());
                let mut invocation = self.gcra.prepare_invoke();
                invocation
                    .key(check.key.as_str())
                    .arg(tick)
                    .arg(tick * f64::from(burst.get() - 1));
                invocation
            }
            None => {
                let mut invocation = self.rate_limit.prepare_invoke();
                for check in checks {
                    let (code, burst) = match check.limit.algorithm() {
                        Algorithm::FixedWindow => (1, 1),
                        Algorithm::SlidingLog => (2, 1),
                        Algorithm::SlidingWindow => (3, 1),
                        Algorithm::Gcra { burst } => (4, burst.get()),
                    };
                    invocation
                        .key(check.key.as_str())
                        .arg(code)
                        .arg(check.limit.limit())
                        .arg(check.limit.window().as_micros() as u64)
                        .arg(burst)
                        // A sliding log's member suffix, so equal timestamps stay distinct;
                        // unused by the other algorithms.
                        .arg(if code == 2 { rand::random::<u64>() } else { 0 });
                }
                invocation
            }
        };
        let flat: Vec<i64> = self.invoke(&invocation).await?;
        if flat.len() != checks.len() * 4 {
            return Err(Error::new(
                ErrorKind::Backend,
                "the rate-limit script returned an unexpected reply",
            ));
        }
        let us = |v: i64| Duration::from_micros(v.max(0) as u64);
        Ok(flat
            .chunks(4)
            .zip(checks)
            .map(|(r, check)| Decision {
                allowed: r[0] == 1,
                limit: check.limit.quota(),
                remaining: r[1].clamp(0, i64::from(u32::MAX)) as u32,
                reset_after: us(r[2]),
                retry_after: (r[3] >= 0).then(|| us(r[3].max(1))),
            })
            .collect())
    }

    async fn ping(&self) -> Result<()> {
        self.query::<()>(&redis::cmd("PING")).await
    }
}

#[cfg(feature = "bb8")]
mod pool {
    //! The pooled transport.
    //!
    //! bb8-redis's own manager never reports a multiplexed connection as broken, so a pool that
    //! skips the PING on every check-out would keep dead connections after a Redis restart. This
    //! manager marks a connection broken when a command on it fails at the connection level, and
    //! bb8 then replaces it; check-outs stay PING-free.

    use bb8_redis::bb8;
    use redis::aio::MultiplexedConnection;
    use redis::{AsyncConnectionConfig, RedisError, RedisResult};

    use crate::config::RedisConfig;

    /// bb8's limit on waiting for a connection; the Store's timeout is what callers feel.
    const POOL_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

    pub(super) struct Manager {
        client: redis::Client,
        config: AsyncConnectionConfig,
    }

    pub(super) struct Pooled {
        conn: MultiplexedConnection,
        broken: bool,
    }

    impl bb8::ManageConnection for Manager {
        type Connection = Pooled;
        type Error = RedisError;

        async fn connect(&self) -> Result<Pooled, RedisError> {
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            Ok(Pooled {
                conn,
                broken: false,
            })
        }

        async fn is_valid(&self, conn: &mut Pooled) -> Result<(), RedisError> {
            redis::cmd("PING").query_async(&mut conn.conn).await
        }

        fn has_broken(&self, conn: &mut Pooled) -> bool {
            conn.broken
        }
    }

    pub(super) fn build(
        client: redis::Client,
        config: &RedisConfig,
        size: u32,
    ) -> bb8::Pool<Manager> {
        let manager = Manager {
            client,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.get_connect_timeout()))
                .set_response_timeout(None),
        };
        bb8::Pool::builder()
            .max_size(size.max(1))
            .test_on_check_out(false)
            // Waiting for a check-out is bounded by the Store's operation timeout, which wraps
            // the whole call; bb8's own limit (which also covers the wait) must not cut it
            // shorter. Connecting is bounded by the client's connection timeout.
            .connection_timeout(POOL_WAIT_LIMIT)
            .build_unchecked(manager)
    }

    pub(super) async fn run<T>(
        pool: &bb8::Pool<Manager>,
        f: impl AsyncFnOnce(&mut MultiplexedConnection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let mut pooled = pool.get().await.map_err(|e| match e {
            bb8::RunError::User(e) => e,
            bb8::RunError::TimedOut => RedisError::from((
                redis::ErrorKind::Io,
                "timed out waiting for a pooled connection",
            )),
        })?;
        let result = f(&mut pooled.conn).await;
        if let Err(e) = &result
            && (e.is_unrecoverable_error() || e.is_io_error())
        {
            pooled.broken = true;
        }
        result
    }
}
