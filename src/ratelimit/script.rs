//! The rate limiter's atomic step, as a store [`Operation`]: its Redis scripts and its memory
//! twin ([`MemoryLimiter`]), with the same rules. The scripts' Lua source is public, for
//! benchmarks and for other services that want to check the same counters.
//!
//! On Redis every check is one script, one round trip, on server time (`TIME`, microseconds), so
//! that every app server agrees on the windows. A one-layer check (the common case) runs a script
//! written for its algorithm alone, with the fewest server calls; a multi-layer check runs the
//! general script, which evaluates every layer first and writes only if all admit.
//!
//! A counter key may hold another client's data (another type, a value of another shape, no
//! TTL): the scripts read it as an empty state and overwrite it on the next admission, never
//! failing on it (a script error would be a refused check, and the check must be answered).

use std::sync::Arc;
#[cfg(feature = "redis")]
use std::sync::LazyLock;
#[cfg(feature = "redis")]
use std::time::Duration;

use async_trait::async_trait;

use super::RateCheck;
#[cfg(feature = "redis")]
use super::limit::Algorithm;
use super::limit::Decision;
use super::memory::{DEFAULT_MAX_KEYS, MemoryLimiter};
use crate::error::Result;
use crate::store::{MemoryLayer, Operation};

// Every script returns four integers per layer: admitted (0/1), remaining, reset (us), retry
// (us, -1 if none). Lua numbers are doubles: microsecond timestamps (~1.8e15) are exact, and
// string.format('%d') writes them without the rounding of tostring.
//
// Each algorithm is written once, as a Lua function of the layer's key and parameters that
// answers `ok, remaining, reset, retry, write` (the write to make if the check admits, or nil);
// the general script and the one-layer scripts are put together from these pieces.

/// Server time and the helpers every script uses.
macro_rules! prelude {
    () => {
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function int(x) return string.format('%d', x) end
local function ms(us) return int(math.ceil(us / 1000) + 1) end
local function apply(wr)
  if wr[1] == 'LOG' then
    if wr[6] then redis.call('DEL', wr[2]) end
    redis.call('ZADD', wr[2], wr[3], wr[4])
    redis.call('PEXPIRE', wr[2], wr[5])
  else
    redis.call('SET', wr[2], wr[3], 'PX', wr[4])
  end
end
"
    };
}

/// Fixed window: the key holds `<window index>:<count>`.
macro_rules! fixed_fn {
    () => {
        r"
local function fixed(key, limit, w)
  local idx, count = math.floor(now / w), 0
  local v = redis.pcall('GET', key)
  if type(v) == 'string' then
    local si, sc = string.match(v, '^(%d+):(%d+)$')
    if tonumber(si) == idx then count = tonumber(sc) end
  end
  local reset = (idx + 1) * w - now
  if count < limit then
    return 1, limit - count - 1, reset, -1, {'SET', key, int(idx) .. ':' .. int(count + 1), ms(reset)}
  end
  return 0, 0, reset, reset, nil
end
"
    };
}

/// Sliding log: the key is a sorted set of admission times; another type there is replaced.
macro_rules! log_fn {
    () => {
        r"
local function log(key, limit, w, member)
  local count, replace = 0, false
  if type(redis.pcall('ZREMRANGEBYSCORE', key, '-inf', int(now - w))) == 'number' then
    count = redis.call('ZCARD', key)
  else
    replace = true
  end
  if count < limit then
    return 1, limit - count - 1, w, -1, {'LOG', key, int(now), member, ms(w), replace}
  end
  local oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
  local newest = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
  return 0, 0, math.max(newest + w - now, 1), math.max(oldest + w - now, 1), nil
end
"
    };
}

