//! The typed cache: JSON values over a [`Store`], with get-or-set and single-flight loading.
//!
//! Values are stored as plain JSON (`serde_json`), so `redis-cli GET` and a Node service read
//! them as they are. A stored value that no longer decodes (the type changed between deploys, the
//! bytes were truncated, another client wrote a hash under the key) is a miss: it is deleted,
//! counted in [`CacheStats::decode_failures`], and never an error to the caller.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::invalidation::{Invalidates, InvalidationRegistry, InvalidationReport, Targets};
use crate::key::{Key, KeyPattern, Namespace, Tag};
use crate::store::{
    BackendKind, BreakerState, CacheLayer, IndexWindow, LeaseHold, Leased, Source, Store, is_lease,
};
use crate::telemetry::Tally;
use crate::tier::{Lookup, Tier, TierRead, TierStats};
use crate::ttl::{Ttl, TtlPolicy};

mod batch;
mod fetch;
mod flight;

pub use batch::{Batch, BatchEntry};
pub use fetch::{EarlyRefresh, FetchError, FetchPolicy, Fetched};

use flight::{Flight, Flights};

/// What a flight publishes: the value and what is known of its freshness, or the loader's
/// error. `None` only if a caller's loader was already spent.
type Flown<V, E> = Option<Result<(V, Fresh), Arc<E>>>;

/// Whether a flight's value may be handed to members that did not run its load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fresh {
    /// Stored under a lease no invalidation broke: no invalidation came between the load and
    /// the end of the flight, so it is current for every member.
    Stored,
    /// Found in the store by the leader: current for members that joined before it looked.
    Found,
    /// Not stored (no lease, or the lease was broken): current for members that joined before
    /// the loader ran.
    Unknown,
}

impl Fresh {
    /// True when a member that joined before the leader looked in the store
    /// (`before_observation`) or before its loader ran (`before_loading`) may be handed the value.
    fn usable_by(self, before_observation: bool, before_loading: bool) -> bool {
        match self {
            Fresh::Stored => true,
            Fresh::Found => before_observation,
            // Loaded without a lease (another process holds it, or the backend is unusable):
            // current for the members that joined before the loader read the database, since
            // any invalidation they could have seen came before that read.
            Fresh::Unknown => before_loading,
        }
    }
}

/// Waiting for the value of a load another caller holds the lease for: pauses from 2 ms,
/// doubling up to 16 ms, for at most `lease_wait` in all.
pub(crate) struct LeaseWait {
    since: tokio::time::Instant,
    backoff: Duration,
    limit: Duration,
}

impl LeaseWait {
    pub(crate) fn new(limit: Duration) -> LeaseWait {
        LeaseWait {
            since: tokio::time::Instant::now(),
            backoff: Duration::from_millis(2),
            limit,
        }
    }

    /// Pauses before the next try; false, at once, when the pause would end past the limit.
    pub(crate) async fn pause(&mut self) -> bool {
        if self.since.elapsed() + self.backoff > self.limit {
            return false;
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(16));
        true
    }
}

/// What a load is for.
struct LoadRequest<'a> {
    key: &'a Key,
    tags: &'a [Tag],
    /// The longest TTL the value can get (the tag index must outlive it).
    longest_ttl: Ttl,
    /// Who answered the read that missed.
    first_read: Source,
    /// What that read found and could not decode, if anything.
    undecodable: Option<&'a [u8]>,
}

/// Flights a caller may wait on before it loads by itself.
const WAITER_ROUNDS: usize = 2;

/// Counters and state of a [`Cache`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// The primary backend.
    pub backend: BackendKind,
    /// The backend's last call succeeded and its breaker is closed (always true for memory).
    pub connected: bool,
    /// The breaker's state.
    pub breaker: BreakerState,
    /// Reads answered by a value found in the store (the backend or, during an outage, the
    /// fallback), without a loader call of their own.
    pub hits: u64,
    /// `get_or_set` callers (and keys of a `get_or_set_many` batch) that found nothing and
    /// received the value of a load another caller in this process ran for them (a stampede
    /// shared by single-flight): served without a database query of their own, but not by the
    /// store.
    pub coalesced: u64,
    /// Reads that found nothing usable: a `get` that missed, or a `get_or_set` caller that ran
    /// its own loader (a batch counts each key it loaded).
    pub misses: u64,
    /// Loader calls made by `get_or_set` (one per key per flight, not one per caller) and by
    /// `get_or_set_many` (one per batch that missed, whatever its number of keys).
    pub loader_calls: u64,
    /// Loader calls that returned an error (never cached).
    pub loader_errors: u64,
    /// Stored values that did not decode, or had the wrong Redis type; each was deleted.
    pub decode_failures: u64,
    /// Loaded values not cached because they were larger than the configured maximum or did not
    /// encode.
    pub uncacheable: u64,
    /// Failed backend calls, timeouts included.
    pub errors: u64,
    /// Backend calls that timed out.
    pub timeouts: u64,
    /// Operations answered without the backend.
    pub fallbacks: u64,
    /// Calls that skipped the backend because the breaker was open.
    pub short_circuited: u64,
    /// Entries in process memory (the memory backend, or the fallback); approximate, as moka
    /// counts lazily.
    pub memory_entries: u64,
    /// Loaded values not stored because their key (or one of its tags) was invalidated or
    /// written while the load ran: each one a stale write prevented.
    pub stale_sets_refused: u64,
    /// Loads that found another load's lease on their key (in another process) and no value
    /// after waiting for it ([`Config::lease_wait`], 50 ms by default), or nowhere to take a lease, and so returned their value
    /// without caching it.
    pub leases_denied: u64,
    /// Events passed to [`Cache::invalidate`].
    pub invalidations: u64,
    /// Keys and tags whose invalidation waits for the backend to come back.
    pub pending_invalidations: u64,
    /// Invalidations dropped because the queue for the backend was full.
    pub lost_invalidations: u64,
    /// [`Cache::fetch`] answers past their TTL, within the grace (the refresh failed or was
    /// slower than the soft timeout).
    pub stale_served: u64,
    /// Refreshes [`Cache::fetch`] started before a TTL ended ([`EarlyRefresh`]).
    pub early_refreshes: u64,
}

