//! The Redis backend.
//!
//! The default transport is one redis-rs `ConnectionManager`: a multiplexed connection (every
//! task pipelines its commands onto one socket) that reconnects by itself after the server
//! drops it. The opt-in `bb8` feature adds a pooled transport. Both connect lazily, so a service
//! starts even while Redis is down. A connection whose peer vanished without closing it (no RST:
//! a dead host, a dropped route) answers nothing and is never dropped by the driver; when the
//! [`Store`](super::Store) gives up waiting on a call ([`CacheLayer::call_timed_out`]), the
//! connection is replaced (at most once per [`REPLACE_INTERVAL`]).
//!
//! Values are stored as plain Redis strings (`SET key value PX ttl`), readable with
//! `redis-cli GET`. Multi-key operations are one round trip: `MGET`, a pipeline of `SET`s, one
//! `UNLINK`; on a Redis Cluster (feature `cluster`), one per slot, all sent at once. Counters are
//! one Lua script (`INCRBY` + `PEXPIRE`) so that the TTL refresh cannot be lost between two
//! commands.
//!
//! Capabilities run their own scripts through [`RedisLayer::invoke`], from an
//! [`Operation`](super::Operation).
//!
//! Errors come back as [`Error`]s with the password scrubbed; timeouts are applied by the
//! [`Store`](super::Store) wrapper, not here. An error about the data (a key of another type, a
//! script failing on what it found) is the caller's and never counts against the server's health.

use std::fmt;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisError, RedisResult, Script};

use super::{
    Backend, BackendKind, CacheLayer, Entry, LeaseRequest, Leased, LeasedEntry, Remaining,
    TagChunk, TagCursor, TagMember, lease_key,
};
use crate::config::{RedisConfig, Topology, Transport};
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Key, KeyPattern, Tag};
use crate::ttl::Ttl;

#[cfg(feature = "cluster")]
mod cluster;
pub(crate) mod tracking;

/// Shortest time between two replacements of the multiplexed connection.
pub const REPLACE_INTERVAL: Duration = Duration::from_millis(250);

// Lua numbers are doubles: returning INCRBY's reply would round counters above 2^53. The new
// value is read back as the exact decimal string Redis stores.
const INCREMENT_SCRIPT: &str = r"
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('GET', KEYS[1])
";

// Reads the key; when it is absent, takes the lease in the same atomic step: the key holds ''
// and the lease key (same slot) the caller's token, both for the lease TTL. Returns the value, 0
// (another live lease) or 1 (granted). A value equal to `replace` (one the caller could not
// decode), a key of another type than string, and an '' that is not a live lease (no token beside
// it, or no TTL: another client wrote it) count as absent and are replaced.
macro_rules! lease_fn {
    () => {
        r"
local function lease(key, lease_key, token, ttl, replace)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'string' then
    local value = redis.call('GET', key)
    if value == '' then
      if redis.call('PTTL', key) > 0 and redis.call('EXISTS', lease_key) == 1 then return 0 end
    elseif replace == nil or value ~= replace then
      return value
    end
  end
  redis.call('SET', key, '', 'PX', ttl)
  redis.call('SET', lease_key, token, 'PX', ttl)
  return 1
end
"
    };
}

// One key: KEYS = key, lease key; ARGV = token, lease TTL, [replace].
const GET_OR_LEASE_SCRIPT: &str = concat!(
    lease_fn!(),
    "return lease(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])\n"
);

// Many keys in one atomic step, so that two batches never interleave their leases (one could
// otherwise hold a key the other waits for while it waits for one the other holds). KEYS = key,
// lease key pairs; ARGV = lease TTL, then per key: token, has-replace ('0'/'1'), replace.
const GET_OR_LEASE_MANY_SCRIPT: &str = concat!(
    lease_fn!(),
    r"
local out = {}
for n = 1, #KEYS / 2 do
  local a = 1 + (n - 1) * 3
  local replace = nil
  if ARGV[a + 2] == '1' then replace = ARGV[a + 3] end
  out[n] = lease(KEYS[2 * n - 1], KEYS[2 * n], ARGV[a + 1], ARGV[1], replace)
end
return out
"
);

// How long a value still lives: -2 when there is none to read (absent, another type than a
// string, or a lease ''), -1 without expiry, else milliseconds.
const PEEK_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then return -2 end
if redis.call('STRLEN', KEYS[1]) == 0 then return -2 end
return redis.call('PTTL', KEYS[1])
";

// Sets a value's TTL, only if it is a value (a string other than a lease ''): 1 when set.
const TOUCH_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then return 0 end
if redis.call('STRLEN', KEYS[1]) == 0 then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
";

// Stores the loaded value only if the key still holds the lease and the lease is the caller's.
// A DEL or SET of the key by anyone (an invalidation, another service) breaks the lease.
const SET_LEASED_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.pcall('GET', KEYS[1]) ~= '' then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
";

// Gives up the caller's lease: removes the token and the '' it guards, if they are still its.
const RELEASE_LEASE_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if redis.pcall('GET', KEYS[1]) == '' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

// Adds a member to a tag index: a sorted set whose score is 1024 × the time (Redis server
// milliseconds) until which the member can live, plus the microseconds of the registration
// within its millisecond (0-999). Every registration changes the score: a member still indexed
// gets a higher one (the longest lifetime wins, and a registration that does not lengthen it
// still adds 1), and a member registered anew after an invalidation dropped it gets the
// microseconds of its own moment, so that an invalidation that read the member before can tell
// it was registered again and keeps it. Members past their time are pruned; the index lives as
// long as its longest-lived member. Another client's value at the index key is replaced.
const TAG_ADD_SCRIPT: &str = r"
local t = redis.call('TIME')
local micros = tonumber(t[2])
local now = tonumber(t[1]) * 1000 + math.floor(micros / 1000)
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', now * 1024))
local score = (now + tonumber(ARGV[2])) * 1024 + micros % 1000
local old = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if old and old >= score then score = old + 1 end
redis.call('ZADD', KEYS[1], string.format('%d', score), ARGV[1])
local keep = math.floor(score / 1024) - now + 1
if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
return 1
";

