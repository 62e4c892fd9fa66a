//! The race every cache-aside library has to answer: a reader misses and loads the old row, a
//! writer commits and invalidates, and the reader then stores the old row for a whole TTL.
//!
//! First the interleavings, forced with loaders held on barriers; then a randomized run against
//! a model of the database, through speedlayer and through a plain get-then-set cache-aside on
//! the same store, to show that the run detects the bug where it exists.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::RngExt;
use speedlayer::Cache;
use speedlayer::store::CacheLayer;
use speedlayer::ttl::Ttl;
use tokio::sync::Barrier;

use crate::registry::View;
use crate::school::*;
use crate::support::Backend;

const MINUTE: Ttl = Ttl::seconds(60);

both_backends!(
    a_key_invalidated_during_the_load_is_not_stored,
    a_tag_invalidated_during_the_load_is_not_stored,
    a_write_during_the_load_wins,
    a_loader_that_outlives_its_lease_stores_nothing,
    randomized_readers_and_writers_never_see_stale_data_after_an_invalidation,
    randomized_plain_cache_aside_is_caught_serving_stale_data,
);

/// Starts a `get_or_set` whose loader reads version 1, then waits at `hold` until released.
fn slow_reader(
    cache: &Cache,
    key: speedlayer::Key,
    tags: Vec<speedlayer::Tag>,
    loading: Arc<Barrier>,
    release: Arc<Barrier>,
) -> tokio::task::JoinHandle<View> {
    let cache = cache.clone();
    tokio::spawn(async move {
        cache
            .get_or_set_tagged(&key, MINUTE, &tags, || async {
                let row = View { version: 1 };
                loading.wait().await;
                release.wait().await;
                Ok::<_, std::io::Error>(row)
            })
            .await
            .unwrap()
    })
}

