//! Group `ratelimit`: one check of a per-IP route, on Redis (sliding log and GCRA) against a
//! trivial script over the same connection, and in memory (GCRA) against governor's keyed
//! limiter over the same keys.

use std::time::{Duration, Instant};

use criterion::Criterion;
use speedlayer::Cache;
use speedlayer::config::Transport;
use speedlayer::key::Ident;
use speedlayer::ratelimit::{Identity, Limit, RateLimiter, Route};

use crate::common::{redis_cache, runtime};
use crate::support::{RedisServer, nz};

const CLIENTS: usize = 1_000;

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    let rt = runtime();
    // Quotas large enough that every benched check is admitted and does the full write.
    let hour = Duration::from_secs(3_600);
    let log = Route::new(Ident::from_static("bench-log"))
        .per_ip(Limit::sliding_log(nz(100_000), hour).unwrap());
    let gcra = Route::new(Ident::from_static("bench-gcra"))
        .per_ip(Limit::gcra(nz(1_000_000_000), Duration::from_secs(1), nz(1_000)).unwrap());
    let client_keys: Vec<String> = (0..CLIENTS)
        .map(|i| format!("10.{}.{}.{}", i / 65_536, (i / 256) % 256, i % 256))
        .collect();
    let clients: Vec<Identity> = client_keys.iter().map(Identity::ip).collect();

    let redis = rt.block_on(redis_cache(server, Transport::Multiplexed));
    let redis_limiter = RateLimiter::new(&redis);
    let raw = rt
        .block_on(redis::aio::ConnectionManager::new(server.client()))
        .expect("raw connection manager");
    let noop = redis::Script::new("return 1");
    let memory_limiter = RateLimiter::new(&Cache::memory());
    let governor = governor::RateLimiter::<String, _, _>::keyed(
        governor::Quota::per_second(nz(1_000_000_000)).allow_burst(nz(1_000)),
    );

    let mut group = c.benchmark_group("ratelimit");
    // One admitted check per iteration, cycling through the clients.
    let mut bench_check = |name: &str, limiter: &RateLimiter, route: &Route| {
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % CLIENTS;
                let who = &clients[i];
                async move { assert!(limiter.check(route, who).await.allowed) }
            })
        });
    };
    bench_check("redis/sliding_log", &redis_limiter, &log);
    bench_check("redis/gcra", &redis_limiter, &gcra);
    bench_check("memory/gcra", &memory_limiter, &gcra);
    group.bench_function("redis/raw_evalsha_noop", |b| {
        b.to_async(&rt).iter(|| {
            let (mut conn, noop) = (raw.clone(), &noop);
            async move {
                let one: i64 = noop.invoke_async(&mut conn).await.expect("script");
                assert_eq!(one, 1);
            }
        })
    });
    let mut i = 0usize;
    group.bench_function("memory/governor_keyed", |b| {
        b.iter(|| {
            i = (i + 1) % CLIENTS;
            assert!(governor.check_key(&client_keys[i]).is_ok());
        })
    });
    group.finish();

    // Paired rounds against the same baselines.
    let redis_gcra = || {
        let started = Instant::now();
        rt.block_on(async {
            for who in clients.iter().take(500) {
                assert!(redis_limiter.check(&gcra, who).await.allowed);
            }
        });
        started.elapsed()
    };
    let redis_noop = || {
        let started = Instant::now();
        rt.block_on(async {
            let mut conn = raw.clone();
            for _ in 0..500 {
                let _: i64 = noop.invoke_async(&mut conn).await.expect("script");
            }
        });
        started.elapsed()
    };
    let ratio = crate::report::paired(21, redis_gcra, redis_noop);
    crate::report::remember_paired(
        "ratelimit redis/gcra vs redis/raw_evalsha_noop",
        "time",
        "<= 1.2",
        ratio,
    );
    let memory_gcra = || {
        let started = Instant::now();
        rt.block_on(async {
            for _ in 0..20 {
                for who in clients.iter() {
                    assert!(memory_limiter.check(&gcra, who).await.allowed);
                }
            }
        });
        started.elapsed()
    };
    let memory_governor = || {
        let started = Instant::now();
        for _ in 0..20 {
            for key in &client_keys {
                assert!(governor.check_key(key).is_ok());
            }
        }
        started.elapsed()
    };
    let ratio = crate::report::paired(21, memory_gcra, memory_governor);
    crate::report::remember_paired(
        "ratelimit memory/gcra vs memory/governor_keyed",
        "time",
        "<= 3",
        ratio,
    );
}
