//! A tour of speedlayer in one run: keys, TTLs with jitter, get-or-set with one loader call per
//! cold key, loader errors that are never cached, negative caching, and the stats.
//!
//! ```sh
//! cargo run --example quickstart                                  # in-memory backend
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example quickstart # Redis
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use speedlayer::Cache;
use speedlayer::key::{Ident, Namespace};
use speedlayer::ttl::{Jitter, Ttl, TtlPolicy};

const FEES: Ident = Ident::from_static("fees");
const SUMMARY: Ident = Ident::from_static("summary");
const AUTH: Ident = Ident::from_static("auth");
const ROLE: Ident = Ident::from_static("role");

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FeeSummary {
    student_id: String,
    due_cents: i64,
    paid_cents: i64,
}

/// Stands in for the database: counts its queries.
#[derive(Default)]
struct Database {
    queries: AtomicU32,
}

impl Database {
    async fn fee_summary(&self, student_id: &str) -> Result<FeeSummary, std::io::Error> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(FeeSummary {
            student_id: student_id.to_owned(),
            due_cents: 12_500,
            paid_cents: 37_500,
        })
    }

    async fn role(&self, user_id: &str) -> Result<Option<String>, std::io::Error> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        Ok((user_id == "teacher_9").then(|| "teacher".to_owned()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "speedlayer=info".into()),
        )
        .init();

    // Redis when REDIS_URL (or REDIS_HOST) is set, process memory otherwise.
    let cache = Cache::from_env().await?;
    let db = Arc::new(Database::default());
    let scope = Namespace::root().global();
    let fees = scope.keyspace(&FEES, &SUMMARY);
    println!("backend: {}", cache.stats().backend);

    // Keys: ids are escaped, so no user input can change a key's shape.
    let key = fees.key("student_456")?;
    println!("key for student_456: {key}");
    println!("key for an IPv6 id:  {}", fees.key("2001:db8::1")?);
    println!(
        "a 10 kB id is refused: {}",
        fees.key("x".repeat(10_000)).unwrap_err()
    );

    // Get-or-set: 50 concurrent requests for a cold key make one database query.
    let policy = TtlPolicy::new(Ttl::seconds(300)).with_jitter(Jitter::fraction(0.1)?)?;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (cache, db, key, policy) = (cache.clone(), db.clone(), key.clone(), policy.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_set(&key, policy, || async move {
                    db.fee_summary("student_456").await
                })
                .await
        }));
    }
    for task in tasks {
        task.await??;
    }
    println!(
        "50 concurrent reads of a cold key: {} database query",
        db.queries.load(Ordering::SeqCst)
    );
    let summary: Option<FeeSummary> = cache.get(&key).await;
    println!("cached: {summary:?}");

    // A loader error is returned to the caller and never cached.
    let failing = fees.key("student_999")?;
    let err = cache
        .get_or_set(&failing, Ttl::seconds(300), || async {
            Err::<FeeSummary, _>(std::io::Error::other("database unavailable"))
        })
        .await
        .unwrap_err();
    println!(
        "loader error returned: {err}; cached: {:?}",
        cache.get::<FeeSummary>(&failing).await
    );

    // Negative caching: "no role" is cached too, for a shorter TTL.
    let role_key = scope.key(&AUTH, &ROLE, "student_1")?;
    for _ in 0..3 {
        let db = db.clone();
        let role = cache
            .get_or_set_optional(&role_key, Ttl::hours(1), Ttl::seconds(30), || async move {
                db.role("student_1").await
            })
            .await?;
        assert!(role.is_none());
    }

    // Write path: the database first, then delete the cached copy.
    cache.delete(&key).await;
    println!(
        "after invalidation: {:?}",
        cache.get::<FeeSummary>(&key).await
    );

    let stats = cache.stats();
    println!(
        "database queries: {}; hits {}, misses {}, loader calls {}, hit rate {:.0}%",
        db.queries.load(Ordering::SeqCst),
        stats.hits,
        stats.misses,
        stats.loader_calls,
        stats.hit_rate() * 100.0
    );
    println!("{stats:?}");
    Ok(())
}
