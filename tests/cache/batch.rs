//! `get_or_set_many`: one read, one loader call with only the misses, each key under its own
//! lease; and the rest of the typed API (`set_many`, `exists`, `remaining_ttl`, `touch`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use speedlayer::key::{Ident, Namespace};
use speedlayer::store::{CacheLayer, Remaining, Store};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Config, Key};
use tokio::sync::{Barrier, Notify};

use crate::support::{Backend, key};

const MINUTE: Ttl = Ttl::seconds(60);
const NEGATIVE: Ttl = Ttl::seconds(30);

use crate::behaviour::{Student, student};

fn keys(ids: impl IntoIterator<Item = u32>) -> Vec<(u32, Key)> {
    ids.into_iter().map(|id| (id, key(id))).collect()
}

/// What a loader was asked for, call by call.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Vec<u32>>>>);

impl Calls {
    fn record(&self, ids: &[u32]) {
        self.0.lock().unwrap().push(ids.to_vec());
    }

    fn calls(&self) -> Vec<Vec<u32>> {
        self.0.lock().unwrap().clone()
    }

    /// Every id asked for, with how many times.
    fn loads(&self) -> HashMap<u32, usize> {
        let mut out = HashMap::new();
        for call in self.calls() {
            for id in call {
                *out.entry(id).or_insert(0) += 1;
            }
        }
        out
    }
}

/// A loader over a table of students whose ids are all below `rows`.
fn table(
    calls: &Calls,
    rows: u32,
) -> impl FnMut(Vec<u32>) -> std::future::Ready<Result<HashMap<u32, Student>, std::io::Error>> + use<>
{
    let calls = calls.clone();
    move |ids: Vec<u32>| {
        calls.record(&ids);
        std::future::ready(Ok(ids
            .into_iter()
            .filter(|id| *id < rows)
            .map(|id| (id, student(id)))
            .collect()))
    }
}

async fn shared_store(backend: &Backend) -> (Store, Config) {
    let config = backend.config().lease_wait(Duration::from_secs(3));
    (Store::connect(&config).await.unwrap(), config)
}

/// 50 keys with 20 cached: one loader call with exactly the 30 missing, every answer right, and
/// the next call reaches no loader at all.
pub async fn a_batch_loads_only_the_misses_in_one_call(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let warm: Vec<(Key, Student)> = (0..50)
        .filter(|id| id % 5 < 2)
        .map(|id| (key(id), student(id)))
        .collect();
    assert_eq!(warm.len(), 20);
    cache.set_many(&warm, MINUTE).await.unwrap();

    let calls = Calls::default();
    let batch = cache
        .get_or_set_many(&keys(0..50), MINUTE, NEGATIVE, table(&calls, 1_000))
        .await;
    let asked = calls.calls();
    assert_eq!(asked.len(), 1, "one loader call: {asked:?}");
    let asked: BTreeSet<u32> = asked[0].iter().copied().collect();
    let expected: BTreeSet<u32> = (0..50).filter(|id| id % 5 >= 2).collect();
    assert_eq!(asked, expected, "exactly the 30 missing ids");
    assert_eq!(batch.len(), 50);
    assert!(batch.is_complete());
    for (id, answer) in batch.iter() {
        assert_eq!(answer.as_ref().unwrap(), &Some(student(*id)));
    }
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.loader_calls), (20, 30, 1));

    let again = cache
        .get_or_set_many(&keys(0..50), MINUTE, NEGATIVE, table(&calls, 1_000))
        .await;
    assert_eq!(calls.calls().len(), 1, "a warm batch calls no loader");
    assert_eq!(again.into_map().unwrap().len(), 50);
    // Each entry is the plain JSON a single-key read finds.
    assert_eq!(cache.get::<Student>(&key(7)).await, Some(student(7)));
}