impl CacheStats {
    /// Reads counted: every `get` and `get_or_set` call is exactly one of a hit, a coalesced
    /// call or a miss (`get_many` counts each key, `get_or_set_many` each distinct key).
    pub fn reads(&self) -> u64 {
        self.hits + self.coalesced + self.misses
    }

    /// The share of reads served without a loader call of their own:
    /// `(hits + coalesced) / (hits + coalesced + misses)`, or 0 before any read. This is the
    /// share of reads the database did not see; `hits / reads()` is the share the store
    /// answered.
    pub fn hit_rate(&self) -> f64 {
        let reads = self.reads();
        if reads == 0 {
            0.0
        } else {
            (self.hits + self.coalesced) as f64 / reads as f64
        }
    }
}

struct Counters {
    hits: Tally,
    coalesced: Tally,
    misses: Tally,
    loader_calls: Tally,
    loader_errors: Tally,
    decode_failures: Tally,
    uncacheable: Tally,
    stale_sets_refused: Tally,
    leases_denied: Tally,
    invalidations: Tally,
    stale_served: Tally,
    early_refreshes: Tally,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            hits: Tally::new("speedlayer_cache_hits_total"),
            coalesced: Tally::new("speedlayer_cache_coalesced_total"),
            misses: Tally::new("speedlayer_cache_misses_total"),
            loader_calls: Tally::new("speedlayer_cache_loads_total"),
            loader_errors: Tally::new("speedlayer_cache_load_errors_total"),
            decode_failures: Tally::new("speedlayer_cache_decode_failures_total"),
            uncacheable: Tally::new("speedlayer_cache_uncacheable_total"),
            stale_sets_refused: Tally::new("speedlayer_cache_stale_sets_refused_total"),
            leases_denied: Tally::new("speedlayer_cache_leases_denied_total"),
            invalidations: Tally::new("speedlayer_cache_invalidations_total"),
            stale_served: Tally::new("speedlayer_cache_stale_served_total"),
            early_refreshes: Tally::new("speedlayer_cache_early_refreshes_total"),
        }
    }
}

struct Inner {
    store: Store,
    flights: Flights,
    counters: Counters,
    max_value_bytes: usize,
    namespace: Namespace,
    lease_ttl: Ttl,
    lease_wait: Duration,
    /// The in-process tier, when configured over Redis.
    tier: Option<Arc<Tier>>,
    /// `fetch`'s background refreshes and load times.
    refreshes: fetch::Refreshes,
}

/// A typed, JSON-encoding cache in front of a loader (usually a database query).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use speedlayer::key::{Ident, Namespace};
/// use speedlayer::ttl::Ttl;
/// use speedlayer::Cache;
///
/// #[derive(Clone, Serialize, Deserialize, PartialEq, Debug)]
/// struct FeeSummary { due_cents: i64 }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let cache = Cache::memory();
/// let fees = Namespace::root().global()
///     .keyspace(&Ident::from_static("fees"), &Ident::from_static("summary"));
/// let key = fees.key(456)?;
///
/// let summary = cache
///     .get_or_set(&key, Ttl::seconds(300), || async {
///         // SELECT ... FROM fees WHERE student_id = 456
///         Ok::<_, std::io::Error>(FeeSummary { due_cents: 12_500 })
///     })
///     .await
///     .expect("the loader cannot fail here");
/// assert_eq!(summary.due_cents, 12_500);
/// assert_eq!(cache.get::<FeeSummary>(&key).await, Some(summary));
/// # Ok::<(), speedlayer::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
    registry: Option<Arc<InvalidationRegistry>>,
}

/// Where a value read from the cache came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Served {
    /// The store: Redis (or, while Redis is unusable, the in-process fallback), or the memory
    /// backend.
    Store,
    /// The in-process tier, while its invalidation channel is confirmed alive.
    Local,
    /// The in-process tier past the channel's liveness window, within the tier's fail-safe
    /// bound: an invalidation made on another instance may not have reached this one.
    Stale,
}

/// What a read that found nothing usable saw: where it was answered, and the bytes that did not
/// decode (if any), which a lease may replace.
struct Missed {
    source: Source,
    undecodable: Option<Bytes>,
}

enum Read<V> {
    Hit(V, Served),
    /// Nothing usable: where the read was answered, and the bytes that did not decode (if
    /// any), which a lease may replace.
    Miss(Source, Option<Bytes>),
}

impl Cache {
    /// Builds a cache from a [`Config`]. Fails only for invalid configuration; a Redis that is
    /// down is served around, not reported.
    pub async fn new(config: Config) -> Result<Cache> {
        let store = Store::connect(&config).await?;
        Ok(Cache::from_store(store, &config))
    }

    /// [`Cache::new`] with [`Config::from_env`]: Redis when `REDIS_URL` (or `REDIS_HOST`) is set,
    /// memory otherwise.
    pub async fn from_env() -> Result<Cache> {
        Cache::new(Config::from_env()?).await
    }

    /// A cache on the in-memory backend with default settings.
    pub fn memory() -> Cache {
        let config = Config::memory();
        let store = Store::from_layer(
            Arc::new(crate::store::MemoryLayer::new(
                crate::store::memory::DEFAULT_MAX_BYTES,
            )),
            &config,
        );
        Cache::from_store(store, &config)
    }

