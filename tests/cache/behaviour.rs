//! What the typed cache promises on every backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use speedlayer::store::{BackendKind, BreakerState, CacheLayer, Remaining};
use speedlayer::ttl::{Jitter, Ttl, TtlPolicy};
use speedlayer::{Cache, ErrorKind};
use tokio::sync::Barrier;

use crate::support::{Backend, key};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Student {
    id: u32,
    name: String,
}

pub fn student(id: u32) -> Student {
    Student {
        id,
        name: format!("student {id}"),
    }
}

#[derive(Debug, PartialEq)]
struct DbDown;

impl std::fmt::Display for DbDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database down")
    }
}

impl std::error::Error for DbDown {}

const MINUTE: Ttl = Ttl::seconds(60);

/// Undecodable entries are deleted beside the request; wait (bounded) for it.
async fn eventually_absent(cache: &Cache, key: &speedlayer::Key) {
    for _ in 0..500 {
        if cache.store().get(key).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} was not deleted within 5 s");
}

async fn cache_for(backend: &Backend) -> Cache {
    Cache::new(backend.config()).await.expect("valid config")
}

pub async fn get_or_set_loads_once_then_hits(backend: &Backend) {
    let cache = cache_for(backend).await;
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        let got = cache
            .get_or_set(&key(1), MINUTE, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, DbDown>(student(1))
            })
            .await
            .unwrap();
        assert_eq!(got, student(1));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.loader_calls), (2, 1, 1));
}

pub async fn concurrent_callers_share_one_loader_call(backend: &Backend) {
    let cache = cache_for(backend).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(100));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (cache, calls, start) = (cache.clone(), calls.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            cache
                .get_or_set(&key("cold"), MINUTE, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Long enough that every caller has missed and joined before it ends.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, DbDown>(student(7))
                })
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), student(7));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().loader_calls, 1);
}

pub async fn loader_errors_are_shared_returned_and_never_cached(backend: &Backend) {
    let cache = cache_for(backend).await;
    let start = Arc::new(Barrier::new(10));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (cache, start) = (cache.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            cache
                .get_or_set(&key(1), MINUTE, || async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err::<Student, _>(DbDown)
                })
                .await
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.push(t.await.unwrap().unwrap_err());
    }
    assert!(errors.iter().all(|e| **e == DbDown));
    assert!(
        errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])),
        "callers that shared the load share the error"
    );
    assert_eq!(cache.get::<Student>(&key(1)).await, None);
    assert_eq!(cache.store().get(&key(1)).await.unwrap(), None);
    // The next call loads again, and its value is cached.
    let got = cache
        .get_or_set(&key(1), MINUTE, || async { Ok::<_, DbDown>(student(1)) })
        .await
        .unwrap();
    assert_eq!(got, student(1));
    let stats = cache.stats();
    assert_eq!((stats.loader_calls, stats.loader_errors), (2, 1));
    // `?` works: Arc<E> is an Error.
    fn takes_error(_: Box<dyn std::error::Error>) {}
    takes_error(Box::new(errors.remove(0)));
}

