//! The resilience wrapper: the one place where backend calls are timed out, counted, logged,
//! circuit-broken and answered from the fallback.
//!
//! Rules, in order, for every call to a remote backend:
//!
//! 1. If the breaker is open, the backend is skipped: no waiting on a sick server. After an
//!    outage, the probe that finds the backend answering is a `PING`, and calls keep skipping the
//!    backend for the recovery hold (`Config::recovery_hold`), while every instance applies the
//!    invalidations it queued; removals (deletes, tag invalidations, lease releases) go through
//!    during the hold. A call that fails on a lost connection opens the breaker at once.
//! 2. Otherwise the call gets `op_timeout`; a timeout or a connection/backend error is a failure:
//!    counted, logged (throttled, with the number of failures not logged), fed to the breaker. A
//!    timeout also tells the backend to replace its connection (its peer may have vanished).
//! 3. On a failure or a skip, the call's outage rule answers. For the cache's own calls that is
//!    the fallback, **only while the breaker is open** (a declared outage): the memory layer if
//!    configured (writes to it capped at `fallback_max_ttl`, with their tags), or nothing (a read
//!    misses, a write is dropped). A single failed call while the breaker is still closed is a
//!    miss (or a dropped write), never an answer from the fallback. Capabilities choose their
//!    rule per call ([`Store::run`], [`OutageRule`]).
//! 4. Errors about the data itself (wrong type, overflow, a script failing on another client's
//!    value) are the caller's and pass through; they do not count against the backend's health.
//!
//! The fallback is emptied when the breaker opens and when it closes: it only ever serves
//! entries this process wrote during the current outage. It cannot see invalidations other
//! processes make meanwhile (they have no way to reach it), so during an outage an entry can be
//! served for up to `fallback_max_ttl` after another instance invalidated it; this process's own
//! invalidations reach it at once. Deletes go to the fallback too, always, so that it never
//! keeps an entry the caller removed.
//!
//! A delete or tag invalidation that cannot reach the backend is not lost: it is queued (up to
//! 100,000 keys and tags; beyond that, counted as lost and logged), the breaker opens so that no
//! read reaches the backend before it is applied, and a background task retries it with backoff
//! as soon as the backend answers a `PING`, without waiting for the breaker's cool-down or for
//! traffic.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::telemetry::Tally;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::breaker::{Admit, Breaker, BreakerState, Transition};
use super::{
    Answered, Backend, BackendKind, CacheLayer, Entry, INVALIDATION_PASSES, IndexWindow,
    LeaseRequest, Leased, LeasedEntry, MemoryLayer, Operation, OutageRule, Remaining, TAG_CHUNK,
    TagChunk, TagCursor, TagMember, TagPass, clear_tag, is_lease,
};
use crate::clock::Clock;
use crate::config::{Config, Fallback};
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Key, KeyPattern, Tag};
use crate::ttl::Ttl;

/// Longest a maintenance sweep may run.
const SWEEP_BUDGET: Duration = Duration::from_secs(60);

/// Most keys plus tags kept for replay after an outage.
const MAX_PENDING: usize = 100_000;

/// Keys removed per call when queued invalidations are applied.
const REPLAY_CHUNK: usize = 1_000;

/// First and longest wait of the background replay between two attempts.
/// The longest is well inside the default recovery hold: every instance's queue is applied before
/// the other instances read the backend again.
const REPLAY_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(20), Duration::from_millis(100));

/// Deletes and tag invalidations that could not reach the backend, waiting for it. Each entry
/// carries the generation it was queued at, so that a replay only clears what it applied: an
/// entry queued again meanwhile stays.
#[derive(Default)]
struct Pending {
    keys: HashMap<Key, u64>,
    tags: HashMap<Tag, u64>,
    generation: u64,
}

/// Removes the queued items that were applied and not queued again since (same generation);
/// answers how many.
fn forget_applied<T: std::hash::Hash + Eq>(
    queued: &mut HashMap<T, u64>,
    applied: &[(T, u64)],
) -> u64 {
    let mut removed = 0;
    for (item, generation) in applied {
        if queued.get(item) == Some(generation) {
            queued.remove(item);
            removed += 1;
        }
    }
    removed
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
    /// The backend was unusable: the invalidation is queued and is applied in the background as
    /// soon as the backend answers, before it serves any read again. (The fallback was
    /// invalidated at once.)
    pub deferred: bool,
}

/// What [`Store::register_tags`] did before a write.
enum Registered {
    /// Recorded (or no tags): write with this TTL.
    Ttl(Ttl),
    /// Recorded, but the index expired already: an entry written now could not be reached.
    Expired,
    /// The primary is unusable: nothing recorded there.
    Unusable,
}

/// Where a read was answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The primary backend answered.
    Primary,
    /// The primary was unusable during an outage (breaker open); the memory fallback answered.
    Fallback,
    /// The primary was unusable and the fallback may not answer (no fallback, or the breaker is
    /// still closed): a miss.
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
    /// Operations answered without the primary (by the fallback, by an outage rule, or by
    /// nothing).
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
    /// Data errors the backend answered (a key of another client's type, a script refusing
    /// another client's value). They never count against the backend's health.
    pub data_errors: u64,
}

struct Counters {
    errors: Tally,
    timeouts: Tally,
    fallbacks: Tally,
    short_circuited: Tally,
    lost_invalidations: Tally,
    data_errors: Tally,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            errors: Tally::new("speedlayer_store_errors_total"),
            timeouts: Tally::new("speedlayer_store_timeouts_total"),
            fallbacks: Tally::new("speedlayer_store_fallbacks_total"),
            short_circuited: Tally::new("speedlayer_store_short_circuited_total"),
            lost_invalidations: Tally::new("speedlayer_store_lost_invalidations_total"),
            data_errors: Tally::new("speedlayer_store_data_errors_total"),
        }
    }
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

/// How long a completed invalidation is kept to be applied again after an outage of a backend
/// that fails over (Redis Cluster, Sentinel): a primary that dies can take writes its replica
/// had not received yet, deletes among them, and the promoted replica then holds entries an
/// invalidation had removed. Replication on a healthy link lags by milliseconds.
pub const FAILOVER_REPLAY_WINDOW: Duration = Duration::from_secs(2);

/// How long the journal keeps a completed invalidation: a change of primary found by asking the
/// sentinels (every second, each ask bounded by a second) reaches back to their last answer that
/// named the old one.
const JOURNAL_KEEP: Duration = Duration::from_secs(6);

/// The invalidations completed within [`FAILOVER_REPLAY_WINDOW`], newest last.
#[derive(Default)]
struct Journal {
    entries: std::collections::VecDeque<(std::time::Instant, Vec<Key>, Vec<Tag>)>,
    items: usize,
}

impl Journal {
    fn record(&mut self, keys: &[Key], tags: &[Tag]) {
        let now = std::time::Instant::now();
        self.prune(now);
        if keys.is_empty() && tags.is_empty() {
            return;
        }
        self.items += keys.len() + tags.len();
        self.entries.push_back((now, keys.to_vec(), tags.to_vec()));
        while self.items > MAX_PENDING {
            match self.entries.pop_front() {
                Some((_, k, t)) => self.items -= k.len() + t.len(),
                None => break,
            }
        }
    }

