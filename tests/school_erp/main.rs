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
    state.fail_roll_sink_every(4);
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
    let report = crate::workload::run(&[service.addr], workload).await;
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
        format!(
            "{} stale reads, the first: {:?}",
            report.stale_reads, report.detail.first_stale
        ),
    );
    check(report.detail.writes > 0, "no writes".into());
    check(
        report.duplicate_payments == 0,
        format!("{} duplicate payments", report.duplicate_payments),
    );
    check(
        report.drifted_counters == 0,
        format!(
            "{} counters differed from the database",
            report.drifted_counters
        ),
    );
    let d = &report.detail;
    check(
        d.payments > 0 && d.replays > 0 && d.mismatches > 0 && d.approvals > 0,
        format!(
            "payments {}, replays {}, 422s {}, approvals {}: every kind happened",
            d.payments, d.replays, d.mismatches, d.approvals
        ),
    );
    check(
        d.approvals as i64 == d.approved_requests,
        format!(
            "{} approvals answered, {} in the database",
            d.approvals, d.approved_requests
        ),
    );
    // The burst is three times the limit: at most the limit admitted, the rest answered 429.
    check(
        report.detail.logins_admitted <= u64::from(LOGIN_LIMIT)
            && report.detail.logins_admitted + report.rate_limited == u64::from(3 * LOGIN_LIMIT),
        format!(
            "logins: {} admitted, {} limited",
            report.detail.logins_admitted, report.rate_limited
        ),
    );
    // Short-lived state: sessions, roll call, presence, a switch flipped under load.
    check(
        report.attendance_lost == 0 && report.attendance_doubled == 0,
        format!(
            "attendance: {} lost, {} doubled",
            report.attendance_lost, report.attendance_doubled
        ),
    );
    check(
        report.detail.roll_marks_sent > 0
            && report.detail.roll_sink_failures > 0
            && report.detail.roll_marks_applied == report.detail.roll_marks_sent as i64,
        format!(
            "roll call: {} sent, {} applied, {} sink failures",
            report.detail.roll_marks_sent,
            report.detail.roll_marks_applied,
            report.detail.roll_sink_failures
        ),
    );
    check(
        report.logged_out_accepted == 0
            && report.detail.logouts > 0
            && report.detail.logged_out_refused == report.detail.logouts,
        format!(
            "sessions: {} logouts, {} refused after, {} accepted after",
            report.detail.logouts, report.detail.logged_out_refused, report.logged_out_accepted
        ),
    );
    check(
        report.detail.presence_polls > 0
            && report.detail.presence_seen == report.detail.presence_polls,
        format!(
            "presence: {} polls, teacher seen in {}",
            report.detail.presence_polls, report.detail.presence_seen
        ),
    );
    check(
        report.detail.cache_switched.is_some(),
        "the cache switch was not flipped".into(),
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
    // With the in-process tier: the workload's stale-read check covers it.
    let config = Config::redis(server.redis_config())
        .local_tier(app::local_tier(&speedlayer::Namespace::root()));
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

/// One request to the router, as from `127.0.0.1`; the status and the body.
async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    user: Option<&str>,
    body: &str,
) -> (u16, String) {
    call_with_key(app, method, path, user, body, None).await
}

