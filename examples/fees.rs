//! Fee summaries, cache-first (`fees:summary:{studentId}`, 300 s), and a payment that writes
//! the database first and then invalidates what it made stale.
//!
//! ```sh
//! cargo run --example fees                                   # in-memory backend
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example fees  # Redis
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use speedlayer::Cache;
use speedlayer::invalidation::{Invalidates, Targets};
use speedlayer::key::{Ident, Key, KeyError, Namespace};
use speedlayer::ttl::Ttl;

const FEES: Ident = Ident::from_static("fees");
const SUMMARY: Ident = Ident::from_static("summary");

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FeeSummary {
    student_id: u64,
    due_cents: i64,
    paid_cents: i64,
}

/// The source of truth (a stand-in for PostgreSQL): payments per student, queries counted.
#[derive(Default)]
struct Database {
    paid: Mutex<HashMap<u64, i64>>,
    queries: AtomicU32,
}

impl Database {
    async fn fee_summary(&self, student_id: u64) -> Result<Option<FeeSummary>, std::io::Error> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let paid = self.paid.lock().unwrap();
        Ok((student_id <= 1_000).then(|| FeeSummary {
            student_id,
            due_cents: 150_000,
            paid_cents: paid.get(&student_id).copied().unwrap_or(0),
        }))
    }

    async fn record_payment(&self, student_id: u64, cents: i64) {
        self.queries.fetch_add(1, Ordering::SeqCst);
        *self.paid.lock().unwrap().entry(student_id).or_default() += cents;
    }
}

/// The write event: it declares the keys it makes stale, so it cannot be forgotten.
struct PaymentRecorded {
    student_id: u64,
}

impl Invalidates for PaymentRecorded {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        t.key(fees_key(ns, self.student_id)?);
        Ok(())
    }
}

fn fees_key(ns: &Namespace, student_id: u64) -> Result<Key, KeyError> {
    ns.global().key(&FEES, &SUMMARY, student_id)
}

async fn summary(cache: &Cache, db: &Database, student_id: u64) -> Option<FeeSummary> {
    let key = fees_key(cache.namespace(), student_id).expect("a numeric id is a valid key");
    // A missing student is cached too, for 30 s, so that probing ids does not reach the database.
    cache
        .get_or_set_optional(&key, Ttl::seconds(300), Ttl::seconds(30), || {
            db.fee_summary(student_id)
        })
        .await
        .expect("the stand-in database does not fail")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = Cache::from_env().await?;
    let db = Arc::new(Database::default());
    println!("backend: {}", cache.stats().backend);
    let student = 456;
    cache.delete(&fees_key(cache.namespace(), student)?).await;

    // 100 concurrent reads of a cold key: one database query.
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (cache, db) = (cache.clone(), db.clone());
        readers.spawn(async move { summary(&cache, &db, student).await });
    }
    let results = readers.join_all().await;
    println!(
        "100 concurrent reads: paid {} cents, {} database query",
        results[0].as_ref().map_or(0, |s| s.paid_cents),
        db.queries.load(Ordering::SeqCst)
    );

    // The write path: the database first, then the event's invalidation.
    db.record_payment(student, 25_000).await;
    let report = cache
        .invalidate(&PaymentRecorded {
            student_id: student,
        })
        .await?;
    println!("payment recorded; invalidated {} key(s)", report.removed());
    let after = summary(&cache, &db, student).await.expect("student exists");
    println!("read after the payment: paid {} cents", after.paid_cents);
    assert_eq!(
        after.paid_cents, 25_000,
        "a read after the write sees the write"
    );

    // An unknown student: one query, then answered from the cache.
    for _ in 0..3 {
        assert!(summary(&cache, &db, 99_999).await.is_none());
    }
    let stats = cache.stats();
    println!(
        "database queries: {}; cache hits {}, misses {}",
        db.queries.load(Ordering::SeqCst),
        stats.hits,
        stats.misses
    );
    Ok(())
}