/// Ids the loader does not return are cached as absent for the negative TTL: not asked again
/// within it, asked again after it.
pub async fn absent_rows_are_cached_for_the_negative_ttl(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let calls = Calls::default();
    let short = Ttl::from_millis(1_000).unwrap();
    let batch = cache
        .get_or_set_many(&keys(0..10), MINUTE, short, table(&calls, 6))
        .await;
    assert_eq!(batch.found().count(), 6);
    for id in 6..10 {
        assert!(
            matches!(batch.get(&id), Some(Ok(None))),
            "id {id} is absent"
        );
    }
    let again = cache
        .get_or_set_many(&keys(0..10), MINUTE, short, table(&calls, 6))
        .await;
    assert_eq!(calls.calls().len(), 1, "absent ids are cached as absent");
    assert!(matches!(again.get(&8), Some(Ok(None))));
    // The same entries serve the single-key optional lookup.
    let single = cache
        .get_or_set_optional(&key(8), MINUTE, short, || async {
            Ok::<_, std::io::Error>(Some(student(8)))
        })
        .await
        .unwrap();
    assert_eq!(
        single, None,
        "the batch's absent entry answers the single-key call"
    );

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cache
        .get_or_set_many(&keys(0..10), MINUTE, short, table(&calls, 6))
        .await;
    let asked = calls.calls();
    assert_eq!(asked.len(), 2);
    let asked: BTreeSet<u32> = asked[1].iter().copied().collect();
    assert_eq!(asked, (6..10).collect(), "only the expired absent ids");
}

