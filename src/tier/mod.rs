//! The in-process tier: a bounded copy of hot entries in the process's memory (L1, moka) in front
//! of Redis (L2), kept coherent across every instance that shares the Redis.
//!
//! A hit on Redis costs a round trip; a hit in process memory costs well under a microsecond. The
//! tier is opt-in per cache ([`Config::local_tier`](crate::Config::local_tier)) and only ever
//! holds copies of what Redis holds:
//!
//! - **Filled by reads.** A read that misses L1 reads Redis (the value and its remaining TTL in
//!   one round trip) and copies what it found into L1 for the tier's own, shorter TTL, never past
//!   the Redis entry's own expiry. Writes never fill L1.
//! - **Evicted by any write to the key, by anyone.** The tier keeps one extra connection to Redis
//!   (to every primary of a Redis Cluster; to the primary Sentinel names, followed across
//!   failovers) with server-assisted client-side caching on (`CLIENT TRACKING ON BCAST PREFIX ...`, RESP3):
//!   Redis itself sends the key name of every key written, deleted, expired or evicted under the
//!   tier's prefixes, whoever wrote it: another instance's `invalidate`, a lease being taken, a
//!   Node service's `SET`, a `redis-cli DEL`. The message carries no value; the key is dropped from
//!   L1 and read from Redis the next time it is asked for.
//! - **A fill never installs a value an invalidation overtook.** Each key has a generation that
//!   every eviction bumps; a fill records it before its Redis read and installs only if it is
//!   unchanged (checked and installed under the same lock the eviction takes).
//! - **No channel, no L1.** If the tracking connection is lost (Redis restarted, the connection
//!   killed, a failover), L1 is emptied and bypassed at once, and used again only once tracking is
//!   back on a new connection. A heartbeat on the channel confirms it every
//!   [`heartbeat`](LocalTier::heartbeat); when no confirmation came for
//!   [`liveness`](LocalTier::liveness) (Redis frozen, the network stalled), L1 is bypassed too,
//!   since invalidations may be waiting on the way. [`fail_safe`](LocalTier::fail_safe) trades
//!   that for availability: L1 keeps answering for up to that long past the last confirmation,
//!   and each such answer is counted and marked stale ([`Cache::get_served`](crate::Cache::get_served)).
//!
//! - **Queued invalidations keep L1 out.** While the store holds invalidations it could not
//!   apply (Redis unusable for the data path), L1 is neither read nor filled: Redis still holds
//!   those entries, so no message about them will come until they are applied.
//!
//! Each tiered [`Cache`](crate::Cache) built from a config has its own L1 and channel: two caches
//! built separately in one process see each other's writes through Redis's messages, within the
//! channel's lag; clones of one cache share everything. With a fail-safe bound,
//! [`get_or_set`](crate::Cache::get_or_set) may answer from a stale L1 copy like `get` does; only
//! [`get_served`](crate::Cache::get_served) says so.
//!
//! On the memory backend there is nothing to tier: the store already is process memory, so a
//! configured tier is not built there and every promise holds as it is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

#[cfg(feature = "redis")]
mod socket;
#[cfg(feature = "redis")]
mod tracking;

mod read;

pub(crate) use read::TierRead;

use crate::key::KeySpace;
use crate::telemetry::Tally;

/// Default bound of L1, in bytes of keys and values.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default L1 TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Default interval between two confirmations of the invalidation channel.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(50);
/// Default longest time L1 is trusted after the channel's last confirmation.
pub const DEFAULT_LIVENESS: Duration = Duration::from_millis(250);

const STRIPES: usize = 4096;