/// Sliding window: the key holds `<window index>:<previous count>:<current count>`.
macro_rules! sliding_fn {
    () => {
        r"
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
local function sliding(key, limit, w)
  local idx, prev, cur = math.floor(now / w), 0, 0
  local v = redis.pcall('GET', key)
  if type(v) == 'string' then
    local si, sp, sc = string.match(v, '^(%d+):(%d+):(%d+)$')
    si = tonumber(si)
    if si == idx then prev, cur = tonumber(sp), tonumber(sc)
    elseif si == idx - 1 then prev = tonumber(sc) end
  end
  local elapsed = now - idx * w
  local weighted = prev * (w - elapsed) + (cur + 1) * w
  if weighted <= limit * w then
    return 1, math.floor((limit * w - weighted) / w), (idx + 2) * w - now, -1,
      {'SET', key, int(idx) .. ':' .. int(prev) .. ':' .. int(cur + 1), ms(2 * w)}
  end
  local retry = sliding_retry(prev, cur, limit, w, elapsed)
  local reset = (idx + 1) * w - now
  if cur > 0 then reset = reset + w end
  return 0, 0, math.max(reset, retry), retry, nil
end
"
    };
}

/// GCRA: the key holds the theoretical arrival time (us, to the nanosecond).
macro_rules! gcra_fn {
    () => {
        r"
local function gcra(key, tick, tau)
  local tat = now
  local v = redis.pcall('GET', key)
  if type(v) == 'string' then tat = tonumber(v) or now end
  -- Not a number, in the past, or later than any admission can have left it ('inf', '1e300'):
  -- another client's value, read as an empty state.
  if not (tat >= now) or tat > now + tau + tick then tat = now end
  if tat - now > tau then
    return 0, 0, tat - now, math.max(tat - tau - now, 1), nil
  end
  local nxt = tat + tick
  local remaining = 0
  if now + tau >= nxt then remaining = math.floor((now + tau - nxt) / tick) + 1 end
  return 1, remaining, nxt - now, -1, {'SET', key, string.format('%.3f', nxt), ms(nxt - now)}
end
"
    };
}

/// The end of a one-layer script: `ok, remaining, reset, retry, wr` are set.
macro_rules! one_layer_tail {
    () => {
        r"
if wr then apply(wr) end
return {ok, remaining, math.ceil(reset), math.ceil(retry)}
"
    };
}

/// The general script: every layer of one check, on Redis server time (microseconds). ARGV holds
/// five values per layer: algorithm (1 fixed window, 2 sliding log, 3 sliding window, 4 GCRA),
/// limit, window (us), burst, and a unique member for the log. Every layer is evaluated first;
/// only if all admit are their states written, so a denied request counts nowhere.
pub const RATE_LIMIT_SCRIPT: &str = concat!(
    prelude!(),
    fixed_fn!(),
    log_fn!(),
    sliding_fn!(),
    gcra_fn!(),
    r"
local out, writes, all = {}, {}, true
for i = 1, #KEYS do
  local b = (i - 1) * 5
  local algo, limit, w = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local key = KEYS[i]
  local ok, remaining, reset, retry, wr
  if algo == 1 then
    ok, remaining, reset, retry, wr = fixed(key, limit, w)
  elseif algo == 2 then
    ok, remaining, reset, retry, wr = log(key, limit, w, ARGV[b + 5])
  elseif algo == 3 then
    ok, remaining, reset, retry, wr = sliding(key, limit, w)
  else
    local tick = w / limit
    ok, remaining, reset, retry, wr = gcra(key, tick, tick * (tonumber(ARGV[b + 4]) - 1))
  end
  if ok == 0 then all = false end
  writes[i] = wr
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = ok, remaining, math.ceil(reset), math.ceil(retry)
end
if all then
  for i = 1, #KEYS do
    if writes[i] then apply(writes[i]) end
  end
end
return out
"
);

