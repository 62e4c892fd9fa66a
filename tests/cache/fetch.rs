//! `Cache::fetch`: fail-safe, soft and hard timeouts, early refresh (XFetch), and refreshes
//! racing invalidations. Run on every backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use speedlayer::Cache;
use speedlayer::cache::{EarlyRefresh, FetchError, FetchPolicy};
use speedlayer::ttl::Ttl;
use tokio::sync::Notify;

use crate::support::{Backend, key};

async fn cache_for(backend: &Backend) -> Cache {
    Cache::new(backend.config()).await.expect("valid config")
}

#[derive(Debug)]
struct DbDown;

impl std::fmt::Display for DbDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database down")
    }
}

/// A loader answering `value`, counting its calls in `calls`, taking `delay`.
fn counted(
    calls: &Arc<AtomicU64>,
    value: u64,
    delay: Duration,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<u64, DbDown>> + Send>>
+ Send
+ Sync
+ 'static {
    let calls = calls.clone();
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(value)
        })
    }
}

fn failing() -> impl Fn() -> std::future::Ready<Result<u64, DbDown>> + Send + Sync + 'static {
    || std::future::ready(Err(DbDown))
}

/// Past its TTL, within the grace, an entry whose refresh fails is served, marked stale; a
/// fresh one is served as it is without a load.
pub async fn fail_safe_serves_an_expired_value_when_the_loader_fails(backend: &Backend) {
    let cache = cache_for(backend).await;
    let k = key("fetch-1");
    let policy = FetchPolicy::new(Ttl::from_millis(200).unwrap()).grace(Duration::from_secs(30));
    let calls = Arc::new(AtomicU64::new(0));
    let first = cache
        .fetch(&k, &policy, counted(&calls, 1, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!((first.value, first.stale), (1, false));
    let again = cache.fetch(&k, &policy, failing()).await.unwrap();
    assert_eq!((again.value, again.stale), (1, false), "fresh: no load");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stale = cache.fetch(&k, &policy, failing()).await.unwrap();
    assert_eq!((stale.value, stale.stale), (1, true));
    assert_eq!(cache.stats().stale_served, 1);
    // A refresh that succeeds replaces it.
    let fresh = cache
        .fetch(&k, &policy, counted(&calls, 2, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!((fresh.value, fresh.stale), (2, false));
    let after = cache.fetch(&k, &policy, failing()).await.unwrap();
    assert_eq!((after.value, after.stale), (2, false));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Fail-safe never brings back what a delete or an invalidation removed.
pub async fn an_invalidated_value_is_never_served_stale(backend: &Backend) {
    let cache = cache_for(backend).await;
    let k = key("fetch-2");
    let policy = FetchPolicy::new(Ttl::from_millis(200).unwrap()).grace(Duration::from_secs(30));
    let calls = Arc::new(AtomicU64::new(0));
    cache
        .fetch(&k, &policy, counted(&calls, 1, Duration::ZERO))
        .await
        .unwrap();
    assert!(cache.delete(&k).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    match cache.fetch(&k, &policy, failing()).await {
        Err(FetchError::Loader(_)) => {}
        other => panic!("a deleted entry came back: {other:?}"),
    }
}

/// With a stale value and a slow loader: the soft timeout returns the stale value, the load
/// finishes in the background and its value is then served fresh without another load.
pub async fn a_soft_timeout_serves_stale_and_the_load_finishes_behind(backend: &Backend) {
    let cache = cache_for(backend).await;
    let k = key("fetch-3");
    let policy = FetchPolicy::new(Ttl::seconds(1))
        .grace(Duration::from_secs(30))
        .soft_timeout(Duration::from_millis(20));
    let calls = Arc::new(AtomicU64::new(0));
    cache
        .fetch(&k, &policy, counted(&calls, 1, Duration::ZERO))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = cache
        .fetch(&k, &policy, counted(&calls, 2, Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!((stale.value, stale.stale), (1, true));
    // Meanwhile, other callers do not start a second refresh.
    let meanwhile = cache
        .fetch(&k, &policy, counted(&calls, 3, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!((meanwhile.value, meanwhile.stale), (1, true));
    // The load (300 ms) has stored its value, fresh for a second.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = cache.fetch(&k, &policy, failing()).await.unwrap();
    assert_eq!((fresh.value, fresh.stale), (2, false));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Without anything to serve, the hard timeout ends the wait with an error, and the load's lease
/// is released: the next fetch loads at once.
pub async fn a_hard_timeout_without_a_stale_value_is_an_error(backend: &Backend) {
    let cache = cache_for(backend).await;
    let k = key("fetch-4");
    let policy = FetchPolicy::new(Ttl::seconds(60)).hard_timeout(Duration::from_millis(50));
    let calls = Arc::new(AtomicU64::new(0));
    match cache
        .fetch(&k, &policy, counted(&calls, 1, Duration::from_secs(5)))
        .await
    {
        Err(FetchError::Timeout(after)) => assert_eq!(after, Duration::from_millis(50)),
        other => panic!("expected a timeout: {other:?}"),
    }
    let next = cache
        .fetch(&k, &policy, counted(&calls, 2, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(next.value, 2);
}

/// A refresh whose entry is deleted while its loader runs does not store its value.
pub async fn a_refresh_racing_a_delete_is_not_stored(backend: &Backend) {
    let cache = cache_for(backend).await;
    let k = key("fetch-5");
    let policy = FetchPolicy::new(Ttl::from_millis(200).unwrap())
        .grace(Duration::from_secs(30))
        .soft_timeout(Duration::from_millis(10));
    let calls = Arc::new(AtomicU64::new(0));
    cache
        .fetch(&k, &policy, counted(&calls, 1, Duration::ZERO))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let loader = {
        let (started, release) = (started.clone(), release.clone());
        move || {
            let (started, release) = (started.clone(), release.clone());
            async move {
                started.notify_one();
                release.notified().await;
                Ok::<u64, DbDown>(2)
            }
        }
    };
    let stale = cache.fetch(&k, &policy, loader).await.unwrap();
    assert!(stale.stale);
    started.notified().await;
    // The row changes; its write deletes the entry while the refresh still runs.
    let refused_before = cache.stats().stale_sets_refused;
    assert!(cache.delete(&k).await);
    release.notify_one();
    for _ in 0..200 {
        if cache.stats().stale_sets_refused > refused_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(cache.stats().stale_sets_refused, refused_before + 1);
    assert_eq!(
        cache.get::<u64>(&k).await,
        None,
        "the refresh did not store"
    );
}

/// XFetch: 8 readers on one hot key for 1.2 s, TTL 200 ms: the key is refreshed in the
/// background about once per TTL, and after the first load no reader ever loads or waits.
pub async fn xfetch_refreshes_a_hot_key_before_it_expires(backend: &Backend) {
    let cache = cache_for(backend).await;
    let k = key("fetch-6");
    let policy = FetchPolicy::new(Ttl::from_millis(200).unwrap())
        .grace(Duration::from_secs(5))
        .early_refresh(EarlyRefresh::xfetch())
        .expected_load(Duration::from_millis(20));
    let calls = Arc::new(AtomicU64::new(0));
    let version = Arc::new(AtomicU64::new(0));
    let make = |calls: Arc<AtomicU64>, version: Arc<AtomicU64>| {
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            let v = version.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<u64, DbDown>(v)
            }
        }
    };
    cache
        .fetch(&k, &policy, make(calls.clone(), version.clone()))
        .await
        .unwrap();
    let misses = cache.stats().misses;
    let started = std::time::Instant::now();
    let mut readers = Vec::new();
    for _ in 0..8 {
        let (cache, k, policy) = (cache.clone(), k.clone(), policy.clone());
        let loader = make(calls.clone(), version.clone());
        readers.push(tokio::spawn(async move {
            let mut stale = 0;
            while started.elapsed() < Duration::from_millis(1200) {
                let got = cache.fetch(&k, &policy, loader.clone()).await.unwrap();
                stale += u32::from(got.stale);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            stale
        }));
    }
    let mut stale = 0;
    for r in readers {
        stale += r.await.unwrap();
    }
    let stats = cache.stats();
    let loads = calls.load(Ordering::SeqCst);
    eprintln!(
        "xfetch: {loads} loads in 1.2 s at TTL 200 ms, {} early refreshes, {stale} stale reads",
        stats.early_refreshes
    );
    assert_eq!(stats.misses, misses, "no reader ran a load of its own");
    assert!(stats.early_refreshes >= 3, "{stats:?}");
    assert!(loads <= 1 + 2 * 7, "about one refresh per TTL: {loads}");
}