/// Batches overlapping on some keys, and single-key calls on them, load each key once; a
/// batch whose keys another batch is loading does not wait for it to load its own.
pub async fn overlapping_batches_load_each_key_once(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let calls = Calls::default();
    let start = Arc::new(Barrier::new(5));
    let mut tasks = Vec::new();
    for range in [0..30, 15..45, 10..20, 40..50] {
        let (cache, calls, start) = (cache.clone(), calls.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let ids: Vec<u32> = range.clone().collect();
            let batch = cache
                .get_or_set_many(&keys(ids), MINUTE, NEGATIVE, |ids: Vec<u32>| {
                    calls.record(&ids);
                    async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::io::Error>(
                            ids.into_iter().map(|id| (id, student(id))).collect(),
                        )
                    }
                })
                .await;
            let map = batch.into_map().unwrap();
            assert_eq!(map.len(), range.len());
            for id in range {
                assert_eq!(map[&id], student(id));
            }
        }));
    }
    let single = {
        let (cache, calls, start) = (cache.clone(), calls.clone(), start.clone());
        tokio::spawn(async move {
            start.wait().await;
            cache
                .get_or_set_optional(&key(17), MINUTE, NEGATIVE, || async {
                    calls.record(&[17]);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, std::io::Error>(Some(student(17)))
                })
                .await
                .unwrap()
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(single.await.unwrap(), Some(student(17)));
    let loads = calls.loads();
    assert_eq!(loads.len(), 50, "every key loaded");
    let twice: Vec<_> = loads.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys loaded more than once: {twice:?}");

    // Unrelated keys are not serialised behind a slow load.
    let release = Arc::new(Notify::new());
    let slow = {
        let (cache, release) = (cache.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_set_many(&keys(100..110), MINUTE, NEGATIVE, |ids: Vec<u32>| {
                    let release = release.clone();
                    async move {
                        release.notified().await;
                        Ok::<_, std::io::Error>(
                            ids.into_iter().map(|id| (id, student(id))).collect(),
                        )
                    }
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let unrelated = tokio::time::timeout(
        Duration::from_secs(10),
        cache.get_or_set_many(&keys(200..210), MINUTE, NEGATIVE, table(&calls, 1_000)),
    )
    .await
    .expect("a batch of other keys does not wait for a slow load");
    assert_eq!(unrelated.found().count(), 10);
    assert!(!slow.is_finished());
    release.notify_one();
    assert_eq!(slow.await.unwrap().found().count(), 10);
}

/// A key deleted, or whose tag is invalidated, while the batch loads is returned but not stored;
/// the other keys are stored.
pub async fn an_invalidation_during_the_batch_load_is_not_stored(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let scope = Namespace::root().global();
    let class = Ident::from_static("class");
    let tag_of = |id: &u32| vec![scope.tag(&class, id % 2).unwrap()];
    let odd = scope.tag(&class, 1).unwrap();
    let batch = {
        let cache = cache.clone();
        cache
            .clone()
            .get_or_set_many_tagged(&keys(0..6), MINUTE, NEGATIVE, tag_of, |ids: Vec<u32>| {
                let (cache, odd) = (cache.clone(), odd.clone());
                async move {
                    // The database write and its invalidations land while the rows are read.
                    cache.delete(&key(0)).await;
                    cache.invalidate_tag(&odd).await.unwrap();
                    Ok::<_, std::io::Error>(ids.into_iter().map(|id| (id, student(id))).collect())
                }
            })
            .await
    };
    assert_eq!(batch.found().count(), 6, "every caller still gets its rows");
    for id in [0, 1, 3, 5] {
        assert!(
            !cache.exists(&key(id)).await,
            "key {id} was invalidated during the load"
        );
    }
    for id in [2, 4] {
        assert_eq!(cache.get::<Student>(&key(id)).await, Some(student(id)));
    }
    assert_eq!(cache.stats().stale_sets_refused, 4);
    // The stored entries carry their tags.
    let even = scope.tag(&class, 0).unwrap();
    assert_eq!(cache.invalidate_tag(&even).await.unwrap(), 2);
    assert!(!cache.exists(&key(2)).await);
}

/// A loader error fails the keys it was for, and only those; nothing is cached for them, their
/// leases are given up, and the next call loads them.
pub async fn a_loader_error_fails_only_the_keys_it_was_for(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    cache
        .set_many(&[(key(0), student(0)), (key(1), student(1))], MINUTE)
        .await
        .unwrap();
    let batch = cache
        .get_or_set_many(&keys(0..5), MINUTE, NEGATIVE, |_ids: Vec<u32>| async {
            Err::<HashMap<u32, Student>, _>(std::io::Error::other("database down"))
        })
        .await;
    assert!(!batch.is_complete());
    assert_eq!(batch.found().count(), 2, "cached rows are still returned");
    let failed: BTreeSet<u32> = batch.errors().map(|(id, _)| *id).collect();
    assert_eq!(failed, (2..5).collect());
    assert!(batch.clone().into_map().is_err());
    for id in 2..5 {
        // Neither a value nor a lease is left behind.
        assert_eq!(cache.store().get(&key(id)).await.unwrap(), None);
    }
    assert_eq!(cache.stats().loader_errors, 1);

    let calls = Calls::default();
    let retry = cache
        .get_or_set_many(&keys(0..5), MINUTE, NEGATIVE, table(&calls, 100))
        .await;
    assert!(retry.is_complete());
    assert_eq!(calls.calls(), vec![vec![2, 3, 4]]);
}

/// Values that do not decode are misses that are loaded and replaced; an id given twice is
/// loaded once and answered twice; an empty batch does nothing.
pub async fn undecodable_entries_and_duplicate_ids(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    cache
        .store()
        .set(&key(3), bytes::Bytes::from_static(b"{not json"), MINUTE)
        .await
        .unwrap();
    cache
        .set(&key(4), &serde_json::json!({"other": "shape"}), MINUTE)
        .await
        .unwrap();
    let calls = Calls::default();
    let batch = cache
        .get_or_set_many(&keys([1, 3, 4, 3, 1]), MINUTE, NEGATIVE, table(&calls, 100))
        .await;
    assert_eq!(calls.calls().len(), 1);
    let asked: BTreeSet<u32> = calls.calls()[0].iter().copied().collect();
    assert_eq!(asked, BTreeSet::from([1, 3, 4]), "each distinct id once");
    let ids: Vec<u32> = batch.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![1, 3, 4, 3, 1], "answers in the order given");
    assert!(
        batch
            .iter()
            .all(|(id, a)| a.as_ref().unwrap() == &Some(student(*id)))
    );
    assert_eq!(cache.stats().decode_failures, 2);
    assert_eq!(cache.get::<Student>(&key(3)).await, Some(student(3)));

    let empty = cache
        .get_or_set_many(&keys([]), MINUTE, NEGATIVE, table(&calls, 100))
        .await;
    assert!(empty.is_empty());
    assert_eq!(calls.calls().len(), 1, "no loader call for an empty batch");
}

/// A key another app server is loading is waited for, not loaded again; a batch dropped
/// mid-load gives its leases up, so the next app server loads at once and caches.
pub async fn batches_across_app_servers_share_leases(backend: &Backend) {
    let (store, config) = shared_store(backend).await;
    let first = Cache::from_store(store.clone(), &config);
    let second = Cache::from_store(store.clone(), &config);

    // `first` loads key 5 alone, slowly; `second`'s batch waits for its value.
    let started = Arc::new(Notify::new());
    let single = {
        let (first, started) = (first.clone(), started.clone());
        tokio::spawn(async move {
            first
                .get_or_set_optional(&key(5), MINUTE, NEGATIVE, || async move {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, std::io::Error>(Some(student(5)))
                })
                .await
                .unwrap()
        })
    };
    started.notified().await;
    let calls = Calls::default();
    let batch = second
        .get_or_set_many(&keys(0..10), MINUTE, NEGATIVE, table(&calls, 100))
        .await;
    assert_eq!(single.await.unwrap(), Some(student(5)));
    assert!(batch.is_complete());
    assert_eq!(batch.get(&5).unwrap().as_ref().unwrap(), &Some(student(5)));
    let asked: BTreeSet<u32> = calls.calls().concat().into_iter().collect();
    assert!(
        !asked.contains(&5),
        "key 5 was loaded by the other app server: {asked:?}"
    );
    assert_eq!(second.stats().leases_denied, 0);

    // A batch dropped mid-load.
    let started = Arc::new(Notify::new());
    let dropped = keys(20..30);
    let load = {
        let started = started.clone();
        first.get_or_set_many(&dropped, MINUTE, NEGATIVE, move |_ids: Vec<u32>| {
            let started = started.clone();
            async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<HashMap<u32, Student>, std::io::Error>(HashMap::new())
            }
        })
    };
    tokio::select! {
        _ = load => panic!("the load cannot finish"),
        _ = started.notified() => {}
    }
    // Its leases are released in the background; wait until they are gone.
    for id in 20..30 {
        let mut gone = false;
        for _ in 0..200 {
            if store.get(&key(id)).await.unwrap().is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "the lease of key {id} was not released");
    }
    let calls = Calls::default();
    let third = Cache::from_store(store.clone(), &config);
    let batch = third
        .get_or_set_many(&keys(20..30), MINUTE, NEGATIVE, table(&calls, 100))
        .await;
    assert!(batch.is_complete());
    assert_eq!(calls.calls().len(), 1);
    assert_eq!(third.stats().leases_denied, 0);
    assert!(third.exists(&key(25)).await, "loaded and cached at once");
}

/// `set_many`, `exists`, `remaining_ttl` and `touch` on the typed cache.
pub async fn set_many_exists_remaining_ttl_and_touch(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let entries: Vec<(Key, Student)> = (0..3).map(|id| (key(id), student(id))).collect();
    cache.set_many(&entries, MINUTE).await.unwrap();
    for id in 0..3 {
        assert!(cache.exists(&key(id)).await);
        assert_eq!(cache.get::<Student>(&key(id)).await, Some(student(id)));
        match cache.remaining_ttl(&key(id)).await {
            Remaining::Expires(left) => {
                assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(30))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!cache.exists(&key(9)).await);
    assert_eq!(cache.remaining_ttl(&key(9)).await, Remaining::Missing);
    assert!(!cache.touch(&key(9), MINUTE).await, "nothing to touch");
    assert!(!cache.exists(&key(9)).await, "touch creates nothing");

    assert!(cache.touch(&key(1), Ttl::seconds(3_600)).await);
    match cache.remaining_ttl(&key(1)).await {
        Remaining::Expires(left) => assert!(left > Duration::from_secs(3_000)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(cache.get::<Student>(&key(1)).await, Some(student(1)));

    // A load in flight is neither a value nor something to touch.
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let load = {
        let (cache, started, release) = (cache.clone(), started.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_set(&key(7), MINUTE, || async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>(student(7))
                })
                .await
                .unwrap()
        })
    };
    started.notified().await;
    assert!(!cache.exists(&key(7)).await);
    assert_eq!(cache.remaining_ttl(&key(7)).await, Remaining::Missing);
    assert!(!cache.touch(&key(7), Ttl::seconds(3_600)).await);
    release.notify_one();
    assert_eq!(load.await.unwrap(), student(7));
    assert!(
        cache.exists(&key(7)).await,
        "the lease survived the touch attempt"
    );

    // Too large: an error, and nothing written.
    let small = Cache::new(backend.config().max_value_bytes(64))
        .await
        .unwrap();
    let big = vec![(key(50), "x".repeat(100)), (key(51), "y".to_owned())];
    assert!(small.set_many(&big, MINUTE).await.is_err());
    assert!(
        !small.exists(&key(51)).await,
        "nothing of a refused batch is written"
    );
}

/// A touched entry stays reachable through its tags after its first TTL (and its tag index's)
/// would have passed.
pub async fn touch_keeps_the_entry_reachable_by_its_tags(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let tag = Namespace::root()
        .global()
        .tag(&Ident::from_static("class"), 9)
        .unwrap();
    cache
        .set_tagged(
            &key(1),
            &student(1),
            Ttl::seconds(1),
            std::slice::from_ref(&tag),
        )
        .await
        .unwrap();
    assert!(
        cache
            .touch_tagged(&key(1), Ttl::seconds(60), std::slice::from_ref(&tag))
            .await
    );
    // Past the first TTL plus the index's slack (the 2 s operation timeout).
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(
        cache.exists(&key(1)).await,
        "the touch kept the entry alive"
    );
    assert_eq!(cache.invalidate_tag(&tag).await.unwrap(), 1);
    assert!(!cache.exists(&key(1)).await, "the tag still reaches it");
}

/// A batch whose leader in this process is cancelled mid-load: the batches that were waiting on
/// its keys load them themselves, with one more loader call for just those keys.
pub async fn a_cancelled_batch_is_taken_over_by_the_batches_waiting_on_it(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let started = Arc::new(Notify::new());
    let leader = {
        let (cache, started) = (cache.clone(), started.clone());
        tokio::spawn(async move {
            cache
                .get_or_set_many(&keys(0..10), MINUTE, NEGATIVE, |_ids: Vec<u32>| {
                    let started = started.clone();
                    async move {
                        started.notify_one();
                        std::future::pending::<()>().await;
                        Ok::<HashMap<u32, Student>, std::io::Error>(HashMap::new())
                    }
                })
                .await
        })
    };
    started.notified().await;
    let calls = Calls::default();
    let first_call = Arc::new(Notify::new());
    let follower = {
        let (cache, calls, first_call) = (cache.clone(), calls.clone(), first_call.clone());
        tokio::spawn(async move {
            cache
                .get_or_set_many(&keys(5..15), MINUTE, NEGATIVE, |ids: Vec<u32>| {
                    calls.record(&ids);
                    first_call.notify_one();
                    std::future::ready(Ok::<_, std::io::Error>(
                        ids.into_iter()
                            .map(|id| (id, student(id)))
                            .collect::<HashMap<_, _>>(),
                    ))
                })
                .await
        })
    };
    // The follower has joined the leader's loads of 5..10 and loaded its own keys.
    first_call.notified().await;
    leader.abort();
    let batch = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .expect("the follower must not hang")
        .unwrap();
    assert!(batch.is_complete());
    for id in 5..15 {
        assert_eq!(
            batch.get(&id).unwrap().as_ref().unwrap(),
            &Some(student(id))
        );
    }
    let asked: Vec<BTreeSet<u32>> = calls
        .calls()
        .into_iter()
        .map(|c| c.into_iter().collect())
        .collect();
    assert_eq!(asked, vec![(10..15).collect(), (5..10).collect()]);
    assert!(
        cache.exists(&key(7)).await,
        "the taken-over keys are cached"
    );
}

/// Two app servers reading overlapping pages at once, in opposite orders, round after round:
/// their leases never interleave (the batch lease is one atomic step), so neither waits out the
/// lease wait for a key the other holds while it holds one the other wants, and every key is
/// loaded once.
pub async fn overlapping_batches_of_two_app_servers_never_hold_each_other_up(backend: &Backend) {
    let (store, config) = shared_store(backend).await;
    let servers = [
        Cache::from_store(store.clone(), &config),
        Cache::from_store(store.clone(), &config),
    ];
    let calls = Calls::default();
    for round in 0..20u32 {
        let base = 1_000 + round * 100;
        let start = Arc::new(Barrier::new(2));
        let mut tasks = Vec::new();
        for (n, cache) in servers.iter().enumerate() {
            let ids: Vec<u32> = if n == 0 {
                (base..base + 40).collect()
            } else {
                (base + 10..base + 50).rev().collect()
            };
            let (cache, calls, start) = (cache.clone(), calls.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                cache
                    .get_or_set_many(&keys(ids), MINUTE, NEGATIVE, |ids: Vec<u32>| {
                        calls.record(&ids);
                        async move {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok::<_, std::io::Error>(
                                ids.into_iter()
                                    .map(|id| (id, student(id)))
                                    .collect::<HashMap<_, _>>(),
                            )
                        }
                    })
                    .await
                    .is_complete()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
    }
    let loads = calls.loads();
    assert_eq!(loads.len(), 20 * 50);
    assert!(loads.values().all(|n| *n == 1), "a key was loaded twice");
    for cache in &servers {
        assert_eq!(cache.stats().leases_denied, 0);
    }
}

/// Two keys of one batch with the same id both get the row (neither is cached as absent).
pub async fn one_id_under_two_keys_gets_its_row_twice(backend: &Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let pairs = vec![(1u32, key(1)), (1u32, key("one"))];
    let calls = Calls::default();
    let batch = cache
        .get_or_set_many(&pairs, MINUTE, NEGATIVE, table(&calls, 100))
        .await;
    assert_eq!(calls.calls(), vec![vec![1, 1]]);
    assert_eq!(batch.found().count(), 2);
    assert_eq!(cache.get::<Student>(&key("one")).await, Some(student(1)));
}