/// Longest heartbeat interval and liveness window (larger values are lowered to it).
const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// How a cache's in-process tier behaves (see the [module documentation](self)).
///
/// ```
/// use std::time::Duration;
/// use speedlayer::key::{Ident, Namespace};
/// use speedlayer::tier::LocalTier;
///
/// let profiles = Namespace::root().global()
///     .keyspace(&Ident::from_static("school"), &Ident::from_static("student"));
/// let tier = LocalTier::new()
///     .keyspace(&profiles)
///     .max_bytes(16 * 1024 * 1024)
///     .ttl(Duration::from_secs(10))
///     .fail_safe(Duration::from_secs(5));
/// # let _ = tier;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct LocalTier {
    pub(crate) max_bytes: u64,
    pub(crate) ttl: Duration,
    pub(crate) fail_safe: Option<Duration>,
    pub(crate) heartbeat: Duration,
    pub(crate) liveness: Duration,
    pub(crate) prefixes: Vec<String>,
}

impl Default for LocalTier {
    fn default() -> Self {
        LocalTier::new()
    }
}

impl LocalTier {
    /// A tier over every key of the cache's namespace, with the defaults: 64 MiB, a 30 s L1 TTL,
    /// a heartbeat every 50 ms, trusted for 250 ms after the last one, no fail-safe.
    pub fn new() -> LocalTier {
        LocalTier {
            max_bytes: DEFAULT_MAX_BYTES,
            ttl: DEFAULT_TTL,
            fail_safe: None,
            heartbeat: DEFAULT_HEARTBEAT,
            liveness: DEFAULT_LIVENESS,
            prefixes: Vec::new(),
        }
    }

    /// Tiers the keys of `keyspace` (call once per keyspace). Without any, every key of the
    /// cache's namespace is tiered; naming the hot keyspaces keeps the invalidation traffic to
    /// what L1 can hold, since Redis sends each instance the name of every key written under the
    /// tier's prefixes.
    pub fn keyspace(mut self, keyspace: &KeySpace) -> LocalTier {
        self.prefixes.push(keyspace.base().to_owned());
        self
    }

    /// The most L1 holds, counting keys and values (at least 1 KiB).
    pub fn max_bytes(mut self, bytes: u64) -> LocalTier {
        self.max_bytes = bytes.max(1024);
        self
    }

    /// How long a copy stays in L1 (at least 1 ms). A copy never outlives its Redis entry.
    pub fn ttl(mut self, ttl: Duration) -> LocalTier {
        self.ttl = ttl
            .max(Duration::from_millis(1))
            .min(crate::ttl::Ttl::MAX.as_duration());
        self
    }

    /// How often the invalidation channel is confirmed (at least 5 ms). The liveness window is
    /// raised to at least twice this.
    pub fn heartbeat(mut self, every: Duration) -> LocalTier {
        self.heartbeat = every.clamp(Duration::from_millis(5), MAX_WINDOW / 2);
        self.liveness = self.liveness.max(self.heartbeat * 2);
        self
    }

    /// How long after the channel's last confirmation L1 is still trusted (at least twice the
    /// heartbeat). Past it, reads go to Redis (or, with [`fail_safe`](LocalTier::fail_safe), are
    /// answered from L1 and marked stale).
    pub fn liveness(mut self, window: Duration) -> LocalTier {
        self.liveness = window.min(MAX_WINDOW).max(self.heartbeat * 2);
        self
    }

    /// Availability over freshness while Redis does not answer: L1 keeps answering for up to
    /// `bound` past the channel's last confirmation, each answer counted
    /// ([`TierStats::stale_served`]) and marked stale. Meanwhile an invalidation made on another
    /// instance may not have reached this one. A lost channel (a closed connection) still empties
    /// L1 at once.
    pub fn fail_safe(mut self, bound: Duration) -> LocalTier {
        self.fail_safe = Some(bound.min(crate::ttl::Ttl::MAX.as_duration()));
        self
    }

