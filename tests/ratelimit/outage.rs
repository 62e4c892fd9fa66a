//! Outages: a frozen and a killed Redis. No check waits longer than the operation timeout;
//! once the breaker is open, checks cost memory-limiter time; each route's outage rule holds.

use std::time::{Duration, Instant};

use speedlayer::Cache;
use speedlayer::config::Config;
use speedlayer::key::Ident;
use speedlayer::ratelimit::{Identity, Limit, Outage, RateLimiter, Route, ServedBy};

use crate::support::timing::within_attempts;
use crate::support::{RedisServer, nz, redis_config_at};

const OP_TIMEOUT: Duration = Duration::from_millis(100);
/// Scheduling slack on a shared 2-core machine (see tests/faults for the reasoning).
const SLACK: Duration = Duration::from_millis(100);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn routes() -> (Route, Route, Route) {
    let limit = Limit::sliding_log(nz(5), Duration::from_secs(60)).unwrap();
    (
        Route::new(Ident::from_static("insured")).per_ip(limit),
        Route::new(Ident::from_static("open"))
            .per_ip(limit)
            .on_outage(Outage::Allow),
        Route::new(Ident::from_static("closed"))
            .per_ip(limit)
            .on_outage(Outage::Deny),
    )
}

async fn limiter_at(port: u16) -> RateLimiter {
    let cache = Cache::new(Config::redis(redis_config_at(port)).op_timeout(OP_TIMEOUT))
        .await
        .unwrap();
    RateLimiter::new(&cache)
}

/// Checks every route while Redis is unusable; returns the slowest check and the p99 once the
/// breaker is open.
async fn checks_during_the_outage(limiter: &RateLimiter) -> (Duration, Duration) {
    let (insured, open, closed) = routes();
    let who = Identity::ip("203.0.113.77");
    let mut slowest = Duration::ZERO;
    // The first checks may each wait one timeout until the breaker opens.
    let mut insured_admitted = 0;
    for _ in 0..8 {
        let started = Instant::now();
        let v = limiter.check(&insured, &who).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(v.served_by, ServedBy::Insurance);
        insured_admitted += usize::from(v.allowed);
    }
    assert_eq!(
        insured_admitted, 5,
        "the insurance limiter enforces the route's quota"
    );
    let started = Instant::now();
    let v = limiter.check(&open, &who).await;
    slowest = slowest.max(started.elapsed());
    assert!(v.allowed && v.served_by == ServedBy::FailOpen);
    let started = Instant::now();
    let v = limiter.check(&closed, &who).await;
    slowest = slowest.max(started.elapsed());
    assert!(!v.allowed && v.served_by == ServedBy::FailClosed);
    assert!(v.decision().retry_after.is_some());
    assert!(
        v.headers("closed").iter().any(|(n, _)| *n == "Retry-After"),
        "a fail-closed denial says when to retry"
    );

    let mut open_costs = Vec::new();
    for i in 0..200 {
        let started = Instant::now();
        let v = limiter
            .check(&insured, &Identity::ip(format!("198.51.100.{}", i % 250)))
            .await;
        open_costs.push(started.elapsed());
        assert_eq!(v.served_by, ServedBy::Insurance);
    }
    open_costs.sort();
    (slowest, open_costs[open_costs.len() * 99 / 100])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_checks_stay_bounded() {
    let _serial = SERIAL.lock().await;
    within_attempts("frozen redis", || async {
        let mut server = RedisServer::start();
        let limiter = limiter_at(server.port()).await;
        let (insured, _, _) = routes();
        assert_eq!(
            limiter
                .check(&insured, &Identity::ip("192.0.2.9"))
                .await
                .served_by,
            ServedBy::Backend
        );
        server.freeze();
        let (slowest, open_p99) = checks_during_the_outage(&limiter).await;
        server.thaw();
        eprintln!(
            "frozen redis: slowest check {slowest:?} (bound {:?}), p99 with the breaker open {open_p99:?}",
            OP_TIMEOUT + SLACK
        );
        if slowest <= OP_TIMEOUT + SLACK && open_p99 < Duration::from_millis(1) {
            Ok(())
        } else {
            Err(format!("slowest {slowest:?}, open p99 {open_p99:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_checks_fall_back_and_return_to_redis() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let limiter = limiter_at(server.port()).await;
    server.kill();
    let (slowest, open_p99) = checks_during_the_outage(&limiter).await;
    eprintln!("killed redis: slowest check {slowest:?}, p99 with the breaker open {open_p99:?}");
    assert!(slowest <= OP_TIMEOUT + SLACK * 3, "{slowest:?}");
    server.restart();
    let (insured, _, _) = routes();
    let started = Instant::now();
    loop {
        let v = limiter.check(&insured, &Identity::ip("192.0.2.10")).await;
        if v.served_by == ServedBy::Backend {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Redis not used again"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!(
        "killed redis: checks on Redis again {:?} after the restart",
        started.elapsed()
    );
}
