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

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::breaker::{Admit, Breaker, BreakerState, Transition};
use super::{BackendKind, CacheLayer, Entry, MemoryLayer, Remaining};
use crate::clock::Clock;
use crate::config::{Config, Fallback};
use crate::error::{Error, ErrorKind, Result};
use crate::key::Key;
use crate::ttl::Ttl;

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
    /// Entries in process memory (the memory backend, or the fallback).
    pub memory_entries: u64,
}

#[derive(Default)]
struct Counters {
    errors: AtomicU64,
    timeouts: AtomicU64,
    fallbacks: AtomicU64,
    short_circuited: AtomicU64,
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
                    Arc::new(MemoryLayer::new(config.get_memory_max_bytes())),
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
        }
    }

    /// The configured per-operation timeout.
    pub fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    /// Reads `key` and says who answered.
    pub async fn get_with_source(&self, key: &Key) -> Result<(Option<Bytes>, Source)> {
        match self.attempt("GET", self.inner.primary.get(key)).await {
            Outcome::Done(v) => Ok((v, Source::Primary)),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match &self.inner.fallback {
                Some(f) => Ok((f.get(key).await?, Source::Fallback)),
                None => Ok((None, Source::Nothing)),
            },
        }
    }

    /// Writes a freshly loaded value. With `skip_primary` (the read before the load already found
    /// the primary unusable) only the fallback is written, so that one request never waits on a
    /// sick backend twice.
    pub(crate) async fn fill(&self, key: &Key, value: Bytes, ttl: Ttl, skip_primary: bool) {
        let result = if skip_primary && self.inner.remote {
            self.inner
                .counters
                .fallbacks
                .fetch_add(1, Ordering::Relaxed);
            self.write_fallback(key, value, ttl).await
        } else {
            self.set(key, value, ttl).await
        };
        if let Err(e) = result {
            tracing::debug!(key = %key, error = %e, "cache fill failed");
        }
    }

    async fn write_fallback(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<()> {
        match &self.inner.fallback {
            Some(f) => {
                f.set(key, value, ttl.min(self.inner.fallback_max_ttl))
                    .await
            }
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
        match self
            .attempt("MGET", self.inner.primary.get_many(keys))
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match &self.inner.fallback {
                Some(f) => f.get_many(keys).await,
                None => Ok(vec![None; keys.len()]),
            },
        }
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
            Outcome::Unusable => Ok(from_fallback),
        }
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<u64> {
        let from_fallback = match &self.inner.fallback {
            Some(f) => f.delete_many(keys).await?,
            None => 0,
        };
        match self
            .attempt("UNLINK", self.inner.primary.delete_many(keys))
            .await
        {
            Outcome::Done(removed) => Ok(removed.max(from_fallback)),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => Ok(from_fallback),
        }
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
                Some(f) => {
                    f.set_if_absent(key, value, ttl.min(self.inner.fallback_max_ttl))
                        .await
                }
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
                Some(f) => {
                    f.increment(key, delta, ttl.min(self.inner.fallback_max_ttl))
                        .await
                }
                None => Err(self.unavailable("increment")),
            },
        }
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