// After a chunk of a tag's members was removed, drops them from the index, but only those whose
// score is still the one that was read: a member registered again meanwhile (a new load) stays.
// ARGV holds member, score pairs. Touches only the index key.
const TAG_FORGET_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then return 0 end
local forgotten = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    forgotten = forgotten + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return forgotten
";

/// The registration of `member` in each of `tags` for `ttl`, one command per tag index key
/// (with the key it routes by). EVAL (not EVALSHA) so that a pipeline needs no NOSCRIPT
/// handling.
fn tag_adds(tags: &[Tag], member: &Key, ttl: Ttl, out: &mut Vec<(String, Cmd)>) {
    for tag in tags {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TAG_ADD_SCRIPT)
            .arg(1)
            .arg(tag.as_str())
            .arg(member.as_str())
            .arg(ttl.as_millis());
        out.push((tag.as_str().to_owned(), cmd));
    }
}

/// Positions of keys, grouped by Redis Cluster slot.
#[cfg(feature = "cluster")]
type SlotGroups = Vec<(u16, Vec<usize>)>;

/// The positions of `keys`, grouped by Redis Cluster slot (in order of first appearance).
#[cfg(feature = "cluster")]
fn by_slot<'a>(keys: impl IntoIterator<Item = &'a str>) -> SlotGroups {
    let mut groups: SlotGroups = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let slot = cluster::slot(key);
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, indices)) => indices.push(i),
            None => groups.push((slot, vec![i])),
        }
    }
    groups
}

/// One `command` (`MGET`, `UNLINK`) per slot of `keys`, with the key each routes by, and the
/// positions of the keys it names.
#[cfg(feature = "cluster")]
fn per_slot(command: &str, keys: &[Key]) -> (SlotGroups, Vec<(String, Cmd)>) {
    let groups = by_slot(keys.iter().map(Key::as_str));
    let cmds = groups
        .iter()
        .map(|(_, indices)| {
            let mut cmd = redis::cmd(command);
            for i in indices {
                cmd.arg(keys[*i].as_str());
            }
            (keys[indices[0]].as_str().to_owned(), cmd)
        })
        .collect();
    (groups, cmds)
}

fn lease_reply(reply: redis::Value) -> Leased {
    match reply {
        redis::Value::BulkString(bytes) => Leased::Value(Bytes::from(bytes)),
        redis::Value::Int(1) => Leased::Granted,
        _ => Leased::Denied,
    }
}

enum Conn {
    Multiplexed(Box<Multiplexed>),
    #[cfg(feature = "bb8")]
    Pooled(bb8_redis::bb8::Pool<pool::Manager>),
    #[cfg(feature = "cluster")]
    Cluster(Box<cluster::Sharded>),
}

/// Where the multiplexed transport's server comes from (one per layer: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Source {
    /// One address, fixed in the configuration.
    Fixed(redis::Client),
    /// The primary the sentinels name, asked again after a connection failure.
    #[cfg(feature = "sentinel")]
    Sentinel(std::sync::Arc<Asker>),
}

/// How often, with Sentinel, the sentinels are asked whether the primary in use is still the
/// one they name: a `SENTINEL FAILOVER` leaves the old primary up and taking writes (until the
/// sentinels reconfigure it, seconds later), so no failed call would tell.
#[cfg(feature = "sentinel")]
pub const SENTINEL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A server's host and port.
#[cfg(feature = "sentinel")]
type Address = (String, u16);

/// Asks the sentinels for the primary, in a task of its own.
#[cfg(feature = "sentinel")]
struct Asker {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    /// A task is asking; how the last one failed.
    state: std::sync::Mutex<(bool, Option<RedisError>)>,
    /// Signalled when a task ends.
    done: std::sync::Arc<tokio::sync::Notify>,
    /// The address of the primary the current connection goes to (`None` while there is no
    /// connection after a change), and when the sentinels last named it. Locked before
    /// `current` wherever both are.
    primary: std::sync::Mutex<(Option<Address>, Option<Instant>)>,
    /// How many times another primary was found (named by the sentinels, or reached after a
    /// failed call) while one was in use.
    changes: std::sync::atomic::AtomicU64,
    /// Since when calls may have reached an old primary after it stopped being the primary (the
    /// sentinels' last naming of it, the earliest over every change; `None`: not known).
    changed_since: std::sync::Mutex<Option<Instant>>,
}

#[cfg(feature = "sentinel")]
impl Asker {
    fn new(client: redis::sentinel::SentinelClient) -> Asker {
        Asker {
            client: tokio::sync::Mutex::new(client),
            state: std::sync::Mutex::new((false, None)),
            done: std::sync::Arc::new(tokio::sync::Notify::new()),
            primary: std::sync::Mutex::new((None, None)),
            changes: Default::default(),
            changed_since: Default::default(),
        }
    }

