//! The typed cache: JSON values over a [`Store`], with get-or-set and single-flight loading.
//!
//! Values are stored as plain JSON (`serde_json`), so `redis-cli GET` and a Node service read
//! them as they are. A stored value that no longer decodes (the type changed between deploys, the
//! bytes were truncated, another client wrote a hash under the key) is a miss: it is deleted,
//! counted in [`CacheStats::decode_failures`], and never an error to the caller.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::key::Key;
use crate::store::{BackendKind, BreakerState, CacheLayer, Source, Store};
use crate::ttl::{Ttl, TtlPolicy};

mod flight;

use flight::Flights;

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
    /// Reads that found a value (in the backend or, during an outage, the fallback).
    pub hits: u64,
    /// Reads that found nothing usable.
    pub misses: u64,
    /// Loader calls made by `get_or_set` (one per key per flight, not one per caller).
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
    /// Entries in process memory (the memory backend, or the fallback).
    pub memory_entries: u64,
}

impl CacheStats {
    /// `hits / (hits + misses)`, or 0 before any read.
    pub fn hit_rate(&self) -> f64 {
        let reads = self.hits + self.misses;
        if reads == 0 {
            0.0
        } else {
            self.hits as f64 / reads as f64
        }
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    loader_calls: AtomicU64,
    loader_errors: AtomicU64,
    decode_failures: AtomicU64,
    uncacheable: AtomicU64,
}

struct Inner {
    store: Store,
    flights: Flights,
    counters: Counters,
    max_value_bytes: usize,
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
}

enum Read<V> {
    Hit(V),
    Miss(Source),
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
        Cache {
            inner: Arc::new(Inner {
                store,
                flights: Flights::default(),
                counters: Counters::default(),
                max_value_bytes: config.get_max_value_bytes(),
            }),
        }
    }

    /// The store underneath, for byte-level operations (`set_if_absent`, `increment`).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The value under `key`, or `None` when it is absent, does not decode as `T` (then it is
    /// deleted and counted), or cannot be read because the backend is unusable and the fallback
    /// holds nothing.
    pub async fn get<T: DeserializeOwned>(&self, key: &Key) -> Option<T> {
        match self.read(key).await {
            Read::Hit(v) => Some(v),
            Read::Miss(_) => None,
        }
    }

