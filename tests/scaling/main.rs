//! Scaling out: Redis Cluster and Sentinel under load while a primary fails.
//!
//! 64 tasks read through `get_or_set`, write rows and invalidate them, and check a rate limit,
//! while the primary of a busy slot is failed over (`CLUSTER FAILOVER` on its replica), or is
//! killed with SIGKILL (a Cluster primary, a Sentinel primary). Every request must succeed, no
//! read may return a row older than one whose invalidation had returned before the read began,
//! and the cache must serve from Redis again by itself, following the new topology. The time
//! that took is printed (`--nocapture`).

#[path = "../support/mod.rs"]
mod support;

mod tier;
mod topology;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use speedlayer::config::{Config, RedisConfig};
use speedlayer::invalidation::{Invalidates, Targets};
use speedlayer::key::{KeyError, Namespace};
use speedlayer::ratelimit::{Identity, Limit, RateLimiter, Route};
use speedlayer::store::BreakerState;
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Ident};

use support::{ITEM, TEST, nz};

const ROWS: u32 = 200;
const TASKS: usize = 64;

/// The database: each row's version, and the newest version whose invalidation returned.
#[derive(Default)]
struct Db {
    rows: Mutex<HashMap<u32, u64>>,
    confirmed: Mutex<HashMap<u32, u64>>,
}

struct RowWritten(u32);

