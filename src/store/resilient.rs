//! The resilience wrapper: the one place where backend calls are timed out, counted, logged,
//! circuit-broken and answered from the fallback.
//!
//! Rules, in order, for every call to a remote backend:
//!
//! 1. If the breaker is open, the backend is skipped: no waiting on a sick server.
//! 2. Otherwise the call gets `op_timeout`; a timeout or a connection/backend error is a failure:
//!    counted, logged (throttled, with the number of failures not logged), fed to the breaker.
//! 3. On a failure or a skip, the fallback answers: the memory layer if configured (writes to it
//!    capped at `fallback_max_ttl`), or nothing (a read misses, a write is dropped).
//! 4. Errors about the data itself (wrong type, overflow) are the caller's and pass through; they
//!    do not count against the backend's health.
//!
//! Deletes go to the fallback too, always, so that it never keeps an entry the caller removed.
//! The fallback is emptied when the breaker opens and when it closes: it only ever serves
//! entries written during the current outage.
//!
//! A delete or tag invalidation that cannot reach the backend is not lost: it is queued (up to
//! 100,000 keys and tags; beyond that, counted as lost and logged) and replayed before the next
//! call that reaches the backend is let through, so that an entry invalidated during an outage is
//! never served after it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::breaker::{Admit, Breaker, BreakerState, Transition};
use super::{BackendKind, CacheLayer, Entry, Leased, MemoryLayer, RateCheck, Remaining, is_lease};
use crate::clock::Clock;
use crate::config::{Config, Fallback};
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Key, KeyPattern, Tag};
use crate::ratelimit::Decision;
use crate::ttl::Ttl;

/// Longest a maintenance sweep may run.
const SWEEP_BUDGET: Duration = Duration::from_secs(60);

/// Most keys plus tags kept for replay after an outage.
const MAX_PENDING: usize = 100_000;

/// Keys removed per call when queued invalidations are applied.
const REPLAY_CHUNK: usize = 1_000;

/// Deletes and tag invalidations that could not reach the backend, waiting for it. Each entry
/// carries the generation it was queued at, so that a replay only clears what it applied: an
/// entry queued again meanwhile stays.
#[derive(Default)]
struct Pending {
    keys: HashMap<Key, u64>,
    tags: HashMap<Tag, u64>,
    generation: u64,
}

impl Pending {
    fn len(&self) -> usize {
        self.keys.len() + self.tags.len()
    }
}

/// What [`Store::invalidate`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Invalidated {
    /// Entries removed by key.
    pub keys_removed: u64,
    /// Entries removed through tags.
    pub tag_entries_removed: u64,
    /// The backend was unusable: the invalidation is queued and will be applied before the
    /// backend serves again. (The fallback was invalidated at once.)
    pub deferred: bool,
}

/// Where a read was answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The primary backend answered.
    Primary,
    /// The primary was unusable; the memory fallback answered.
    Fallback,
    /// The primary was unusable and there is no fallback: a miss.
    Nothing,
}

/// Counters and state of a [`Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// The primary backend.
    pub backend: BackendKind,
    /// The last call to the primary succeeded and its breaker is closed (always true for memory).
    pub connected: bool,
    /// The breaker's state.
    pub breaker: BreakerState,
    /// Failed calls to the primary, timeouts included.
    pub errors: u64,
    /// Calls to the primary that timed out.
    pub timeouts: u64,
    /// Operations answered without the primary (by the fallback or by nothing).
    pub fallbacks: u64,
    /// Calls that skipped the primary because the breaker was open.
    pub short_circuited: u64,
    /// Entries in process memory (the memory backend, or the fallback). moka updates its count
    /// lazily, so this is approximate.
    pub memory_entries: u64,
    /// Keys and tags whose invalidation waits for the backend to come back.
    pub pending_invalidations: u64,
    /// Invalidations dropped because the queue was full (those entries expire by their TTL).
    pub lost_invalidations: u64,
}

#[derive(Default)]
struct Counters {
    errors: AtomicU64,
    timeouts: AtomicU64,
    fallbacks: AtomicU64,
    short_circuited: AtomicU64,
    lost_invalidations: AtomicU64,
}