/// [`call`] with an Idempotency-Key.
async fn call_with_key(
    app: &axum::Router,
    method: &str,
    path: &str,
    user: Option<&str>,
    body: &str,
    key: Option<&str>,
) -> (u16, String) {
    use tower::ServiceExt;
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(user) = user {
        request = request.header("x-user-id", user);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let mut request = request
        .body(axum::body::Body::from(body.to_owned()))
        .expect("request");
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(SocketAddr::from((
            [127, 0, 0, 1],
            40_000,
        ))));
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The API refuses what it must, with the right status and no 500s: callers without a user,
/// other families' data, self-suspension, control characters, bad amounts, malformed ids. An
/// admin's suspension takes effect at once (the cached role is invalidated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_what_it_must() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let size = SchoolSize {
        students: 50,
        teachers: 5,
        days: 2,
    };
    let db = Db::open(None, size).await.expect("database");
    let state = Arc::new(AppState::new(db, Cache::memory()));
    let app = app::router(state.clone());
    // The series are the process's: what this test adds is measured against this first scrape.
    let (_, metrics_before) = call(&app, "GET", "/metrics", None, "").await;
    let fees = "/api/fees/summary/7";

    assert_eq!(call(&app, "GET", fees, None, "").await.0, 401);
    assert_eq!(call(&app, "GET", fees, Some("nobody"), "").await.0, 401);
    assert_eq!(call(&app, "GET", fees, Some("s\t7"), "").await.0, 401);
    assert_eq!(call(&app, "GET", fees, Some("s7"), "").await.0, 200);
    assert_eq!(call(&app, "GET", fees, Some("p7"), "").await.0, 200);
    assert_eq!(call(&app, "GET", fees, Some("a1"), "").await.0, 200);
    assert_eq!(call(&app, "GET", fees, Some("p8"), "").await.0, 403);
    assert_eq!(call(&app, "GET", fees, Some("t2"), "").await.0, 403);
    assert_eq!(
        call(&app, "GET", "/api/fees/summary/x%2A", Some("a1"), "")
            .await
            .0,
        400
    );
    assert_eq!(
        call(&app, "GET", "/api/fees/summary/99999", Some("a1"), "")
            .await
            .0,
        404
    );

    // Dashboards: one's own, the admin's view of anyone's, never another user's.
    assert_eq!(
        call(&app, "GET", "/api/dashboard/student/s7", Some("s7"), "")
            .await
            .0,
        200
    );
    assert_eq!(
        call(&app, "GET", "/api/dashboard/student/s8", Some("s7"), "")
            .await
            .0,
        403
    );
    assert_eq!(
        call(&app, "GET", "/api/dashboard/teacher/s7", Some("s7"), "")
            .await
            .0,
        404
    );
    assert_eq!(
        call(&app, "GET", "/api/dashboard/parent/p7", Some("a1"), "")
            .await
            .0,
        200
    );
    let (status, body) = call(&app, "GET", "/api/dashboard/teacher/t2", Some("t2"), "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"class_id\":2"), "{body}");

    // Payments: an Idempotency-Key, the admin only, amounts in range, known students.
    let pay =
        |student: i64, cents: i64| format!("{{\"student_id\":{student},\"amount_cents\":{cents}}}");
    let pay_with = async |user: &str, body: &str, key: &str| {
        call_with_key(&app, "POST", "/api/payments", Some(user), body, Some(key))
            .await
            .0
    };
    assert_eq!(
        call(&app, "POST", "/api/payments", Some("a1"), &pay(7, 500))
            .await
            .0,
        400,
        "no Idempotency-Key"
    );
    assert_eq!(pay_with("s7", &pay(7, 500), "k-1").await, 403);
    assert_eq!(pay_with("a1", &pay(7, -5), "k-2").await, 422);
    assert_eq!(pay_with("a1", &pay(9999, 500), "k-3").await, 404);
    assert_eq!(pay_with("a1", "{not json", "k-4").await, 400);
    let (status, body) = call_with_key(
        &app,
        "POST",
        "/api/payments",
        Some("a1"),
        &pay(7, 500),
        Some("k-5"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The retry replays the receipt; the key with another amount is refused; one payment.
    let (status, replay) = call_with_key(
        &app,
        "POST",
        "/api/payments",
        Some("a1"),
        &pay(7, 500),
        Some("k-5"),
    )
    .await;
    assert_eq!((status, replay.as_str()), (200, body.as_str()));
    assert_eq!(pay_with("a1", &pay(7, 600), "k-5").await, 422);
    assert_eq!(state.db.duplicate_payments().await.unwrap(), 0);
    // The parent was notified: their badge counts it, and reading clears it.
    let badge = "/api/notifications/count";
    assert_eq!(
        call(&app, "GET", badge, Some("p7"), "").await,
        (200, "{\"unread\":1}".into())
    );
    assert_eq!(
        call(&app, "POST", "/api/notifications/read", Some("p7"), "")
            .await
            .0,
        200
    );
    assert_eq!(
        call(&app, "GET", badge, Some("p7"), "").await,
        (200, "{\"unread\":0}".into())
    );

    // Approvals: the admin only; once; the student is notified.
    let approve = "/api/requests/1/approve";
    assert_eq!(call(&app, "POST", approve, Some("s10"), "").await.0, 403);
    let (status, body) = call(&app, "POST", approve, Some("a1"), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"approved\":true"), "{body}");
    let (status, body) = call(&app, "POST", approve, Some("a1"), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"approved\":false"), "{body}");
    assert_eq!(
        call(&app, "GET", badge, Some("s10"), "").await,
        (200, "{\"unread\":1}".into())
    );

    // Profiles: one's own, printable, and no self-suspension.
    let profile = |name: &str, active: bool| {
        serde_json::json!({ "name": name, "phone": "1", "active": active }).to_string()
    };
    let me = "/api/students/7";
    assert_eq!(
        call(&app, "PUT", me, Some("s8"), &profile("X", true))
            .await
            .0,
        403
    );
    assert_eq!(
        call(&app, "PUT", me, Some("s7"), &profile("A\u{0}B", true))
            .await
            .0,
        422
    );
    assert_eq!(
        call(&app, "PUT", me, Some("s7"), &profile("", true))
            .await
            .0,
        422
    );
    assert_eq!(
        call(&app, "PUT", me, Some("s7"), &profile("X", false))
            .await
            .0,
        403
    );
    assert_eq!(
        call(&app, "PUT", me, Some("s7"), &profile("Asha", true))
            .await
            .0,
        200
    );
    // The admin suspends student 7: the cached role is dropped, access ends at once.
    assert_eq!(
        call(&app, "PUT", me, Some("a1"), &profile("Asha", false))
            .await
            .0,
        200
    );
    assert_eq!(call(&app, "GET", fees, Some("s7"), "").await.0, 401);

    // Login: wrong password, hostile ids, then the limit.
    let login = |user: &str, password: &str| {
        serde_json::json!({ "user_id": user, "password": password }).to_string()
    };
    let path = "/api/auth/login";
    assert_eq!(
        call(&app, "POST", path, None, &login("s1", "nope")).await.0,
        401
    );
    assert_eq!(
        call(&app, "POST", path, None, &login("s1\r\n", "x"))
            .await
            .0,
        401
    );
    assert_eq!(
        call(&app, "POST", path, None, &login(&"s".repeat(10_000), "x"))
            .await
            .0,
        401
    );
    let mut statuses = Vec::new();
    for _ in 0..LOGIN_LIMIT {
        statuses.push(
            call(&app, "POST", path, None, &login("s1", "demo-s1"))
                .await
                .0,
        );
    }
    // Three attempts above already counted: 7 more admitted, then 429s.
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u32;
    assert_eq!(admitted, LOGIN_LIMIT - 3, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );

    let (status, metrics) = call(&app, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    for name in [
        "speedlayer_cache_hits_total",
        "speedlayer_cache_misses_total",
        "speedlayer_cache_loads_total",
        "school_erp_db_queries_total",
        "school_erp_rate_limited_total",
        "speedlayer_ratelimit_denied_total{route=\"auth-login\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from {metrics}");
    }
    let added = |name: &str| {
        support::prometheus_series(&metrics, name)
            - support::prometheus_series(&metrics_before, name)
    };
    assert_eq!(added("school_erp_rate_limited_total"), 3.0, "{metrics}");
    assert_eq!(
        added("speedlayer_ratelimit_denied_total{route=\"auth-login\"}"),
        3.0,
        "{metrics}"
    );
    assert_eq!(added("school_erp_server_errors_total"), 0.0, "{metrics}");
    state.db.close().await;
}
