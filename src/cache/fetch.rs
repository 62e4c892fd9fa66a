//! `Cache::fetch`: get-or-set with fail-safe, soft and hard loader timeouts, and early refresh
//! (XFetch).
//!
//! - **Fail-safe.** With a grace period, an entry is stored for its TTL plus the grace; past the
//!   TTL it is *stale*: a fetch then refreshes it, and serves the stale value (marked
//!   [`Fetched::stale`]) when the loader fails or is slower than the soft timeout. A deleted or
//!   invalidated entry is gone, grace and all: fail-safe never brings back what an invalidation
//!   removed.
//! - **Soft timeout.** Past it, a fetch that has a stale value returns it, and the load finishes
//!   in the background and stores its value.
//! - **Hard timeout.** Past it, a fetch without a stale value returns [`FetchError::Timeout`] (the
//!   load is cancelled and its lease released).
//! - **Early refresh.** Before the TTL ends, a fetch may start a refresh in the background and
//!   return the current value at once. [`EarlyRefresh::XFetch`] (Vattani, Chierichetti and
//!   Lowenstein, "Optimal probabilistic cache stampede prevention", VLDB 2015) refreshes when
//!   `delta * beta * -ln(u) >= time left`, `u` uniform in (0, 1] and `delta` the time the last load
//!   of the key took in this process (else [`FetchPolicy::expected_load`]): a hot key is refreshed
//!   about once per expiry, close to it, without any caller waiting on the loader.
//!   [`EarlyRefresh::Fixed`] refreshes whenever less than a fixed time is left.
//!
//! A refresh stores its value only if the entry still holds the bytes it refreshed (a
//! compare-and-set: one script on Redis, its twin in memory): a delete, a write or an invalidation
//! during the refresh keeps its older value out, as a lease does for a first load. Refreshes are
//! single-flight per key within a process. Keys read with `fetch` should be written with it: a
//! plain [`get`](crate::Cache::get) does not know the grace period and reads a stale value as a
//! hit. `fetch` reads Redis directly, not the in-process tier.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Cache, Missed, is_lease};
use crate::error::Result;
use crate::key::Key;
use crate::store::{
    Answered, IndexWindow, MemoryLayer, MemoryUpdate, Operation, OutageRule, Source,
};
use crate::tier::TierRead;
use crate::ttl::{Ttl, TtlPolicy};

/// When a fresh entry is refreshed before its TTL ends.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum EarlyRefresh {
    /// XFetch with this `beta` (1 is the paper's optimum; larger refreshes earlier).
    XFetch {
        /// The paper's β.
        beta: f64,
    },
    /// Whenever less than this is left of the TTL.
    Fixed {
        /// The threshold.
        before_expiry: Duration,
    },
}

impl EarlyRefresh {
    /// XFetch with β = 1.
    pub fn xfetch() -> EarlyRefresh {
        EarlyRefresh::XFetch { beta: 1.0 }
    }
}

/// How [`Cache::fetch`] loads, keeps and refreshes an entry.
///
/// ```
/// use std::time::Duration;
/// use speedlayer::cache::{EarlyRefresh, FetchPolicy};
/// use speedlayer::ttl::Ttl;
///
/// let policy = FetchPolicy::new(Ttl::seconds(60))
///     .grace(Duration::from_secs(3600))         // serve up to an hour past the TTL if the DB fails
///     .soft_timeout(Duration::from_millis(50))  // then, stale beats slow
///     .hard_timeout(Duration::from_secs(2))     // nothing to serve: give up after 2 s
///     .early_refresh(EarlyRefresh::xfetch());
/// # let _ = policy;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct FetchPolicy {
    ttl: TtlPolicy,
    grace: Duration,
    soft_timeout: Option<Duration>,
    hard_timeout: Option<Duration>,
    early: Option<EarlyRefresh>,
    expected_load: Duration,
}

impl FetchPolicy {
    /// Entries live for `ttl` (a [`Ttl`] or a [`TtlPolicy`] with jitter); no grace, no timeouts,
    /// no early refresh.
    pub fn new(ttl: impl Into<TtlPolicy>) -> FetchPolicy {
        FetchPolicy {
            ttl: ttl.into(),
            grace: Duration::ZERO,
            soft_timeout: None,
            hard_timeout: None,
            early: None,
            expected_load: Duration::from_millis(50),
        }
    }

