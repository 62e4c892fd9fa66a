//! Group `ratelimit`: one check of a per-IP route, on Redis (sliding log and GCRA) against the
//! same GCRA script sent raw over the same kind of connection (the library's own cost) and a
//! trivial script (the server's cost of running a script at all), and in memory (GCRA) against
//! governor's keyed limiter over the same keys.

use std::time::{Duration, Instant};

use criterion::Criterion;
use speedlayer::Cache;
use speedlayer::config::Transport;
use speedlayer::key::Ident;
use speedlayer::ratelimit::{Identity, Limit, RateLimiter, Route};

use crate::common::{redis_cache, runtime};
use crate::support::{RedisServer, nz};

const CLIENTS: usize = 1_000;

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &[
    "ratelimit/redis/sliding_log",
    "ratelimit/redis/gcra",
    "ratelimit/redis/raw_evalsha_gcra",
    "ratelimit/redis/raw_evalsha_noop",
    "ratelimit/memory/gcra",
    "ratelimit/memory/governor_keyed",
];

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
    // The script speedlayer runs for a one-layer GCRA check, with the same arguments: the
    // emission interval and the burst tolerance in microseconds.
    let raw_gcra = redis::Script::new(speedlayer::ratelimit::script::GCRA_SCRIPT);
    let gcra_limit = gcra.layers()[0].1;
    let tick = gcra_limit.window().as_micros() as f64 / f64::from(gcra_limit.limit());
    let tau = tick * f64::from(gcra_limit.quota() - 1);
    let raw_keys: Vec<String> = (0..CLIENTS)
        .map(|i| format!("bench:raw-gcra:{i}:{{bench-gcra}}"))
        .collect();
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
    // The GCRA script sent raw for client `i`, as the criterion bench and the paired rounds run it.
    let raw_gcra_check = |i: usize| {
        let (mut conn, script, key) = (raw.clone(), &raw_gcra, &raw_keys[i]);
        async move {
            let reply: Vec<i64> = script
                .key(key)
                .arg(tick)
                .arg(tau)
                .invoke_async(&mut conn)
                .await
                .expect("script");
            assert_eq!(reply[0], 1);
        }
    };
    let mut i = 0usize;
    group.bench_function("redis/raw_evalsha_gcra", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % CLIENTS;
            raw_gcra_check(i)
        })
    });
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
    let redis_raw_gcra = || {
        let started = Instant::now();
        rt.block_on(async {
            for i in 0..500.min(CLIENTS) {
                raw_gcra_check(i).await;
            }
        });
        started.elapsed()
    };
    crate::report::paired_if_selected(
        ("ratelimit/redis/gcra", "ratelimit/redis/raw_evalsha_gcra"),
        "time",
        "<= 1.10",
        redis_gcra,
        redis_raw_gcra,
    );
    crate::report::paired_if_selected(
        ("ratelimit/redis/gcra", "ratelimit/redis/raw_evalsha_noop"),
        "time",
        "reported",
        redis_gcra,
        redis_noop,
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
    crate::report::paired_if_selected(
        ("ratelimit/memory/gcra", "ratelimit/memory/governor_keyed"),
        "time",
        "<= 3",
        memory_gcra,
        memory_governor,
    );
}
