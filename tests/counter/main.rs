//! Live counters: the same behaviour on memory and Redis (recount on a miss, updates that never
//! create a counter, every interleaving of an update's three steps with a recount's, updates
//! dropped, cancelled or later than their window, reconciliation), another client's data at a
//! counter key, a lost update mark, and Redis unusable. Updates from several OS processes racing recounts
//! and a restart are in `tests/fleet`.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use speedlayer::Cache;
use speedlayer::counter::{Counted, CounterUpdate, Counters};
use speedlayer::key::{Ident, Key};
use speedlayer::store::Remaining;
use speedlayer::ttl::Ttl;
use tokio::sync::Barrier;

use support::Backend;

const NOTIFICATIONS: Ident = Ident::from_static("notifications");
const COUNT: Ident = Ident::from_static("count");
const DAY: Ttl = Ttl::hours(24);

both_backends!(
    a_missing_counter_is_recounted_then_updated,
    an_update_never_creates_a_counter,
    every_interleaving_of_an_update_and_a_recount_ends_equal,
    an_update_dropped_after_its_write_invalidates_the_counter,
    a_cancelled_update_keeps_the_counter,
    update_runs_the_write_between_the_steps,
    an_update_later_than_its_window_is_not_counted,
    reconcile_repairs_drift,
    a_failed_recount_stores_nothing_and_frees_the_counter,
    updates_refresh_the_ttl,
);

fn key(cache: &Cache, user: u64) -> Key {
    cache
        .namespace()
        .global()
        .key(&NOTIFICATIONS, &COUNT, user)
        .unwrap()
}

/// An update whose database write does not race anything.
async fn bump(counters: &Counters, k: &Key, delta: i64) -> Counted {
    counters.begin(k).await.add(delta, DAY).await
}

async fn setup(backend: &Backend) -> (Cache, Counters) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let counters = Counters::new(&cache);
    (cache, counters)
}

/// The database: a row count.
#[derive(Clone, Default)]
struct Db(Arc<AtomicI64>);

impl Db {
    fn insert(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn count(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
    fn loader(&self) -> impl Future<Output = Result<i64, std::io::Error>> + use<> {
        let n = self.count();
        async move { Ok(n) }
    }
}

async fn a_missing_counter_is_recounted_then_updated(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    for _ in 0..3 {
        db.insert();
    }
    let k = key(&cache, 1);
    assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 3);
    let update = counters.begin(&k).await;
    db.insert();
    assert_eq!(update.increment(DAY).await, Counted::Updated(4));
    assert_eq!(
        counters
            .get(&k, DAY, || async { Ok::<_, std::io::Error>(-1) })
            .await
            .unwrap(),
        4,
        "a live counter is read, not recounted"
    );
    assert_eq!(
        counters.begin(&k).await.decrement(DAY).await,
        Counted::Updated(3)
    );
    assert_eq!(bump(&counters, &k, 10).await.value(), Some(13));
}

async fn an_update_never_creates_a_counter(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    let k = key(&cache, 2);
    for _ in 0..5 {
        let update = counters.begin(&k).await;
        db.insert();
        assert_eq!(update.increment(DAY).await, Counted::Absent);
    }
    // The first read counts the rows, which include every update made while it was missing.
    assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 5);
}

/// The steps of one update, each at a position relative to a recount: 0 before it starts, 1
/// while its loader runs but before it reads the database, 2 after it read the database but
/// before it stores, 3 after it stored.
#[derive(Debug, Clone, Copy)]
struct Interleaving {
    begin: u8,
    insert: u8,
    add: u8,
}

async fn writer_steps(
    at: u8,
    plan: Interleaving,
    counters: &Counters,
    k: &Key,
    db: &Db,
    update: &mut Option<CounterUpdate>,
) {
    if plan.begin == at {
        *update = Some(counters.begin(k).await);
    }
    if plan.insert == at {
        db.insert();
    }
    if plan.add == at {
        let _ = update.take().unwrap().increment(DAY).await;
    }
}