    /// Records a change of primary; the caller holds the `primary` lock (whose last naming is
    /// `named_at`) and `current`'s write lock, and drops or replaces the connection before
    /// releasing it: a call that reads the raised count gets no connection to the old primary.
    fn changed(&self, named_at: Option<Instant>) {
        // The earliest of every change: two changes before the store acts on them are covered
        // from the first.
        let mut since = self.changed_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.changes.load(std::sync::atomic::Ordering::Acquire) == 0 {
            *since = named_at;
        } else {
            *since = since.zip(named_at).map(|(a, b)| a.min(b));
        }
        drop(since);
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Every [`SENTINEL_CHECK_EVERY`] while the layer lives: asks the sentinels whether the primary
/// in use is still the one they name. When it is not, the connection is dropped (the next call
/// asks them again) and the change recorded.
#[cfg(feature = "sentinel")]
async fn watch_sentinels(
    asker: std::sync::Weak<Asker>,
    current: std::sync::Weak<RwLock<Option<(ConnectionManager, Instant)>>>,
) {
    loop {
        tokio::time::sleep(SENTINEL_CHECK_EVERY).await;
        let (Some(asker), Some(current)) = (asker.upgrade(), current.upgrade()) else {
            return;
        };
        let asked_at = Instant::now();
        let named = tokio::time::timeout(SENTINEL_CHECK_EVERY, async {
            asker.client.lock().await.async_get_client().await
        })
        .await;
        let Ok(Ok(client)) = named else {
            continue;
        };
        let named = address_of(&client);
        let mut primary = asker.primary.lock().unwrap_or_else(|e| e.into_inner());
        match (&primary.0, &named) {
            (Some(used), Some(named)) if used != named => {
                tracing::warn!("the sentinels name another primary: calls go to it from now on");
                let mut current = current.write().unwrap_or_else(|e| e.into_inner());
                asker.changed(primary.1);
                *primary = (None, None);
                current.take();
            }
            (Some(_), Some(_)) => primary.1 = Some(asked_at),
            _ => {}
        }
    }
}

/// The address a client connects to.
#[cfg(feature = "sentinel")]
pub(crate) fn address_of(client: &redis::Client) -> Option<(String, u16)> {
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => Some((host.clone(), *port)),
        redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
        _ => None,
    }
}

/// The multiplexed transport: the current connection manager, replaced when a call to it timed
/// out (its peer may have vanished). With Sentinel, there is none until the sentinels named the
/// primary, and a failed call makes the next one ask them again.
struct Multiplexed {
    source: Source,
    config: ConnectionManagerConfig,
    current: std::sync::Arc<RwLock<Option<(ConnectionManager, Instant)>>>,
}

impl Multiplexed {
    async fn manager(&self) -> RedisResult<ConnectionManager> {
        // A poisoned lock still holds a valid manager: replacing it is one assignment.
        if let Some((manager, _)) = &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(manager.clone());
        }
        self.resolve().await
    }

    /// The connection of a source without one yet: with Sentinel, the primary's, once the
    /// sentinels named it.
    async fn resolve(&self) -> RedisResult<ConnectionManager> {
        match &self.source {
            Source::Fixed(client) => {
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())?;
                let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
                Ok(current
                    .get_or_insert_with(|| (manager, Instant::now()))
                    .0
                    .clone())
            }
            #[cfg(feature = "sentinel")]
            Source::Sentinel(asker) => loop {
                // The sentinels are asked in a task of its own, one at a time: a caller that
                // gives up waiting (the Store's timeout) does not cancel it, so an answer slower
                // than one call still reaches the calls after it.
                let notified = {
                    let mut state = asker.state.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((manager, _)) =
                        &*self.current.read().unwrap_or_else(|e| e.into_inner())
                    {
                        return Ok(manager.clone());
                    }
                    let notified = asker.done.clone().notified_owned();
                    if !state.0 {
                        state.0 = true;
                        state.1 = None;
                        let (asker, current, config) =
                            (asker.clone(), self.current.clone(), self.config.clone());
                        let spawned = crate::store::spawn_detached(async move {
                            let asked_at = Instant::now();
                            let found = async {
                                let client = asker.client.lock().await.async_get_client().await?;
                                let addr = address_of(&client);
                                Ok((
                                    ConnectionManager::new_lazy_with_config(client, config)?,
                                    addr,
                                ))
                            }
                            .await;
                            let mut state = asker.state.lock().unwrap_or_else(|e| e.into_inner());
                            state.0 = false;
                            match found {
                                Ok((manager, addr)) => {
                                    let mut primary =
                                        asker.primary.lock().unwrap_or_else(|e| e.into_inner());
                                    let mut current =
                                        current.write().unwrap_or_else(|e| e.into_inner());
                                    // Another primary than the one in use before a failed
                                    // call (a `READONLY` old primary): a change too.
                                    if let (Some(used), Some(found)) = (&primary.0, &addr)
                                        && used != found
                                    {
                                        asker.changed(primary.1);
                                    }
                                    *primary = (addr, Some(asked_at));
                                    *current = Some((manager, Instant::now()));
                                }
                                Err(e) => state.1 = Some(e),
                            }
                            drop(state);
                            asker.done.notify_waiters();
                        });
                        if !spawned {
                            state.0 = false;
                            return Err(RedisError::from((
                                redis::ErrorKind::Io,
                                "no runtime to ask the sentinels on",
                            )));
                        }
                    }
                    notified
                };
                notified.await;
                if let Some((manager, _)) = &*self.current.read().unwrap_or_else(|e| e.into_inner())
                {
                    return Ok(manager.clone());
                }
                let state = asker.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = &state.1 {
                    return Err(e.clone());
                }
            },
        }
    }

    /// Replaces the connection, unless it was replaced less than [`REPLACE_INTERVAL`] ago.
    /// Commands already sent on the old one finish or fail there; new ones use the new one
    /// (with Sentinel, at the primary the sentinels name then).
    fn replace(&self) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < REPLACE_INTERVAL)
        {
            return false;
        }
        match &self.source {
            Source::Fixed(client) => {
                match ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone()) {
                    Ok(manager) => {
                        *current = Some((manager, Instant::now()));
                        true
                    }
                    Err(_) => false,
                }
            }
            #[cfg(feature = "sentinel")]
            Source::Sentinel(_) => current.take().is_some(),
        }
    }

    /// After a failed call: with Sentinel, a lost connection or a server that is no longer the
    /// primary (`READONLY`, `MASTERDOWN`) sends the next call to the sentinels.
    fn failed(&self, e: &RedisError) {
        #[cfg(feature = "sentinel")]
        if matches!(self.source, Source::Sentinel(_))
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING")))
        {
            self.replace();
        }
        let _ = e;
    }
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
    get_or_lease_many: Script,
    set_leased: Script,
    release_lease: Script,
    tag_forget: Script,
    peek: Script,
    touch: Script,
}