pub async fn a_cancelled_loader_is_taken_over_by_a_waiter(backend: &Backend) {
    let cache = cache_for(backend).await;
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_set(&key(1), MINUTE, || async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok::<_, DbDown>(student(0))
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_set(&key(1), MINUTE, || async { Ok::<_, DbDown>(student(1)) })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter must not hang on a cancelled leader")
        .unwrap()
        .unwrap();
    assert_eq!(got, student(1));
    assert_eq!(cache.stats().loader_calls, 2);
}

pub async fn none_is_cached_for_the_negative_ttl(backend: &Backend) {
    let cache = cache_for(backend).await;
    let calls = AtomicUsize::new(0);
    let lookup = || async {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok::<Option<Student>, DbDown>(None)
    };
    let negative = Ttl::from_millis(150).unwrap();
    assert_eq!(
        cache
            .get_or_set_optional(&key(1), MINUTE, negative, lookup)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        cache
            .get_or_set_optional(&key(1), MINUTE, negative, lookup)
            .await
            .unwrap(),
        None
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the None must be cached");
    match cache.store().remaining_ttl(&key(1)).await.unwrap() {
        Remaining::Expires(d) => assert!(d <= Duration::from_millis(150), "{d:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        cache.store().get(&key(1)).await.unwrap(),
        Some(Bytes::from_static(b"null"))
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    cache
        .get_or_set_optional(&key(1), MINUTE, negative, lookup)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "expired negative entry");
    // A found row is cached with the positive TTL.
    let found = cache
        .get_or_set_optional(&key(2), MINUTE, negative, || async {
            Ok::<_, DbDown>(Some(student(2)))
        })
        .await
        .unwrap();
    assert_eq!(found, Some(student(2)));
    match cache.store().remaining_ttl(&key(2)).await.unwrap() {
        Remaining::Expires(d) => assert!(d > Duration::from_secs(50), "{d:?}"),
        other => panic!("{other:?}"),
    }
}

pub async fn values_are_stored_as_plain_json(backend: &Backend) {
    let cache = cache_for(backend).await;
    cache.set(&key(1), &student(1), MINUTE).await.unwrap();
    let expected = serde_json::to_string(&student(1)).unwrap();
    assert_eq!(
        cache.store().get(&key(1)).await.unwrap(),
        Some(Bytes::from(expected.clone()))
    );
    if let Some(cli) = backend.cli_args() {
        // Read the value as an operator would (redis-cli ships with redis-server).
        let out = std::process::Command::new("redis-cli")
            .args(cli)
            .args(["GET", key(1).as_str()])
            .output()
            .expect("redis-cli is installed with redis-server");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    }
}

pub async fn undecodable_values_are_misses_that_are_deleted_and_counted(backend: &Backend) {
    let cache = cache_for(backend).await;
    let store = cache.store();
    store
        .set(&key(1), Bytes::from_static(b"{\"id\":1,\"na"), MINUTE)
        .await
        .unwrap();
    store
        .set(&key(2), Bytes::from_static(&[0xff, 0xfe, 0x00]), MINUTE)
        .await
        .unwrap();
    assert_eq!(cache.get::<Student>(&key(1)).await, None);
    eventually_absent(&cache, &key(1)).await;
    let got = cache
        .get_or_set(&key(2), MINUTE, || async { Ok::<_, DbDown>(student(2)) })
        .await
        .unwrap();
    assert_eq!(got, student(2));
    assert_eq!(cache.get::<Student>(&key(2)).await, Some(student(2)));
    let stats = cache.stats();
    assert_eq!(stats.decode_failures, 2);
    assert_eq!(stats.errors, 0);
}

pub async fn a_changed_schema_is_a_miss(backend: &Backend) {
    #[derive(Serialize)]
    struct OldStudent {
        id: u32,
    }
    let cache = cache_for(backend).await;
    cache
        .set(&key(1), &OldStudent { id: 1 }, MINUTE)
        .await
        .unwrap();
    let got = cache
        .get_or_set(&key(1), MINUTE, || async { Ok::<_, DbDown>(student(1)) })
        .await
        .unwrap();
    assert_eq!(got, student(1));
    assert_eq!(cache.stats().decode_failures, 1);
    assert_eq!(cache.get::<Student>(&key(1)).await, Some(student(1)));
}

pub async fn ttls_are_jittered_within_the_policy(backend: &Backend) {
    let cache = cache_for(backend).await;
    let policy = TtlPolicy::new(Ttl::seconds(100))
        .with_jitter(Jitter::fraction(0.5).unwrap())
        .unwrap()
        .seeded(42);
    let mut ttls = Vec::new();
    for i in 0..20 {
        cache
            .get_or_set(&key(i), policy.clone(), || async { Ok::<_, DbDown>(i) })
            .await
            .unwrap();
        match cache.store().remaining_ttl(&key(i)).await.unwrap() {
            Remaining::Expires(d) => ttls.push(d),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        ttls.iter()
            .all(|d| *d >= Duration::from_secs(49) && *d <= Duration::from_secs(100)),
        "{ttls:?}"
    );
    let spread = ttls.iter().max().unwrap().as_secs() - ttls.iter().min().unwrap().as_secs();
    assert!(spread >= 10, "jitter must spread TTLs: {ttls:?}");
}

pub async fn oversized_values_are_refused_or_left_uncached(backend: &Backend) {
    let cache = Cache::new(backend.config().max_value_bytes(64))
        .await
        .unwrap();
    let big = "x".repeat(100);
    let err = cache.set(&key(1), &big, MINUTE).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ValueTooLarge);
    assert!(err.to_string().contains("max_value_bytes"), "{err}");
    let got = cache
        .get_or_set(&key(2), MINUTE, || async { Ok::<_, DbDown>(big.clone()) })
        .await
        .unwrap();
    assert_eq!(got, big, "the loaded value is returned");
    assert_eq!(
        cache.store().get(&key(2)).await.unwrap(),
        None,
        "not cached"
    );
    assert_eq!(cache.stats().uncacheable, 1);
    // A value JSON cannot encode: a map with non-string keys.
    let mut odd = std::collections::HashMap::new();
    odd.insert((1, 2), 3);
    let err = cache.set(&key(3), &odd, MINUTE).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialize);
}

pub async fn get_many_decodes_each_entry(backend: &Backend) {
    let cache = cache_for(backend).await;
    cache.set(&key(1), &student(1), MINUTE).await.unwrap();
    cache
        .store()
        .set(&key(2), Bytes::from_static(b"garbage"), MINUTE)
        .await
        .unwrap();
    cache.set(&key(4), &student(4), MINUTE).await.unwrap();
    let got: Vec<Option<Student>> = cache.get_many(&[key(1), key(2), key(3), key(4)]).await;
    assert_eq!(got, vec![Some(student(1)), None, None, Some(student(4))]);
    eventually_absent(&cache, &key(2)).await;
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.decode_failures), (2, 2, 1));
}