async fn a_key_invalidated_during_the_load_is_not_stored(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    let key = role(&ns, 1);
    let (loading, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let reader = slow_reader(
        &cache,
        key.clone(),
        vec![],
        loading.clone(),
        release.clone(),
    );
    loading.wait().await;
    // The writer: the database now holds version 2; then the invalidation.
    cache.invalidate(&RoleChanged { user_id: 1 }).await.unwrap();
    release.wait().await;
    assert_eq!(
        reader.await.unwrap(),
        View { version: 1 },
        "the caller gets what it loaded"
    );
    assert_eq!(cache.get::<View>(&key).await, None, "but it is not cached");
    assert_eq!(cache.stats().stale_sets_refused, 1);
    let fresh = cache
        .get_or_set(&key, MINUTE, || async {
            Ok::<_, std::io::Error>(View { version: 2 })
        })
        .await
        .unwrap();
    assert_eq!(fresh, View { version: 2 });
    assert_eq!(cache.get::<View>(&key).await, Some(View { version: 2 }));
}

async fn a_tag_invalidated_during_the_load_is_not_stored(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    let key = dashboard(&ns, &PARENT, 90);
    let (loading, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let reader = slow_reader(
        &cache,
        key.clone(),
        vec![shows_student(&ns, 5)],
        loading.clone(),
        release.clone(),
    );
    loading.wait().await;
    let report = cache
        .invalidate(&FeePaymentRecorded { student_id: 5 })
        .await
        .unwrap();
    assert_eq!(
        report.tag_entries_removed, 1,
        "the load's lease marker was removed"
    );
    release.wait().await;
    assert_eq!(reader.await.unwrap(), View { version: 1 });
    assert_eq!(cache.get::<View>(&key).await, None);
    assert_eq!(cache.stats().stale_sets_refused, 1);
}

async fn a_write_during_the_load_wins(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    let key = fees(&ns, 3);
    let (loading, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let reader = slow_reader(
        &cache,
        key.clone(),
        vec![],
        loading.clone(),
        release.clone(),
    );
    loading.wait().await;
    cache.set(&key, &View { version: 2 }, MINUTE).await.unwrap();
    release.wait().await;
    assert_eq!(reader.await.unwrap(), View { version: 1 });
    assert_eq!(cache.get::<View>(&key).await, Some(View { version: 2 }));
}

async fn a_loader_that_outlives_its_lease_stores_nothing(backend: Backend) {
    let cache =
        cache_with_registry(backend.config().lease_ttl(Ttl::from_millis(50).unwrap())).await;
    let ns = cache.namespace().clone();
    let key = fees(&ns, 4);
    let got = cache
        .get_or_set(&key, MINUTE, || async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok::<_, std::io::Error>(View { version: 1 })
        })
        .await
        .unwrap();
    assert_eq!(got, View { version: 1 });
    assert_eq!(cache.get::<View>(&key).await, None);
    assert_eq!(cache.stats().stale_sets_refused, 1);
}

/// The database model: row versions, and for each committed write the moment (on a global
/// sequence) its invalidation returned.
struct Db {
    versions: Mutex<HashMap<u64, u32>>,
    /// (row, version, sequence number when its invalidation returned)
    invalidated: Mutex<Vec<(u64, u32, u64)>>,
}

/// One read: row, version seen, sequence number when the read started.
type Read = (u64, u32, u64);

const ROWS: u64 = 4;
const RUN: Duration = Duration::from_millis(1_500);

/// How a reader and a writer talk to the cache.
#[derive(Clone)]
enum Client {
    Speedlayer(Cache),
    /// get, miss, load, set; writers delete. No leases.
    Plain(Cache),
}

impl Client {
    async fn read(&self, key: &speedlayer::Key, db: &Arc<Db>, row: u64) -> u32 {
        let load = || {
            let db = db.clone();
            async move {
                let version = db.versions.lock().unwrap()[&row];
                // The time between reading the row and storing it, where writes slip in.
                let pause = rand::rng().random_range(0..3u64);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                Ok::<_, std::io::Error>(View { version })
            }
        };
        match self {
            Client::Speedlayer(cache) => cache.get_or_set(key, MINUTE, load).await.unwrap().version,
            Client::Plain(cache) => {
                let store = cache.store();
                if let Some(bytes) = store.get(key).await.unwrap() {
                    return serde_json::from_slice::<View>(&bytes).unwrap().version;
                }
                let view = load().await.unwrap();
                let bytes = Bytes::from(serde_json::to_vec(&view).unwrap());
                store.set(key, bytes, MINUTE).await.unwrap();
                view.version
            }
        }
    }

    async fn invalidate(&self, row: u64) {
        match self {
            Client::Speedlayer(cache) => {
                cache
                    .invalidate(&RoleChanged { user_id: row })
                    .await
                    .unwrap();
            }
            Client::Plain(cache) => {
                cache
                    .store()
                    .delete(&role(cache.namespace(), row))
                    .await
                    .unwrap();
            }
        }
    }
}

/// Readers and writers over a few rows for [`RUN`]; returns (stale reads, reads, writes).
async fn randomized_run(client: Client, ns: speedlayer::key::Namespace) -> (usize, usize, usize) {
    let db = Arc::new(Db {
        versions: Mutex::new((0..ROWS).map(|r| (r, 0)).collect()),
        invalidated: Mutex::new(Vec::new()),
    });
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reads: Arc<Mutex<Vec<Read>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let (client, db, seq, stop, reads, ns) = (
            client.clone(),
            db.clone(),
            seq.clone(),
            stop.clone(),
            reads.clone(),
            ns.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let row = rand::rng().random_range(0..ROWS);
                let started = seq.fetch_add(1, Ordering::SeqCst);
                let version = client.read(&role(&ns, row), &db, row).await;
                reads.lock().unwrap().push((row, version, started));
                // A hit on the memory backend never yields; let timers and writers run.
                tokio::task::yield_now().await;
            }
        }));
    }
    for _ in 0..3 {
        let (client, db, seq, stop) = (client.clone(), db.clone(), seq.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let row = rand::rng().random_range(0..ROWS);
                let version = {
                    let mut versions = db.versions.lock().unwrap();
                    let v = versions.get_mut(&row).unwrap();
                    *v += 1;
                    *v
                };
                client.invalidate(row).await;
                let returned = seq.fetch_add(1, Ordering::SeqCst);
                db.invalidated
                    .lock()
                    .unwrap()
                    .push((row, version, returned));
                let pause = rand::rng().random_range(1..4u64);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(started.elapsed() < RUN + Duration::from_secs(10));
    let reads = reads.lock().unwrap();
    let invalidated = db.invalidated.lock().unwrap();
    // For each row, the newest version whose invalidation had returned before a read started.
    let stale = reads
        .iter()
        .filter(|(row, seen, started)| {
            let must_see = invalidated
                .iter()
                .filter(|(r, _, returned)| r == row && returned < started)
                .map(|(_, v, _)| *v)
                .max()
                .unwrap_or(0);
            *seen < must_see
        })
        .count();
    (stale, reads.len(), invalidated.len())
}

async fn randomized_readers_and_writers_never_see_stale_data_after_an_invalidation(
    backend: Backend,
) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    let (stale, reads, writes) = randomized_run(Client::Speedlayer(cache.clone()), ns).await;
    eprintln!(
        "speedlayer ({}): {stale} stale reads in {reads} reads with {writes} writes; {} stale sets refused",
        cache.stats().backend,
        cache.stats().stale_sets_refused
    );
    assert!(reads > 200 && writes > 50, "{reads} reads, {writes} writes");
    assert_eq!(stale, 0);
}