impl RedisLayer {
    /// Prepares the connection. It is made lazily: this succeeds while the server is down, and
    /// the first operations then fail (and reconnect) until it is up. Fails only for invalid
    /// configuration.
    pub async fn connect(config: &RedisConfig) -> Result<RedisLayer> {
        let info = config.connection_info()?;
        let client = redis::Client::open(info.clone()).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "cannot use Redis at {config}: {}",
                    config.scrub(&e.to_string())
                ),
            )
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.get_connect_timeout()))
            // The Store bounds every call; a driver-side timeout would only race it.
            .set_response_timeout(None)
            // Reconnect quickly and give up soon: while a reconnect is pending every call
            // waits on it, and the next failing call starts a new one anyway.
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(2);
        let conn = match (config.get_topology(), config.get_transport()) {
            #[cfg(feature = "cluster")]
            (Topology::Cluster { nodes }, _) => {
                Conn::Cluster(Box::new(cluster::Sharded::new(config, nodes)?))
            }
            #[cfg(feature = "sentinel")]
            (Topology::Sentinel { sentinels, master }, _) => {
                let sentinel = sentinel_client(config, &info, sentinels, master)?;
                let asker = std::sync::Arc::new(Asker::new(sentinel));
                let current = std::sync::Arc::default();
                crate::store::spawn_detached(watch_sentinels(
                    std::sync::Arc::downgrade(&asker),
                    std::sync::Arc::downgrade(&current),
                ));
                Conn::Multiplexed(Box::new(Multiplexed {
                    source: Source::Sentinel(asker),
                    config: manager_config,
                    current,
                }))
            }
            (Topology::Single, Transport::Multiplexed) => {
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                        .map_err(|e| map_error(config, e))?;
                Conn::Multiplexed(Box::new(Multiplexed {
                    source: Source::Fixed(client),
                    config: manager_config,
                    current: std::sync::Arc::new(RwLock::new(Some((manager, Instant::now())))),
                }))
            }
            #[cfg(feature = "bb8")]
            (Topology::Single, Transport::Pooled { size }) => {
                Conn::Pooled(pool::build(client, config, size))
            }
            #[cfg(not(feature = "bb8"))]
            (Topology::Single, Transport::Pooled { .. }) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "the pooled transport needs speedlayer's `bb8` feature",
                ));
            }
            #[allow(unreachable_patterns)]
            (topology, _) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{config}: speedlayer was built without support for {topology:?}"),
                ));
            }
        };
        Ok(RedisLayer {
            conn,
            config: config.clone(),
            increment: Script::new(INCREMENT_SCRIPT),
            get_or_lease: Script::new(GET_OR_LEASE_SCRIPT),
            get_or_lease_many: Script::new(GET_OR_LEASE_MANY_SCRIPT),
            set_leased: Script::new(SET_LEASED_SCRIPT),
            release_lease: Script::new(RELEASE_LEASE_SCRIPT),
            tag_forget: Script::new(TAG_FORGET_SCRIPT),
            peek: Script::new(PEEK_SCRIPT),
            touch: Script::new(TOUCH_SCRIPT),
        })
    }

    /// Runs one command.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let result = match &self.conn {
            Conn::Multiplexed(m) => match m.manager().await {
                Ok(mut c) => cmd.query_async(&mut c).await.inspect_err(|e| m.failed(e)),
                Err(e) => Err(e),
            },
            #[cfg(feature = "bb8")]
            Conn::Pooled(p) => pool::run(p, async |c| cmd.query_async(c).await).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => match c.conn().await {
                Ok((mut conn, generation)) => cmd
                    .query_async(&mut conn)
                    .await
                    .inspect_err(|e| c.failed(e, generation)),
                Err(e) => Err(e),
            },
        };
        result.map_err(|e| map_error(&self.config, e))
    }

    /// Runs a pipeline (one round trip).
    async fn query_pipeline<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        let result = match &self.conn {
            Conn::Multiplexed(m) => match m.manager().await {
                Ok(mut c) => pipe.query_async(&mut c).await.inspect_err(|e| m.failed(e)),
                Err(e) => Err(e),
            },
            #[cfg(feature = "bb8")]
            Conn::Pooled(p) => pool::run(p, async |c| pipe.query_async(c).await).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => match c.conn().await {
                Ok((mut conn, generation)) => pipe
                    .query_async(&mut conn)
                    .await
                    .inspect_err(|e| c.failed(e, generation)),
                Err(e) => Err(e),
            },
        };
        result.map_err(|e| map_error(&self.config, e))
    }

    /// Runs `cmds`, each given with the key it routes by, as pipelines: one on a single server;
    /// on a Cluster, one per slot, sent at once. The replies come back in the order of `cmds`.
    async fn query_routed(&self, cmds: Vec<(String, Cmd)>) -> Result<Vec<redis::Value>> {
        #[cfg(feature = "cluster")]
        if let Conn::Cluster(_) = &self.conn {
            let count = cmds.len();
            let groups = by_slot(cmds.iter().map(|(key, _)| key.as_str()));
            let mut cmds: Vec<Option<Cmd>> = cmds.into_iter().map(|(_, cmd)| Some(cmd)).collect();
            let groups: Vec<(Vec<usize>, redis::Pipeline)> = groups
                .into_iter()
                .map(|(_, indices)| {
                    let mut pipe = redis::pipe();
                    for i in &indices {
                        if let Some(cmd) = cmds[*i].take() {
                            pipe.add_command(cmd);
                        }
                    }
                    (indices, pipe)
                })
                .collect();
            let replies = futures_util::future::try_join_all(
                groups
                    .iter()
                    .map(|(_, pipe)| self.query_pipeline::<Vec<redis::Value>>(pipe)),
            )
            .await?;
            let mut out = vec![redis::Value::Nil; count];
            for ((indices, _), values) in groups.iter().zip(replies) {
                for (i, value) in indices.iter().zip(values) {
                    out[*i] = value;
                }
            }
            return Ok(out);
        }
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (_, cmd) in cmds {
            pipe.add_command(cmd);
        }
        self.query_pipeline(&pipe).await
    }

    /// `GET` and `PTTL` of `key` in one pipeline: the value and how long it has left (`None`:
    /// no expiry). For the in-process tier, whose copies never outlive the entry.
    pub(crate) async fn get_with_ttl(
        &self,
        key: &Key,
    ) -> Result<(Option<Bytes>, Option<Duration>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(key.as_str())
            .cmd("PTTL")
            .arg(key.as_str());
        let (value, pttl): (Option<Vec<u8>>, i64) = self.query_pipeline(&pipe).await?;
        let remaining = match pttl {
            -1 => None,
            ms => Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        };
        Ok((bytes_of(value), remaining))
    }

    /// The servers of the in-process tier's invalidation channel: the same credentials and
    /// TLS, speaking RESP3 (server push).
    pub(crate) fn tracking_targets(&self) -> Result<tracking::Targets> {
        tracking::Targets::new(&self.config)
    }

    /// Removes the keys matching `pattern` on one node (on a Cluster, the primary at `node`),
    /// at most `max_removed`.
    async fn sweep_node(
        &self,
        node: Option<(&str, u16)>,
        pattern: &KeyPattern,
        batch: usize,
        max_removed: u64,
    ) -> Result<u64> {
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern.glob())
                .arg("COUNT")
                .arg(batch.max(1));
            let (next, keys): (u64, Vec<Vec<u8>>) = match node {
                None => self.query(&scan).await?,
                #[cfg(feature = "cluster")]
                Some((host, port)) => match &self.conn {
                    Conn::Cluster(c) => {
                        let reply = c
                            .on_node(host, port, scan)
                            .await
                            .map_err(|e| map_error(&self.config, e))?;
                        redis::from_redis_value(reply)
                            .map_err(|e| map_error(&self.config, e.into()))?
                    }
                    _ => self.query(&scan).await?,
                },
                #[cfg(not(feature = "cluster"))]
                Some(_) => self.query(&scan).await?,
            };
            // Keys that are not text are never ours.
            let victims: Vec<&str> = keys
                .iter()
                .filter_map(|k| std::str::from_utf8(k).ok())
                .filter(|k| pattern.matches_str(k))
                .take((max_removed - removed).min(usize::MAX as u64) as usize)
                .collect();
            if !victims.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                for key in &victims {
                    unlink.arg(*key);
                }
                removed += self.query::<u64>(&unlink).await?;
            }
            cursor = next;
            if cursor == 0 || removed >= max_removed {
                return Ok(removed);
            }
        }
    }

    /// The batch lease on a Cluster, where a script's keys must share a slot: one script per
    /// slot, all sent at once. On one server the batch's leases are taken in one atomic step, so
    /// that two batches over the same keys never each hold a key the other waits for. Here the
    /// same holds by ordering slots: when a key of slot `s` is leased to another batch, this
    /// batch keeps the leases it got in slots up to `s` and gives back those above it (reported
    /// as denied, so that the batch asks for them again). A batch then holds leases only in
    /// slots at or below the lowest one it waits on, and a cycle of two batches waiting on each
    /// other would need both to wait on the other's lowest slot: within one slot the script is
    /// atomic, as on one server. (As on one server, a third batch that gives a lease up without
    /// a value can still leave two batches waiting on each other, each for at most the lease
    /// wait.)
    #[cfg(feature = "cluster")]
    async fn lease_many_by_slot(
        &self,
        requests: &[LeaseRequest<'_>],
        lease_ttl: Ttl,
    ) -> Result<Vec<Leased>> {
        let groups = by_slot(requests.iter().map(|r| r.key.as_str()));
        let replies = futures_util::future::try_join_all(groups.iter().map(|(_, indices)| {
            let group: Vec<&LeaseRequest<'_>> = indices.iter().map(|i| &requests[*i]).collect();
            self.lease_many_in_one_slot(group, lease_ttl)
        }))
        .await?;
        let mut out: Vec<Leased> = (0..requests.len()).map(|_| Leased::Denied).collect();
        let mut lowest_denied = u16::MAX;
        for ((slot, indices), leased) in groups.iter().zip(replies) {
            for (i, l) in indices.iter().zip(leased) {
                if matches!(l, Leased::Denied) {
                    lowest_denied = lowest_denied.min(*slot);
                }
                out[*i] = l;
            }
        }
        let give_back: Vec<usize> = groups
            .iter()
            .filter(|(slot, _)| *slot > lowest_denied)
            .flat_map(|(_, indices)| indices.iter().copied())
            .filter(|i| matches!(out[*i], Leased::Granted))
            .collect();
        if !give_back.is_empty() {
            let leases: Vec<(Key, u64)> = give_back
                .iter()
                .map(|i| (requests[*i].key.clone(), requests[*i].token))
                .collect();
            self.release_leases(&leases).await?;
            for i in give_back {
                out[i] = Leased::Denied;
            }
        }
        Ok(out)
    }

    /// The batch lease script over `requests` (on a Cluster, all in one slot).
    async fn lease_many_in_one_slot(
        &self,
        requests: Vec<&LeaseRequest<'_>>,
        lease_ttl: Ttl,
    ) -> Result<Vec<Leased>> {
        let mut invocation = self.get_or_lease_many.prepare_invoke();
        invocation.arg(lease_ttl.as_millis());
        for r in &requests {
            invocation.key(r.key.as_str()).key(lease_key(r.key));
            invocation.arg(r.token);
            match r.replace {
                Some(replace) => invocation.arg("1").arg(replace),
                None => invocation.arg("0").arg(""),
            };
        }
        let replies: Vec<redis::Value> = self.invoke(&invocation).await?;
        if replies.len() != requests.len() {
            return Err(Error::new(
                ErrorKind::Script,
                format!(
                    "the batch lease script answered {} values for {} keys",
                    replies.len(),
                    requests.len()
                ),
            ));
        }
        Ok(replies.into_iter().map(lease_reply).collect())
    }

    /// Runs a script (`EVALSHA`, loading it once if the server does not know it): what a
    /// capability's [`Operation`](super::Operation) calls. Errors are mapped as for every other
    /// call: a script failing on the data it found is [`ErrorKind::Script`], not an availability
    /// error.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let result = match &self.conn {
            Conn::Multiplexed(m) => match m.manager().await {
                Ok(mut c) => invocation
                    .invoke_async(&mut c)
                    .await
                    .inspect_err(|e| m.failed(e)),
                Err(e) => Err(e),
            },
            #[cfg(feature = "bb8")]
            Conn::Pooled(p) => pool::run(p, async |c| invocation.invoke_async(c).await).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => match c.conn().await {
                Ok((mut conn, generation)) => invocation
                    .invoke_async(&mut conn)
                    .await
                    .inspect_err(|e| c.failed(e, generation)),
                Err(e) => Err(e),
            },
        };
        result.map_err(|e| map_error(&self.config, e))
    }
}