    /// The values under `keys`, in order, in one round trip. Entries that do not decode are
    /// deleted and read as `None`.
    pub async fn get_many<T: DeserializeOwned>(&self, keys: &[Key]) -> Vec<Option<T>> {
        let c = &self.inner.counters;
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
            let _ = self.inner.store.delete_many(&undecodable).await;
        }
        out
    }

    /// Stores `value` as JSON under `key` for `ttl`.
    ///
    /// Errors only when the value cannot be encoded ([`ErrorKind::Serialize`]) or is larger than
    /// the configured maximum ([`ErrorKind::ValueTooLarge`]); while the backend is unusable the
    /// value goes to the fallback (or nowhere) and this returns `Ok`.
    pub async fn set<T: Serialize + ?Sized>(&self, key: &Key, value: &T, ttl: Ttl) -> Result<()> {
        let bytes = self.encode(value)?;
        self.inner.store.set(key, bytes, ttl).await
    }

    /// Removes `key`. True when an entry was removed; false when there was none, or when the
    /// backend could not be reached (the entry then expires by its TTL).
    pub async fn delete(&self, key: &Key) -> bool {
        match self.inner.store.delete(key).await {
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
        let policy = ttl.into();
        self.load_through(key, loader, move |_| policy.pick()).await
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
        self.load_through(key, loader, move |v: &Option<T>| match v {
            Some(_) => policy.pick(),
            None => negative_ttl,
        })
        .await
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
        }
    }

    async fn load_through<V, E, F, Fut>(
        &self,
        key: &Key,
        loader: F,
        ttl_for: impl FnOnce(&V) -> Ttl,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let source = match self.read::<V>(key).await {
            Read::Hit(v) => return Ok(v),
            Read::Miss(source) => source,
        };
        let member = self.inner.flights.join::<V, E>(key.as_str());
        let result = member
            .flight
            .cell
            .get_or_init(|| async {
                // A caller whose read missed just before another flight for this key ended
                // starts a new flight; reading again first turns such stragglers into hits
                // instead of second loader calls. It costs one read per flight, not per caller,
                // and is skipped when the first read found the backend unusable (a request waits
                // on a sick backend at most once).
                if source == Source::Primary
                    && let Read::Hit(v) = self.read_uncounted::<V>(key).await
                {
                    return Ok(v);
                }
                self.inner
                    .counters
                    .loader_calls
                    .fetch_add(1, Ordering::Relaxed);
                let loaded = loader()
                    .instrument(tracing::debug_span!("speedlayer.load", key = %key))
                    .await;
                match loaded {
                    Ok(value) => {
                        let ttl = ttl_for(&value);
                        self.fill(key, &value, ttl, source != Source::Primary).await;
                        Ok(value)
                    }
                    Err(e) => {
                        self.inner
                            .counters
                            .loader_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(key = %key, "loader failed; nothing cached");
                        Err(Arc::new(e))
                    }
                }
            })
            .await
            .clone();
        drop(member);
        result
    }

    async fn fill<V: Serialize>(&self, key: &Key, value: &V, ttl: Ttl, skip_primary: bool) {
        match self.encode(value) {
            Ok(bytes) => self.inner.store.fill(key, bytes, ttl, skip_primary).await,
            Err(e) => {
                self.inner
                    .counters
                    .uncacheable
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %key, error = %e, "loaded value not cached");
            }
        }
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

    /// A read that leaves hit and miss counters alone (an undecodable entry is left to the counted read that
    /// came before).
    async fn read_uncounted<V: DeserializeOwned>(&self, key: &Key) -> Read<V> {
        match self.inner.store.get_with_source(key).await {
            Ok((Some(bytes), _)) => match serde_json::from_slice::<V>(&bytes) {
                Ok(v) => Read::Hit(v),
                Err(_) => Read::Miss(Source::Primary),
            },
            Ok((None, source)) => Read::Miss(source),
            Err(_) => Read::Miss(Source::Nothing),
        }
    }

    async fn read<V: DeserializeOwned>(&self, key: &Key) -> Read<V> {
        let c = &self.inner.counters;
        let (bytes, source) = match self.inner.store.get_with_source(key).await {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::WrongType => {
                tracing::warn!(key = %key, error = %e, "cached entry has the wrong type; deleting it");
                self.discard(key).await;
                return Read::Miss(Source::Primary);
            }
            Err(e) => {
                tracing::debug!(key = %key, error = %e, "read failed; treating as a miss");
                c.misses.fetch_add(1, Ordering::Relaxed);
                return Read::Miss(Source::Nothing);
            }
        };
        match bytes.map(|b| serde_json::from_slice::<V>(&b)) {
            Some(Ok(v)) => {
                c.hits.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(key = %key, "hit");
                Read::Hit(v)
            }
            Some(Err(e)) => {
                tracing::warn!(key = %key, error = %e, "cached value does not decode; deleting it");
                self.discard(key).await;
                Read::Miss(source)
            }
            None => {
                c.misses.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(key = %key, "miss");
                Read::Miss(source)
            }
        }
    }

    async fn discard(&self, key: &Key) {
        let c = &self.inner.counters;
        c.decode_failures.fetch_add(1, Ordering::Relaxed);
        c.misses.fetch_add(1, Ordering::Relaxed);
        let _ = self.inner.store.delete(key).await;
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("store", &self.inner.store)
            .field("max_value_bytes", &self.inner.max_value_bytes)
            .finish()
    }
}
