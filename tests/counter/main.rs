//! Live counters: the same behaviour on memory and Redis (recount on a miss, updates that never
//! create a counter, a recount raced by an update not stored, reconciliation), another client's
//! data at a counter key, and Redis unusable. Updates from several OS processes racing recounts
//! and a restart are in `tests/fleet`.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use speedlayer::Cache;
use speedlayer::counter::{Counted, Counters};
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
    an_update_racing_a_recount_is_neither_lost_nor_counted_twice,
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
    db.insert();
    assert_eq!(counters.increment(&k, DAY).await, Counted::Updated(4));
    assert_eq!(
        counters
            .get(&k, DAY, || async { Ok::<_, std::io::Error>(-1) })
            .await
            .unwrap(),
        4,
        "a live counter is read, not recounted"
    );
    assert_eq!(counters.decrement(&k, DAY).await, Counted::Updated(3));
    assert_eq!(counters.add(&k, 10, DAY).await.value(), Some(13));
}

async fn an_update_never_creates_a_counter(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    let k = key(&cache, 2);
    for _ in 0..5 {
        db.insert();
        assert_eq!(counters.increment(&k, DAY).await, Counted::Absent);
    }
    // The first read counts the rows, which include every update made while it was missing.
    assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 5);
}

/// The recount reads the database; an update (row written, then counter updated) lands while it
/// runs. Whether or not the recount saw the row, storing it could lose or double the update: it
/// is returned but not stored, and the next read recounts.
async fn an_update_racing_a_recount_is_neither_lost_nor_counted_twice(backend: Backend) {
    let (cache, counters) = setup(&backend).await;
    let db = Db::default();
    for _ in 0..2 {
        db.insert();
    }
    let k = key(&cache, 3);
    for row_before_count in [true, false] {
        // The recount's loader: started, reads the database, returns; each step on a barrier.
        let steps: Vec<Arc<Barrier>> = (0..4).map(|_| Arc::new(Barrier::new(2))).collect();
        let recount = {
            let (counters, k, db, steps) = (counters.clone(), k.clone(), db.clone(), steps.clone());
            tokio::spawn(async move {
                counters
                    .get(&k, DAY, || async move {
                        steps[0].wait().await;
                        steps[1].wait().await;
                        let n = db.count();
                        steps[2].wait().await;
                        steps[3].wait().await;
                        Ok::<_, std::io::Error>(n)
                    })
                    .await
                    .unwrap()
            })
        };
        steps[0].wait().await;
        if row_before_count {
            db.insert();
            assert_eq!(counters.increment(&k, DAY).await, Counted::Absent);
            steps[1].wait().await;
            steps[2].wait().await;
        } else {
            steps[1].wait().await;
            steps[2].wait().await;
            // The recount has read the database; the row lands before it stores its count.
            db.insert();
            assert_eq!(counters.increment(&k, DAY).await, Counted::Absent);
        }
        steps[3].wait().await;
        recount.await.unwrap();
        assert_eq!(
            counters.get(&k, DAY, || db.loader()).await.unwrap(),
            db.count(),
            "row before the count: {row_before_count}"
        );
        // Start the next round from a missing counter.
        cache.delete(&k).await;
    }
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
    assert_eq!(counters.add(&k, 7, DAY).await, Counted::Updated(11));
    let reconciled = counters.reconcile(&k, DAY, || db.loader()).await.unwrap();
    assert_eq!(reconciled.count, 4);
    assert_eq!(reconciled.previous, Some(11));
    assert!(reconciled.drifted() && reconciled.stored);
    assert_eq!(counters.increment(&k, DAY).await, Counted::Updated(5));
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
        if counters.increment(&k, DAY).await == Counted::Updated(10) {
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
    assert_eq!(counters.increment(&k, DAY).await, Counted::Updated(2));
    if let Backend::Redis { server, .. } = &backend {
        let mut raw = server.raw().await;
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
        let cache = Cache::new(speedlayer::Config::redis(server.redis_config()))
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
            assert_eq!(
                counters.increment(&k, DAY).await,
                Counted::Absent,
                "{foreign:?}"
            );
            let got = counters
                .get(&k, DAY, || async { Ok::<_, std::io::Error>(7) })
                .await
                .unwrap();
            assert_eq!(got, 7, "{foreign:?}");
        }
        let k = key(&cache, 200);
        let _: () = raw.hset(k.as_str(), "f", "v").await.unwrap();
        assert_eq!(counters.increment(&k, DAY).await, Counted::Absent);
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
        assert_eq!(counters.increment(&k, DAY).await, Counted::Absent);
        assert_eq!(cache.stats().errors, 0);
        assert_eq!(cache.store().stats().data_errors, 0);
    }

    /// Redis unusable: reads count from the loader, updates are not counted anywhere and
    /// invalidate the counter once Redis is back; the memory fallback never serves a counter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_reads_the_database_and_updates_invalidate() {
        let mut server = RedisServer::start();
        let cache = Cache::new(
            speedlayer::Config::redis(server.redis_config())
                .op_timeout(Duration::from_millis(100))
                .failure_threshold(1),
        )
        .await
        .unwrap();
        let counters = Counters::new(&cache);
        let db = Db::default();
        for _ in 0..3 {
            db.insert();
        }
        let k = key(&cache, 7);
        assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 3);
        server.freeze();
        db.insert();
        assert_eq!(counters.increment(&k, DAY).await, Counted::Unavailable);
        assert_eq!(cache.stats().breaker, BreakerState::Open);
        assert_eq!(
            counters.get(&k, DAY, || db.loader()).await.unwrap(),
            4,
            "the database answers"
        );
        server.thaw();
        assert!(cache.flush_invalidations(Duration::from_secs(10)).await);
        // The counter Redis held (3) missed the update: it was invalidated, and is recounted.
        assert_eq!(counters.get(&k, DAY, || db.loader()).await.unwrap(), 4);
    }
}