    /// A cache over an existing [`Store`]; `config` supplies the cache's own settings (largest
    /// value).
    pub fn from_store(store: Store, config: &Config) -> Cache {
        let tier = Cache::start_tier(&store, config);
        Cache {
            inner: Arc::new(Inner {
                store,
                flights: Flights::default(),
                counters: Counters::default(),
                max_value_bytes: config.get_max_value_bytes(),
                namespace: config.get_namespace().clone(),
                lease_ttl: config.get_lease_ttl(),
                lease_wait: config.get_lease_wait(),
                tier,
                refreshes: fetch::Refreshes::default(),
            }),
            registry: None,
        }
    }

    #[cfg(feature = "redis")]
    fn start_tier(store: &Store, config: &Config) -> Option<Arc<Tier>> {
        let settings = config.get_local_tier()?;
        let crate::store::Backend::Redis(redis) = store.backend() else {
            tracing::debug!("the in-process tier is not used on the memory backend");
            return None;
        };
        let prefix = match config.get_namespace().prefix() {
            Some(p) => format!("{}:", p.as_str()),
            None => String::new(),
        };
        match Tier::start(redis, settings.clone(), &prefix) {
            Ok(tier) => tier,
            Err(e) => {
                tracing::warn!(error = %e, "the in-process tier cannot start; it is not used");
                None
            }
        }
    }

    #[cfg(not(feature = "redis"))]
    fn start_tier(_store: &Store, _config: &Config) -> Option<Arc<Tier>> {
        None
    }

    /// The in-process tier, if `key` is tiered and the tier may be used now: not while
    /// invalidations wait for the backend (their entries may be copied in L1, and no message
    /// will come for them until they are applied), nor during the recovery hold after an outage
    /// (other instances' queued invalidations are on their way).
    fn tier_of(&self, key: &Key) -> Option<&Tier> {
        if self.inner.store.has_pending() || self.inner.store.is_recovering() {
            return None;
        }
        self.inner
            .tier
            .as_deref()
            .filter(|t| t.covers(key.as_str()))
    }

    /// After an invalidation that could not reach the backend: this process's copies go.
    fn evict_all_local(&self) {
        if let Some(tier) = &self.inner.tier {
            tier.evict_all();
        }
    }