/// The client that asks `sentinels` for the primary they monitor as `master`; connections to
/// the primary use `info`'s credentials, database and TLS. The sentinels are reached with their
/// own credentials (`RedisConfig::sentinel_password`), if any, over TLS when the data nodes are.
#[cfg(feature = "sentinel")]
fn sentinel_client(
    config: &RedisConfig,
    info: &redis::ConnectionInfo,
    sentinels: &[(String, u16)],
    master: &str,
) -> Result<redis::sentinel::SentinelClient> {
    use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
    let tls = match info.addr() {
        redis::ConnectionAddr::TcpTls { insecure, .. } => Some(if *insecure {
            redis::TlsMode::Insecure
        } else {
            redis::TlsMode::Secure
        }),
        _ => None,
    };
    // The sentinels get their own credentials (if any), never the data nodes'.
    let (user, password) = config.sentinel_credentials();
    let mut auth = redis::RedisConnectionInfo::default();
    if let Some(user) = user {
        auth = auth.set_username(user);
    }
    if let Some(password) = password {
        auth = auth.set_password(password);
    }
    let nodes: Vec<redis::ConnectionInfo> = config
        .infos_at(sentinels)?
        .into_iter()
        .map(|i| i.set_redis_settings(auth.clone()))
        .collect();
    let mut node = SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(info.redis_settings().clone());
    if let Some(tls) = tls {
        node = node.set_tls_mode(tls);
    }
    // redis-rs takes the name as a `String` without TLS support, as `impl AsRef<str>` with it.
    #[allow(clippy::unnecessary_to_owned)]
    SentinelClient::build(
        nodes,
        master.to_owned(),
        Some(node),
        SentinelServerType::Master,
    )
    .map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!(
                "cannot use Sentinel at {config}: {}",
                config.scrub(&e.to_string())
            ),
        )
    })
}