/// One fixed-window layer. ARGV: limit, window (us).
pub const FIXED_WINDOW_SCRIPT: &str = concat!(
    prelude!(),
    fixed_fn!(),
    r"
local ok, remaining, reset, retry, wr = fixed(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
",
    one_layer_tail!()
);

/// One sliding-log layer. ARGV: limit, window (us), a unique member.
pub const SLIDING_LOG_SCRIPT: &str = concat!(
    prelude!(),
    log_fn!(),
    r"
local ok, remaining, reset, retry, wr = log(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
",
    one_layer_tail!()
);

/// One sliding-window layer. ARGV: limit, window (us).
pub const SLIDING_WINDOW_SCRIPT: &str = concat!(
    prelude!(),
    sliding_fn!(),
    r"
local ok, remaining, reset, retry, wr = sliding(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
",
    one_layer_tail!()
);

/// One GCRA layer. ARGV: emission interval and burst tolerance (us).
pub const GCRA_SCRIPT: &str = concat!(
    prelude!(),
    gcra_fn!(),
    r"
local ok, remaining, reset, retry, wr = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
",
    one_layer_tail!()
);

#[cfg(feature = "redis")]
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    general: redis::Script::new(RATE_LIMIT_SCRIPT),
    fixed: redis::Script::new(FIXED_WINDOW_SCRIPT),
    log: redis::Script::new(SLIDING_LOG_SCRIPT),
    sliding: redis::Script::new(SLIDING_WINDOW_SCRIPT),
    gcra: redis::Script::new(GCRA_SCRIPT),
});

#[cfg(feature = "redis")]
struct Scripts {
    general: redis::Script,
    fixed: redis::Script,
    log: redis::Script,
    sliding: redis::Script,
    gcra: redis::Script,
}

/// The memory twin's state on a memory layer: one limiter per layer, shared by every
/// [`RateLimiter`](super::RateLimiter) on it, as they would share one Redis.
pub(super) fn twin(memory: &MemoryLayer) -> Arc<MemoryLimiter> {
    memory.twin(|m| MemoryLimiter::with_clock(DEFAULT_MAX_KEYS, m.clock()))
}

/// One check of every layer at once: admitted only if every layer admits, and then counted in
/// each; a denied request is counted nowhere. Answers each layer's decision, in order.
pub(super) struct Check<'a> {
    pub(super) checks: &'a [RateCheck],
}

#[async_trait]
impl Operation for Check<'_> {
    type Output = Vec<Decision>;

    fn name(&self) -> &'static str {
        "rate limit"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Vec<Decision>> {
        let checks = self.checks;
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let scripts = &*SCRIPTS;
        let invocation = match checks {
            [check] => {
                let limit = &check.limit;
                let window = limit.window_us();
                match limit.algorithm() {
                    Algorithm::FixedWindow => {
                        let mut inv = scripts.fixed.prepare_invoke();
                        inv.key(check.key.as_str()).arg(limit.limit()).arg(window);
                        inv
                    }
                    Algorithm::SlidingLog => {
                        let mut inv = scripts.log.prepare_invoke();
                        inv.key(check.key.as_str())
                            .arg(limit.limit())
                            .arg(window)
                            // Equal timestamps stay distinct members.
                            .arg(rand::random::<u64>());
                        inv
                    }
                    Algorithm::SlidingWindow => {
                        let mut inv = scripts.sliding.prepare_invoke();
                        inv.key(check.key.as_str()).arg(limit.limit()).arg(window);
                        inv
                    }
                    Algorithm::Gcra { burst } => {
                        let tick = window as f64 / f64::from(limit.limit());
                        let mut inv = scripts.gcra.prepare_invoke();
                        inv.key(check.key.as_str())
                            .arg(tick)
                            .arg(tick * f64::from(burst.get() - 1));
                        inv
                    }
                }
            }
            _ => {
                let mut inv = scripts.general.prepare_invoke();
                for check in checks {
                    let (code, burst) = match check.limit.algorithm() {
                        Algorithm::FixedWindow => (1, 1),
                        Algorithm::SlidingLog => (2, 1),
                        Algorithm::SlidingWindow => (3, 1),
                        Algorithm::Gcra { burst } => (4, burst.get()),
                    };
                    inv.key(check.key.as_str())
                        .arg(code)
                        .arg(check.limit.limit())
                        .arg(check.limit.window_us())
                        .arg(burst)
                        // A sliding log's member suffix, so equal timestamps stay distinct;
                        // unused by the other algorithms.
                        .arg(if code == 2 { rand::random::<u64>() } else { 0 });
                }
                inv
            }
        };
        let flat: Vec<i64> = redis.invoke(&invocation).await?;
        decisions(checks, &flat)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Vec<Decision>> {
        Ok(twin(memory).check(self.checks))
    }
}

/// Reads a script's reply: four integers per layer.
#[cfg(feature = "redis")]
fn decisions(checks: &[RateCheck], flat: &[i64]) -> Result<Vec<Decision>> {
    if flat.len() != checks.len() * 4 {
        return Err(crate::error::Error::new(
            crate::error::ErrorKind::Script,
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