/// A key whose load is running holds a lease marker: `get_many` sees a miss, not a value that
/// does not decode, and neither deletes the marker nor stops the load from storing its value.
pub async fn get_many_passes_over_a_load_in_progress(backend: &Backend) {
    let cache = cache_for(backend).await;
    let (loading, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let load = {
        let (cache, loading, release) = (cache.clone(), loading.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_set(&key(1), MINUTE, || async move {
                    loading.wait().await;
                    release.wait().await;
                    Ok::<_, DbDown>(student(1))
                })
                .await
        })
    };
    loading.wait().await;
    let got: Vec<Option<Student>> = cache.get_many(&[key(1)]).await;
    assert_eq!(got, vec![None]);
    release.wait().await;
    assert_eq!(load.await.unwrap().unwrap(), student(1));
    assert_eq!(cache.stats().decode_failures, 0);
    assert_eq!(cache.stats().stale_sets_refused, 0);
    assert_eq!(cache.get::<Student>(&key(1)).await, Some(student(1)));
}

pub async fn delete_removes(backend: &Backend) {
    let cache = cache_for(backend).await;
    cache.set(&key(1), &student(1), MINUTE).await.unwrap();
    assert!(cache.delete(&key(1)).await);
    assert!(!cache.delete(&key(1)).await);
    assert_eq!(cache.get::<Student>(&key(1)).await, None);
}

pub async fn set_and_get_with_hostile_ids(backend: &Backend) {
    let cache = cache_for(backend).await;
    let ids = ["2001:db8::1", "x*", "a b\nc", "%41", "ana@school.org"];
    for (i, id) in ids.iter().enumerate() {
        cache.set(&key(id), &i, MINUTE).await.unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(cache.get::<usize>(&key(id)).await, Some(i), "{id:?}");
    }
}

pub async fn stats_describe_the_backend(backend: &Backend) {
    let cache = cache_for(backend).await;
    cache.set(&key(1), &1, MINUTE).await.unwrap();
    let stats = cache.stats();
    let expected = match backend {
        Backend::Memory(_) => BackendKind::Memory,
        _ => BackendKind::Redis,
    };
    assert_eq!(stats.backend, expected);
    assert!(stats.connected);
    assert_eq!(stats.breaker, BreakerState::Closed);
    assert_eq!((stats.errors, stats.fallbacks), (0, 0));
}