/// Every order of an update's steps (mark, row written, add) against a recount's (lease, read
/// of the database, store), for a read of a missing counter and for a reconciliation of a live
/// one: whatever the recount stored or not, the next read equals the database. Storing a recount
/// that read the row before the update's add (or that missed a row whose add came first) would
/// double or lose it.
async fn every_interleaving_of_an_update_and_a_recount_ends_equal(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    for _ in 0..2 {
        db.insert();
    }
    let k = key(&cache, 3);
    let mut cases = 0;
    for force in [false, true] {
        for begin in 0..4 {
            for insert in begin..4 {
                for add in insert..4 {
                    let plan = Interleaving { begin, insert, add };
                    cache.delete(&k).await;
                    if force {
                        // A live, correct counter for the reconciliation to reset.
                        assert_eq!(
                            counters.get(&k, DAY, || db.loader()).await.unwrap(),
                            db.count()
                        );
                    }
                    let mut update = None;
                    writer_steps(0, plan, &counters, &k, &db, &mut update).await;
                    let steps: Vec<Arc<Barrier>> =
                        (0..4).map(|_| Arc::new(Barrier::new(2))).collect();
                    let recount = {
                        let (counters, k, db, steps) =
                            (counters.clone(), k.clone(), db.clone(), steps.clone());
                        tokio::spawn(async move {
                            let loader = || async move {
                                steps[0].wait().await;
                                steps[1].wait().await;
                                let n = db.count();
                                steps[2].wait().await;
                                steps[3].wait().await;
                                Ok::<_, std::io::Error>(n)
                            };
                            if force {
                                counters.reconcile(&k, DAY, loader).await.unwrap().count
                            } else {
                                counters.get(&k, DAY, loader).await.unwrap()
                            }
                        })
                    };
                    steps[0].wait().await;
                    writer_steps(1, plan, &counters, &k, &db, &mut update).await;
                    steps[1].wait().await;
                    steps[2].wait().await;
                    writer_steps(2, plan, &counters, &k, &db, &mut update).await;
                    steps[3].wait().await;
                    recount.await.unwrap();
                    writer_steps(3, plan, &counters, &k, &db, &mut update).await;
                    assert_eq!(
                        counters.get(&k, DAY, || db.loader()).await.unwrap(),
                        db.count(),
                        "{plan:?}, reconcile: {force}"
                    );
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 40);
}

async fn an_update_dropped_after_its_write_invalidates_the_counter(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    let k = key(&cache, 8);
    assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 0);
    let update = counters.begin(&k).await;
    db.insert();
    // The caller's future was cancelled after the write: the counter goes in the background.
    drop(update);
    for _ in 0..200 {
        if counters.get(&k, DAY, || db.loader()).await.unwrap() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the dropped update did not invalidate the counter");
}

async fn a_cancelled_update_keeps_the_counter(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    let k = key(&cache, 9);
    assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 0);
    // The write failed: nothing to count, and the counter stays live.
    counters.begin(&k).await.cancel().await;
    assert_eq!(bump(&counters, &k, 2).await, Counted::Updated(2));
    // Its mark is gone: a recount is stored again.
    cache.delete(&k).await;
    let reconciled = counters.reconcile(&k, DAY, || db.loader()).await.unwrap();
    assert!(reconciled.stored, "{reconciled:?}");
}

async fn update_runs_the_write_between_the_steps(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    let k = key(&cache, 10);
    assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 0);
    let (id, counted) = counters
        .update(&k, 1, DAY, || async {
            db.insert();
            Ok::<_, std::io::Error>(77)
        })
        .await
        .unwrap();
    assert_eq!((id, counted), (77, Counted::Updated(1)));
    let err = counters
        .update(&k, 1, DAY, || async {
            Err::<(), _>(std::io::Error::other("constraint violated"))
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "constraint violated");
    assert_eq!(
        counters
            .get(&k, DAY, || async { Ok::<_, std::io::Error>(-1) })
            .await
            .unwrap(),
        1
    );
}

/// An update whose add comes after its window: a recount may have ignored its mark and counted
/// its row, so it deletes the counter instead of counting.
async fn an_update_later_than_its_window_is_not_counted(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let counters = counters.write_window(Ttl::from_millis(100).unwrap());
    let db = Db::default();
    let k = key(&cache, 11);
    let update = counters.begin(&k).await;
    db.insert();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let reconciled = counters.reconcile(&k, DAY, || db.loader()).await.unwrap();
    assert!(
        reconciled.stored,
        "an expired mark does not hold recounts back"
    );
    assert_eq!(update.increment(DAY).await, Counted::Absent);
    assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 1);
}

async fn reconcile_repairs_drift(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    for _ in 0..4 {
        db.insert();
    }
    let k = key(&cache, 4);
    assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 4);
    // Drift: an update without its row (a bug elsewhere, a lost write).
    assert_eq!(bump(&counters, &k, 7).await, Counted::Updated(11));
    let reconciled = counters.reconcile(&k, DAY, || db.loader()).await.unwrap();
    assert_eq!(reconciled.count, 4);
    assert_eq!(reconciled.previous, Some(11));
    assert!(reconciled.drifted() && reconciled.stored);
    assert_eq!(bump(&counters, &k, 1).await, Counted::Updated(5));
    // No drift: reported as such.
    db.insert();
    let reconciled = counters.reconcile(&k, DAY, || db.loader()).await.unwrap();
    assert!(!reconciled.drifted() && reconciled.stored, "{reconciled:?}");
}

