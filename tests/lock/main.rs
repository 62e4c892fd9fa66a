//! Locks with fencing tokens: the same behaviour on memory and Redis, tokens that survive a
//! Redis restart, failing closed when Redis is frozen, and another client's data at a lock key.
//! Contention across OS processes and a frozen holder are in `tests/fleet`.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

use std::time::{Duration, Instant};

use speedlayer::Cache;
use speedlayer::key::Ident;
use speedlayer::lock::{Acquire, LockGuard, Locks};
use speedlayer::store::BreakerState;
use speedlayer::ttl::Ttl;

use support::Backend;

const SLOT: Ident = Ident::from_static("slot");
const TEN_SECONDS: Ttl = Ttl::seconds(10);

both_backends!(
    a_lock_has_one_holder_until_released,
    tokens_strictly_increase,
    a_holder_whose_lease_ran_out_can_neither_extend_nor_release,
    dropping_the_guard_releases_the_lock,
    the_watchdog_keeps_a_short_lease_alive,
    waiting_acquisition_is_bounded,
    hostile_ids_name_distinct_locks,
);

async fn locks(backend: &Backend) -> (Cache, Locks) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let locks = Locks::new(&cache);
    (cache, locks)
}

fn acquired(answer: Acquire) -> LockGuard {
    match answer {
        Acquire::Acquired(guard) => guard,
        other => panic!("expected the lock, got {other:?}"),
    }
}

async fn a_lock_has_one_holder_until_released(backend: Backend) {
    let (_cache, locks) = locks(&backend).await;
    let name = locks.name(&SLOT, "room-12:2026-12-01T09:00").unwrap();
    let first = acquired(locks.acquire(&name, TEN_SECONDS).await);
    match locks.acquire(&name, TEN_SECONDS).await {
        Acquire::Contended { remaining } => {
            assert!(remaining > Duration::from_secs(8) && remaining <= Duration::from_secs(10))
        }
        other => panic!("{other:?}"),
    }
    let token = first.token();
    assert!(first.release().await.unwrap(), "it still held the lock");
    let second = acquired(locks.acquire(&name, TEN_SECONDS).await);
    assert!(second.token() > token);
    assert!(!second.is_lost());
}

async fn tokens_strictly_increase(backend: Backend) {
    let (_cache, locks) = locks(&backend).await;
    let name = locks.name(&SLOT, 1).unwrap();
    let mut last = None;
    for _ in 0..200 {
        let guard = acquired(locks.acquire(&name, TEN_SECONDS).await);
        if let Some(last) = last {
            assert!(guard.token() > last, "{} after {last}", guard.token());
        }
        last = Some(guard.token());
        guard.release().await.unwrap();
    }
    // Tokens are at least the time they were issued, in microseconds since the epoch.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let last = last.unwrap().get();
    assert!(
        last > now_us - 60_000_000 && last < now_us + 60_000_000,
        "{last}"
    );
}

async fn a_holder_whose_lease_ran_out_can_neither_extend_nor_release(backend: Backend) {
    let (_cache, locks) = locks(&backend).await;
    let name = locks.name(&SLOT, 2).unwrap();
    let late = acquired(locks.acquire(&name, Ttl::from_millis(100).unwrap()).await);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let next = acquired(locks.acquire(&name, TEN_SECONDS).await);
    assert!(next.token() > late.token());
    assert!(
        !late.extend(TEN_SECONDS).await.unwrap(),
        "not its lock any more"
    );
    assert!(late.is_lost());
    assert!(!late.release().await.unwrap());
    assert!(
        locks.acquire(&name, TEN_SECONDS).await.is_contended(),
        "the late holder did not release the new holder's lock"
    );
    assert!(next.extend(TEN_SECONDS).await.unwrap());
}

async fn dropping_the_guard_releases_the_lock(backend: Backend) {
    let (_cache, locks) = locks(&backend).await;
    let name = locks.name(&SLOT, 3).unwrap();
    drop(acquired(locks.acquire(&name, TEN_SECONDS).await));
    let started = Instant::now();
    loop {
        match locks.acquire(&name, TEN_SECONDS).await {
            Acquire::Acquired(_) => break,
            Acquire::Contended { .. } if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => panic!("the dropped guard did not release the lock: {other:?}"),
        }
    }
}

/// A 200 ms lease kept alive for 2 s of work.
async fn the_watchdog_keeps_a_short_lease_alive(backend: Backend) {
    let (_cache, locks) = locks(&backend).await;
    let name = locks.name(&SLOT, 4).unwrap();
    let guard =
        acquired(locks.acquire(&name, Ttl::from_millis(200).unwrap()).await).with_watchdog();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert!(
            locks.acquire(&name, TEN_SECONDS).await.is_contended(),
            "lost after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!guard.is_lost());
    assert!(guard.release().await.unwrap());
    let _last = acquired(locks.acquire(&name, TEN_SECONDS).await);
}

async fn waiting_acquisition_is_bounded(backend: Backend) {
    let (_cache, locks) = locks(&backend).await;
    let name = locks.name(&SLOT, 5).unwrap();
    let holder = acquired(locks.acquire(&name, TEN_SECONDS).await);
    let started = Instant::now();
    let answer = locks
        .acquire_timeout(&name, TEN_SECONDS, Duration::from_millis(300))
        .await;
    let waited = started.elapsed();
    assert!(answer.is_contended(), "{answer:?}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Released while another waits: the waiter gets it.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        holder.release().await.unwrap()
    });
    let started = Instant::now();
    let waiter = acquired(
        locks
            .acquire_timeout(&name, TEN_SECONDS, Duration::from_secs(5))
            .await,
    );
    assert!(release.await.unwrap());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!waiter.is_lost());
}