async fn randomized_plain_cache_aside_is_caught_serving_stale_data(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    let (stale, reads, writes) = randomized_run(Client::Plain(cache.clone()), ns).await;
    eprintln!(
        "plain cache-aside ({}): {stale} stale reads in {reads} reads with {writes} writes",
        cache.stats().backend
    );
    assert!(reads > 200 && writes > 50, "{reads} reads, {writes} writes");
    assert!(
        stale > 0,
        "the run must detect the race in plain cache-aside"
    );
}

mod redis_only {
    use super::*;

    /// Two caches on one Redis (in one process; `tests/fleet` runs the same with two OS
    /// processes): while one loads a key, the other does not store over it; it loads and
    /// returns its own value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_cache_loading_the_key_is_not_overwritten() {
        let backend = Backend::redis().await;
        let a = cache_with_registry(backend.config()).await;
        let b = cache_with_registry(backend.config()).await;
        let key = fees(a.namespace(), 8);
        let (loading, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let reader = slow_reader(&a, key.clone(), vec![], loading.clone(), release.clone());
        loading.wait().await;
        let from_b = b
            .get_or_set(&key, MINUTE, || async {
                Ok::<_, std::io::Error>(View { version: 1 })
            })
            .await
            .unwrap();
        assert_eq!(from_b, View { version: 1 });
        assert_eq!(b.stats().leases_denied, 1);
        assert_eq!(
            b.get::<View>(&key).await,
            None,
            "b stored nothing over a's lease"
        );
        release.wait().await;
        assert_eq!(reader.await.unwrap(), View { version: 1 });
        assert_eq!(
            b.get::<View>(&key).await,
            Some(View { version: 1 }),
            "a stored it"
        );
    }

    /// An invalidation made through one cache stops a load running in another (in one process;
    /// `tests/fleet` runs the same with OS processes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invalidation_from_another_cache_stops_the_stale_set() {
        let backend = Backend::redis().await;
        let a = cache_with_registry(backend.config()).await;
        let b = cache_with_registry(backend.config()).await;
        let key = role(a.namespace(), 9);
        let (loading, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let reader = slow_reader(&a, key.clone(), vec![], loading.clone(), release.clone());
        loading.wait().await;
        b.invalidate(&RoleChanged { user_id: 9 }).await.unwrap();
        release.wait().await;
        assert_eq!(reader.await.unwrap(), View { version: 1 });
        assert_eq!(a.get::<View>(&key).await, None);
        assert_eq!(a.stats().stale_sets_refused, 1);
    }
}