    /// Keeps each entry this long past its TTL, to serve when a refresh fails or is slow. The
    /// TTL plus the grace is at most [`Ttl::MAX`]: a longer grace is shortened to fit.
    pub fn grace(mut self, grace: Duration) -> FetchPolicy {
        let room = Ttl::MAX
            .as_duration()
            .saturating_sub(self.ttl.ttl().as_duration());
        self.grace = grace.min(room);
        self
    }

    /// With a stale value to serve, waits at most this long for a refresh.
    pub fn soft_timeout(mut self, timeout: Duration) -> FetchPolicy {
        self.soft_timeout = Some(timeout);
        self
    }

    /// Waits at most this long for a load (without a stale value: the fetch then fails with
    /// [`FetchError::Timeout`]; with one, and no soft timeout, the stale value is served).
    pub fn hard_timeout(mut self, timeout: Duration) -> FetchPolicy {
        self.hard_timeout = Some(timeout);
        self
    }

    /// Refreshes fresh entries before their TTL ends.
    pub fn early_refresh(mut self, early: EarlyRefresh) -> FetchPolicy {
        self.early = Some(early);
        self
    }

    /// XFetch's `delta` for a key this process has not loaded yet (default 50 ms).
    pub fn expected_load(mut self, delta: Duration) -> FetchPolicy {
        self.expected_load = delta;
        self
    }

    /// The stored TTL of one write: a TTL picked by the policy, plus the grace.
    fn stored_ttl(&self) -> Ttl {
        Ttl::new(self.ttl.pick().as_duration().saturating_add(self.grace)).unwrap_or(Ttl::MAX)
    }

    fn longest_stored(&self) -> Ttl {
        Ttl::new(self.ttl.ttl().as_duration().saturating_add(self.grace)).unwrap_or(Ttl::MAX)
    }

    /// How long a background refresh may run: the hard timeout, else `default`.
    fn refresh_limit(&self, default: Duration) -> Duration {
        self.hard_timeout.unwrap_or(default)
    }
}

/// What [`Cache::fetch`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fetched<T> {
    /// The value.
    pub value: T,
    /// True when the value is past its TTL (within the grace): the refresh failed or was slower
    /// than the soft timeout.
    pub stale: bool,
}

/// Why [`Cache::fetch`] has no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum FetchError<E> {
    /// The loader failed and no stale value was there to serve.
    Loader(Arc<E>),
    /// The hard timeout passed before the loader answered, with no stale value to serve.
    Timeout(Duration),
}

impl<E: std::fmt::Display> std::fmt::Display for FetchError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Loader(e) => write!(f, "the loader failed: {e}"),
            FetchError::Timeout(after) => write!(
                f,
                "the loader did not answer within the hard timeout ({after:?}) and no stale \
                 value was kept"
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for FetchError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FetchError::Loader(e) => Some(&**e),
            FetchError::Timeout(_) => None,
        }
    }
}

/// Refreshes running in this process, and how long each key's last load took.
pub(crate) struct Refreshes {
    running: Mutex<HashSet<String>>,
    load_times: moka::sync::Cache<String, Duration>,
}

impl Default for Refreshes {
    fn default() -> Self {
        Refreshes {
            running: Mutex::new(HashSet::new()),
            load_times: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }
}

impl Refreshes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Replaces the value under a key only if it still holds `old` (one script on Redis).
struct Replace<'a> {
    key: &'a Key,
    old: &'a Bytes,
    new: &'a Bytes,
    ttl: Ttl,
}

/// `KEYS[1]` holds `ARGV[1]`: set it to `ARGV[2]` for `ARGV[3]` ms and answer 1; else 0.
#[cfg(feature = "redis")]
const REPLACE_SCRIPT: &str = r"
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

#[cfg(feature = "redis")]
static REPLACE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REPLACE_SCRIPT));