async fn hostile_ids_name_distinct_locks(backend: Backend) {
    let (_cache, locks) = locks(&backend).await;
    let a = locks.name(&SLOT, "a:b").unwrap();
    let b = locks.name(&SLOT, "a").unwrap();
    assert_ne!(a, b);
    assert_eq!(a.as_str(), "lock:slot:a%3Ab");
    let _ga = acquired(locks.acquire(&a, TEN_SECONDS).await);
    let _gb = acquired(locks.acquire(&b, TEN_SECONDS).await);
    assert!(locks.name(&SLOT, "x".repeat(10_000)).is_err());
}

mod redis_only {
    use ::redis::AsyncCommands;

    use super::*;
    use support::RedisServer;

    fn config(server: &RedisServer) -> speedlayer::Config {
        speedlayer::Config::redis(server.redis_config()).op_timeout(Duration::from_millis(100))
    }

    /// Redis restarted without persistence lost the fence key: the next token still exceeds
    /// every token issued before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_keep_increasing_after_redis_lost_the_fence() {
        let mut server = RedisServer::start();
        let cache = Cache::new(config(&server).cool_down(Duration::from_millis(100)))
            .await
            .unwrap();
        let locks = Locks::new(&cache);
        let name = locks.name(&SLOT, 1).unwrap();
        let mut last = None;
        for _ in 0..50 {
            let guard = acquired(locks.acquire(&name, TEN_SECONDS).await);
            last = Some(guard.token());
            guard.release().await.unwrap();
        }
        let before = last.unwrap();
        server.restart();
        let started = Instant::now();
        let after = loop {
            match locks.acquire(&name, TEN_SECONDS).await {
                Acquire::Acquired(guard) => break guard.token(),
                Acquire::Unavailable if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("{other:?}"),
            }
        };
        let mut raw = server.raw().await;
        let fence: u64 = raw.get(name.fence_key()).await.unwrap();
        assert_eq!(fence, after.get(), "a new fence key");
        assert!(after > before, "{after} after a restart, {before} before");
    }

    /// Locks fail closed: with Redis frozen the answer is `Unavailable` within the operation
    /// timeout, and stays so while the breaker is open, although the cache meanwhile serves from
    /// its memory fallback.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_redis_is_unavailable_and_memory_never_grants() {
        let mut server = RedisServer::start();
        let cache = support::fragile_cache(&server).await;
        let locks = Locks::new(&cache);
        let name = locks.name(&SLOT, 7).unwrap();
        server.freeze();
        let started = Instant::now();
        assert!(locks.acquire(&name, TEN_SECONDS).await.is_unavailable());
        let first = started.elapsed();
        assert_eq!(cache.stats().breaker, BreakerState::Open);
        cache
            .set(&support::key(1), &1, Ttl::seconds(60))
            .await
            .unwrap();
        assert_eq!(cache.get::<i32>(&support::key(1)).await, Some(1));
        let started = Instant::now();
        for _ in 0..20 {
            assert!(locks.acquire(&name, TEN_SECONDS).await.is_unavailable());
        }
        let skipped = started.elapsed();
        eprintln!("frozen Redis: first acquisition answered in {first:?}, then 20 in {skipped:?}");
        assert!(
            first < Duration::from_millis(100) + Duration::from_millis(400),
            "{first:?}"
        );
        assert!(skipped < Duration::from_millis(200), "{skipped:?}");
        server.thaw();
    }

    /// Another client's key where a lock lives: a holder until its TTL ends, and a key without
    /// TTL gets one, so that it cannot block the lock for good. A foreign fence is ignored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_clients_key_at_a_lock_does_not_block_it_for_good() {
        let server = RedisServer::start();
        // The behaviour suites' timeout: a slow call on a busy machine is not a failure here.
        let cache = Cache::new(config(&server).op_timeout(Duration::from_secs(2)))
            .await
            .unwrap();
        let locks = Locks::new(&cache);
        let name = locks.name(&SLOT, 9).unwrap();
        let mut raw = server.raw().await;
        let _: () = raw.hset(name.as_str(), "f", "v").await.unwrap();
        let _: () = raw.set(name.fence_key(), "1e300").await.unwrap();
        match locks.acquire(&name, Ttl::from_millis(200).unwrap()).await {
            Acquire::Contended { remaining } => assert!(remaining <= Duration::from_millis(200)),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let guard = acquired(locks.acquire(&name, TEN_SECONDS).await);
        assert!(
            guard.token().get() < 1_000_000_000_000_000_000,
            "{}",
            guard.token()
        );
        support::assert_healthy(&cache).await;
        assert_eq!(cache.store().stats().data_errors, 0);
    }

    /// The watchdog tells the holder the moment its lock is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watchdog_reports_a_lost_lock() {
        let server = RedisServer::start();
        let cache = Cache::new(config(&server)).await.unwrap();
        let locks = Locks::new(&cache);
        let name = locks.name(&SLOT, 10).unwrap();
        let guard =
            acquired(locks.acquire(&name, Ttl::from_millis(300).unwrap()).await).with_watchdog();
        let mut raw = server.raw().await;
        // Another client removes the lock and someone else takes it.
        let _: () = raw.del(name.as_str()).await.unwrap();
        let _other = acquired(locks.acquire(&name, TEN_SECONDS).await);
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), guard.lost())
            .await
            .expect("the holder learns it lost the lock");
        eprintln!("lost lock noticed after {:?}", started.elapsed());
        assert!(guard.is_lost());
    }
}
