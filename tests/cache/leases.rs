//! Leases and counters across callers that do not share a process's single-flight: several
//! caches over one store behave like several app servers on one Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use speedlayer::store::Store;
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Config};
use tokio::sync::{Barrier, Notify};

use crate::support::{Backend, key};

const MINUTE: Ttl = Ttl::seconds(60);

/// One store (one Redis, or one process memory) and a config whose lease wait is long enough
/// that a caller finding a live lease always waits for its value on a busy machine.
async fn shared_store(backend: &Backend) -> (Store, Config) {
    let config = backend.config().lease_wait(Duration::from_secs(3));
    (Store::connect(&config).await.unwrap(), config)
}

/// A load dropped mid-way (the client went away, the request timed out) gives its lease up: the
/// next callers, each its own app server, share one load instead of each loading uncached for
/// the lease TTL.
pub async fn cancelled_load_releases_its_lease(backend: &Backend) {
    let (store, config) = shared_store(backend).await;
    let first = Cache::from_store(store.clone(), &config);
    let started = Arc::new(Notify::new());
    let cold = key(1);
    let load = {
        let started = started.clone();
        first.get_or_set(&cold, MINUTE, move || async move {
            started.notify_one();
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, std::io::Error>(0u32)
        })
    };
    tokio::select! {
        _ = load => panic!("the load cannot finish"),
        _ = async {
            started.notified().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        } => {}
    }
    // The load's future is dropped here: its lease must not outlive it.

    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(50));
    let mut callers = Vec::new();
    for _ in 0..50 {
        let cache = Cache::from_store(store.clone(), &config);
        let (calls, start) = (calls.clone(), start.clone());
        callers.push(tokio::spawn(async move {
            start.wait().await;
            cache
                .get_or_set(&key(1), MINUTE, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, std::io::Error>(7u32)
                })
                .await
                .unwrap()
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), 7);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "50 callers after a cancelled load share one loader call"
    );
    let cache = Cache::from_store(store, &config);
    assert_eq!(
        cache.get::<u32>(&key(1)).await,
        Some(7),
        "and it was cached"
    );
}

/// Every read is exactly one of a hit, a coalesced call or a miss, and the hit rate counts what
/// the database did not see.
pub async fn callers_served_by_another_load_count_as_coalesced(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let start = Arc::new(Barrier::new(20));
    let mut callers = Vec::new();
    for _ in 0..20 {
        let (cache, start) = (cache.clone(), start.clone());
        callers.push(tokio::spawn(async move {
            start.wait().await;
            cache
                .get_or_set(&key(1), MINUTE, || async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, std::io::Error>(1u32)
                })
                .await
                .unwrap()
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), 1);
    }
    let stats = cache.stats();
    assert_eq!(stats.loader_calls, 1);
    assert_eq!(
        (stats.hits, stats.coalesced, stats.misses),
        (0, 19, 1),
        "{stats:?}"
    );
    for _ in 0..5 {
        cache
            .get_or_set(&key(1), MINUTE, || async { Ok::<_, std::io::Error>(2u32) })
            .await
            .unwrap();
    }
    assert_eq!(cache.get::<u32>(&key(2)).await, None);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.coalesced, stats.misses), (5, 19, 2));
    assert_eq!(stats.reads(), 26);
    assert!((stats.hit_rate() - 24.0 / 26.0).abs() < 1e-9, "{stats:?}");
}

/// When no lease can be taken (another process holds it), the callers of this process still
/// share one load: those that joined before it read the database get its value, although it
/// is not cached.
pub async fn callers_share_a_load_that_cannot_be_cached(backend: &Backend) {
    let config = backend.config();
    let store = Store::connect(&config).await.unwrap();
    let other = Cache::from_store(store.clone(), &config);
    let ours = Cache::from_store(store, &config);
    // Another app server is loading the key and holds its lease.
    let (loading, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let held = {
        let (other, loading, release) = (other.clone(), loading.clone(), release.clone());
        tokio::spawn(async move {
            other
                .get_or_set(&key(1), MINUTE, || async {
                    loading.wait().await;
                    release.wait().await;
                    Ok::<_, std::io::Error>(1u32)
                })
                .await
                .unwrap()
        })
    };
    loading.wait().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(20));
    let mut callers = Vec::new();
    for _ in 0..20 {
        let (ours, calls, start) = (ours.clone(), calls.clone(), start.clone());
        callers.push(tokio::spawn(async move {
            start.wait().await;
            ours.get_or_set(&key(1), MINUTE, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, std::io::Error>(2u32)
            })
            .await
            .unwrap()
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), 2);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one load for the 20 callers"
    );
    assert_eq!(ours.stats().leases_denied, 1);
    release.wait().await;
    assert_eq!(held.await.unwrap(), 1);
}