/// Server error codes that say the server cannot serve now (loading, busy, out of memory, a
/// failover under way), as opposed to an error about the data.
const UNAVAILABLE_CODES: &[&str] = &[
    "LOADING",
    "BUSY",
    "OOM",
    "MISCONF",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "READONLY",
    "MOVED",
    "ASK",
    "NOAUTH",
    "NOPERM",
    "WRONGPASS",
];

/// Maps a driver error to a crate error: data errors (wrong type, not an integer, a script
/// failing on what it found) stay the caller's, everything else is an availability error.
fn map_error(config: &RedisConfig, e: RedisError) -> Error {
    let text = config.scrub(&e.to_string());
    let code = e.code().unwrap_or_default().to_owned();
    let lower = text.to_ascii_lowercase();
    let kind = if code == "WRONGTYPE" || lower.contains("wrongtype") || lower.contains("not an integer")
            // The reply had a shape the operation cannot read (another client's data).
            || e.kind() == redis::ErrorKind::UnexpectedReturnType
    {
        ErrorKind::WrongType
    } else if lower.contains("overflow") {
        ErrorKind::Overflow
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        ErrorKind::Connection
    } else if UNAVAILABLE_CODES.contains(&code.as_str()) || lower.contains("max number of clients")
    {
        ErrorKind::Backend
    } else if code == "ERR" && (lower.contains("script") || lower.contains("lua")) {
        ErrorKind::Script
    } else {
        ErrorKind::Backend
    };
    let message = match kind {
        ErrorKind::WrongType => {
            format!("the Redis value has a type this operation cannot use ({text})")
        }
        ErrorKind::Script => format!(
            "a speedlayer script failed on the data it found in Redis at {config}; another \
             client may have written this key ({text})"
        ),
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
            #[cfg(feature = "cluster")]
            Conn::Cluster(_) => "cluster",
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
        #[cfg(feature = "cluster")]
        if let Conn::Cluster(_) = &self.conn {
            // One MGET per slot, all at once: each is routed (and redirected after a failover)
            // on its own.
            let (groups, cmds) = per_slot("MGET", keys);
            let replies = self.query_routed(cmds).await?;
            let mut out = vec![None; keys.len()];
            for ((_, indices), reply) in groups.iter().zip(replies) {
                let values: Vec<Option<Vec<u8>>> = redis::from_redis_value(reply)
                    .map_err(|e| map_error(&self.config, e.into()))?;
                for (i, value) in indices.iter().zip(values) {
                    out[*i] = bytes_of(value);
                }
            }
            return Ok(out);
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
        let cmds = entries
            .iter()
            .map(|entry| {
                let mut cmd = redis::cmd("SET");
                cmd.arg(entry.key.as_str())
                    .arg(entry.value.as_ref())
                    .arg("PX")
                    .arg(entry.ttl.as_millis());
                (entry.key.as_str().to_owned(), cmd)
            })
            .collect();
        self.query_routed(cmds).await.map(|_| ())
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
        #[cfg(feature = "cluster")]
        if let Conn::Cluster(_) = &self.conn {
            let (_, cmds) = per_slot("UNLINK", keys);
            let mut removed = 0;
            for reply in self.query_routed(cmds).await? {
                removed += redis::from_redis_value::<u64>(reply)
                    .map_err(|e| map_error(&self.config, e.into()))?;
            }
            return Ok(removed);
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
            .key(lease_key(key))
            .arg(token)
            .arg(lease_ttl.as_millis());
        if let Some(replace) = replace {
            invocation.arg(replace);
        }
        Ok(lease_reply(self.invoke::<redis::Value>(&invocation).await?))
    }

    async fn set_leased(&self, key: &Key, token: u64, value: Bytes, ttl: Ttl) -> Result<bool> {
        let mut invocation = self.set_leased.prepare_invoke();
        invocation
            .key(key.as_str())
            .key(lease_key(key))
            .arg(token)
            .arg(value.as_ref())
            .arg(ttl.as_millis());
        self.invoke::<i64>(&invocation)
            .await
            .map(|stored| stored == 1)
    }

    async fn release_lease(&self, key: &Key, token: u64) -> Result<bool> {
        let mut invocation = self.release_lease.prepare_invoke();
        invocation.key(key.as_str()).key(lease_key(key)).arg(token);
        self.invoke::<i64>(&invocation)
            .await
            .map(|released| released == 1)
    }

    // The batch forms below (but the lease, one script) are pipelines of EVAL (not EVALSHA: a
    // pipeline then needs no NOSCRIPT handling; the server compiles each script once and keeps
    // it by its hash).

    async fn get_or_lease_many(
        &self,
        requests: &[LeaseRequest<'_>],
        lease_ttl: Ttl,
    ) -> Result<Vec<Leased>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        #[cfg(feature = "cluster")]
        if let Conn::Cluster(_) = &self.conn {
            return self.lease_many_by_slot(requests, lease_ttl).await;
        }
        self.lease_many_in_one_slot(requests.iter().collect(), lease_ttl)
            .await
    }

    async fn set_leased_many(&self, entries: &[LeasedEntry]) -> Result<Vec<bool>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = entries
            .iter()
            .map(|e| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(SET_LEASED_SCRIPT)
                    .arg(2)
                    .arg(e.key.as_str())
                    .arg(lease_key(&e.key))
                    .arg(e.token)
                    .arg(e.value.as_ref())
                    .arg(e.ttl.as_millis());
                (e.key.as_str().to_owned(), cmd)
            })
            .collect();
        let stored = self.query_routed(cmds).await?;
        Ok(stored
            .into_iter()
            .map(|n| matches!(n, redis::Value::Int(1)))
            .collect())
    }

    async fn release_leases(&self, leases: &[(Key, u64)]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let cmds = leases
            .iter()
            .map(|(key, token)| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(RELEASE_LEASE_SCRIPT)
                    .arg(2)
                    .arg(key.as_str())
                    .arg(lease_key(key))
                    .arg(*token);
                (key.as_str().to_owned(), cmd)
            })
            .collect();
        let released = self.query_routed(cmds).await?;
        Ok(released
            .iter()
            .filter(|n| matches!(n, redis::Value::Int(1)))
            .count() as u64)
    }

    async fn tag_add_many(&self, members: &[(Key, Vec<Tag>)], ttl: Ttl) -> Result<()> {
        if members.iter().all(|(_, tags)| tags.is_empty()) {
            return Ok(());
        }
        let mut cmds = Vec::new();
        for (member, tags) in members {
            tag_adds(tags, member, ttl, &mut cmds);
        }
        self.query_routed(cmds).await.map(|_| ())
    }

    async fn peek(&self, key: &Key) -> Result<Option<Remaining>> {
        let mut invocation = self.peek.prepare_invoke();
        invocation.key(key.as_str());
        Ok(match self.invoke::<i64>(&invocation).await? {
            -2 => None,
            -1 => Some(Remaining::NoExpiry),
            ms => Some(Remaining::Expires(Duration::from_millis(ms.max(0) as u64))),
        })
    }

    async fn touch(&self, key: &Key, ttl: Ttl) -> Result<bool> {
        let mut invocation = self.touch.prepare_invoke();
        invocation.key(key.as_str()).arg(ttl.as_millis());
        self.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        // One round trip for all tags (on a Cluster, one per slot, at once).
        let mut cmds = Vec::new();
        tag_adds(tags, member, ttl, &mut cmds);
        self.query_routed(cmds).await.map(|_| ())
    }

    async fn tag_members(&self, tag: &Tag, cursor: &TagCursor, limit: usize) -> Result<TagChunk> {
        // By score, from the cursor on (inclusive: members of the previous chunk that were
        // forgotten are gone, and one registered again has a higher score).
        let mut range = redis::cmd("ZRANGE");
        range
            .arg(tag.as_str())
            .arg(cursor.0.as_deref().unwrap_or("-inf"))
            .arg("+inf")
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit.max(1))
            .arg("WITHSCORES");
        let found: Vec<(Vec<u8>, String)> = match self.query(&range).await {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::WrongType => {
                // Another client's value at the index key: nothing of ours can be found
                // through it. Repaired, so that the next registration starts a clean index.
                tracing::warn!(tag = %tag, "a tag index held another client's value; it was removed");
                self.query::<u64>(redis::cmd("DEL").arg(tag.as_str()))
                    .await?;
                return Ok(TagChunk {
                    foreign: 1,
                    ..TagChunk::default()
                });
            }
            Err(e) => return Err(e),
        };
        let mut chunk = TagChunk::default();
        let full = found.len() >= limit.max(1);
        let mut foreign: Vec<&[u8]> = Vec::new();
        for (member, score) in &found {
            // A member that is not text, or not a key of the tag's scope, was written by another
            // client: it is dropped from the index, never deleted.
            match std::str::from_utf8(member)
                .ok()
                .and_then(|m| tag.member_key(m))
            {
                Some(key) => chunk.members.push(TagMember {
                    key,
                    stamp: score.clone(),
                }),
                None => foreign.push(member.as_slice()),
            }
        }
        if !foreign.is_empty() {
            chunk.foreign = foreign.len() as u64;
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(tag.as_str());
            for member in &foreign {
                zrem.arg(*member);
            }
            self.query::<u64>(&zrem).await?;
        }
        if full && let Some((_, score)) = found.last() {
            chunk.next = Some(TagCursor(Some(score.clone())));
        }
        Ok(chunk)
    }

    async fn tag_forget(&self, tag: &Tag, members: &[TagMember]) -> Result<u64> {
        if members.is_empty() {
            return Ok(0);
        }
        let mut forget = self.tag_forget.prepare_invoke();
        forget.key(tag.as_str());
        for member in members {
            forget.arg(member.key.as_str()).arg(member.stamp.as_str());
        }
        self.invoke::<u64>(&forget).await
    }

    async fn sweep(&self, pattern: &KeyPattern, batch: usize, max_removed: u64) -> Result<u64> {
        #[cfg(feature = "cluster")]
        if let Conn::Cluster(c) = &self.conn {
            // A SCAN cursor belongs to one node: every primary is walked in turn.
            let primaries = c
                .primaries()
                .await
                .map_err(|e| map_error(&self.config, e))?;
            let mut removed = 0;
            for (host, port) in primaries {
                if removed >= max_removed {
                    break;
                }
                removed += self
                    .sweep_node(Some((&host, port)), pattern, batch, max_removed - removed)
                    .await?;
            }
            return Ok(removed);
        }
        self.sweep_node(None, pattern, batch, max_removed).await
    }

    async fn ping(&self) -> Result<()> {
        self.query::<()>(&redis::cmd("PING")).await
    }

    fn backend(&self) -> Backend<'_> {
        Backend::Redis(self)
    }

    fn fails_over(&self) -> bool {
        *self.config.get_topology() != Topology::Single
    }

    fn primary_changes(&self) -> u64 {
        match &self.conn {
            #[cfg(feature = "sentinel")]
            Conn::Multiplexed(m) => match &m.source {
                Source::Sentinel(asker) => asker.changes.load(std::sync::atomic::Ordering::Acquire),
                Source::Fixed(_) => 0,
            },
            #[allow(unreachable_patterns)]
            _ => 0,
        }
    }

    fn primary_changed_since(&self) -> Option<Instant> {
        match &self.conn {
            #[cfg(feature = "sentinel")]
            Conn::Multiplexed(m) => match &m.source {
                Source::Sentinel(asker) => *asker
                    .changed_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
                Source::Fixed(_) => None,
            },
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    fn call_timed_out(&self) {
        match &self.conn {
            Conn::Multiplexed(m) => {
                if m.replace() {
                    tracing::info!(
                        target = %self.config,
                        "a Redis call timed out: the connection is replaced by a new one"
                    );
                }
            }
            // A pooled connection whose call was cancelled is marked broken by `pool::run`.
            #[cfg(feature = "bb8")]
            Conn::Pooled(_) => {}
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => {
                if c.replace(None) {
                    tracing::info!(
                        target = %self.config,
                        "a Redis Cluster call timed out: the cluster connection is replaced"
                    );
                }
            }
        }
    }
}

#[cfg(feature = "bb8")]
mod pool {
    //! The pooled transport.
    //!
    //! bb8-redis's own manager never reports a multiplexed connection as broken, so a pool that
    //! skips the PING on every check-out would keep dead connections after a Redis restart. This
    //! manager marks a connection broken when a command on it fails at the connection level, or
    //! is abandoned before its answer came (the Store's timeout), and bb8 then replaces it;
    //! check-outs stay PING-free.

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

    /// Marks the checked-out connection broken unless the call on it finished: a call dropped
    /// while waiting for its answer leaves the connection in doubt.
    struct InDoubt<'a, 'b> {
        pooled: &'a mut bb8::PooledConnection<'b, Manager>,
        finished: bool,
    }

    impl Drop for InDoubt<'_, '_> {
        fn drop(&mut self) {
            if !self.finished {
                self.pooled.broken = true;
            }
        }
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
        let mut guard = InDoubt {
            pooled: &mut pooled,
            finished: false,
        };
        let result = f(&mut guard.pooled.conn).await;
        guard.finished = true;
        if let Err(e) = &result
            && (e.is_unrecoverable_error() || e.is_io_error())
        {
            guard.pooled.broken = true;
        }
        result
    }
}