    fn prune(&mut self, now: std::time::Instant) {
        while let Some((at, k, t)) = self.entries.front() {
            if now.duration_since(*at) <= JOURNAL_KEEP {
                break;
            }
            self.items -= k.len() + t.len();
            self.entries.pop_front();
        }
    }

    /// Everything recorded within [`FAILOVER_REPLAY_WINDOW`], emptying the journal.
    fn take(&mut self) -> (Vec<Key>, Vec<Tag>) {
        let now = std::time::Instant::now();
        self.prune(now);
        self.take_since(now.checked_sub(FAILOVER_REPLAY_WINDOW))
    }

    /// Everything kept that was recorded at or after `since` (`None`: everything kept), taken
    /// out of the journal; older entries stay (a later change of primary may reach further
    /// back).
    fn take_since(&mut self, since: Option<std::time::Instant>) -> (Vec<Key>, Vec<Tag>) {
        let mut keys = Vec::new();
        let mut tags = Vec::new();
        let split = match since {
            Some(since) => self.entries.partition_point(|(at, _, _)| *at < since),
            None => 0,
        };
        for (_, k, t) in self.entries.drain(split..) {
            self.items -= k.len() + t.len();
            keys.extend(k);
            tags.extend(t);
        }
        (keys, tags)
    }
}

struct Inner {
    primary: Arc<dyn CacheLayer>,
    /// Completed invalidations, kept for [`JOURNAL_KEEP`] when the backend can fail
    /// over; queued again when the breaker opens.
    journal: Option<Mutex<Journal>>,
    /// The primary's [`primary_changes`](CacheLayer::primary_changes) acted on, and the lock
    /// that acting on a new one holds.
    primary_changes: AtomicU64,
    following: Mutex<()>,
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
    replaying: AtomicBool,
    switches: Arc<crate::switch::Switches>,
}