/// Lets one log line through per interval and counts the rest.
struct LogThrottle {
    interval: u64,
    next_at: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    fn new(interval: Duration) -> LogThrottle {
        LogThrottle {
            interval: interval.as_nanos().min(u128::from(u64::MAX)) as u64,
            next_at: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(number suppressed since the last line)` when this event may be logged.
    fn admit(&self, now: Duration) -> Option<u64> {
        let now = now.as_nanos().min(u128::from(u64::MAX)) as u64;
        let next = self.next_at.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_at
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

enum Replay {
    /// Nothing is left.
    Done,
    /// The backend answered, but work is left (the time ran out, or more was queued).
    Unfinished,
    /// The backend failed.
    Failed,
}

enum Outcome<T> {
    /// The primary answered.
    Done(T),
    /// The primary answered with an error about the data.
    Refused(Error),
    /// The primary failed or was skipped.
    Unusable,
}

/// Frees a half-open breaker's probe slot if the call is dropped before it finishes.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    admit: Admit,
    finished: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.breaker.on_abandoned(self.admit);
        }
    }
}

struct Inner {
    primary: Arc<dyn CacheLayer>,
    fallback: Option<MemoryLayer>,
    remote: bool,
    op_timeout: Duration,
    fallback_max_ttl: Ttl,
    breaker: Breaker,
    counters: Counters,
    throttle: LogThrottle,
    clock: Arc<dyn Clock>,
    pending: Mutex<Pending>,
    has_pending: AtomicBool,
}

/// A [`CacheLayer`] with the resilience rules applied; what policy modules talk to.
///
/// While the backend is unusable, reads are answered by the fallback (or miss), writes go to the
/// fallback (or are dropped): no call returns an availability error, except
/// [`set_if_absent`](CacheLayer::set_if_absent), [`increment`](CacheLayer::increment) and
/// [`remaining_ttl`](CacheLayer::remaining_ttl) when there is no fallback to answer them, which
/// return [`ErrorKind::Unavailable`]. Cloning is cheap and clones share everything.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

static MEMORY_NOTICE: AtomicBool = AtomicBool::new(false);

impl Store {
    /// Builds the store a [`Config`] describes. Redis is connected lazily: this fails only for
    /// invalid configuration, never because Redis is down.
    pub async fn connect(config: &Config) -> Result<Store> {
        match config.redis_config() {
            None => {
                if !MEMORY_NOTICE.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "no Redis configured (REDIS_URL and REDIS_HOST are unset): speedlayer \
                         uses the in-memory backend"
                    );
                }
                Ok(Store::from_layer(
                    Arc::new(MemoryLayer::with_clock(
                        config.get_memory_max_bytes(),
                        config.get_clock(),
                    )),
                    config,
                ))
            }
            #[cfg(feature = "redis")]
            Some(redis_config) => {
                let layer = super::redis::RedisLayer::connect(redis_config).await?;
                let store = Store::from_layer(Arc::new(layer), config);
                let warm_up = tokio::time::timeout(
                    redis_config.get_connect_timeout(),
                    store.inner.primary.ping(),
                )
                .await;
                match warm_up {
                    Ok(Ok(())) => tracing::info!(target = %redis_config, "connected to Redis"),
                    Ok(Err(e)) => tracing::warn!(
                        target = %redis_config,
                        error = %e,
                        "Redis is not reachable yet; serving from the fallback until it is"
                    ),
                    Err(_) => tracing::warn!(
                        target = %redis_config,
                        "Redis did not answer within the connect timeout; serving from the \
                         fallback until it does"
                    ),
                }
                Ok(store)
            }
            #[cfg(not(feature = "redis"))]
            Some(redis_config) => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "Redis is configured ({redis_config}) but speedlayer was built without its \
                     `redis` feature"
                ),
            )),
        }
    }

    /// Wraps any [`CacheLayer`] with the rules of `config` (timeout, breaker, fallback). A
    /// [`BackendKind::Memory`] layer is used as is: it cannot be slow or down.
    pub fn from_layer(primary: Arc<dyn CacheLayer>, config: &Config) -> Store {
        let remote = primary.kind() != BackendKind::Memory;
        let fallback = match (remote, config.get_fallback()) {
            (true, Fallback::Memory) => Some(MemoryLayer::new(config.get_memory_max_bytes())),
            _ => None,
        };
        let clock = config.get_clock();
        Store {
            inner: Arc::new(Inner {
                primary,
                fallback,
                remote,
                op_timeout: config.get_op_timeout(),
                fallback_max_ttl: config.get_fallback_max_ttl(),
                breaker: Breaker::new(
                    config.get_failure_threshold(),
                    config.get_cool_down(),
                    clock.clone(),
                ),
                counters: Counters::default(),
                throttle: LogThrottle::new(config.get_log_interval()),
                clock,
                pending: Mutex::new(Pending::default()),
                has_pending: AtomicBool::new(false),
            }),
        }
    }

    /// The breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Counters and state.
    pub fn stats(&self) -> StoreStats {
        let inner = &self.inner;
        let c = &inner.counters;
        let breaker = inner.breaker.state();
        StoreStats {
            backend: inner.primary.kind(),
            connected: !inner.remote
                || (breaker == BreakerState::Closed && inner.breaker.consecutive_failures() == 0),
            breaker,
            errors: c.errors.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
            short_circuited: c.short_circuited.load(Ordering::Relaxed),
            memory_entries: match &inner.fallback {
                Some(f) => f.memory_entries(),
                None => inner.primary.memory_entries(),
            },
            pending_invalidations: self.lock_pending().len() as u64,
            lost_invalidations: c.lost_invalidations.load(Ordering::Relaxed),
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Every update of the queue is a single insert or remove: a panic cannot leave it
        // half-written.
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues invalidations the backend did not get, and opens the breaker: no read may reach
    /// the backend before they are applied, and only the probe applies them.
    fn defer(&self, keys: &[Key], tags: &[Tag]) {
        if !self.inner.remote || (keys.is_empty() && tags.is_empty()) {
            return;
        }
        let mut lost = 0u64;
        {
            let mut p = self.lock_pending();
            p.generation += 1;
            let generation = p.generation;
            for key in keys {
                if p.len() < MAX_PENDING || p.keys.contains_key(key) {
                    p.keys.insert(key.clone(), generation);
                } else {
                    lost += 1;
                }
            }
            for tag in tags {
                if p.len() < MAX_PENDING || p.tags.contains_key(tag) {
                    p.tags.insert(tag.clone(), generation);
                } else {
                    lost += 1;
                }
            }
            self.inner.has_pending.store(true, Ordering::Release);
        }
        if self.inner.breaker.trip() {
            if let Some(f) = &self.inner.fallback {
                f.clear();
            }
            tracing::warn!(
                backend = %self.inner.primary.kind(),
                "an invalidation could not reach the backend: circuit opened until it is applied"
            );
        }
        if lost > 0 {
            self.inner
                .counters
                .lost_invalidations
                .fetch_add(lost, Ordering::Relaxed);
            tracing::error!(
                lost,
                "the queue of invalidations waiting for the backend is full; these entries can \
                 be served stale until their TTL ends"
            );
        }
    }

    /// Applies queued invalidations within one operation timeout, in chunks; each chunk leaves
    /// the queue as soon as the backend has applied it.
    async fn replay(&self) -> Replay {
        let inner = &*self.inner;
        let deadline = tokio::time::Instant::now() + inner.op_timeout;
        let (keys, tags) = {
            let p = self.lock_pending();
            let keys: Vec<(Key, u64)> = p.keys.iter().map(|(k, g)| (k.clone(), *g)).collect();
            let tags: Vec<(Tag, u64)> = p.tags.iter().map(|(t, g)| (t.clone(), *g)).collect();
            (keys, tags)
        };
        let total = keys.len() + tags.len();
        for chunk in keys.chunks(REPLAY_CHUNK) {
            let batch: Vec<Key> = chunk.iter().map(|(k, _)| k.clone()).collect();
            match tokio::time::timeout_at(deadline, inner.primary.delete_many(&batch)).await {
                Ok(Ok(_)) => {
                    let mut p = self.lock_pending();
                    for (key, generation) in chunk {
                        if p.keys.get(key) == Some(generation) {
                            p.keys.remove(key);
                        }
                    }
                }
                Ok(Err(e)) if e.is_unavailable() => return Replay::Failed,
                Ok(Err(_)) => {}
                Err(_) => return Replay::Unfinished,
            }
        }
        for (tag, generation) in &tags {
            match tokio::time::timeout_at(deadline, inner.primary.invalidate_tag(tag)).await {
                Ok(Ok(_)) => {
                    let mut p = self.lock_pending();
                    if p.tags.get(tag) == Some(generation) {
                        p.tags.remove(tag);
                    }
                }
                Ok(Err(e)) if e.is_unavailable() => return Replay::Failed,
                // A tag index another client overwrote cannot be applied; do not retry forever.
                Ok(Err(_)) => {
                    self.lock_pending().tags.remove(tag);
                }
                Err(_) => return Replay::Unfinished,
            }
        }
        let p = self.lock_pending();
        if p.len() == 0 {
            inner.has_pending.store(false, Ordering::Release);
            drop(p);
            tracing::info!(
                applied = total,
                "invalidations queued while the backend was unusable were applied"
            );
            Replay::Done
        } else {
            Replay::Unfinished
        }
    }

    /// Deletes `keys` and invalidates `tags`, in the backend and the fallback. When the backend
    /// is unusable the work is queued for it ([`Invalidated::deferred`]), never dropped.
    pub async fn invalidate(&self, keys: &[Key], tags: &[Tag]) -> Result<Invalidated> {
        let mut done = Invalidated::default();
        if !keys.is_empty() {
            let (removed, deferred) = self.delete_keys(keys).await?;
            done.keys_removed = removed;
            done.deferred |= deferred;
        }
        for tag in tags {
            let (removed, deferred) = self.invalidate_one_tag(tag).await?;
            done.tag_entries_removed += removed;
            done.deferred |= deferred;
        }
        Ok(done)
    }

    /// Deletes `keys` in the fallback and the backend; when the backend is unusable its part is
    /// queued. Returns the keys removed and whether the backend's part was deferred.
    async fn delete_keys(&self, keys: &[Key]) -> Result<(u64, bool)> {
        let from_fallback = match &self.inner.fallback {
            Some(f) => f.delete_many(keys).await?,
            None => 0,
        };
        match self
            .attempt("UNLINK", self.inner.primary.delete_many(keys))
            .await
        {
            Outcome::Done(n) => Ok((n.max(from_fallback), false)),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => {
                self.defer(keys, &[]);
                Ok((from_fallback, true))
            }
        }
    }

    /// [`Store::delete_keys`] for the entries of one tag.
    async fn invalidate_one_tag(&self, tag: &Tag) -> Result<(u64, bool)> {
        let from_fallback = match &self.inner.fallback {
            Some(f) => f.invalidate_tag(tag).await?,
            None => 0,
        };
        match self
            .attempt("invalidate tag", self.inner.primary.invalidate_tag(tag))
            .await
        {
            Outcome::Done(n) => Ok((n.max(from_fallback), false)),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => {
                self.defer(&[], std::slice::from_ref(tag));
                Ok((from_fallback, true))
            }
        }
    }

    /// [`CacheLayer::get_or_lease`], saying who answered. With `skip_primary` only the fallback
    /// is asked.
    pub async fn get_or_lease_with_source(
        &self,
        key: &Key,
        token: u64,
        lease_ttl: Ttl,
        replace: Option<&[u8]>,
        skip_primary: bool,
    ) -> Result<(Leased, Source)> {
        if !(skip_primary && self.inner.remote) {
            match self
                .attempt(
                    "GET (lease)",
                    self.inner
                        .primary
                        .get_or_lease(key, token, lease_ttl, replace),
                )
                .await
            {
                Outcome::Done(leased) => return Ok((leased, Source::Primary)),
                Outcome::Refused(e) => return Err(e),
                Outcome::Unusable => {}
            }
        } else {
            self.inner
                .counters
                .fallbacks
                .fetch_add(1, Ordering::Relaxed);
        }
        match &self.inner.fallback {
            Some(f) => Ok((
                f.get_or_lease(key, token, self.fallback_ttl(lease_ttl), replace)
                    .await?,
                Source::Fallback,
            )),
            None => Ok((Leased::Denied, Source::Nothing)),
        }
    }

    /// Records `member` in `tags` where its lease was granted (`source`). An error means the
    /// entry must not be cached: it could not be indexed.
    pub async fn tag_add_at(
        &self,
        tags: &[Tag],
        member: &Key,
        ttl: Ttl,
        source: Source,
    ) -> Result<()> {
        match source {
            Source::Primary => match self
                .attempt("tag add", self.inner.primary.tag_add(tags, member, ttl))
                .await
            {
                Outcome::Done(()) => Ok(()),
                Outcome::Refused(e) => Err(e),
                Outcome::Unusable => Err(self.unavailable("tag_add")),
            },
            Source::Fallback => match &self.inner.fallback {
                Some(f) => f.tag_add(tags, member, ttl).await,
                None => Err(self.unavailable("tag_add")),
            },
            Source::Nothing => Err(self.unavailable("tag_add")),
        }
    }

    /// The configured per-operation timeout.
    pub fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    /// The primary's in-process rate limiter, when the primary is the memory backend.
    pub(crate) fn primary_memory_limiter(&self) -> Option<crate::ratelimit::MemoryLimiter> {
        self.inner.primary.memory_limiter().cloned()
    }

    /// How long an open breaker waits before it probes the backend.
    pub fn cool_down(&self) -> Duration {
        self.inner.breaker.cool_down()
    }

    /// A rate-limit check on the primary under the resilience rules; `None` when the primary is
    /// unusable (the caller decides what answers then).
    pub async fn rate_limit_primary(&self, checks: &[RateCheck]) -> Option<Vec<Decision>> {
        if checks.is_empty() {
            return Some(Vec::new());
        }
        match self
            .attempt("rate limit", self.inner.primary.rate_limit(checks))
            .await
        {
            Outcome::Done(decisions) => Some(decisions),
            Outcome::Refused(e) => {
                // A counter key holding another type: treat as unusable rather than as "deny
                // everything" or "allow everything"; the route's outage rule answers.
                tracing::warn!(error = %e, "rate-limit check refused by the backend");
                None
            }
            Outcome::Unusable => None,
        }
    }

    /// Reads `key` and says who answered.
    ///
    /// A lease marker (a load in flight) reads as `None`.
    pub async fn get_with_source(&self, key: &Key) -> Result<(Option<Bytes>, Source)> {
        let (value, source) = match self.attempt("GET", self.inner.primary.get(key)).await {
            Outcome::Done(v) => (v, Source::Primary),
            Outcome::Refused(e) => return Err(e),
            Outcome::Unusable => match &self.inner.fallback {
                Some(f) => (f.get(key).await?, Source::Fallback),
                None => (None, Source::Nothing),
            },
        };
        Ok((value.filter(|v| !is_lease(v)), source))
    }

    /// [`CacheLayer::set_leased`] where the lease was granted (`source`): only that store is
    /// written.
    pub async fn set_leased_at(
        &self,
        key: &Key,
        token: u64,
        value: Bytes,
        ttl: Ttl,
        source: Source,
    ) -> Result<bool> {
        match source {
            Source::Primary => match self
                .attempt(
                    "SET (leased)",
                    self.inner.primary.set_leased(key, token, value, ttl),
                )
                .await
            {
                Outcome::Done(stored) => Ok(stored),
                Outcome::Refused(e) => Err(e),
                Outcome::Unusable => Ok(false),
            },
            Source::Fallback => match &self.inner.fallback {
                Some(f) => {
                    f.set_leased(key, token, value, self.fallback_ttl(ttl))
                        .await
                }
                None => Ok(false),
            },
            Source::Nothing => Ok(false),
        }
    }

    /// A TTL as the fallback keeps it: at most `fallback_max_ttl`.
    fn fallback_ttl(&self, ttl: Ttl) -> Ttl {
        ttl.min(self.inner.fallback_max_ttl)
    }

    async fn write_fallback(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<()> {
        match &self.inner.fallback {
            Some(f) => f.set(key, value, self.fallback_ttl(ttl)).await,
            None => Ok(()),
        }
    }

    /// Runs one call against the primary under the rules above.
    async fn attempt<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Outcome<T> {
        let inner = &*self.inner;
        if !inner.remote {
            return match call.await {
                Ok(v) => Outcome::Done(v),
                Err(e) => Outcome::Refused(e),
            };
        }
        let admit = inner.breaker.admit();
        if admit == Admit::Skip {
            inner
                .counters
                .short_circuited
                .fetch_add(1, Ordering::Relaxed);
            inner.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Outcome::Unusable;
        }
        let mut guard = ProbeGuard {
            breaker: &inner.breaker,
            admit,
            finished: false,
        };
        // Invalidations queued while the backend was unusable go first, applied by the probe
        // (queuing opened the breaker): nothing is read from the backend before they are.
        if matches!(admit, Admit::Probe(_)) && inner.has_pending.load(Ordering::Acquire) {
            match self.replay().await {
                Replay::Done => {}
                Replay::Unfinished => {
                    // The backend works; the next call goes on with the queue at once.
                    guard.finished = true;
                    inner.breaker.on_abandoned(admit);
                    inner.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                    return Outcome::Unusable;
                }
                Replay::Failed => {
                    guard.finished = true;
                    let e = Error::new(
                        ErrorKind::Unavailable,
                        "invalidations queued while the backend was unusable could not be applied",
                    );
                    self.failed(op, admit, e);
                    return Outcome::Unusable;
                }
            }
        }
        let result = tokio::time::timeout(inner.op_timeout, call).await;
        guard.finished = true;
        match result {
            Ok(Ok(v)) => {
                self.succeeded(admit);
                Outcome::Done(v)
            }
            Ok(Err(e)) if !e.is_unavailable() => {
                self.succeeded(admit);
                Outcome::Refused(e)
            }
            Ok(Err(e)) => {
                self.failed(op, admit, e);
                Outcome::Unusable
            }
            Err(_) => {
                inner.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                let e = Error::new(
                    ErrorKind::Timeout,
                    format!("Redis did not answer {op} within {:?}", inner.op_timeout),
                );
                self.failed(op, admit, e);
                Outcome::Unusable
            }
        }
    }

    fn succeeded(&self, admit: Admit) {
        if self.inner.breaker.on_success(admit) == Transition::Closed {
            if let Some(f) = &self.inner.fallback {
                f.clear();
            }
            tracing::info!(
                backend = %self.inner.primary.kind(),
                "backend answers again: circuit closed, fallback emptied"
            );
        }
    }

    fn failed(&self, op: &'static str, admit: Admit, error: Error) {
        let inner = &*self.inner;
        inner.counters.errors.fetch_add(1, Ordering::Relaxed);
        inner.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        if inner.breaker.on_failure(admit) == Transition::Opened {
            if let Some(f) = &inner.fallback {
                f.clear();
            }
            tracing::warn!(
                backend = %inner.primary.kind(),
                failures = inner.breaker.consecutive_failures(),
                error = %error,
                "circuit opened: calls skip the backend and are served by the fallback until a \
                 probe succeeds"
            );
            return;
        }
        if let Some(suppressed) = inner.throttle.admit(inner.clock.now()) {
            tracing::warn!(
                backend = %inner.primary.kind(),
                op,
                error = %error,
                suppressed,
                "backend call failed; served by the fallback"
            );
        }
    }

    fn unavailable(&self, op: &str) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "{op}: the {} backend is unusable and no fallback is configured",
                self.inner.primary.kind()
            ),
        )
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("primary", &self.inner.primary)
            .field("fallback", &self.inner.fallback.is_some())
            .field("op_timeout", &self.inner.op_timeout)
            .field("breaker", &self.inner.breaker)
            .finish()
    }
}

#[async_trait]
impl CacheLayer for Store {
    fn kind(&self) -> BackendKind {
        self.inner.primary.kind()
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        self.get_with_source(key).await.map(|(v, _)| v)
    }

    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>> {
        let values = match self
            .attempt("MGET", self.inner.primary.get_many(keys))
            .await
        {
            Outcome::Done(v) => v,
            Outcome::Refused(e) => return Err(e),
            Outcome::Unusable => match &self.inner.fallback {
                Some(f) => f.get_many(keys).await?,
                None => vec![None; keys.len()],
            },
        };
        // A key whose load is running holds its lease marker: a miss, as for `get`.
        Ok(values
            .into_iter()
            .map(|v| v.filter(|v| !is_lease(v)))
            .collect())
    }

    async fn set(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<()> {
        match self
            .attempt("SET", self.inner.primary.set(key, value.clone(), ttl))
            .await
        {
            Outcome::Done(()) => Ok(()),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => self.write_fallback(key, value, ttl).await,
        }
    }

    async fn set_many(&self, entries: &[Entry]) -> Result<()> {
        match self
            .attempt("SET (pipeline)", self.inner.primary.set_many(entries))
            .await
        {
            Outcome::Done(()) => Ok(()),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => {
                for e in entries {
                    self.write_fallback(&e.key, e.value.clone(), e.ttl).await?;
                }
                Ok(())
            }
        }
    }

    async fn delete(&self, key: &Key) -> Result<bool> {
        let from_fallback = match &self.inner.fallback {
            Some(f) => f.delete(key).await?,
            None => false,
        };
        match self.attempt("UNLINK", self.inner.primary.delete(key)).await {
            Outcome::Done(removed) => Ok(removed || from_fallback),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => {
                self.defer(std::slice::from_ref(key), &[]);
                Ok(from_fallback)
            }
        }
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<u64> {
        self.delete_keys(keys).await.map(|(removed, _)| removed)
    }

    async fn remaining_ttl(&self, key: &Key) -> Result<Remaining> {
        match self
            .attempt("PTTL", self.inner.primary.remaining_ttl(key))
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match &self.inner.fallback {
                Some(f) => f.remaining_ttl(key).await,
                None => Err(self.unavailable("remaining_ttl")),
            },
        }
    }

    async fn set_if_absent(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<bool> {
        match self
            .attempt(
                "SET NX",
                self.inner.primary.set_if_absent(key, value.clone(), ttl),
            )
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match &self.inner.fallback {
                Some(f) => f.set_if_absent(key, value, self.fallback_ttl(ttl)).await,
                None => Err(self.unavailable("set_if_absent")),
            },
        }
    }

    async fn increment(&self, key: &Key, delta: i64, ttl: Ttl) -> Result<i64> {
        match self
            .attempt("INCRBY", self.inner.primary.increment(key, delta, ttl))
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match &self.inner.fallback {
                Some(f) => f.increment(key, delta, self.fallback_ttl(ttl)).await,
                None => Err(self.unavailable("increment")),
            },
        }
    }

    async fn get_or_lease(
        &self,
        key: &Key,
        token: u64,
        lease_ttl: Ttl,
        replace: Option<&[u8]>,
    ) -> Result<Leased> {
        self.get_or_lease_with_source(key, token, lease_ttl, replace, false)
            .await
            .map(|(leased, _)| leased)
    }

    async fn set_leased(&self, key: &Key, token: u64, value: Bytes, ttl: Ttl) -> Result<bool> {
        // The lease is in the backend or in the fallback; each only accepts its own marker.
        let stored = self
            .set_leased_at(key, token, value.clone(), ttl, Source::Primary)
            .await?;
        if stored || !self.inner.remote {
            return Ok(stored);
        }
        self.set_leased_at(key, token, value, ttl, Source::Fallback)
            .await
    }

    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()> {
        match self.tag_add_at(tags, member, ttl, Source::Primary).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_unavailable() => {
                // Index in the fallback for entries it holds, and still report the failure: a
                // lease granted by the backend must not be used for an unindexed entry.
                if let Some(f) = &self.inner.fallback {
                    f.tag_add(tags, member, ttl).await?;
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn invalidate_tag(&self, tag: &Tag) -> Result<u64> {
        self.invalidate_one_tag(tag)
            .await
            .map(|(removed, _)| removed)
    }

    async fn sweep(&self, pattern: &KeyPattern, batch: usize, max_removed: u64) -> Result<u64> {
        let from_fallback = match &self.inner.fallback {
            Some(f) => f.sweep(pattern, batch, max_removed).await?,
            None => 0,
        };
        // A sweep walks the whole keyspace, so it gets a budget of its own rather than one
        // operation timeout, and is not started against a backend known to be unusable.
        if self.inner.remote && self.inner.breaker.state() != BreakerState::Closed {
            return Err(self.unavailable("sweep"));
        }
        match tokio::time::timeout(
            SWEEP_BUDGET,
            self.inner.primary.sweep(pattern, batch, max_removed),
        )
        .await
        {
            Ok(Ok(n)) => Ok(n.max(from_fallback)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("the sweep did not finish within {SWEEP_BUDGET:?}; run it again to go on"),
            )),
        }
    }

    async fn rate_limit(&self, checks: &[RateCheck]) -> Result<Vec<Decision>> {
        self.rate_limit_primary(checks)
            .await
            .ok_or_else(|| self.unavailable("rate_limit"))
    }

    async fn ping(&self) -> Result<()> {
        match self.attempt("PING", self.inner.primary.ping()).await {
            Outcome::Done(()) => Ok(()),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => Err(self.unavailable("ping")),
        }
    }

    fn memory_entries(&self) -> u64 {
        self.stats().memory_entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_line_through_per_interval() {
        let t = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(t.admit(Duration::from_secs(0)), Some(0));
        assert_eq!(t.admit(Duration::from_secs(1)), None);
        assert_eq!(t.admit(Duration::from_secs(9)), None);
        assert_eq!(t.admit(Duration::from_secs(10)), Some(2));
        assert_eq!(t.admit(Duration::from_secs(11)), None);
    }
}