    /// The tracked prefixes: the keyspaces given, else the namespace's prefix; a prefix inside
    /// another is dropped (Redis refuses overlapping prefixes).
    pub(crate) fn tracked_prefixes(&self, namespace_prefix: &str) -> Vec<String> {
        let mut prefixes = if self.prefixes.is_empty() {
            vec![namespace_prefix.to_owned()]
        } else {
            self.prefixes.clone()
        };
        prefixes.sort();
        prefixes.dedup();
        let all = prefixes.clone();
        prefixes.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q.as_str())));
        prefixes
    }
}

/// Counters of one cache's in-process tier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierStats {
    /// Reads answered from L1 while it was trusted.
    pub local_hits: u64,
    /// Reads answered from L1 past the liveness window, within the fail-safe bound.
    pub stale_served: u64,
    /// Copies installed in L1.
    pub fills: u64,
    /// Copies not installed because the key was invalidated (or the channel lost) during the
    /// read that fetched them.
    pub fills_refused: u64,
    /// Keys dropped from L1 by an invalidation message from Redis.
    pub evicted_by_message: u64,
    /// Reads that found a copy in L1 but went to Redis (and dropped the copy): a message that may
    /// name the key waited on the channel's socket or in its task, not yet handled, or the
    /// channel was closed.
    pub unsettled_reads: u64,
    /// Times the channel was lost (L1 emptied).
    pub channel_losses: u64,
    /// Times tracking was switched on (the first connection and each reconnection).
    pub channel_starts: u64,
    /// Whether L1 is trusted now.
    pub trusted: bool,
    /// Entries in L1 now (approximate).
    pub entries: u64,
}

struct Counters {
    local_hits: Tally,
    stale_served: Tally,
    fills: Tally,
    fills_refused: Tally,
    evicted_by_message: Tally,
    unsettled_reads: Tally,
    channel_losses: Tally,
    channel_starts: Tally,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            local_hits: Tally::labelled("speedlayer_tier_hits_total", &[("state", "fresh")]),
            stale_served: Tally::labelled("speedlayer_tier_hits_total", &[("state", "stale")]),
            fills: Tally::new("speedlayer_tier_fills_total"),
            fills_refused: Tally::new("speedlayer_tier_fills_refused_total"),
            evicted_by_message: Tally::labelled(
                "speedlayer_tier_evictions_total",
                &[("cause", "message")],
            ),
            unsettled_reads: Tally::new("speedlayer_tier_unsettled_reads_total"),
            channel_losses: Tally::new("speedlayer_tier_channel_losses_total"),
            channel_starts: Tally::new("speedlayer_tier_channel_starts_total"),
        }
    }
}

#[derive(Clone)]
struct Local {
    bytes: Bytes,
    expires: Instant,
}

/// What L1 answered.
pub(crate) enum Lookup {
    /// A copy, trusted.
    Fresh(Bytes),
    /// A copy, served under the fail-safe bound.
    Stale(Bytes),
    /// Nothing usable.
    Miss,
}

/// What a fill checks before installing: the key's generation and the channel's epoch when its
/// read started.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Snapshot {
    generation: u64,
    epoch: u64,
    /// When the read began: a copy's expiry counts from here, before Redis measured its TTL.
    at: Instant,
}

/// One cache's L1 and the state of its invalidation channel.
pub(crate) struct Tier {
    entries: moka::sync::Cache<String, Local>,
    generations: Box<[Mutex<u64>]>,
    settings: LocalTier,
    prefixes: Vec<String>,
    /// Whether tracking is on over a live connection.
    alive: AtomicBool,
    /// Bumped whenever the channel is lost or restarted: fills begun before do not install.
    epoch: AtomicU64,
    /// Microseconds since `base` at which the channel was last confirmed (a heartbeat sent then
    /// was answered, so every invalidation sent before it was applied); 0 when never.
    confirmed: AtomicU64,
    /// L1 is trusted only once a confirmation at or after this (microseconds since `base`)
    /// came: set when a barrier after this process's own writes was not answered in time.
    must_confirm: AtomicU64,
    base: Instant,
    counters: Counters,
    #[cfg(feature = "redis")]
    channel: tracking::Channel,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("prefixes", &self.prefixes)
            .field("trusted", &self.trusted(Instant::now()))
            .finish_non_exhaustive()
    }
}