/// A [`CacheLayer`] with the resilience rules applied; what capabilities talk to.
///
/// While the backend is unusable, reads are answered by the fallback during an outage (or miss),
/// writes go to the fallback during an outage (or are dropped), deletes and invalidations are
/// queued. Calls that cannot be answered that way return [`ErrorKind::Unavailable`]:
/// [`set_if_absent`](CacheLayer::set_if_absent), [`increment`](CacheLayer::increment) and
/// [`remaining_ttl`](CacheLayer::remaining_ttl) when the fallback may not answer them, and the
/// byte-level [`tag_add`](CacheLayer::tag_add), [`tag_members`](CacheLayer::tag_members),
/// [`tag_forget`](CacheLayer::tag_forget), [`ping`](CacheLayer::ping) and
/// [`sweep`](CacheLayer::sweep). Cloning is cheap and clones share everything.
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
            (true, Fallback::Memory) => Some(MemoryLayer::with_clock(
                config.get_memory_max_bytes(),
                config.get_clock(),
            )),
            _ => None,
        };
        let clock = config.get_clock();
        Store {
            inner: Arc::new(Inner {
                journal: (remote && primary.fails_over()).then(Mutex::default),
                primary_changes: AtomicU64::new(0),
                following: Mutex::new(()),
                primary,
                fallback,
                remote,
                op_timeout: config.get_op_timeout(),
                fallback_max_ttl: config.get_fallback_max_ttl(),
                breaker: Breaker::new(
                    config.get_failure_threshold(),
                    config.get_cool_down(),
                    config.get_recovery_hold(),
                    clock.clone(),
                ),
                counters: Counters::default(),
                throttle: LogThrottle::new(config.get_log_interval()),
                clock,
                pending: Mutex::new(Pending::default()),
                has_pending: AtomicBool::new(false),
                replaying: AtomicBool::new(false),
                switches: Arc::new(crate::switch::Switches::with_off(config.get_switched_off())),
            }),
        }
    }

    /// The rollout switches every capability on this store obeys (see [`switch`](crate::switch)).
    pub fn switches(&self) -> &crate::switch::Switches {
        &self.inner.switches
    }

    /// True when `capability` is switched on.
    pub(crate) fn is_on(&self, capability: crate::switch::Capability) -> bool {
        self.inner.switches.is_on(capability)
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
            data_errors: c.data_errors.load(Ordering::Relaxed),
        }
    }

    /// The configured per-operation timeout.
    pub fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    /// How long an open breaker waits before it probes the backend.
    pub fn cool_down(&self) -> Duration {
        self.inner.breaker.cool_down()
    }

    /// The primary backend, when it is the memory backend (capabilities read their twin's state
    /// from it directly, without an asynchronous call).
    pub fn primary_memory(&self) -> Option<&MemoryLayer> {
        match self.inner.primary.backend() {
            Backend::Memory(m) => Some(m),
            _ => None,
        }
    }

    /// The in-process fallback, if one is configured.
    pub fn fallback(&self) -> Option<&MemoryLayer> {
        self.inner.fallback.as_ref()
    }

    /// True while the fallback may answer: a remote backend whose breaker is open (or probing).
    fn in_outage(&self) -> bool {
        self.inner.remote && self.inner.breaker.state() != BreakerState::Closed
    }

    /// The fallback, when it may answer now.
    fn outage_fallback(&self) -> Option<&MemoryLayer> {
        self.inner.fallback.as_ref().filter(|_| self.in_outage())
    }

    /// Runs a capability's [`Operation`] on the primary under the resilience rules; while the
    /// primary is unusable, `rule` says what answers. Errors are about the data only.
    pub async fn run<O: Operation>(&self, op: &O, rule: OutageRule) -> Result<Answered<O::Output>> {
        let primary = self.inner.primary.backend();
        let call = async {
            match primary {
                Backend::Memory(m) => op.on_memory(m).await,
                #[cfg(feature = "redis")]
                Backend::Redis(r) => op.on_redis(r).await,
                Backend::Other => Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "`{}` needs one of speedlayer's backends (memory or Redis); this store \
                         wraps another CacheLayer",
                        op.name()
                    ),
                )),
            }
        };
        match self.attempt(op.name(), call).await {
            Outcome::Done(v) => Ok(Answered::Backend(v)),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match rule {
                OutageRule::Fallback => match self.outage_fallback() {
                    Some(f) => op.on_memory(f).await.map(Answered::Fallback),
                    None => Ok(Answered::Closed),
                },
                OutageRule::FailOpen => Ok(Answered::Open),
                OutageRule::FailClosed => Ok(Answered::Closed),
            },
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Every update of the queue is a single insert or remove: a panic cannot leave it
        // half-written.
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while invalidations wait for the backend (cheap: one atomic load).
    pub(crate) fn has_pending(&self) -> bool {
        self.inner.has_pending.load(Ordering::Acquire)
    }

    /// Keys and tags whose invalidation waits for the backend.
    pub fn pending_invalidations(&self) -> u64 {
        self.lock_pending().len() as u64
    }

    /// Waits until every queued invalidation has been applied, up to `timeout`; true when none
    /// is left.
    pub async fn flush_invalidations(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.inner.has_pending.load(Ordering::Acquire) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Queues invalidations the backend did not get, opens the breaker (no read may reach the
    /// backend before they are applied), and starts the background replay.
    fn defer(&self, keys: &[Key], tags: &[Tag]) {
        if !self.inner.remote || (keys.is_empty() && tags.is_empty()) {
            return;
        }
        self.queue(keys, tags);
        if self.inner.breaker.trip() {
            self.opened();
            tracing::warn!(
                backend = %self.inner.primary.kind(),
                "an invalidation could not reach the backend: circuit opened until it is applied"
            );
        }
        self.start_replayer();
    }

    /// What every opening of the breaker does: the fallback starts empty (it never serves
    /// entries from before the outage), and on a backend that fails over, the recent
    /// invalidations are queued again.
    fn opened(&self) {
        crate::telemetry::breaker_open(true);
        if let Some(f) = &self.inner.fallback {
            f.clear();
        }
        self.requeue_journal();
    }

    /// Records invalidations the backend applied, on a backend that can fail over. One that
    /// completes while the breaker is open (it was under way on the old primary as it opened) is
    /// queued at once: the journal was queued as the breaker opened, and this one is the
    /// likeliest to be lost. (Removals made during the recovery hold reach the backend that
    /// answers again, and are journalled.)
    fn journal(&self, keys: &[Key], tags: &[Tag]) {
        if self.inner.journal.is_none() {
            return;
        }
        if self.inner.breaker.state() == BreakerState::Open {
            self.queue(keys, tags);
            self.start_replayer();
            return;
        }
        self.remember(keys, tags);
    }

    /// As the breaker opens on a backend that can fail over: the invalidations it applied within
    /// [`FAILOVER_REPLAY_WINDOW`] are queued again, so that they are applied once more, before
    /// any read, when it answers again (perhaps from a promoted replica that had not received
    /// them).
    fn requeue_journal(&self) {
        let Some(journal) = &self.inner.journal else {
            return;
        };
        let (keys, tags) = journal.lock().unwrap_or_else(|e| e.into_inner()).take();
        if keys.is_empty() && tags.is_empty() {
            return;
        }
        tracing::info!(
            keys = keys.len(),
            tags = tags.len(),
            "recent invalidations are applied again when the backend answers (a failover may \
             have lost them)"
        );
        self.queue(&keys, &tags);
        self.start_replayer();
    }

    /// The backend found its primary replaced while the old one still answered (a Sentinel
    /// failover), `changes` times in all: the invalidations made since the old primary was last
    /// known to be the primary (at most [`JOURNAL_KEEP`] back) may have gone to it after the
    /// switch, and are lost when it is made a replica. They are queued again, like after an
    /// outage, before any call goes on: nothing is read from the new primary before they are
    /// applied.
    fn primary_changed(&self, changes: u64) {
        let inner = &*self.inner;
        let _following = inner.following.lock().unwrap_or_else(|e| e.into_inner());
        if inner.primary_changes.load(Ordering::Acquire) >= changes {
            return;
        }
        if let Some(journal) = &inner.journal {
            let since = inner.primary.primary_changed_since();
            let (keys, tags) = journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take_since(since);
            tracing::info!(
                keys = keys.len(),
                tags = tags.len(),
                "the backend's primary was replaced: recent invalidations are applied again"
            );
            self.defer(&keys, &tags);
        }
        inner.primary_changes.fetch_max(changes, Ordering::AcqRel);
    }

    /// Records in the journal invalidations the replay applied (they could be lost in a
    /// failover like any other), whatever the breaker's state.
    fn remember(&self, keys: &[Key], tags: &[Tag]) {
        if let Some(journal) = &self.inner.journal {
            journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(keys, tags);
        }
    }

    /// Adds invalidations to the queue the replay applies.
    fn queue(&self, keys: &[Key], tags: &[Tag]) {
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
        crate::telemetry::pending_invalidations(self.lock_pending().len());
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

    /// Starts the background task that applies queued invalidations as soon as the backend
    /// answers (one task per store at a time).
    fn start_replayer(&self) {
        if self.inner.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        if !super::spawn_detached(replay_in_background(weak)) {
            // No runtime to run it on: the breaker's probe applies the queue instead.
            self.inner.replaying.store(false, Ordering::Release);
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
        // A batch applied while the primary changed may have reached the old one: it stays
        // queued for the next pass.
        let changes = inner.primary.primary_changes();
        let moved = || inner.primary.primary_changes() != changes;
        for chunk in keys.chunks(REPLAY_CHUNK) {
            let batch: Vec<Key> = chunk.iter().map(|(k, _)| k.clone()).collect();
            match tokio::time::timeout_at(deadline, inner.primary.delete_many(&batch)).await {
                Ok(Ok(_)) if moved() => return Replay::Unfinished,
                Ok(Ok(_)) => {
                    forget_applied(&mut self.lock_pending().keys, chunk);
                    self.remember(&batch, &[]);
                }
                Ok(Err(e)) if e.is_unavailable() => return Replay::Failed,
                // An error about the data cannot be mended by retrying: those keys leave the
                // queue (counted), or the replay would spin on them.
                Ok(Err(e)) => {
                    let dropped = forget_applied(&mut self.lock_pending().keys, chunk);
                    inner
                        .counters
                        .data_errors
                        .fetch_add(dropped, Ordering::Relaxed);
                    tracing::warn!(error = %e, dropped, "queued deletes refused by the backend");
                }
                Err(_) => return Replay::Unfinished,
            }
        }
        for one in tags.chunks(1) {
            let tag = &one[0].0;
            // A tag's members leave its index as they are removed, so a replay cut short by the
            // deadline goes on where it stopped. Passed over again while the index listed
            // anything, as `invalidate` does.
            let passes = async {
                for _ in 0..INVALIDATION_PASSES {
                    if clear_tag(&*inner.primary, tag).await?.listed == 0 {
                        break;
                    }
                }
                Ok::<_, Error>(())
            };
            match tokio::time::timeout_at(deadline, passes).await {
                Ok(Err(e)) if e.is_unavailable() => return Replay::Failed,
                Ok(_) if moved() => return Replay::Unfinished,
                // Applied, or a data error, which retrying cannot apply (the index was repaired).
                Ok(_) => {
                    forget_applied(&mut self.lock_pending().tags, one);
                    self.remember(&[], std::slice::from_ref(tag));
                }
                Err(_) => return Replay::Unfinished,
            }
        }
        let p = self.lock_pending();
        crate::telemetry::pending_invalidations(p.len());
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
    ///
    /// An error about the data of one target (another client's value where a tag index lives)
    /// does not stop the others: every target is attempted, and the first such error is
    /// returned at the end.
    ///
    /// Entries built from other cached entries (a dashboard whose loader reads cached profiles)
    /// are covered too. Such an entry can be registered while the invalidation runs, after its
    /// tag was read and before the entry it was built from was removed, and so hold the old
    /// data without being listed. So when a pass found any entry listed under the tags, the
    /// tags are passed over again: the second pass removes what the first let through (the
    /// indexes then list only entries registered since), up to [`INVALIDATION_PASSES`] passes in
    /// all, which covers entries built from cached entries that are themselves built from cached
    /// entries. A pass whose indexes list nothing ends it; usually that is the second, one more
    /// read per tag.
    ///
    /// What was listed counts, not what was removed: when two invalidations of one tag run at
    /// once (two writers in two processes), the entry both listed is removed by one of them, and
    /// the other, finding nothing left to remove, must still look again for what was built from
    /// it before it returns. Keys are removed once, before the tags: an entry registered after
    /// a tag was read was loaded after the keys were gone.
    pub async fn invalidate(&self, keys: &[Key], tags: &[Tag]) -> Result<Invalidated> {
        let (mut done, mut listed) = self.invalidate_pass(keys, tags).await?;
        for _ in 1..INVALIDATION_PASSES {
            if listed == 0 || done.deferred {
                break;
            }
            let (again, listed_again) = self.invalidate_pass(&[], tags).await?;
            listed = listed_again;
            done.tag_entries_removed += again.tag_entries_removed;
            done.deferred |= again.deferred;
        }
        Ok(done)
    }

    /// One pass of [`invalidate`](Store::invalidate) over every key and tag; also says how many
    /// members the tags' indexes listed.
    async fn invalidate_pass(&self, keys: &[Key], tags: &[Tag]) -> Result<(Invalidated, u64)> {
        let mut done = Invalidated::default();
        let mut listed = 0;
        let mut first_error = None;
        if !keys.is_empty() {
            match self.delete_keys(keys).await {
                Ok((removed, deferred)) => {
                    done.keys_removed = removed;
                    done.deferred |= deferred;
                }
                Err(e) => first_error = Some(e),
            }
        }
        for tag in tags {
            match self.invalidate_one_tag(tag).await {
                Ok((pass, deferred)) => {
                    if !deferred {
                        self.journal(&[], std::slice::from_ref(tag));
                    }
                    done.tag_entries_removed += pass.removed;
                    listed += pass.listed;
                    done.deferred |= deferred;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok((done, listed)),
        }
    }

    /// Deletes `keys` in the fallback and the backend; when the backend is unusable its part is
    /// queued. Returns the keys removed and whether the backend's part was deferred.
    async fn delete_keys(&self, keys: &[Key]) -> Result<(u64, bool)> {
        let from_fallback = match &self.inner.fallback {
            Some(f) => f.delete_many(keys).await?,
            None => 0,
        };
        match self
            .attempt_removal("UNLINK", self.inner.primary.delete_many(keys))
            .await
        {
            Outcome::Done(n) => {
                self.journal(keys, &[]);
                Ok((n.max(from_fallback), false))
            }
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => {
                self.defer(keys, &[]);
                Ok((from_fallback, true))
            }
        }
    }

    /// Invalidates one tag in the fallback and the backend, in chunks of [`TAG_CHUNK`] members,
    /// each chunk a call of its own under the operation timeout: a large tag never has to fit in
    /// one timeout, and a chunk cut short is queued and resumed where it stopped.
    async fn invalidate_one_tag(&self, tag: &Tag) -> Result<(TagPass, bool)> {
        let from_fallback = match &self.inner.fallback {
            Some(f) => f.invalidate_tag(tag).await?,
            None => 0,
        };
        if !self.inner.remote {
            return Ok((clear_tag(&*self.inner.primary, tag).await?, false));
        }
        let primary = &self.inner.primary;
        let mut removed = 0;
        let mut listed = 0;
        let mut cursor = TagCursor::start();
        loop {
            let chunk: TagChunk = match self
                .attempt_removal("tag members", primary.tag_members(tag, &cursor, TAG_CHUNK))
                .await
            {
                Outcome::Done(chunk) => chunk,
                Outcome::Refused(e) => return Err(e),
                Outcome::Unusable => break,
            };
            if chunk.foreign > 0 {
                self.inner
                    .counters
                    .data_errors
                    .fetch_add(chunk.foreign, Ordering::Relaxed);
            }
            if !chunk.members.is_empty() {
                listed += chunk.members.len() as u64;
                let keys: Vec<Key> = chunk.members.iter().map(|m| m.key.clone()).collect();
                match self
                    .attempt_removal("UNLINK", primary.delete_many(&keys))
                    .await
                {
                    Outcome::Done(n) => removed += n,
                    Outcome::Refused(e) => return Err(e),
                    Outcome::Unusable => break,
                }
                match self
                    .attempt_removal("tag forget", primary.tag_forget(tag, &chunk.members))
                    .await
                {
                    Outcome::Done(_) => {}
                    Outcome::Refused(e) => return Err(e),
                    Outcome::Unusable => break,
                }
            }
            match chunk.next {
                Some(next) => cursor = next,
                None => {
                    let pass = TagPass {
                        removed: removed.max(from_fallback),
                        listed,
                    };
                    return Ok((pass, false));
                }
            }
        }
        self.defer(&[], std::slice::from_ref(tag));
        let pass = TagPass {
            removed: removed.max(from_fallback),
            listed,
        };
        Ok((pass, true))
    }

    /// Reads `key` for the typed cache and says who answered. A lease (a load in flight) reads
    /// as `None`.
    pub async fn get_with_source(&self, key: &Key) -> Result<(Option<Bytes>, Source)> {
        let (value, source) = match self.attempt("GET", self.inner.primary.get(key)).await {
            Outcome::Done(v) => (v, Source::Primary),
            Outcome::Refused(e) => return Err(e),
            Outcome::Unusable => match self.outage_fallback() {
                Some(f) => (f.get(key).await?, Source::Fallback),
                None => (None, Source::Nothing),
            },
        };
        Ok((value.filter(|v| !is_lease(v)), source))
    }

    /// [`CacheLayer::get_or_lease`], saying who answered. With `skip_primary` only the fallback
    /// is asked (the first read of this request already found the primary unusable).
    pub async fn get_or_lease_with_source(
        &self,
        key: &Key,
        token: u64,
        lease_ttl: Ttl,
        replace: Option<&[u8]>,
        skip_primary: bool,
    ) -> Result<(Leased, Source)> {
        let fallback_ttl = self.fallback_ttl(lease_ttl);
        self.lease_at_source(
            "GET (lease)",
            skip_primary,
            || {
                self.inner
                    .primary
                    .get_or_lease(key, token, lease_ttl, replace)
            },
            |f| async move { f.get_or_lease(key, token, fallback_ttl, replace).await },
            Leased::Denied,
        )
        .await
    }

    /// Takes leases on the primary (unless `skip_primary`), or on the fallback while the primary
    /// is unusable; `nothing` when neither can be asked. Says who answered.
    async fn lease_at_source<'a, T, P, PF, F, FF>(
        &'a self,
        op: &'static str,
        skip_primary: bool,
        primary: P,
        fallback: F,
        nothing: T,
    ) -> Result<(T, Source)>
    where
        P: FnOnce() -> PF,
        PF: Future<Output = Result<T>>,
        F: FnOnce(&'a MemoryLayer) -> FF,
        FF: Future<Output = Result<T>>,
    {
        if !(skip_primary && self.inner.remote) {
            match self.attempt(op, primary()).await {
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
        match self.outage_fallback() {
            Some(f) => Ok((fallback(f).await?, Source::Fallback)),
            None => Ok((nothing, Source::Nothing)),
        }
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
            Source::Fallback => match self.outage_fallback() {
                Some(f) => {
                    f.set_leased(key, token, value, self.fallback_ttl(ttl))
                        .await
                }
                None => Ok(false),
            },
            Source::Nothing => Ok(false),
        }
    }

    /// [`CacheLayer::release_lease`] where the lease was granted (`source`).
    pub async fn release_lease_at(&self, key: &Key, token: u64, source: Source) -> Result<bool> {
        match source {
            Source::Primary => match self
                .attempt_removal(
                    "release lease",
                    self.inner.primary.release_lease(key, token),
                )
                .await
            {
                Outcome::Done(released) => Ok(released),
                Outcome::Refused(e) => Err(e),
                Outcome::Unusable => Ok(false),
            },
            Source::Fallback => match &self.inner.fallback {
                Some(f) => f.release_lease(key, token).await,
                None => Ok(false),
            },
            Source::Nothing => Ok(false),
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
            Source::Fallback => match self.outage_fallback() {
                Some(f) => f.tag_add(tags, member, ttl).await,
                None => Err(self.unavailable("tag_add")),
            },
            Source::Nothing => Err(self.unavailable("tag_add")),
        }
    }

    /// [`get_many`](CacheLayer::get_many) for the typed cache, saying who answered. Leases (loads
    /// in flight) read as `None`.
    pub async fn get_many_with_source(&self, keys: &[Key]) -> Result<(Vec<Option<Bytes>>, Source)> {
        let (values, source) = match self
            .attempt("MGET", self.inner.primary.get_many(keys))
            .await
        {
            Outcome::Done(v) => (v, Source::Primary),
            Outcome::Refused(e) => return Err(e),
            Outcome::Unusable => match self.outage_fallback() {
                Some(f) => (f.get_many(keys).await?, Source::Fallback),
                None => (vec![None; keys.len()], Source::Nothing),
            },
        };
        let values = values
            .into_iter()
            .map(|v| v.filter(|v| !is_lease(v)))
            .collect();
        Ok((values, source))
    }

    /// [`CacheLayer::get_or_lease_many`], saying who answered (one answer for the whole batch).
    /// With `skip_primary` only the fallback is asked.
    pub async fn get_or_lease_many_with_source(
        &self,
        requests: &[LeaseRequest<'_>],
        lease_ttl: Ttl,
        skip_primary: bool,
    ) -> Result<(Vec<Leased>, Source)> {
        let fallback_ttl = self.fallback_ttl(lease_ttl);
        self.lease_at_source(
            "GET (lease, pipeline)",
            skip_primary,
            || self.inner.primary.get_or_lease_many(requests, lease_ttl),
            |f| async move { f.get_or_lease_many(requests, fallback_ttl).await },
            vec![Leased::Denied; requests.len()],
        )
        .await
    }

    /// [`CacheLayer::set_leased_many`] where the leases were granted (`source`): only that store
    /// is written. Nothing is stored when it is unusable.
    pub async fn set_leased_many_at(
        &self,
        entries: &[LeasedEntry],
        source: Source,
    ) -> Result<Vec<bool>> {
        match source {
            Source::Primary => match self
                .attempt(
                    "SET (leased, pipeline)",
                    self.inner.primary.set_leased_many(entries),
                )
                .await
            {
                Outcome::Done(stored) => Ok(stored),
                Outcome::Refused(e) => Err(e),
                Outcome::Unusable => Ok(vec![false; entries.len()]),
            },
            Source::Fallback => match self.outage_fallback() {
                Some(f) => {
                    let capped: Vec<LeasedEntry> = entries
                        .iter()
                        .map(|e| LeasedEntry {
                            ttl: self.fallback_ttl(e.ttl),
                            ..e.clone()
                        })
                        .collect();
                    f.set_leased_many(&capped).await
                }
                None => Ok(vec![false; entries.len()]),
            },
            Source::Nothing => Ok(vec![false; entries.len()]),
        }
    }

    /// [`CacheLayer::release_leases`] where the leases were granted (`source`).
    pub async fn release_leases_at(&self, leases: &[(Key, u64)], source: Source) -> Result<u64> {
        match source {
            Source::Primary => match self
                .attempt_removal("release leases", self.inner.primary.release_leases(leases))
                .await
            {
                Outcome::Done(released) => Ok(released),
                Outcome::Refused(e) => Err(e),
                Outcome::Unusable => Ok(0),
            },
            Source::Fallback => match &self.inner.fallback {
                Some(f) => f.release_leases(leases).await,
                None => Ok(0),
            },
            Source::Nothing => Ok(0),
        }
    }

    /// Records each member in its tags where its lease was granted (`source`). An error means
    /// none of the entries may be cached: they could not all be indexed.
    pub async fn tag_add_many_at(
        &self,
        members: &[(Key, Vec<Tag>)],
        ttl: Ttl,
        source: Source,
    ) -> Result<()> {
        match source {
            Source::Primary => match self
                .attempt(
                    "tag add (pipeline)",
                    self.inner.primary.tag_add_many(members, ttl),
                )
                .await
            {
                Outcome::Done(()) => Ok(()),
                Outcome::Refused(e) => Err(e),
                Outcome::Unusable => Err(self.unavailable("tag_add")),
            },
            Source::Fallback => match self.outage_fallback() {
                Some(f) => f.tag_add_many(members, ttl).await,
                None => Err(self.unavailable("tag_add")),
            },
            Source::Nothing => Err(self.unavailable("tag_add")),
        }
    }

    /// Stores `value` with `tags`: the tags are recorded first, then the value, so that no entry
    /// exists that its tags cannot reach. During an outage both go to the fallback; after a
    /// failure while the breaker is still closed, nothing is written.
    pub async fn set_tagged(&self, key: &Key, value: Bytes, ttl: Ttl, tags: &[Tag]) -> Result<()> {
        let ttl = match self.register_tags(key, ttl, tags).await? {
            Registered::Ttl(ttl) => ttl,
            Registered::Expired => return Ok(()),
            Registered::Unusable => return self.write_fallback(key, value, ttl, tags).await,
        };
        match self
            .attempt("SET", self.inner.primary.set(key, value.clone(), ttl))
            .await
        {
            Outcome::Done(()) => Ok(()),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => self.write_fallback(key, value, ttl, tags).await,
        }
    }

    /// Stores several entries, with the tags of each (`tags`, by key; entries without tags may be
    /// left out): all tags are recorded first, in one call, then all values, in one call, so that
    /// no entry exists that its tags cannot reach. During an outage both go to the fallback; after
    /// a failure while the breaker is still closed, nothing is written.
    pub async fn set_many_tagged(&self, entries: &[Entry], tags: &[(Key, Vec<Tag>)]) -> Result<()> {
        let tags: Vec<(Key, Vec<Tag>)> = tags
            .iter()
            .filter(|(_, t)| !t.is_empty())
            .cloned()
            .collect();
        let mut entries = entries.to_vec();
        if !tags.is_empty() {
            let longest = entries.iter().map(|e| e.ttl).max().unwrap_or(Ttl::MIN);
            let index = IndexWindow::starting_now(longest, self.inner.op_timeout);
            match self
                .attempt(
                    "tag add (pipeline)",
                    self.inner.primary.tag_add_many(&tags, index.ttl),
                )
                .await
            {
                Outcome::Done(()) => {}
                Outcome::Refused(e) => return Err(e),
                Outcome::Unusable => return self.write_many_fallback(&entries, &tags).await,
            }
            let mut expired = Vec::new();
            for (i, entry) in entries.iter_mut().enumerate() {
                if tags.iter().any(|(k, _)| *k == entry.key) {
                    match index.cut(entry.ttl) {
                        Some(cut) => entry.ttl = cut,
                        None => expired.push(i),
                    }
                }
            }
            // An entry whose index already expired could not be reached: not written.
            for i in expired.into_iter().rev() {
                entries.remove(i);
            }
        }
        match self
            .attempt("SET (pipeline)", self.inner.primary.set_many(&entries))
            .await
        {
            Outcome::Done(()) => Ok(()),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => self.write_many_fallback(&entries, &tags).await,
        }
    }

    async fn write_many_fallback(&self, entries: &[Entry], tags: &[(Key, Vec<Tag>)]) -> Result<()> {
        for e in entries {
            let own: &[Tag] = tags
                .iter()
                .find(|(k, _)| *k == e.key)
                .map(|(_, t)| t.as_slice())
                .unwrap_or(&[]);
            self.write_fallback(&e.key, e.value.clone(), e.ttl, own)
                .await?;
        }
        Ok(())
    }

    /// [`CacheLayer::touch`] that first registers `key` in `tags` for the new TTL (so that the
    /// longer-lived entry stays reachable through them). False when there is no value, or when
    /// the tags could not be recorded (the TTL is then left as it was).
    pub async fn touch_tagged(&self, key: &Key, ttl: Ttl, tags: &[Tag]) -> Result<bool> {
        match self.register_tags(key, ttl, tags).await? {
            Registered::Ttl(ttl) => self.touch(key, ttl).await,
            Registered::Expired => Ok(false),
            Registered::Unusable => match self.outage_fallback() {
                Some(f) => {
                    let ttl = self.fallback_ttl(ttl);
                    f.tag_add(tags, key, ttl).await?;
                    f.touch(key, ttl).await
                }
                None => Ok(false),
            },
        }
    }

    /// Registers `key` in `tags` on the primary before a write of it for `ttl`. The index
    /// outlives the value: it is registered for the TTL plus the longest the write can take, and
    /// the TTL the write may use is what is left of it.
    async fn register_tags(&self, key: &Key, ttl: Ttl, tags: &[Tag]) -> Result<Registered> {
        if tags.is_empty() {
            return Ok(Registered::Ttl(ttl));
        }
        let index = IndexWindow::starting_now(ttl, self.inner.op_timeout);
        match self
            .attempt("tag add", self.inner.primary.tag_add(tags, key, index.ttl))
            .await
        {
            Outcome::Done(()) => Ok(match index.cut(ttl) {
                Some(cut) => Registered::Ttl(cut),
                // The index has already expired: an entry written now could not be reached.
                None => Registered::Expired,
            }),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => Ok(Registered::Unusable),
        }
    }

    /// A TTL as the fallback keeps it: at most `fallback_max_ttl`.
    fn fallback_ttl(&self, ttl: Ttl) -> Ttl {
        ttl.min(self.inner.fallback_max_ttl)
    }

    async fn write_fallback(&self, key: &Key, value: Bytes, ttl: Ttl, tags: &[Tag]) -> Result<()> {
        match self.outage_fallback() {
            Some(f) => {
                let ttl = self.fallback_ttl(ttl);
                if !tags.is_empty() {
                    f.tag_add(tags, key, ttl).await?;
                }
                f.set(key, value, ttl).await
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
        self.attempt_with(op, call, false).await
    }

    /// [`attempt`](Store::attempt) for the parts of an invalidation (and the release of this
    /// process's leases): they go through during the recovery hold too, since they only remove
    /// entries, and the hold is there for them to land.
    async fn attempt_removal<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Outcome<T> {
        self.attempt_with(op, call, true).await
    }

    async fn attempt_with<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T>>,
        during_hold: bool,
    ) -> Outcome<T> {
        let inner = &*self.inner;
        if !inner.remote {
            return match call.await {
                Ok(v) => Outcome::Done(v),
                Err(e) => Outcome::Refused(e),
            };
        }
        let changes = inner.primary.primary_changes();
        if changes > inner.primary_changes.load(Ordering::Acquire) {
            self.primary_changed(changes);
        }
        let admit = if during_hold {
            inner.breaker.admit_removal()
        } else {
            inner.breaker.admit()
        };
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
        if !inner.breaker.closes(admit) {
            // The probe that ends an outage only checks that the backend answers: the call
            // skips it until the recovery hold has passed.
            let answered = tokio::time::timeout(inner.op_timeout, inner.primary.ping()).await;
            guard.finished = true;
            match answered {
                Ok(Ok(())) => {
                    self.succeeded(admit);
                    inner.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => self.failed("PING", admit, e),
                Err(_) => self.timed_out("PING", admit),
            }
            return Outcome::Unusable;
        }
        let result = tokio::time::timeout(inner.op_timeout, call).await;
        guard.finished = true;
        if inner.primary.primary_changes() != changes {
            // The primary changed during the call: it may have reached the new one before the
            // recent invalidations were applied there again. Its outcome is not used.
            inner.breaker.on_abandoned(admit);
            inner.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Outcome::Unusable;
        }
        match result {
            Ok(Ok(v)) => {
                self.succeeded(admit);
                Outcome::Done(v)
            }
            Ok(Err(e)) if !e.is_unavailable() => {
                // The server answered: it is healthy, whatever it thinks of the data.
                self.succeeded(admit);
                inner.counters.data_errors.fetch_add(1, Ordering::Relaxed);
                Outcome::Refused(e)
            }
            Ok(Err(e)) => {
                self.failed(op, admit, e);
                Outcome::Unusable
            }
            Err(_) => {
                self.timed_out(op, admit);
                Outcome::Unusable
            }
        }
    }

    /// A call (`op`) that got no answer within the operation timeout: counted, the backend told
    /// to replace its connection (its peer may have vanished), and fed to the breaker.
    fn timed_out(&self, op: &'static str, admit: Admit) {
        let inner = &*self.inner;
        inner.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        inner.primary.call_timed_out();
        let e = Error::new(
            ErrorKind::Timeout,
            format!("Redis did not answer {op} within {:?}", inner.op_timeout),
        );
        self.failed(op, admit, e);
    }

    fn succeeded(&self, admit: Admit) {
        match self.inner.breaker.on_success(admit) {
            Transition::Closed => {
                crate::telemetry::breaker_open(false);
                if let Some(f) = &self.inner.fallback {
                    f.clear();
                }
                tracing::info!(
                    backend = %self.inner.primary.kind(),
                    "backend answers again: circuit closed, fallback emptied"
                );
            }
            Transition::Recovering => tracing::info!(
                backend = %self.inner.primary.kind(),
                hold = ?self.inner.breaker.hold(),
                "backend answers again: calls use it after the recovery hold, once the other \
                 instances have applied the invalidations they queued"
            ),
            _ => {}
        }
    }

    /// True while the breaker holds calls back after an outage (see
    /// [`Config::recovery_hold`](crate::config::Config::recovery_hold)).
    pub(crate) fn is_recovering(&self) -> bool {
        self.inner.breaker.state() == BreakerState::Recovering
    }

    fn failed(&self, op: &'static str, admit: Admit, error: Error) {
        let inner = &*self.inner;
        inner.counters.errors.fetch_add(1, Ordering::Relaxed);
        inner.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        let transition = if error.kind() == ErrorKind::Connection {
            inner.breaker.on_connection_lost(admit)
        } else {
            inner.breaker.on_failure(admit)
        };
        if transition == Transition::Opened {
            self.opened();
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
                "backend call failed"
            );
        }
    }

    fn unavailable(&self, op: &str) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "{op}: the {} backend is unusable and no fallback may answer",
                self.inner.primary.kind()
            ),
        )
    }
}

/// The background replay: waits with backoff until the backend answers a `PING`, then applies
/// the queue as the breaker's probe, without waiting for the cool-down or for traffic. Ends when
/// the queue is empty or the store is dropped.
async fn replay_in_background(weak: Weak<Inner>) {
    let mut backoff = REPLAY_BACKOFF.0;
    loop {
        tokio::time::sleep(backoff).await;
        let Some(inner) = weak.upgrade() else { return };
        let store = Store { inner };
        let inner = &*store.inner;
        if !inner.has_pending.load(Ordering::Acquire) {
            inner.replaying.store(false, Ordering::Release);
            // Something queued between the check and the flag is picked up by a new task.
            if inner.has_pending.load(Ordering::Acquire) {
                store.start_replayer();
            }
            return;
        }
        let alive = matches!(
            tokio::time::timeout(inner.op_timeout, inner.primary.ping()).await,
            Ok(Ok(()))
        );
        if !alive {
            backoff = (backoff * 2).min(REPLAY_BACKOFF.1);
            continue;
        }
        let admit = inner.breaker.probe_now();
        if !matches!(admit, Admit::Probe(_) | Admit::Call) {
            // Another probe is running; look again shortly.
            backoff = REPLAY_BACKOFF.0;
            continue;
        }
        match store.replay().await {
            Replay::Done => {
                store.succeeded(admit);
            }
            Replay::Unfinished => {
                inner.breaker.on_abandoned(admit);
                backoff = Duration::ZERO;
                continue;
            }
            Replay::Failed => {
                inner.breaker.on_failure(admit);
            }
        }
        backoff = REPLAY_BACKOFF.0;
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
        match self.attempt("GET", self.inner.primary.get(key)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match self.outage_fallback() {
                Some(f) => f.get(key).await,
                None => Ok(None),
            },
        }
    }

    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>> {
        match self
            .attempt("MGET", self.inner.primary.get_many(keys))
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match self.outage_fallback() {
                Some(f) => f.get_many(keys).await,
                None => Ok(vec![None; keys.len()]),
            },
        }
    }

    async fn set(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<()> {
        self.set_tagged(key, value, ttl, &[]).await
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
                    self.write_fallback(&e.key, e.value.clone(), e.ttl, &[])
                        .await?;
                }
                Ok(())
            }
        }
    }

    async fn delete(&self, key: &Key) -> Result<bool> {
        self.delete_keys(std::slice::from_ref(key))
            .await
            .map(|(removed, _)| removed > 0)
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
            Outcome::Unusable => match self.outage_fallback() {
                Some(f) => f.remaining_ttl(key).await,
                None => Err(self.unavailable("remaining_ttl")),
            },
        }
    }

    async fn peek(&self, key: &Key) -> Result<Option<Remaining>> {
        match self
            .attempt("PTTL (value)", self.inner.primary.peek(key))
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match self.outage_fallback() {
                Some(f) => f.peek(key).await,
                None => Err(self.unavailable("peek")),
            },
        }
    }

    async fn touch(&self, key: &Key, ttl: Ttl) -> Result<bool> {
        match self
            .attempt("PEXPIRE (value)", self.inner.primary.touch(key, ttl))
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => match self.outage_fallback() {
                Some(f) => f.touch(key, self.fallback_ttl(ttl)).await,
                None => Err(self.unavailable("touch")),
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
            Outcome::Unusable => match self.outage_fallback() {
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
            Outcome::Unusable => match self.outage_fallback() {
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
        // The lease is in the backend or in the fallback; each only accepts its own.
        let stored = self
            .set_leased_at(key, token, value.clone(), ttl, Source::Primary)
            .await?;
        if stored || !self.inner.remote {
            return Ok(stored);
        }
        self.set_leased_at(key, token, value, ttl, Source::Fallback)
            .await
    }

    async fn release_lease(&self, key: &Key, token: u64) -> Result<bool> {
        let released = self.release_lease_at(key, token, Source::Primary).await?;
        if released || !self.inner.remote {
            return Ok(released);
        }
        self.release_lease_at(key, token, Source::Fallback).await
    }

    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()> {
        match self.tag_add_at(tags, member, ttl, Source::Primary).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_unavailable() => {
                // Index in the fallback for entries it holds, and still report the failure: a
                // lease granted by the backend must not be used for an unindexed entry.
                if let Some(f) = self.outage_fallback() {
                    f.tag_add(tags, member, ttl).await?;
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn tag_members(&self, tag: &Tag, cursor: &TagCursor, limit: usize) -> Result<TagChunk> {
        match self
            .attempt(
                "tag members",
                self.inner.primary.tag_members(tag, cursor, limit),
            )
            .await
        {
            Outcome::Done(chunk) => Ok(chunk),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => Err(self.unavailable("tag_members")),
        }
    }

    async fn tag_forget(&self, tag: &Tag, members: &[TagMember]) -> Result<u64> {
        match self
            .attempt("tag forget", self.inner.primary.tag_forget(tag, members))
            .await
        {
            Outcome::Done(n) => Ok(n),
            Outcome::Refused(e) => Err(e),
            Outcome::Unusable => Err(self.unavailable("tag_forget")),
        }
    }

    async fn invalidate_tag(&self, tag: &Tag) -> Result<u64> {
        self.invalidate(&[], std::slice::from_ref(tag))
            .await
            .map(|done| done.tag_entries_removed)
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

    fn backend(&self) -> Backend<'_> {
        self.inner.primary.backend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{Ident, KeyPattern, Namespace};
    use crate::store::{Entry, LeaseRequest, Leased, Remaining, TagChunk, TagCursor, TagMember};
    use bytes::Bytes;

    /// A backend that fails over: memory underneath, unreachable while `down` is set (a primary
    /// lost), and `fails_over` as Redis Cluster and Sentinel say.
    #[derive(Debug)]
    struct FailingOver {
        inner: MemoryLayer,
        down: AtomicBool,
        replicated: bool,
    }

    impl FailingOver {
        fn check(&self) -> Result<()> {
            if self.down.load(Ordering::SeqCst) {
                Err(Error::new(ErrorKind::Connection, "the primary is gone"))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait::async_trait]
    impl CacheLayer for FailingOver {
        fn kind(&self) -> BackendKind {
            BackendKind::Redis
        }
        fn fails_over(&self) -> bool {
            self.replicated
        }
        async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
            self.check()?;
            self.inner.get(key).await
        }
        async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>> {
            self.check()?;
            self.inner.get_many(keys).await
        }
        async fn set(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<()> {
            self.check()?;
            self.inner.set(key, value, ttl).await
        }
        async fn set_many(&self, entries: &[Entry]) -> Result<()> {
            self.check()?;
            self.inner.set_many(entries).await
        }
        async fn delete(&self, key: &Key) -> Result<bool> {
            self.check()?;
            self.inner.delete(key).await
        }
        async fn delete_many(&self, keys: &[Key]) -> Result<u64> {
            self.check()?;
            self.inner.delete_many(keys).await
        }
        async fn remaining_ttl(&self, key: &Key) -> Result<Remaining> {
            self.check()?;
            self.inner.remaining_ttl(key).await
        }
        async fn set_if_absent(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<bool> {
            self.check()?;
            self.inner.set_if_absent(key, value, ttl).await
        }
        async fn increment(&self, key: &Key, delta: i64, ttl: Ttl) -> Result<i64> {
            self.check()?;
            self.inner.increment(key, delta, ttl).await
        }
        async fn get_or_lease(
            &self,
            key: &Key,
            token: u64,
            lease_ttl: Ttl,
            replace: Option<&[u8]>,
        ) -> Result<Leased> {
            self.check()?;
            self.inner
                .get_or_lease(key, token, lease_ttl, replace)
                .await
        }
        async fn set_leased(&self, key: &Key, token: u64, value: Bytes, ttl: Ttl) -> Result<bool> {
            self.check()?;
            self.inner.set_leased(key, token, value, ttl).await
        }
        async fn release_lease(&self, key: &Key, token: u64) -> Result<bool> {
            self.check()?;
            self.inner.release_lease(key, token).await
        }
        async fn get_or_lease_many(
            &self,
            requests: &[LeaseRequest<'_>],
            lease_ttl: Ttl,
        ) -> Result<Vec<Leased>> {
            self.check()?;
            self.inner.get_or_lease_many(requests, lease_ttl).await
        }
        async fn peek(&self, key: &Key) -> Result<Option<Remaining>> {
            self.check()?;
            self.inner.peek(key).await
        }
        async fn touch(&self, key: &Key, ttl: Ttl) -> Result<bool> {
            self.check()?;
            self.inner.touch(key, ttl).await
        }
        async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()> {
            self.check()?;
            self.inner.tag_add(tags, member, ttl).await
        }
        async fn tag_members(
            &self,
            tag: &Tag,
            cursor: &TagCursor,
            limit: usize,
        ) -> Result<TagChunk> {
            self.check()?;
            self.inner.tag_members(tag, cursor, limit).await
        }
        async fn tag_forget(&self, tag: &Tag, members: &[TagMember]) -> Result<u64> {
            self.check()?;
            self.inner.tag_forget(tag, members).await
        }
        async fn sweep(&self, pattern: &KeyPattern, batch: usize, max_removed: u64) -> Result<u64> {
            self.check()?;
            self.inner.sweep(pattern, batch, max_removed).await
        }
        async fn ping(&self) -> Result<()> {
            self.check()
        }
    }

    /// A delete applied just before the primary was lost, and missing from the replica promoted
    /// in its place, is applied again once the backend answers: on a backend that fails over,
    /// and only there.
    async fn a_delete_lost_in_a_failover(replicated: bool) -> Option<Bytes> {
        let layer = Arc::new(FailingOver {
            inner: MemoryLayer::new(1 << 20),
            down: AtomicBool::new(false),
            replicated,
        });
        let config = Config::memory()
            .cool_down(Duration::from_millis(20))
            .recovery_hold(Duration::from_millis(20));
        let store = Store::from_layer(layer.clone(), &config);
        let key = Namespace::root()
            .global()
            .key(&Ident::from_static("test"), &Ident::from_static("item"), 1)
            .unwrap();
        let value = Bytes::from_static(b"old");
        store
            .set(&key, value.clone(), Ttl::seconds(60))
            .await
            .unwrap();
        store
            .invalidate(std::slice::from_ref(&key), &[])
            .await
            .unwrap();
        // The promoted replica never received the delete.
        layer
            .inner
            .set(&key, value, Ttl::seconds(60))
            .await
            .unwrap();
        layer.down.store(true, Ordering::SeqCst);
        assert_eq!(store.get(&key).await.unwrap(), None, "the fallback answers");
        assert_ne!(store.breaker_state(), BreakerState::Closed);
        layer.down.store(false, Ordering::SeqCst);
        assert!(store.flush_invalidations(Duration::from_secs(5)).await);
        layer.inner.get(&key).await.unwrap()
    }

    #[tokio::test]
    async fn a_failover_gets_the_recent_invalidations_again() {
        assert_eq!(a_delete_lost_in_a_failover(true).await, None);
    }

    #[tokio::test]
    async fn a_single_server_keeps_no_journal() {
        assert!(a_delete_lost_in_a_failover(false).await.is_some());
    }

    /// A change of primary takes what was recorded since the old one was last known; an
    /// outage takes the last [`FAILOVER_REPLAY_WINDOW`] and leaves the older entries for a
    /// change found later.
    #[test]
    fn the_journal_gives_what_is_asked_and_keeps_the_older_entries() {
        let key = |id: u64| {
            Namespace::root()
                .global()
                .key(&Ident::from_static("test"), &Ident::from_static("item"), id)
                .unwrap()
        };
        let mut journal = Journal::default();
        let start = std::time::Instant::now();
        journal.record(&[key(1)], &[]);
        std::thread::sleep(Duration::from_millis(5));
        let middle = std::time::Instant::now();
        journal.record(&[key(2), key(3)], &[]);
        assert_eq!(journal.take_since(Some(middle)).0, vec![key(2), key(3)]);
        assert_eq!(journal.items, 1);
        assert_eq!(journal.take_since(Some(start)).0, vec![key(1)]);
        assert_eq!(journal.items, 0);
        journal.record(&[key(4)], &[]);
        // Old entries (here: made to look older than the window) stay after an outage's take.
        journal.entries[0].0 = std::time::Instant::now()
            .checked_sub(FAILOVER_REPLAY_WINDOW + Duration::from_secs(1))
            .expect("the monotonic clock reaches 3 s back");
        journal.record(&[key(5)], &[]);
        assert_eq!(journal.take().0, vec![key(5)]);
        assert_eq!(journal.take_since(None).0, vec![key(4)]);
    }

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