impl Invalidates for RowWritten {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        t.key(ns.global().key(&TEST, &ITEM, self.0)?);
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Report {
    requests: AtomicU64,
    failed: AtomicU64,
    stale: AtomicU64,
    invalidations: AtomicU64,
    rate_checks: AtomicU64,
}

/// What a run measured.
struct Outcome {
    requests: u64,
    failed: u64,
    stale: u64,
    invalidations: u64,
    rate_checks: u64,
    /// From the fault until the breaker closed again (`None`: it never opened).
    back_after: Option<Duration>,
}

/// Runs the load on a cache built from `redis`, calls `fault` after 1 s, and goes on until the
/// cache has served from Redis for 1 s after the fault (at most `limit`).
async fn under_load(
    redis: RedisConfig,
    limit: Duration,
    fault: impl FnOnce() + Send + 'static,
) -> Outcome {
    support::init_tracing();
    // A longer operation timeout than the default 100 ms: six servers and 64 tasks share two
    // cores here, and this test is about the failover, not about slow calls.
    let cache = Cache::new(Config::redis(redis).op_timeout(Duration::from_millis(500)))
        .await
        .expect("a cache");
    let limiter = RateLimiter::new(&cache);
    let route = Route::new(Ident::new("search").unwrap())
        .per_ip(Limit::gcra(nz(1_000_000), Duration::from_secs(1), nz(1_000)).unwrap());
    let db = Arc::new(Db::default());
    let report = Arc::new(Report::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (cache, limiter, route, db, report, stop) = (
            cache.clone(),
            limiter.clone(),
            route.clone(),
            db.clone(),
            report.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = t as u32;
            while !stop.load(Ordering::Relaxed) {
                // A request served from process memory completes without yielding; a real one
                // waits on its client.
                tokio::task::yield_now().await;
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let id = (n >> 8) % ROWS;
                let key = support::key(id);
                report.requests.fetch_add(1, Ordering::Relaxed);
                let who = Identity::ip(format!("198.51.100.{}", t % 250));
                let _ = limiter.check(&route, &who).await;
                report.rate_checks.fetch_add(1, Ordering::Relaxed);
                if t % 8 == 0 {
                    // A writer: the row changes, then its invalidation.
                    let version = {
                        let mut rows = db.rows.lock().unwrap();
                        let v = rows.entry(id).or_insert(0);
                        *v += 1;
                        *v
                    };
                    match cache.invalidate(&RowWritten(id)).await {
                        Ok(_) => {
                            report.invalidations.fetch_add(1, Ordering::Relaxed);
                            let mut confirmed = db.confirmed.lock().unwrap();
                            let c = confirmed.entry(id).or_insert(0);
                            *c = (*c).max(version);
                        }
                        Err(e) => {
                            eprintln!("invalidation failed: {e}");
                            report.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    let floor = db.confirmed.lock().unwrap().get(&id).copied().unwrap_or(0);
                    let db = db.clone();
                    let read = cache
                        .get_or_set(&key, Ttl::seconds(60), move || async move {
                            Ok::<u64, std::io::Error>(
                                db.rows.lock().unwrap().get(&id).copied().unwrap_or(0),
                            )
                        })
                        .await;
                    match read {
                        Ok(v) if v < floor => {
                            eprintln!("stale read of row {id}: {v} < {floor}");
                            report.stale.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("read failed: {e}");
                            report.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let faulted = Instant::now();
    // A fault may wait for its consequences (the old primary made a replica): the load goes on
    // meanwhile, and until it is over.
    let fault = tokio::task::spawn_blocking(fault);
    let mut opened = false;
    let mut back_after = None;
    let mut closed_since: Option<Instant> = None;
    let mut settled = false;
    while faulted.elapsed() < limit {
        let breaker = cache.stats().breaker;
        if breaker != BreakerState::Closed {
            opened = true;
            closed_since = None;
        } else {
            if opened && back_after.is_none() {
                back_after = Some(faulted.elapsed());
            }
            let since = *closed_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(1)
                && faulted.elapsed() > Duration::from_secs(2)
                && fault.is_finished()
            {
                settled = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    fault.await.expect("the fault");
    for t in tasks {
        t.await.expect("a load task");
    }
    let stats = cache.stats();
    eprintln!("cache after the run: {stats:?}");
    assert!(
        settled,
        "the cache served from Redis for 1 s without a break within {limit:?} of the fault: \
         {stats:?}"
    );
    Outcome {
        requests: report.requests.load(Ordering::Relaxed),
        failed: report.failed.load(Ordering::Relaxed),
        stale: report.stale.load(Ordering::Relaxed),
        invalidations: report.invalidations.load(Ordering::Relaxed),
        rate_checks: report.rate_checks.load(Ordering::Relaxed),
        back_after,
    }
}

fn print(name: &str, o: &Outcome) {
    eprintln!(
        "{name}: {} requests ({} rate checks, {} invalidations), {} failed, {} stale; served \
         from Redis again {}",
        o.requests,
        o.rate_checks,
        o.invalidations,
        o.failed,
        o.stale,
        match o.back_after {
            Some(d) => format!("{} ms after the fault", d.as_millis()),
            None => "throughout (the breaker never opened)".to_owned(),
        }
    );
}

/// Waits (10 s at most) until `done` says the replica was promoted, as the nodes see it.
fn promoted(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "the replica was promoted within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_clean(o: &Outcome) {
    assert!(o.requests > 1_000, "the load ran: {} requests", o.requests);
    assert!(o.invalidations > 100, "writers ran: {}", o.invalidations);
    assert_eq!(o.failed, 0, "no request failed");
    assert_eq!(o.stale, 0, "no read older than a returned invalidation");
}

/// A 3-primary/3-replica cluster under load while `fault` strikes the primary of a busy slot
/// (given the cluster, the primary and its replica): the replica must be promoted.
async fn cluster_fault(
    name: &str,
    fault: impl FnOnce(&mut support::cluster::RedisCluster, usize, usize) + Send + 'static,
) {
    let cluster = tokio::task::spawn_blocking(|| support::cluster::RedisCluster::start(3, 1))
        .await
        .unwrap();
    eprintln!(
        "a 3-primary/3-replica cluster came up in {} ms",
        cluster.startup.as_millis()
    );
    let primary = cluster.primary_of(support::key(0).as_str());
    let replica = cluster.replica_of(primary);
    let config = cluster.redis_config();
    let cluster = Arc::new(Mutex::new(cluster));
    let c = cluster.clone();
    let o = under_load(config, Duration::from_secs(30), move || {
        fault(&mut c.lock().unwrap(), primary, replica)
    })
    .await;
    print(name, &o);
    promoted(|| cluster.lock().unwrap().owner_of(support::key(0).as_str()) == Ok(replica));
    assert_clean(&o);
}

/// `CLUSTER FAILOVER` on the replica of a busy primary: a coordinated switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_under_load_fails_no_request() {
    cluster_fault("CLUSTER FAILOVER", |c, _, replica| c.failover(replica)).await;
}

/// A busy primary killed with SIGKILL: the cluster promotes its replica after the node timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_killed_under_load_fails_no_request() {
    cluster_fault("Cluster primary SIGKILL", |c, primary, _| {
        c.nodes()[primary].kill()
    })
    .await;
}

/// A primary, 2 replicas and 3 sentinels under load while `fault` strikes the primary (given
/// the set and the primary's index): the sentinels must name another one.
async fn sentinel_fault(
    name: &str,
    fault: impl FnOnce(&mut support::sentinel::RedisSentinel, usize) + Send + 'static,
) {
    let set = tokio::task::spawn_blocking(|| support::sentinel::RedisSentinel::start(2, 3))
        .await
        .unwrap();
    eprintln!(
        "a primary, 2 replicas and 3 sentinels came up in {} ms",
        set.startup.as_millis()
    );
    let before = set.primary();
    let config = set.redis_config();
    let set = Arc::new(Mutex::new(set));
    let s = set.clone();
    let o = under_load(config, Duration::from_secs(40), move || {
        fault(&mut s.lock().unwrap(), before)
    })
    .await;
    print(name, &o);
    promoted(|| set.lock().unwrap().primary() != before);
    assert_clean(&o);
}

/// The Sentinel-monitored primary killed with SIGKILL: the sentinels promote a replica and the
/// cache follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_primary_killed_under_load_fails_no_request() {
    sentinel_fault("Sentinel primary SIGKILL", |set, primary| {
        set.data[primary].kill()
    })
    .await;
}

/// `SENTINEL FAILOVER`: a replica is promoted while the old primary stays up and keeps taking
/// writes until the sentinels make it a replica (seconds later, dropping what it took
/// meanwhile). The cache must move to the new primary by itself and apply again the
/// invalidations the old one may have taken after the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_fails_no_request() {
    sentinel_fault("SENTINEL FAILOVER", |set, old| {
        set.failover();
        // The load goes on until the old primary was made a replica and took the new primary's
        // data: what it took after the switch is gone then, and a lost invalidation would
        // show as a stale read.
        let took = set.wait_in_sync(old);
        eprintln!(
            "SENTINEL FAILOVER: the old primary is a replica in sync again after {} ms",
            took.as_millis()
        );
    })
    .await;
}

/// A delete made just after `SENTINEL FAILOVER` promoted a replica, while the old primary still
/// takes writes, is not lost when the old primary is made a replica seconds later (and drops
/// what it took meanwhile): the cache notices that the sentinels name another primary and
/// applies its recent invalidations there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_just_after_a_sentinel_failover_is_not_lost() {
    let set = tokio::task::spawn_blocking(|| support::sentinel::RedisSentinel::start(1, 3))
        .await
        .unwrap();
    let cache = Cache::new(Config::redis(set.redis_config()))
        .await
        .expect("a cache");
    let k = support::key(1);
    cache.set(&k, &1u64, Ttl::seconds(60)).await.unwrap();
    let old = set.primary();
    let replica = 1 - old;
    let set = tokio::task::spawn_blocking(move || {
        // The replica holds the entry before the switch.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut conn = support::server::blocking(set.data[replica].port());
        while !redis::cmd("EXISTS")
            .arg(support::key(1).as_str())
            .query::<bool>(&mut conn)
            .unwrap()
        {
            assert!(Instant::now() < deadline, "the entry reached the replica");
            std::thread::sleep(Duration::from_millis(10));
        }
        set.failover();
        promoted(|| set.primary() == replica);
        set
    })
    .await
    .unwrap();
    assert!(cache.delete(&k).await, "the delete returned");
    let set = tokio::task::spawn_blocking(move || {
        set.wait_in_sync(old);
        set
    })
    .await
    .unwrap();
    // The cache may need a few calls to notice the lost connection and get to the new primary.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        assert_eq!(
            cache.get::<u64>(&k).await,
            None,
            "the deleted entry came back: {:?}",
            cache.stats()
        );
        if cache.stats().breaker == BreakerState::Closed && Instant::now() > deadline {
            break;
        }
        if Instant::now() > deadline + Duration::from_secs(10) {
            panic!(
                "the cache did not serve from Redis again: {:?}",
                cache.stats()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = support::server::blocking(set.data[replica].port());
    let exists: bool = redis::cmd("EXISTS")
        .arg(k.as_str())
        .query(&mut conn)
        .unwrap();
    assert!(!exists, "the new primary does not hold the deleted entry");
}