#[async_trait]
impl Operation for Replace<'_> {
    type Output = bool;

    fn name(&self) -> &'static str {
        "refresh"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<bool> {
        let mut invocation = REPLACE.prepare_invoke();
        invocation
            .key(self.key.as_str())
            .arg(self.old.as_ref())
            .arg(self.new.as_ref())
            .arg(self.ttl.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|n| n == 1)
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<bool> {
        let (old, new, ttl) = (self.old.clone(), self.new.clone(), self.ttl);
        memory
            .compute(self.key, move |entry| match entry {
                Some(e) if e.lease == 0 && e.value == old => (
                    MemoryUpdate::Put {
                        value: new,
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

impl Cache {
    /// The cached value under `key`, or the loader's, with the fail-safe, timeouts and early
    /// refresh of `policy` (see [`FetchPolicy`]).
    ///
    /// The loader is `Fn` and `'static` because a refresh may outlive this call: it runs in the
    /// background while the current or stale value is returned. A first load (nothing cached)
    /// goes through the same leases and single flight as [`get_or_set`](Cache::get_or_set).
    pub async fn fetch<T, E, F, Fut>(
        &self,
        key: &Key,
        policy: &FetchPolicy,
        loader: F,
    ) -> std::result::Result<Fetched<T>, FetchError<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
    {
        let loader = Arc::new(loader);
        // What this read found when it was nothing usable: the first load starts from it
        // rather than reading again. `None` (switched off, a read error): `load_through` reads
        // and decides.
        let mut missed = None;
        let read = match self.caches(key) {
            true => self
                .inner
                .store
                .run(&TierRead { key }, OutageRule::Fallback)
                .await
                .ok(),
            false => None,
        };
        if let Some(answered) = read {
            let (found, source) = match answered {
                Answered::Backend(found) => (found, Source::Primary),
                Answered::Fallback(found) => (found, Source::Fallback),
                _ => ((None, None), Source::Nothing),
            };
            let (bytes, left) = found;
            let bytes = bytes.filter(|b| !is_lease(b));
            let decoded = bytes.as_ref().map(|b| serde_json::from_slice::<T>(b));
            if let (Some(bytes), Some(Ok(value))) = (bytes.clone(), decoded) {
                let fresh_left = left.map(|l| l.saturating_sub(policy.grace));
                match fresh_left {
                    Some(left) if left.is_zero() => {
                        return Ok(self.refresh_stale(key, policy, loader, bytes, value).await);
                    }
                    _ => {
                        let c = &self.inner.counters;
                        c.hits.fetch_add(1, Ordering::Relaxed);
                        if let Some(left) = fresh_left
                            && self.refresh_due(key, policy, left)
                            && self.spawn_refresh(key, policy, loader, bytes).is_some()
                        {
                            c.early_refreshes.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(Fetched {
                            value,
                            stale: false,
                        });
                    }
                }
            }
            if bytes.is_some() {
                // Present but not a `T`: the load's lease replaces it.
                self.inner
                    .counters
                    .decode_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            missed = Some(Missed {
                source,
                undecodable: bytes,
            });
        }
        // Nothing usable: a first load, under the key's lease and this process's single flight.
        let started = Instant::now();
        let load = async {
            let (load, ttl) = (loader.clone(), policy.clone());
            let load = move || (*load)();
            let ttl_for = move |_: &T| ttl.stored_ttl();
            let longest = policy.longest_stored();
            match missed {
                Some(first_read) => {
                    self.load_missed(key, &[], longest, first_read, load, ttl_for)
                        .await
                }
                None => self.load_through(key, &[], longest, load, ttl_for).await,
            }
        };
        let loaded = match policy.hard_timeout {
            Some(limit) => match tokio::time::timeout(limit, load).await {
                Ok(loaded) => loaded,
                Err(_) => return Err(FetchError::Timeout(limit)),
            },
            None => load.await,
        };
        if loaded.is_ok() {
            self.inner
                .refreshes
                .load_times
                .insert(key.as_str().to_owned(), started.elapsed());
        }
        loaded
            .map(|value| Fetched {
                value,
                stale: false,
            })
            .map_err(FetchError::Loader)
    }

    /// True when a fresh entry with `left` of its TTL should be refreshed now.
    fn refresh_due(&self, key: &Key, policy: &FetchPolicy, left: Duration) -> bool {
        match policy.early {
            None => false,
            Some(EarlyRefresh::Fixed { before_expiry }) => left <= before_expiry,
            Some(EarlyRefresh::XFetch { beta }) => {
                let delta = self
                    .inner
                    .refreshes
                    .load_times
                    .get(key.as_str())
                    .unwrap_or(policy.expected_load);
                // u in (0, 1]: -ln(u) is in [0, inf).
                let u: f64 = 1.0 - rand::random::<f64>();
                delta.as_secs_f64() * beta * -u.ln() >= left.as_secs_f64()
            }
        }
    }

    /// A stale value: refresh, wait for the refresh within the timeouts, else serve it stale.
    async fn refresh_stale<T, E, F, Fut>(
        &self,
        key: &Key,
        policy: &FetchPolicy,
        loader: Arc<F>,
        bytes: Bytes,
        stale: T,
    ) -> Fetched<T>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
    {
        let c = &self.inner.counters;
        let refreshed = match self.spawn_refresh(key, policy, loader, bytes) {
            // Another caller of this process refreshes it: no waiting on a second load.
            None => None,
            Some(done) => {
                let wait = policy.soft_timeout.or(policy.hard_timeout);
                match wait {
                    Some(limit) => tokio::time::timeout(limit, done).await.ok(),
                    None => Some(done.await),
                }
            }
        };
        match refreshed {
            Some(Ok(Some(value))) => {
                c.misses.fetch_add(1, Ordering::Relaxed);
                Fetched {
                    value,
                    stale: false,
                }
            }
            _ => {
                c.stale_served.fetch_add(1, Ordering::Relaxed);
                Fetched {
                    value: stale,
                    stale: true,
                }
            }
        }
    }

    /// Starts a refresh of `key` (holding `old`) in the background, unless this process is
    /// already refreshing it. The receiver gets the loaded value (`None` when the loader failed).
    fn spawn_refresh<T, E, F, Fut>(
        &self,
        key: &Key,
        policy: &FetchPolicy,
        loader: Arc<F>,
        old: Bytes,
    ) -> Option<tokio::sync::oneshot::Receiver<Option<T>>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
    {
        if !self.inner.refreshes.lock().insert(key.as_str().to_owned()) {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (cache, key, policy) = (self.clone(), key.clone(), policy.clone());
        // Out of the running set however the task ends, also when it never runs (a runtime
        // shutting down drops it unpolled).
        struct Running(Cache, Key);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.inner.refreshes.lock().remove(self.1.as_str());
            }
        }
        let running = Running(cache.clone(), key.clone());
        tokio::spawn(async move {
            let running = running;
            let refreshed = async {
                let c = &cache.inner.counters;
                c.loader_calls.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let limit = policy.refresh_limit(cache.inner.lease_ttl.as_duration());
                let loaded = tokio::time::timeout(limit, (*loader)()).await;
                crate::telemetry::load_time(started.elapsed().as_secs_f64());
                let value = match loaded {
                    Ok(Ok(value)) => value,
                    Err(_) => {
                        tracing::debug!(key = %key, "refresh timed out; the entry is kept as it is");
                        return None;
                    }
                    Ok(Err(_)) => {
                        c.loader_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(key = %key, "refresh failed; the entry is kept as it is");
                        return None;
                    }
                };
                cache
                    .inner
                    .refreshes
                    .load_times
                    .insert(key.as_str().to_owned(), started.elapsed());
                cache.store_refresh(&key, &policy, &old, &value).await;
                Some(value)
            }
            .await;
            // Out of the running set before the waiting caller hears of it: a fetch it makes
            // next may start the next refresh.
            drop(running);
            let _ = tx.send(refreshed);
        });
        Some(rx)
    }

    /// Stores a refreshed value if the entry still holds `old`: tags registered for the new TTL
    /// first, as for any tagged write.
    async fn store_refresh<T: Serialize>(
        &self,
        key: &Key,
        policy: &FetchPolicy,
        old: &Bytes,
        value: &T,
    ) {
        if !self.is_on() {
            return;
        }
        let Ok(new) = self.encode(value) else {
            self.inner
                .counters
                .uncacheable
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut ttl = policy.stored_ttl();
        let tags = self.tags_of(key, &[]);
        if !tags.is_empty() {
            let window = IndexWindow::starting_now(
                policy.longest_stored(),
                self.inner.lease_ttl.as_duration(),
            );
            if let Err(e) = self
                .inner
                .store
                .tag_add_at(&tags, key, window.ttl, Source::Primary)
                .await
            {
                tracing::debug!(key = %key, error = %e, "tags not recorded; the refresh is not stored");
                return;
            }
            ttl = window.cut(ttl).unwrap_or(Ttl::MIN);
        }
        let replace = Replace {
            key,
            old,
            new: &new,
            ttl,
        };
        match self.inner.store.run(&replace, OutageRule::Fallback).await {
            Ok(crate::store::Answered::Backend(true) | crate::store::Answered::Fallback(true)) => {
                self.evict_local([key]);
            }
            Ok(_) => {
                self.inner
                    .counters
                    .stale_sets_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = %key, "the entry changed during the refresh; not stored");
            }
            Err(e) => tracing::debug!(key = %key, error = %e, "refresh not stored"),
        }
    }
}