async fn a_failed_recount_stores_nothing_and_frees_the_counter(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let k = key(&cache, 5);
    let err = counters
        .get(&k, DAY, || async {
            Err::<i64, _>(std::io::Error::other("database down"))
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "database down");
    // The lease is given up at once: the next read recounts and stores.
    for _ in 0..200 {
        let got = counters
            .get(&k, DAY, || async { Ok::<_, std::io::Error>(9) })
            .await
            .unwrap();
        assert_eq!(got, 9);
        if bump(&counters, &k, 1).await == Counted::Updated(10) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the failed recount's lease was not given up");
}

async fn updates_refresh_the_ttl(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let k = key(&cache, 6);
    let short = Ttl::seconds(5);
    counters
        .get(&k, short, || async { Ok::<_, std::io::Error>(1) })
        .await
        .unwrap();
    assert_eq!(bump(&counters, &k, 1).await, Counted::Updated(2));
    if let Some(mut raw) = backend.raw().await {
        let pttl: i64 = ::redis::AsyncCommands::pttl(&mut raw, k.as_str())
            .await
            .unwrap();
        assert!(pttl > 23 * 3600 * 1000, "{pttl}");
    }
    let _ = Remaining::Missing;
}

mod redis_only {
    use ::redis::AsyncCommands;

    use super::*;
    use speedlayer::store::BreakerState;
    use support::RedisServer;

    /// Another client's value at a counter key is recounted, never an error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_clients_value_is_recounted() {
        let server = RedisServer::start();
        let cache = Cache::new(
            speedlayer::Config::redis(server.redis_config()).op_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
        let counters = Counters::new(&cache);
        let mut raw = server.raw().await;
        for (i, foreign) in ["twelve", "1e3", "", "9999999999999999999999"]
            .iter()
            .enumerate()
        {
            let k = key(&cache, 100 + i as u64);
            let _: () = raw.set(k.as_str(), *foreign).await.unwrap();
            assert_eq!(bump(&counters, &k, 1).await, Counted::Absent, "{foreign:?}");
            let got = counters
                .get(&k, DAY, || async { Ok::<_, std::io::Error>(7) })
                .await
                .unwrap();
            assert_eq!(got, 7, "{foreign:?}");
        }
        let k = key(&cache, 200);
        let _: () = raw.hset(k.as_str(), "f", "v").await.unwrap();
        assert_eq!(bump(&counters, &k, 1).await, Counted::Absent);
        assert_eq!(
            counters
                .get(&k, DAY, || async { Ok::<_, std::io::Error>(8) })
                .await
                .unwrap(),
            8
        );
        // INCRBY past i64: the counter is recounted, not wrapped.
        let k = key(&cache, 201);
        let _: () = raw.set(k.as_str(), i64::MAX.to_string()).await.unwrap();
        assert_eq!(bump(&counters, &k, 1).await, Counted::Absent);
        // Another client's value at the update marks' key: the mark replaces it.
        let k = key(&cache, 202);
        let _: () = raw
            .set(speedlayer::counter::script::writes_key(&k), "x")
            .await
            .unwrap();
        assert_eq!(
            counters
                .get(&k, DAY, || async { Ok::<_, std::io::Error>(3) })
                .await
                .unwrap(),
            3
        );
        assert_eq!(bump(&counters, &k, 1).await, Counted::Updated(4));
        support::assert_healthy(&cache).await;
        assert_eq!(cache.store().stats().data_errors, 0);
    }

    /// Redis unusable: reads count from the loader, updates are not counted anywhere and
    /// invalidate the counter once Redis is back; the memory fallback never serves a counter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_reads_the_database_and_updates_invalidate() {
        let mut server = RedisServer::start();
        let cache = support::fragile_cache(&server).await;
        let counters = Counters::new(&cache);
        let db = Db::default();
        for _ in 0..3 {
            db.insert();
        }
        let k = key(&cache, 7);
        assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 3);
        // Marked before the outage, added during it.
        let update = counters.begin(&k).await;
        server.freeze();
        db.insert();
        assert_eq!(update.increment(DAY).await, Counted::Unavailable);
        // Marked and added during it.
        let update = counters.begin(&k).await;
        db.insert();
        assert_eq!(update.increment(DAY).await, Counted::Unavailable);
        assert_eq!(cache.stats().breaker, BreakerState::Open);
        assert_eq!(
            counters.get(&k, DAY, || db.loader()).await.unwrap(),
            5,
            "the database answers"
        );
        server.thaw();
        assert!(cache.flush_invalidations(Duration::from_secs(10)).await);
        // The counter Redis held (3) missed the updates: it was invalidated, and is recounted.
        assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 5);
    }

    /// Redis lost the update's mark (a restart without persistence, seen here as a FLUSHALL):
    /// a recount then counts the row and is stored, and the update, finding its mark gone,
    /// deletes the counter instead of counting it a second time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_update_whose_mark_was_lost_is_not_counted_twice() {
        let server = RedisServer::start();
        let cache = Cache::new(speedlayer::Config::redis(server.redis_config()))
            .await
            .unwrap();
        let counters = Counters::new(&cache);
        let db = Db::default();
        let k = key(&cache, 12);
        assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 0);
        let update = counters.begin(&k).await;
        db.insert();
        let mut raw = server.raw().await;
        let _: () = ::redis::cmd("FLUSHALL")
            .query_async(&mut raw)
            .await
            .unwrap();
        let reconciled = counters.reconcile(&k, DAY, || db.loader()).await.unwrap();
        assert_eq!((reconciled.count, reconciled.stored), (1, true));
        assert_eq!(update.increment(DAY).await, Counted::Absent);
        assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 1);
    }
}
