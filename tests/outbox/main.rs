//! The transactional outbox on SQLite and PostgreSQL (real servers), over the memory backend and
//! a real Redis. The process-crash and Redis-outage cases across processes are in `tests/fleet`.

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use speedlayer::Cache;
use speedlayer::invalidation::{Invalidates, Targets};
use speedlayer::key::{Ident, KeyError, Namespace};
use speedlayer::outbox::Outbox;
use speedlayer::ttl::Ttl;
use sqlx::{PgPool, SqlitePool};

use support::postgres::PostgresServer;
use support::{Backend, key};

const MINUTE: Ttl = Ttl::seconds(60);

/// A student's row changed: their entry and the class tag go.
struct RowChanged(u64);

impl Invalidates for RowChanged {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        let scope = ns.global();
        t.key(scope.key(&support::TEST, &support::ITEM, self.0)?)
            .tag(scope.tag(&Ident::from_static("row"), self.0)?);
        Ok(())
    }
}

async fn sqlite() -> SqlitePool {
    // One connection: every handle sees the same in-memory database.
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .expect("sqlite")
}

/// A committed write with no invalidation after it (the process died): one relay pass removes
/// the key and the tag's entries; a rolled-back write leaves nothing to relay.
async fn sqlite_case(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let pool = sqlite().await;
    let outbox = Outbox::new(&cache, pool.clone());
    outbox.create_table().await.unwrap();
    let (k, tagged) = (key(1), key(2));
    let tag = Namespace::root()
        .global()
        .tag(&Ident::from_static("row"), 1)
        .unwrap();
    cache.set(&k, &1u64, MINUTE).await.unwrap();
    cache
        .set_tagged(&tagged, &1u64, MINUTE, std::slice::from_ref(&tag))
        .await
        .unwrap();
    assert_eq!(outbox.depth().await.unwrap(), 0);

    // Rolled back: nothing recorded.
    let mut tx = pool.begin().await.unwrap();
    outbox.invalidate_in(&mut tx, &RowChanged(1)).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(outbox.depth().await.unwrap(), 0);
    assert_eq!(outbox.relay_once().await.unwrap().applied, 0);
    assert_eq!(cache.get::<u64>(&k).await, Some(1));

    // Another deployment (another namespace prefix) sharing the table leaves the row alone.
    let other_config = backend
        .config()
        .namespace(Namespace::with_prefix(Ident::from_static("other")));
    let other = Outbox::new(&Cache::new(other_config).await.unwrap(), pool.clone());
    let mut tx = pool.begin().await.unwrap();
    outbox.invalidate_in(&mut tx, &RowChanged(1)).await.unwrap();
    tx.commit().await.unwrap();
    let skipped = other.relay_once().await.unwrap();
    assert_eq!((skipped.applied, skipped.released), (0, 0));
    assert_eq!(outbox.depth().await.unwrap(), 1);
    sqlx::query("DELETE FROM speedlayer_outbox")
        .execute(&pool)
        .await
        .unwrap();

    // Committed, and the process "dies" before invalidating.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, v INTEGER)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO rows (id, v) VALUES (1, 2)")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox.invalidate_in(&mut tx, &RowChanged(1)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox.depth().await.unwrap(), 1);
    assert_eq!(
        cache.get::<u64>(&k).await,
        Some(1),
        "stale until the relay runs"
    );
    let relayed = outbox.relay_once().await.unwrap();
    assert_eq!((relayed.applied, relayed.released), (1, 0));
    assert_eq!(cache.get::<u64>(&k).await, None);
    assert_eq!(cache.get::<u64>(&tagged).await, None, "the tag's entry too");
    assert_eq!(outbox.depth().await.unwrap(), 0);

    // A row that is not ours is dropped, not retried forever.
    sqlx::query("INSERT INTO speedlayer_outbox (targets, created_ms) VALUES ('not json', 0)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO speedlayer_outbox (targets, created_ms) VALUES ('{\"keys\":[[\"x\",9,9]],\"tags\":[\"nope\"]}', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(outbox.relay_once().await.unwrap().applied, 2);
    assert_eq!(outbox.depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_memory() {
    sqlite_case(Backend::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_redis() {
    sqlite_case(Backend::redis().await).await;
}

/// PostgreSQL: rows committed by many writers, four relays at once; every row is applied and
/// deleted, and the claims keep the relays off each other's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relays_share_the_table() {
    let postgres = PostgresServer::start();
    let backend = Backend::redis().await;
    let cache = Cache::new(backend.config()).await.unwrap();
    let pool = PgPool::connect(&postgres.url()).await.expect("postgres");
    let outbox = Outbox::new(&cache, pool.clone());
    outbox.create_table().await.unwrap();
    outbox.create_table().await.unwrap();
    for id in 0..300u64 {
        cache.set(&key(id), &id, MINUTE).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        outbox
            .invalidate_in(&mut tx, &RowChanged(id))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(outbox.depth().await.unwrap(), 300);
    let outbox = Arc::new(outbox);
    let relays: Vec<_> = (0..4)
        .map(|_| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut applied = 0;
                loop {
                    let r = outbox.relay_once().await.unwrap();
                    applied += r.applied;
                    if r.applied == 0 {
                        return applied;
                    }
                }
            })
        })
        .collect();
    let mut applied = 0;
    for r in relays {
        applied += r.await.unwrap();
    }
    assert_eq!(applied, 300, "every row applied once");
    assert_eq!(outbox.depth().await.unwrap(), 0);
    for id in 0..300u64 {
        assert_eq!(cache.get::<u64>(&key(id)).await, None);
    }
    // A relay handle runs passes until dropped.
    cache.set(&key(1), &1u64, MINUTE).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox.invalidate_in(&mut tx, &RowChanged(1)).await.unwrap();
    tx.commit().await.unwrap();
    let handle = outbox.relay(Duration::from_millis(20));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cache.get::<u64>(&key(1)).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay did not run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(handle);
}