    /// Drops `keys` from this process's tier after a write of them (other instances drop them
    /// when Redis's message arrives).
    fn evict_local<'k>(&self, keys: impl IntoIterator<Item = &'k Key>) {
        if let Some(tier) = &self.inner.tier {
            for key in keys {
                tier.evict(key.as_str());
            }
        }
    }

    /// After writes whose keys are not known here (tags, sweeps): waits until this process's
    /// tier has applied Redis's messages about them.
    async fn sync_local(&self) {
        if let Some(tier) = &self.inner.tier {
            tier.sync().await;
        }
    }

    /// Counters of the in-process tier; `None` when this cache has none.
    pub fn tier_stats(&self) -> Option<TierStats> {
        self.inner.tier.as_ref().map(|t| t.stats())
    }

    /// This cache with the tag rules of `registry`: every entry it writes whose key matches a
    /// rule carries that rule's tag. Clones made after this call share the registry.
    pub fn with_registry(mut self, registry: InvalidationRegistry) -> Cache {
        self.registry = Some(Arc::new(registry));
        self
    }

    /// The deployment namespace (from [`Config::namespace`]): build keys from it so that they
    /// carry the deployment's prefix.
    pub fn namespace(&self) -> &Namespace {
        &self.inner.namespace
    }

    /// The rollout switches of this cache's store, shared by every capability built on it (see
    /// [`switch`](crate::switch)).
    pub fn switches(&self) -> &crate::switch::Switches {
        self.inner.store.switches()
    }

    fn is_on(&self) -> bool {
        self.inner.store.is_on(crate::switch::Capability::Cache)
    }

    /// True when `key` may be cached: the cache is switched on and the key's domain is not
    /// declared never cached by this cache's namespace (a key built from another namespace is
    /// checked here too).
    fn caches(&self, key: &Key) -> bool {
        if self.inner.namespace.refuses(key) {
            tracing::error!(
                domain = key.domain(),
                "a key in a never-cached domain reached the cache; it is read from the loader and never stored"
            );
            return false;
        }
        self.is_on()
    }

    /// An error when `key` is in a domain this cache's namespace declares never cached.
    fn refuse_never_cached(&self, key: &Key) -> Result<()> {
        if self.inner.namespace.refuses(key) {
            return Err(Error::new(
                ErrorKind::InvalidKey,
                format!(
                    "the domain {:?} is declared never cached: nothing is stored in it",
                    key.domain()
                ),
            ));
        }
        Ok(())
    }

    /// The store underneath, for byte-level operations (`set_if_absent`, `increment`).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// How long a load's lease lives ([`Config::lease_ttl`]).
    pub(crate) fn lease_ttl(&self) -> Ttl {
        self.inner.lease_ttl
    }

    /// The value under `key`, or `None` when it is absent, does not decode as `T` (then it is
    /// deleted and counted), or cannot be read because the backend is unusable and the fallback
    /// holds nothing.
    pub async fn get<T: DeserializeOwned>(&self, key: &Key) -> Option<T> {
        if !self.caches(key) {
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.get_served(key).await.map(|(v, _)| v)
    }

    /// [`get`](Cache::get), saying where the value came from: with an in-process tier under
    /// its fail-safe bound, [`Served::Stale`] marks a value that an invalidation made elsewhere
    /// may have overtaken.
    pub async fn get_served<T: DeserializeOwned>(&self, key: &Key) -> Option<(T, Served)> {
        if !self.caches(key) {
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match self.read(key).await {
            Read::Hit(v, served) => Some((v, served)),
            Read::Miss(_, undecodable) => {
                self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                if undecodable.is_some() {
                    self.delete_in_background(vec![key.clone()]);
                }
                None
            }
        }
    }

    /// The values under `keys`, in order, in one round trip. Entries that do not decode are
    /// deleted and read as `None`.
    pub async fn get_many<T: DeserializeOwned>(&self, keys: &[Key]) -> Vec<Option<T>> {
        let c = &self.inner.counters;
        if keys.iter().any(|k| !self.caches(k)) {
            c.misses.fetch_add(keys.len() as u64, Ordering::Relaxed);
            return keys.iter().map(|_| None).collect();
        }
        let raw = match self.inner.store.get_many(keys).await {
            Ok(raw) => raw,
            Err(e) => {
                tracing::debug!(error = %e, "get_many failed; reading as misses");
                vec![None; keys.len()]
            }
        };
        let mut out = Vec::with_capacity(keys.len());
        let mut undecodable = Vec::new();
        for (key, bytes) in keys.iter().zip(raw) {
            // A key whose load is running holds a lease: a miss, not a value that does not
            // decode.
            let bytes = bytes.filter(|b| !is_lease(b));
            match bytes.map(|b| serde_json::from_slice::<T>(&b)) {
                Some(Ok(v)) => {
                    c.hits.fetch_add(1, Ordering::Relaxed);
                    out.push(Some(v));
                }
                Some(Err(e)) => {
                    tracing::warn!(key = %key, error = %e, "cached value does not decode; deleting it");
                    c.decode_failures.fetch_add(1, Ordering::Relaxed);
                    c.misses.fetch_add(1, Ordering::Relaxed);
                    undecodable.push(key.clone());
                    out.push(None);
                }
                None => {
                    c.misses.fetch_add(1, Ordering::Relaxed);
                    out.push(None);
                }
            }
        }
        if !undecodable.is_empty() {
            self.delete_in_background(undecodable);
        }
        out
    }

    /// Stores `value` as JSON under `key` for `ttl`.
    ///
    /// Errors only when the value cannot be encoded ([`ErrorKind::Serialize`]) or is larger than
    /// the configured maximum ([`ErrorKind::ValueTooLarge`]); while the backend is unusable the
    /// value goes to the fallback (or nowhere) and this returns `Ok`.
    pub async fn set<T: Serialize + ?Sized>(&self, key: &Key, value: &T, ttl: Ttl) -> Result<()> {
        self.set_tagged(key, value, ttl, &[]).await
    }

    /// [`set`](Cache::set) with tags (added to those the registry's rules give the key). The
    /// tags are recorded before the value is written, so that no entry exists that its tags
    /// cannot reach. While the backend is unusable during an outage, both go to the fallback;
    /// after a single failure with the breaker still closed, nothing is written (the call still
    /// returns `Ok`: a cache write is never the request's problem).
    pub async fn set_tagged<T: Serialize + ?Sized>(
        &self,
        key: &Key,
        value: &T,
        ttl: Ttl,
        tags: &[Tag],
    ) -> Result<()> {
        let bytes = self.encode(value)?;
        self.refuse_never_cached(key)?;
        if !self.is_on() {
            // Switched off: the write becomes a delete, so that no older value is left for the
            // instances (or the moment) where the cache is on.
            self.delete(key).await;
            return Ok(());
        }
        let tags = self.tags_of(key, tags);
        let written = self.inner.store.set_tagged(key, bytes, ttl, &tags).await;
        self.evict_local([key]);
        written
    }

    /// Stores several values as JSON, each for a TTL picked by `ttl` (jitter applied per entry),
    /// with the tags the registry's rules give each key: one round trip for the tags (if any) and
    /// one for the values. Like [`set`](Cache::set), it errors only when a value cannot be
    /// encoded or is too large, and then nothing is written.
    pub async fn set_many<T: Serialize>(
        &self,
        entries: &[(Key, T)],
        ttl: impl Into<TtlPolicy>,
    ) -> Result<()> {
        let policy = ttl.into();
        let mut encoded = Vec::with_capacity(entries.len());
        let mut tags = Vec::new();
        for (key, value) in entries {
            encoded.push(crate::store::Entry {
                key: key.clone(),
                value: self.encode(value)?,
                ttl: policy.pick(),
            });
            let own = self.tags_of(key, &[]);
            if !own.is_empty() {
                tags.push((key.clone(), own));
            }
        }
        for (key, _) in entries {
            self.refuse_never_cached(key)?;
        }
        if !self.is_on() {
            let keys: Vec<Key> = entries.iter().map(|(k, _)| k.clone()).collect();
            if let Err(e) = self.inner.store.delete_many(&keys).await {
                tracing::debug!(error = %e, "delete (cache switched off) failed");
            }
            self.evict_local(&keys);
            return Ok(());
        }
        let written = self.inner.store.set_many_tagged(&encoded, &tags).await;
        self.evict_local(entries.iter().map(|(k, _)| k));
        written
    }

    /// True when `key` holds a value: not absent, not a load in flight, and (on Redis) a string.
    /// The value is not read, so one that would not decode as the type you expect still counts;
    /// [`get`](Cache::get) treats that as a miss. False too when the backend cannot be asked and
    /// no fallback holds the key.
    pub async fn exists(&self, key: &Key) -> bool {
        if !self.caches(key) {
            return false;
        }
        matches!(self.inner.store.peek(key).await, Ok(Some(_)))
    }

    /// How long the value under `key` still lives. [`Remaining::Missing`] when there is no value
    /// (as for [`exists`](Cache::exists)) or the backend cannot be asked;
    /// [`Remaining::NoExpiry`] only for a value another client wrote without a TTL.
    ///
    /// [`Remaining::Missing`]: crate::store::Remaining::Missing
    /// [`Remaining::NoExpiry`]: crate::store::Remaining::NoExpiry
    pub async fn remaining_ttl(&self, key: &Key) -> crate::store::Remaining {
        if !self.caches(key) {
            return crate::store::Remaining::Missing;
        }
        match self.inner.store.peek(key).await {
            Ok(Some(remaining)) => remaining,
            Ok(None) => crate::store::Remaining::Missing,
            Err(e) => {
                tracing::debug!(key = %key, error = %e, "remaining TTL unknown; reading as missing");
                crate::store::Remaining::Missing
            }
        }
    }

    /// Gives the live value under `key` a new TTL picked by `ttl`, counted from now (a sliding
    /// expiry: a draft refreshed on each save, a session on each request). Nothing happens when
    /// there is no value, or a load of the key is in flight. The key is registered again in the
    /// tags the registry's rules give it, for the new TTL, so they keep reaching it; an entry
    /// written with explicit tags must be touched with [`touch_tagged`](Cache::touch_tagged).
    /// True when the TTL was set; false also when the backend cannot be asked.
    pub async fn touch(&self, key: &Key, ttl: impl Into<TtlPolicy>) -> bool {
        self.touch_tagged(key, ttl, &[]).await
    }

    /// [`touch`](Cache::touch) for an entry written with explicit tags: they (and the
    /// registry's) are registered for the new TTL before it is set.
    pub async fn touch_tagged(&self, key: &Key, ttl: impl Into<TtlPolicy>, tags: &[Tag]) -> bool {
        let ttl = ttl.into().pick();
        if !self.caches(key) {
            return false;
        }
        let tags = self.tags_of(key, tags);
        let touched = self.inner.store.touch_tagged(key, ttl, &tags).await;
        self.evict_local([key]);
        match touched {
            Ok(touched) => touched,
            Err(e) => {
                tracing::debug!(key = %key, error = %e, "touch failed");
                false
            }
        }
    }

    /// Removes `key`. True when an entry was removed; false when there was none, or when the
    /// backend could not be reached (the delete is then queued and applied as soon as it
    /// answers, before any read reaches it; see [`invalidation`](crate::invalidation)).
    pub async fn delete(&self, key: &Key) -> bool {
        let deleted = self.inner.store.delete(key).await;
        self.evict_local([key]);
        match deleted {
            Ok(removed) => removed,
            Err(e) => {
                tracing::debug!(key = %key, error = %e, "delete failed");
                false
            }
        }
    }

    /// The cached value under `key`, or the loader's, which is then cached for a TTL picked by
    /// `ttl` (jitter applied).
    ///
    /// - Concurrent callers of one cold key in this process share one loader call; each gets a
    ///   clone of its value.
    /// - A loader error is returned and never cached. Every caller that shared the failed call
    ///   receives the same `Arc<E>`; `Arc<E>` is an `std::error::Error` when `E` is, so `?`
    ///   works.
    /// - If the backend is unusable, the loader still runs and its value is returned (and kept
    ///   in the fallback, if any); the call waits on the backend at most once.
    /// - The value is stored under a lease: if the key is deleted, written or one of its tags
    ///   invalidated while the loader runs, the value is returned but not stored (see
    ///   [`invalidation`](crate::invalidation)). Callers that waited on such a load run their own
    ///   loader rather than receive a value an invalidation may have overtaken.
    pub async fn get_or_set<T, E, F, Fut>(
        &self,
        key: &Key,
        ttl: impl Into<TtlPolicy>,
        loader: F,
    ) -> Result<T, Arc<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.get_or_set_tagged(key, ttl, &[], loader).await
    }

    /// [`get_or_set`](Cache::get_or_set) with tags: the entry is removed whenever one of `tags`
    /// (or of the tags the registry's rules give the key) is invalidated.
    pub async fn get_or_set_tagged<T, E, F, Fut>(
        &self,
        key: &Key,
        ttl: impl Into<TtlPolicy>,
        tags: &[Tag],
        loader: F,
    ) -> Result<T, Arc<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let policy = ttl.into();
        let longest = policy.ttl();
        self.load_through(key, tags, longest, loader, move |_| policy.pick())
            .await
    }

    /// [`get_or_set`](Cache::get_or_set) for lookups that may find nothing: a `None` from the
    /// loader is cached too (as JSON `null`), for `negative_ttl`, so that repeated lookups of a
    /// missing row do not all reach the database.
    pub async fn get_or_set_optional<T, E, F, Fut>(
        &self,
        key: &Key,
        ttl: impl Into<TtlPolicy>,
        negative_ttl: Ttl,
        loader: F,
    ) -> Result<Option<T>, Arc<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let policy = ttl.into();
        let longest = policy.ttl().max(negative_ttl);
        self.load_through(key, &[], longest, loader, move |v: &Option<T>| match v {
            Some(_) => policy.pick(),
            None => negative_ttl,
        })
        .await
    }

    /// Invalidates what `event` declares (see [`Invalidates`]): call it after the database
    /// commit. Reports what was removed. While the backend is unusable the fallback is
    /// invalidated at once and the backend's part is queued ([`InvalidationReport::deferred`]);
    /// it is applied before the backend serves any read again.
    ///
    /// Errors only when the event cannot build its keys ([`ErrorKind::InvalidKey`]) or the
    /// backend refuses the data of a target; another client's value where a tag index lives is
    /// not such a refusal (it is removed and the tag reports nothing removed). Every target is
    /// attempted even when one is refused.
    pub async fn invalidate<E: Invalidates>(&self, event: &E) -> Result<InvalidationReport> {
        let mut targets = Targets::new();
        event.targets(&self.inner.namespace, &mut targets)?;
        self.inner
            .counters
            .invalidations
            .fetch_add(1, Ordering::Relaxed);
        let done = self
            .inner
            .store
            .invalidate(targets.keys(), targets.tags())
            .await;
        self.evict_local(targets.keys());
        if !targets.tags().is_empty() {
            self.sync_local().await;
        }
        if done.as_ref().map_or(true, |d| d.deferred) {
            self.evict_all_local();
        }
        let done = done?;
        let (keys, tags) = targets.into_parts();
        let report = InvalidationReport {
            event: std::any::type_name::<E>(),
            keys,
            tags,
            keys_removed: done.keys_removed,
            tag_entries_removed: done.tag_entries_removed,
            deferred: done.deferred,
        };
        tracing::debug!(
            event = report.event,
            removed = report.removed(),
            deferred = report.deferred,
            "invalidated"
        );
        Ok(report)
    }

    /// Waits until every invalidation queued while the backend was unusable has been applied (a
    /// background task applies them as soon as the backend answers), up to `timeout`. True when
    /// none is left. For shutdown paths and tests; requests never need to wait for it.
    pub async fn flush_invalidations(&self, timeout: Duration) -> bool {
        self.inner.store.flush_invalidations(timeout).await
    }

    /// Invalidates a tag directly: every entry carrying it becomes a miss.
    pub async fn invalidate_tag(&self, tag: &Tag) -> Result<u64> {
        let removed = self.inner.store.invalidate_tag(tag).await;
        self.sync_local().await;
        if removed.is_err() || self.inner.store.has_pending() {
            self.evict_all_local();
        }
        removed
    }

    /// Maintenance only: removes every key matching `pattern` by walking the keyspace (Redis
    /// `SCAN MATCH` in batches, then `UNLINK`), stopping after `max_removed` removals. Its cost
    /// grows with the keyspace; use tags or tag rules on request paths.
    pub async fn sweep(&self, pattern: &KeyPattern, max_removed: u64) -> Result<u64> {
        let removed = self.inner.store.sweep(pattern, 1_000, max_removed).await;
        self.sync_local().await;
        removed
    }

    /// Counters and state.
    pub fn stats(&self) -> CacheStats {
        let s = self.inner.store.stats();
        let c = &self.inner.counters;
        CacheStats {
            backend: s.backend,
            connected: s.connected,
            breaker: s.breaker,
            hits: c.hits.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            loader_calls: c.loader_calls.load(Ordering::Relaxed),
            loader_errors: c.loader_errors.load(Ordering::Relaxed),
            decode_failures: c.decode_failures.load(Ordering::Relaxed),
            uncacheable: c.uncacheable.load(Ordering::Relaxed),
            errors: s.errors,
            timeouts: s.timeouts,
            fallbacks: s.fallbacks,
            short_circuited: s.short_circuited,
            memory_entries: s.memory_entries,
            stale_sets_refused: c.stale_sets_refused.load(Ordering::Relaxed),
            leases_denied: c.leases_denied.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            pending_invalidations: s.pending_invalidations,
            lost_invalidations: s.lost_invalidations,
            stale_served: c.stale_served.load(Ordering::Relaxed),
            early_refreshes: c.early_refreshes.load(Ordering::Relaxed),
        }
    }

    fn tags_of(&self, key: &Key, explicit: &[Tag]) -> Vec<Tag> {
        let mut tags = explicit.to_vec();
        if let Some(registry) = &self.registry {
            registry.extend_tags(key, &mut tags);
        }
        tags
    }

    async fn load_through<V, E, F, Fut>(
        &self,
        key: &Key,
        tags: &[Tag],
        longest_ttl: Ttl,
        loader: F,
        ttl_for: impl FnOnce(&V) -> Ttl,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        if !self.caches(key) {
            // Switched off (or a never-cached domain): the loader answers, nothing is stored.
            let c = &self.inner.counters;
            c.misses.fetch_add(1, Ordering::Relaxed);
            c.loader_calls.fetch_add(1, Ordering::Relaxed);
            return loader().await.map_err(|e| {
                c.loader_errors.fetch_add(1, Ordering::Relaxed);
                Arc::new(e)
            });
        }
        let (source, undecodable) = match self.read::<V>(key).await {
            Read::Hit(v, _) => return Ok(v),
            Read::Miss(source, undecodable) => (source, undecodable),
        };
        let first_read = Missed {
            source,
            undecodable,
        };
        self.load_missed(key, tags, longest_ttl, first_read, loader, ttl_for)
            .await
    }

    /// [`load_through`](Cache::load_through) after a read that found nothing usable
    /// (`first_read`): the flights, the lease, the load.
    async fn load_missed<V, E, F, Fut>(
        &self,
        key: &Key,
        tags: &[Tag],
        longest_ttl: Ttl,
        first_read: Missed,
        loader: F,
        ttl_for: impl FnOnce(&V) -> Ttl,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let Missed {
            source,
            undecodable,
        } = first_read;
        let c = &self.inner.counters;
        // Kept outside the flight's closure: a caller that only waited still holds its loader
        // and can load itself if the shared result turns out not to be usable for it.
        let mut loader = Some(loader);
        let mut ttl_for = Some(ttl_for);
        for round in 0..=WAITER_ROUNDS {
            // The last round is a flight of its own, so this caller surely runs its loader.
            let member = (round < WAITER_ROUNDS)
                .then(|| self.inner.flights.join::<Flown<V, E>>(key.as_str()));
            let flight = match &member {
                Some(m) => m.flight.clone(),
                None => Flight::private(),
            };
            let joined_before_observation = flight.before_observation();
            let joined_before_loading = flight.before_loading();
            // A batch leading this key publishes without running the cell's initializer.
            flight.outside_leader_done().await;
            let mut led = false;
            let outcome = flight
                .cell
                .get_or_init(|| async {
                    led = true;
                    let result = match (loader.take(), ttl_for.take()) {
                        (Some(load), Some(ttl)) => {
                            let request = LoadRequest {
                                key,
                                tags,
                                longest_ttl,
                                first_read: source,
                                undecodable: undecodable.as_deref(),
                            };
                            Some(self.lease_and_load(request, &flight, load, ttl).await)
                        }
                        // A caller runs at most one load and then returns; never reached.
                        _ => None,
                    };
                    // Out of the table before the result is published: nobody can join a load
                    // that has already read the database.
                    self.inner.flights.retire(key.as_str(), &flight);
                    result
                })
                .await
                .clone();
            drop(member);
            match outcome {
                Some(Ok((value, fresh))) => {
                    let usable =
                        led || fresh.usable_by(joined_before_observation, joined_before_loading);
                    if usable {
                        let counter = match (led, fresh) {
                            // The leader found the value another load had just stored.
                            (true, Fresh::Found) => &c.hits,
                            (true, _) => &c.misses,
                            (false, _) => &c.coalesced,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        return Ok(value);
                    }
                    // An invalidation may have come between what the leader saw and this
                    // caller's arrival: go again, with this caller's own loader.
                }
                Some(Err(e)) => {
                    let counter = if led { &c.misses } else { &c.coalesced };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
                None => {}
            }
        }
        unreachable!("the last round is a private flight whose loader this caller runs")
    }

    /// The leader of a flight: takes the key's lease (re-reading the key in the same step),
    /// records the tags, loads, and stores the value only if the lease survived. Returns the
    /// value and what is known of its freshness for callers that joined the flight.
    ///
    /// The lease is released (compare-and-delete: only if it is still this load's) whenever
    /// the load ends without storing: a loader error, a value that cannot be cached, tags that
    /// could not be recorded, and the caller's future being dropped mid-load (a client gone, a
    /// request timeout). Other callers, in this process or another, then load at once instead
    /// of waiting out the lease TTL without stampede protection.
    async fn lease_and_load<V, E, F, Fut>(
        &self,
        request: LoadRequest<'_>,
        flight: &Arc<Flight<Flown<V, E>>>,
        loader: F,
        ttl_for: impl FnOnce(&V) -> Ttl,
    ) -> Result<(V, Fresh), Arc<E>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let inner = &*self.inner;
        let LoadRequest {
            key,
            tags,
            longest_ttl,
            first_read,
            undecodable,
        } = request;
        let token = crate::store::new_token();
        flight.observe();
        // When the first read found the backend unusable, only the fallback is asked: a request
        // waits on a sick backend at most once.
        // Another load holding the key's lease (another process, or this one's previous flight
        // storing its value) usually stores within milliseconds: wait a little for its value
        // rather than query the database again, then load without caching.
        let skip_primary = first_read != Source::Primary;
        let mut wait = LeaseWait::new(inner.lease_wait);
        let mut lease = loop {
            let leased = inner
                .store
                .get_or_lease_with_source(key, token, inner.lease_ttl, undecodable, skip_primary)
                .await;
            match leased {
                // Another flight stored the value between our read and our lease: a hit after all.
                Ok((Leased::Value(bytes), _)) => match serde_json::from_slice::<V>(&bytes) {
                    Ok(v) => return Ok((v, Fresh::Found)),
                    Err(_) => {
                        // Another undecodable value than the one the first read saw.
                        self.discard(key);
                        break None;
                    }
                },
                Ok((Leased::Granted, source)) => {
                    break Some(LeaseHold {
                        store: &inner.store,
                        key,
                        token,
                        source,
                        held: true,
                    });
                }
                Ok((Leased::Denied, source)) => {
                    if source != Source::Nothing && wait.pause().await {
                        continue;
                    }
                    inner.counters.leases_denied.fetch_add(1, Ordering::Relaxed);
                    break None;
                }
                Err(e) => {
                    tracing::debug!(key = %key, error = %e, "no lease; the value will not be cached");
                    break None;
                }
            }
        };
        // When the index expires: the entry's TTL is cut so that it never outlives its tags.
        let mut index = None;
        if let Some(source) = lease.as_ref().map(|hold| hold.source) {
            let tags = self.tags_of(key, tags);
            if !tags.is_empty() {
                // The index must outlive the entry: its longest TTL plus the load.
                let window = IndexWindow::starting_now(longest_ttl, inner.lease_ttl.as_duration());
                index = Some(window);
                if let Err(e) = inner.store.tag_add_at(&tags, key, window.ttl, source).await {
                    tracing::debug!(key = %key, error = %e, "tags not recorded; the value will not be cached");
                    if let Some(hold) = lease.take() {
                        hold.release().await;
                    }
                }
            }
        }

        inner.counters.loader_calls.fetch_add(1, Ordering::Relaxed);
        flight.start_loading();
        let started = std::time::Instant::now();
        let loaded = loader()
            .instrument(tracing::debug_span!("speedlayer.load", key = %key))
            .await;
        crate::telemetry::load_time(started.elapsed().as_secs_f64());
        let value = match loaded {
            Ok(value) => value,
            Err(e) => {
                inner.counters.loader_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = %key, "loader failed; nothing cached");
                if let Some(hold) = lease {
                    hold.release().await;
                }
                return Err(Arc::new(e));
            }
        };
        let mut fresh = Fresh::Unknown;
        if let Some(mut hold) = lease {
            // Nobody may join once the value is about to be stored: a caller arriving after the
            // store could have seen an invalidation that came after it.
            self.inner.flights.retire(key.as_str(), flight);
            let mut ttl = ttl_for(&value);
            if let Some(index) = index {
                // Once the index expired during the load, the entry could not be reached.
                ttl = index.cut(ttl).unwrap_or(Ttl::MIN);
            }
            match self.encode(&value) {
                Ok(bytes) => {
                    // Still held while the store runs: if this future is dropped meanwhile, the
                    // lease is released (a no-op once the value is stored).
                    let stored = inner
                        .store
                        .set_leased_at(key, token, bytes, ttl, hold.source)
                        .await;
                    // Stored or refused, the lease is spent either way.
                    hold.held = false;
                    match stored {
                        Ok(true) => fresh = Fresh::Stored,
                        Ok(false) => {
                            inner
                                .counters
                                .stale_sets_refused
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(
                                key = %key,
                                "the key was invalidated or written during the load; value not cached"
                            );
                        }
                        Err(e) => tracing::debug!(key = %key, error = %e, "cache fill failed"),
                    }
                }
                Err(e) => {
                    inner.counters.uncacheable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %key, error = %e, "loaded value not cached");
                    hold.release().await;
                }
            }
        }
        Ok((value, fresh))
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            Error::new(
                ErrorKind::Serialize,
                format!("the value cannot be encoded as JSON: {e}"),
            )
        })?;
        if bytes.len() > self.inner.max_value_bytes {
            return Err(Error::new(
                ErrorKind::ValueTooLarge,
                format!(
                    "the value is {} bytes as JSON, more than the {} allowed; cache a smaller \
                     projection or raise Config::max_value_bytes",
                    bytes.len(),
                    self.inner.max_value_bytes
                ),
            ));
        }
        Ok(Bytes::from(bytes))
    }

    /// Reads `key`; counts hits and decode failures (a miss is counted by the caller, which
    /// knows whether it then loaded or was served by another caller's load).
    async fn read<V: DeserializeOwned>(&self, key: &Key) -> Read<V> {
        let c = &self.inner.counters;
        let tier = self.tier_of(key);
        let mut snapshot = None;
        if let Some(tier) = tier {
            let (copy, served) = match tier.lookup(key.as_str()) {
                Lookup::Fresh(bytes) => (Some(bytes), Served::Local),
                Lookup::Stale(bytes) => (Some(bytes), Served::Stale),
                Lookup::Miss => (None, Served::Store),
            };
            if let Some(bytes) = copy {
                match serde_json::from_slice::<V>(&bytes) {
                    Ok(v) => {
                        c.hits.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(key = %key, "hit in the in-process tier");
                        return Read::Hit(v, served);
                    }
                    // Read as another type by another caller: ask the store.
                    Err(_) => tier.evict(key.as_str()),
                }
            }
            snapshot = tier.snapshot(key.as_str());
        }
        let found = match (tier, snapshot) {
            (Some(_), Some(_)) => self
                .inner
                .store
                .run(&TierRead { key }, crate::store::OutageRule::Fallback)
                .await
                .map(|answered| match answered {
                    crate::store::Answered::Backend((v, left)) => (v, left, Source::Primary),
                    crate::store::Answered::Fallback((v, left)) => (v, left, Source::Fallback),
                    _ => (None, None, Source::Nothing),
                }),
            _ => self
                .inner
                .store
                .get_with_source(key)
                .await
                .map(|(v, source)| (v, None, source)),
        };
        let (bytes, remaining, source) = match found {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::WrongType => {
                tracing::warn!(key = %key, error = %e, "cached entry has the wrong type; replacing it");
                c.decode_failures.fetch_add(1, Ordering::Relaxed);
                return Read::Miss(Source::Primary, Some(Bytes::new()));
            }
            Err(e) => {
                tracing::debug!(key = %key, error = %e, "read failed; treating as a miss");
                return Read::Miss(Source::Nothing, None);
            }
        };
        match bytes.filter(|b| !is_lease(b)) {
            Some(bytes) => match serde_json::from_slice::<V>(&bytes) {
                Ok(v) => {
                    c.hits.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(key = %key, "hit");
                    if let (Some(tier), Some(snapshot), Source::Primary) = (tier, snapshot, source)
                    {
                        tier.fill(key.as_str(), bytes, remaining, snapshot);
                    }
                    Read::Hit(v, Served::Store)
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "cached value does not decode; replacing it");
                    c.decode_failures.fetch_add(1, Ordering::Relaxed);
                    Read::Miss(source, Some(bytes))
                }
            },
            None => {
                tracing::trace!(key = %key, "miss");
                Read::Miss(source, None)
            }
        }
    }

    /// Counts an undecodable value and deletes it beside the request.
    fn discard(&self, key: &Key) {
        self.inner
            .counters
            .decode_failures
            .fetch_add(1, Ordering::Relaxed);
        self.delete_in_background(vec![key.clone()]);
    }

    /// Deletes that only tidy up (an undecodable entry, an abandoned lease) run beside the
    /// request, so that it never waits on them.
    fn delete_in_background(&self, keys: Vec<Key>) {
        self.evict_local(&keys);
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.delete_many(&keys).await {
                tracing::debug!(error = %e, "background delete failed");
            }
        });
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("store", &self.inner.store)
            .field("max_value_bytes", &self.inner.max_value_bytes)
            .field("namespace", &self.inner.namespace)
            .field("registry", &self.registry)
            .finish()
    }
}
