//! The school ERP demo's workload, run in-process against the service over HTTP, asserting the
//! demo's targets: no failed request, no stale read, at least 95 % of cacheable database reads
//! saved, and the login burst rate limited. On SQLite with the memory backend, on SQLite with a
//! real Redis, and on a real PostgreSQL with a real Redis (servers spawned by the test support).

#[path = "../support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "../../examples/school_erp/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "../../examples/school_erp/db.rs"]
mod db;
#[allow(dead_code)]
#[path = "../../examples/school_erp/workload.rs"]
mod workload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use speedlayer::Cache;
use speedlayer::config::Config;

use crate::app::{AppState, LOGIN_LIMIT};
use crate::db::{Db, SchoolSize};
use crate::support::RedisServer;
use crate::support::postgres::PostgresServer;
use crate::workload::{Report, Workload};

/// Requests per run: enough for the cache to reach its steady state, bounded in time.
const REQUESTS: u64 = 60_000;

/// One run at a time: the runs measure the cache's effect, and three services with their
/// workloads on two cores at once would time out Redis calls that a real deployment would not.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(database_url: Option<&str>, cache: Cache) -> Report {
    let _turn = ONE_AT_A_TIME.lock().await;
    let size = SchoolSize::default();
    let db = Db::open(database_url, size)
        .await
        .expect("database opens and seeds");
    let state = Arc::new(AppState::new(db, cache));
    state.forget_cached_copies().await.expect("sweep");
    let service = app::start(state, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("service listens");
    let workload = Workload {
        requests: REQUESTS,
        duration: Duration::from_secs(150),
        students: size.students,
        teachers: size.teachers,
        ..Workload::default()
    };
    let report = crate::workload::run(service.addr, workload).await;
    service.stop().await.expect("service stops");
    let report = report.expect("workload runs");
    report.print("test", "test");
    println!("{}", report.json_line());
    report
}

fn assert_targets(report: &Report) {
    assert_eq!(
        report.requests, REQUESTS,
        "the whole workload ran within its time bound"
    );
    assert_eq!(
        report.failed_requests, 0,
        "failed requests: {:?}",
        report.detail.first_failures
    );
    assert_eq!(report.stale_reads, 0, "stale reads");
    assert!(
        report.db_hits_saved_pct >= 95.0,
        "db hits saved {} % < 95 %",
        report.db_hits_saved_pct
    );
    assert!(report.detail.writes > 0, "the workload writes");
    // The burst is three times the limit: at most the limit admitted, the rest answered 429.
    assert!(report.detail.logins_admitted <= u64::from(LOGIN_LIMIT));
    assert_eq!(
        report.detail.logins_admitted + report.rate_limited,
        u64::from(3 * LOGIN_LIMIT)
    );
    assert!(report.rate_limited >= u64::from(2 * LOGIN_LIMIT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_memory_cache() {
    let report = run(None, Cache::memory()).await;
    assert_targets(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_redis() {
    let server = RedisServer::start();
    let cache = Cache::new(Config::redis(server.redis_config()))
        .await
        .expect("cache");
    let report = run(None, cache.clone()).await;
    assert!(cache.stats().connected, "Redis served the run");
    assert_targets(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_redis() {
    let postgres = PostgresServer::start();
    let redis = RedisServer::start();
    let cache = Cache::new(Config::redis(redis.redis_config()))
        .await
        .expect("cache");
    let report = run(Some(&postgres.url()), cache).await;
    assert_targets(&report);
}
