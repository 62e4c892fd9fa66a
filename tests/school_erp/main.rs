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

/// The targets the demo promises, as failures (empty when all are met).
fn missed_targets(report: &Report) -> Vec<String> {
    let mut missed = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            missed.push(what);
        }
    };
    check(
        report.requests == REQUESTS,
        format!(
            "{} of {REQUESTS} requests ran within the time bound",
            report.requests
        ),
    );
    check(
        report.failed_requests == 0,
        format!(
            "{} failed requests: {:?}",
            report.failed_requests, report.detail.first_failures
        ),
    );
    check(
        report.stale_reads == 0,
        format!("{} stale reads", report.stale_reads),
    );
    check(report.detail.writes > 0, "no writes".into());
    // The burst is three times the limit: at most the limit admitted, the rest answered 429.
    check(
        report.detail.logins_admitted <= u64::from(LOGIN_LIMIT)
            && report.detail.logins_admitted + report.rate_limited == u64::from(3 * LOGIN_LIMIT),
        format!(
            "logins: {} admitted, {} limited",
            report.detail.logins_admitted, report.rate_limited
        ),
    );
    check(
        report.db_hits_saved_pct >= 95.0,
        format!("db hits saved {} % < 95 %", report.db_hits_saved_pct),
    );
    missed
}

/// Runs the workload and asserts the targets. A run whose only miss is the share of database
/// reads saved, while the cache backend timed out (the whole machine stalled: the open breaker
/// then sends reads to the database by design), is repeated from scratch, up to 3 runs; every
/// other miss fails at once.
async fn run_until_targets_met(database_url: Option<&str>, new_cache: impl AsyncFn() -> Cache) {
    for attempt in 1..=3 {
        let report = run(database_url, new_cache().await).await;
        let missed = missed_targets(&report);
        if missed.is_empty() {
            return;
        }
        let stalled = report.detail.cache_timeouts > 0
            && missed.len() == 1
            && report.db_hits_saved_pct < 95.0;
        assert!(
            stalled && attempt < 3,
            "run {attempt} missed its targets: {missed:?} ({} cache backend timeouts)",
            report.detail.cache_timeouts
        );
        println!(
            "run {attempt}: {} cache backend timeouts left {} % saved; running again",
            report.detail.cache_timeouts, report.db_hits_saved_pct
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_memory_cache() {
    run_until_targets_met(None, async || Cache::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_redis() {
    let server = RedisServer::start();
    let config = Config::redis(server.redis_config());
    run_until_targets_met(None, async || {
        Cache::new(config.clone()).await.expect("cache")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_redis() {
    let postgres = PostgresServer::start();
    let redis = RedisServer::start();
    let config = Config::redis(redis.redis_config());
    run_until_targets_met(Some(&postgres.url()), async || {
        Cache::new(config.clone()).await.expect("cache")
    })
    .await;
}