impl Tier {
    fn new(settings: LocalTier, prefixes: Vec<String>) -> Tier {
        let entries = moka::sync::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|k: &String, v: &Local| {
                u32::try_from(k.len() + v.bytes.len() + 64).unwrap_or(u32::MAX)
            })
            .time_to_live(settings.ttl)
            .build();
        Tier {
            entries,
            generations: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            settings,
            prefixes,
            alive: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            must_confirm: AtomicU64::new(0),
            base: Instant::now(),
            counters: Counters::default(),
            #[cfg(feature = "redis")]
            channel: tracking::Channel::default(),
        }
    }

    /// Starts the tier of a cache over `redis`: the tracking connection is made in the
    /// background, and L1 is bypassed until tracking is on. `None` outside a Tokio runtime.
    #[cfg(feature = "redis")]
    pub(crate) fn start(
        redis: &crate::store::redis::RedisLayer,
        settings: LocalTier,
        namespace_prefix: &str,
    ) -> crate::error::Result<Option<Arc<Tier>>> {
        let targets = redis.tracking_targets()?;
        let prefixes = settings.tracked_prefixes(namespace_prefix);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("the in-process tier needs a Tokio runtime; it is not used");
            return Ok(None);
        };
        let tier = Arc::new(Tier::new(settings, prefixes));
        runtime.spawn(tracking::run(Arc::downgrade(&tier), targets));
        Ok(Some(tier))
    }

    /// True when `key` is tiered.
    pub(crate) fn covers(&self, key: &str) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_micros())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// How long ago the channel was last confirmed; `None` when never.
    fn since_confirmed(&self, now: Instant) -> Option<Duration> {
        let confirmed = self.confirmed.load(Ordering::Acquire);
        (confirmed != 0).then(|| Duration::from_micros(self.micros(now).saturating_sub(confirmed)))
    }

    /// True when L1 may answer as fresh.
    pub(crate) fn trusted(&self, now: Instant) -> bool {
        self.alive.load(Ordering::Acquire)
            && self.confirmed.load(Ordering::Acquire) >= self.must_confirm.load(Ordering::Acquire)
            && self
                .since_confirmed(now)
                .is_some_and(|d| d <= self.settings.liveness)
    }

    fn stripe(&self, key: &str) -> &Mutex<u64> {
        use std::hash::{BuildHasher, Hasher};
        let mut h = STRIPE_HASH.build_hasher();
        h.write(key.as_bytes());
        &self.generations[(h.finish() as usize) % STRIPES]
    }

    fn lock_stripe(&self, key: &str) -> std::sync::MutexGuard<'_, u64> {
        // A generation is a plain counter: a panic cannot leave it half-written.
        self.stripe(key).lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The copy of `key`, if L1 may answer.
    pub(crate) fn lookup(&self, key: &str) -> Lookup {
        let now = Instant::now();
        let stale = if self.trusted(now) {
            false
        } else {
            let within_bound = match (self.settings.fail_safe, self.since_confirmed(now)) {
                (Some(bound), Some(since)) => since <= bound,
                _ => false,
            };
            // A lost channel empties L1; what is left here is a frozen channel's.
            if !within_bound || !self.alive.load(Ordering::Acquire) {
                return Lookup::Miss;
            }
            true
        };
        match self.entries.get(key) {
            Some(local) if local.expires > now => {
                // A message about this key (or the close) may be waiting on the socket, unread
                // by the connection's task: this read goes to Redis, and the copy goes now. Were
                // it kept, a later read could find the socket quiet once the task has taken the
                // message off it but before applying it, and serve the copy after this read
                // returned the newer value.
                #[cfg(feature = "redis")]
                if matches!(
                    self.channel.peek(self.micros(now), key.as_bytes()),
                    socket::Peek::Unread | socket::Peek::Closed
                ) {
                    self.counters
                        .unsettled_reads
                        .fetch_add(1, Ordering::Relaxed);
                    self.evict(key);
                    return Lookup::Miss;
                }
                // The channel's task may have handled the close since this read began, and
                // taken the socket away: the loss is marked before that.
                #[cfg(feature = "redis")]
                if !self.alive.load(Ordering::Acquire) {
                    return Lookup::Miss;
                }
                if stale {
                    self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                    Lookup::Stale(local.bytes)
                } else {
                    self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
                    Lookup::Fresh(local.bytes)
                }
            }
            Some(_) => {
                self.entries.invalidate(key);
                Lookup::Miss
            }
            None => Lookup::Miss,
        }
    }

    /// What a fill of `key` must find unchanged; `None` when L1 is not trusted now (the read
    /// then goes to Redis without filling).
    pub(crate) fn snapshot(&self, key: &str) -> Option<Snapshot> {
        let at = Instant::now();
        if !self.trusted(at) {
            return None;
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let generation = *self.lock_stripe(key);
        Some(Snapshot {
            generation,
            epoch,
            at,
        })
    }

    /// Installs a copy of `key` read from Redis after `snapshot`, unless the key was evicted or
    /// the channel lost since. `remaining` is the Redis entry's remaining TTL (`None`: no
    /// expiry).
    pub(crate) fn fill(
        &self,
        key: &str,
        bytes: Bytes,
        remaining: Option<Duration>,
        snapshot: Snapshot,
    ) {
        let ttl = remaining.map_or(self.settings.ttl, |r| r.min(self.settings.ttl));
        if ttl.is_zero() {
            return;
        }
        let local = Local {
            bytes,
            expires: snapshot.at + ttl,
        };
        {
            let generation = self.lock_stripe(key);
            if *generation != snapshot.generation
                || self.epoch.load(Ordering::Acquire) != snapshot.epoch
            {
                self.counters.fills_refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.entries.insert(key.to_owned(), local);
        }
        // A loss of the channel does not take the key's lock: if it came while installing, the
        // copy may have missed its clearing.
        if self.epoch.load(Ordering::Acquire) != snapshot.epoch {
            self.entries.invalidate(key);
            self.counters.fills_refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counters.fills.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops `key` from L1 and bumps its generation, so that a fill already reading it does
    /// not install.
    pub(crate) fn evict(&self, key: &str) {
        let mut generation = self.lock_stripe(key);
        *generation = generation.wrapping_add(1);
        self.entries.invalidate(key);
    }

    /// An invalidation message from Redis: `None` means every key (`FLUSHALL`, `FLUSHDB`).
    pub(crate) fn on_message(&self, keys: Option<&[&[u8]]>) {
        match keys {
            Some(keys) => {
                for key in keys {
                    if let Ok(key) = std::str::from_utf8(key) {
                        self.evict(key);
                        self.counters
                            .evicted_by_message
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            None => self.evict_all(),
        }
    }

    /// Empties L1; fills begun before do not install. Every key's lock is held meanwhile, so
    /// that no fill installs between the two steps (rare: a lost channel, a `FLUSHALL`).
    pub(crate) fn evict_all(&self) {
        let held: Vec<_> = (0..STRIPES)
            .map(|i| {
                self.generations[i]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
            })
            .collect();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
        drop(held);
    }

    /// The channel is lost: L1 is bypassed and emptied until tracking is back.
    pub(crate) fn lost(&self) {
        if self.alive.swap(false, Ordering::AcqRel) {
            self.counters.channel_losses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "the in-process tier lost its invalidation channel; L1 is emptied and bypassed \
                 until it is back"
            );
        }
        self.evict_all();
    }

    /// Tracking is on over a new connection, as of `since`: L1 starts empty.
    pub(crate) fn restored(&self, since: Instant) {
        self.evict_all();
        self.confirmed.store(self.micros(since), Ordering::Release);
        self.alive.store(true, Ordering::Release);
        self.counters.channel_starts.fetch_add(1, Ordering::Relaxed);
    }

    /// A heartbeat sent at `sent` was answered: every invalidation Redis sent before it was
    /// applied.
    pub(crate) fn confirm(&self, sent: Instant) {
        crate::telemetry::channel_rtt(sent.elapsed().as_secs_f64());
        self.confirmed
            .fetch_max(self.micros(sent), Ordering::AcqRel);
    }

    /// Waits until every invalidation message caused by writes this process has finished has
    /// been applied (a round trip on the channel); empties L1 when that cannot be shown.
    pub(crate) async fn sync(&self) {
        let started = Instant::now();
        #[cfg(feature = "redis")]
        if self.alive.load(Ordering::Acquire) && !self.channel.barrier(self).await {
            // Not shown in time: L1 waits for a heartbeat sent after this point.
            self.must_confirm
                .fetch_max(self.micros(started), Ordering::AcqRel);
        }
        #[cfg(not(feature = "redis"))]
        let _ = started;
    }

    /// Counters and state.
    pub(crate) fn stats(&self) -> TierStats {
        let c = &self.counters;
        TierStats {
            local_hits: c.local_hits.load(Ordering::Relaxed),
            stale_served: c.stale_served.load(Ordering::Relaxed),
            fills: c.fills.load(Ordering::Relaxed),
            fills_refused: c.fills_refused.load(Ordering::Relaxed),
            evicted_by_message: c.evicted_by_message.load(Ordering::Relaxed),
            unsettled_reads: c.unsettled_reads.load(Ordering::Relaxed),
            channel_losses: c.channel_losses.load(Ordering::Relaxed),
            channel_starts: c.channel_starts.load(Ordering::Relaxed),
            trusted: self.trusted(Instant::now()),
            entries: self.entries.entry_count(),
        }
    }
}

static STRIPE_HASH: std::sync::LazyLock<std::collections::hash_map::RandomState> =
    std::sync::LazyLock::new(std::collections::hash_map::RandomState::new);

#[cfg(test)]
mod tests {
    use super::*;

    fn tier() -> Tier {
        trusted(LocalTier::new())
    }

    /// A tier over `app:` with `settings`, its channel just restored.
    fn trusted(settings: LocalTier) -> Tier {
        let tier = Tier::new(settings, vec!["app:".into()]);
        tier.restored(Instant::now());
        tier
    }

    /// Copies `1` into L1 under `key`, as a read that found nothing in its way.
    fn put(tier: &Tier, key: &str) {
        let snap = tier.snapshot(key).expect("trusted");
        tier.fill(key, Bytes::from_static(b"1"), None, snap);
    }

    #[test]
    fn a_fill_after_an_eviction_of_its_key_does_not_install() {
        let tier = tier();
        let snap = tier.snapshot("app:a:1").expect("trusted");
        tier.evict("app:a:1");
        tier.fill("app:a:1", Bytes::from_static(b"1"), None, snap);
        assert!(matches!(tier.lookup("app:a:1"), Lookup::Miss));
        assert_eq!(tier.stats().fills_refused, 1);
    }

    #[test]
    fn a_fill_after_a_lost_channel_does_not_install() {
        let tier = tier();
        let snap = tier.snapshot("app:a:1").expect("trusted");
        tier.lost();
        tier.restored(Instant::now());
        tier.fill("app:a:1", Bytes::from_static(b"1"), None, snap);
        assert!(matches!(tier.lookup("app:a:1"), Lookup::Miss));
    }

    #[test]
    fn an_untouched_fill_installs_and_a_message_removes_it() {
        let tier = tier();
        put(&tier, "app:a:1");
        assert!(matches!(tier.lookup("app:a:1"), Lookup::Fresh(_)));
        tier.on_message(Some(&[b"app:a:1".as_slice()]));
        assert!(matches!(tier.lookup("app:a:1"), Lookup::Miss));
    }

    #[test]
    fn a_copy_never_outlives_its_redis_entry() {
        let tier = tier();
        let snap = tier.snapshot("app:a:1").expect("trusted");
        tier.fill(
            "app:a:1",
            Bytes::from_static(b"1"),
            Some(Duration::from_millis(1)),
            snap,
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(tier.lookup("app:a:1"), Lookup::Miss));
    }

    #[test]
    fn a_lost_channel_bypasses_l1_even_with_fail_safe() {
        let tier = trusted(LocalTier::new().fail_safe(Duration::from_secs(5)));
        put(&tier, "app:a:1");
        tier.lost();
        assert!(matches!(tier.lookup("app:a:1"), Lookup::Miss));
        assert!(tier.snapshot("app:a:1").is_none());
    }

    /// A connected pair on loopback: the channel's end (as the tier keeps it) and Redis's.
    #[cfg(feature = "redis")]
    fn socket_pair() -> (std::sync::Arc<socket::Socket>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (std::sync::Arc::new(socket::Socket::new(ours)), theirs)
    }

    /// Reads off the channel's end what waits there, as the connection's task would before
    /// applying it.
    #[cfg(feature = "redis")]
    fn take_pending(socket: &socket::Socket) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while socket.take_pending() == 0 {
            assert!(Instant::now() < deadline, "nothing arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Looks `key` up until L1 misses (up to 2 s), failing with `what` otherwise.
    #[cfg(feature = "redis")]
    fn until_miss(tier: &Tier, key: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !matches!(tier.lookup(key), Lookup::Miss) {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn a_read_sent_to_redis_by_an_unread_message_drops_the_copy() {
        use std::io::Write;
        // No heartbeat runs here: a long liveness window keeps L1 trusted on a slow machine.
        let tier = trusted(LocalTier::new().liveness(Duration::from_secs(60)));
        let (socket, mut redis) = socket_pair();
        tier.channel.set(1, Vec::new(), vec![socket.clone()]);
        put(&tier, "app:a:1");
        put(&tier, "app:b:1");
        assert!(matches!(tier.lookup("app:a:1"), Lookup::Fresh(_)));

        redis
            .write_all(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$7\r\napp:a:1\r\n")
            .unwrap();
        // The message names app:a:1: its read goes to Redis (once the bytes have arrived).
        until_miss(&tier, "app:a:1", "the message was not seen");
        assert_eq!(tier.stats().unsettled_reads, 1);
        // ... not app:b:1's.
        std::thread::sleep(Duration::from_micros(2 * tracking::PEEK_EVERY_MICROS));
        assert!(matches!(tier.lookup("app:b:1"), Lookup::Fresh(_)));
        // The task takes the message off the socket and has not applied it yet: the socket is
        // quiet, and the copy must not come back.
        take_pending(&socket);
        std::thread::sleep(Duration::from_micros(2 * tracking::PEEK_EVERY_MICROS));
        assert!(matches!(tier.lookup("app:a:1"), Lookup::Miss));
        assert!(matches!(tier.lookup("app:b:1"), Lookup::Fresh(_)));

        // A close: every read goes to Redis before the task has seen it.
        drop(redis);
        until_miss(&tier, "app:b:1", "the close was not seen");
    }

    #[test]
    fn overlapping_prefixes_are_merged() {
        let mut tier = LocalTier::new();
        tier.prefixes = vec!["a:b:".into(), "a:".into(), "c:".into(), "a:".into()];
        assert_eq!(tier.tracked_prefixes("x:"), vec!["a:", "c:"]);
        assert_eq!(LocalTier::new().tracked_prefixes("x:"), vec!["x:"]);
    }
}
