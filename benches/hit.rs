//! Group `hit`: one cache hit, speedlayer against the raw client doing the same work (a get plus
//! the JSON decode of the same value).

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use redis::AsyncCommands;
use speedlayer::Cache;
use speedlayer::config::Transport;
use speedlayer::ttl::Ttl;

use crate::common::{Dashboard, dashboard, key, redis_cache, runtime};
use crate::support::RedisServer;

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &[
    "hit/memory/speedlayer",
    "hit/memory/raw_moka",
    "hit/redis/speedlayer",
    "hit/redis/raw_redis_json",
];

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    let rt = runtime();
    let value = dashboard(456);
    let json = Bytes::from(serde_json::to_vec(&value).unwrap());
    let k = key(456);

    let memory = Cache::memory();
    rt.block_on(memory.set(&k, &value, Ttl::seconds(3600)))
        .unwrap();
    let moka = rt.block_on(crate::common::raw_moka_holding(&k, json.clone()));

    let redis = rt.block_on(redis_cache(server, Transport::Multiplexed));
    rt.block_on(redis.set(&k, &value, Ttl::seconds(3600)))
        .unwrap();
    let raw = rt
        .block_on(redis::aio::ConnectionManager::new(server.client()))
        .expect("raw connection manager");

    let mut group = c.benchmark_group("hit");
    // Loopback round trips on a shared 2-core machine are noisy: more samples, longer runs.
    group.sample_size(100);
    group.measurement_time(Duration::from_secs(6));
    group.bench_function("memory/speedlayer", |b| {
        b.to_async(&rt).iter(|| async {
            let v: Option<Dashboard> = memory.get(&k).await;
            v.expect("hit")
        })
    });
    group.bench_function("memory/raw_moka", |b| {
        b.to_async(&rt).iter(|| async {
            let bytes = moka.get(k.as_str()).await.expect("hit");
            serde_json::from_slice::<Dashboard>(&bytes).expect("decodes")
        })
    });
    group.bench_function("redis/speedlayer", |b| {
        b.to_async(&rt).iter(|| async {
            let v: Option<Dashboard> = redis.get(&k).await;
            v.expect("hit")
        })
    });
    group.bench_function("redis/raw_redis_json", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = raw.clone();
            let bytes: Vec<u8> = conn.get(k.as_str()).await.expect("GET");
            serde_json::from_slice::<Dashboard>(&bytes).expect("decodes")
        })
    });
    group.finish();

    // Paired rounds (see report::paired): batches of hits, alternating, 21 times.
    if crate::any_selected(&IDS[..2]) {
        let ours = || {
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..20_000 {
                    assert!(memory.get::<Dashboard>(&k).await.is_some());
                }
            });
            started.elapsed()
        };
        let raw_moka = || {
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..20_000 {
                    let bytes = moka.get(k.as_str()).await.expect("hit");
                    serde_json::from_slice::<Dashboard>(&bytes).expect("decodes");
                }
            });
            started.elapsed()
        };
        let ratio = crate::report::paired(21, ours, raw_moka);
        crate::report::remember_paired(
            "hit/memory speedlayer vs raw_moka",
            "time",
            "<= 1.5",
            ratio,
        );
    }
    if crate::any_selected(&IDS[2..]) {
        let ours = || {
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..2_000 {
                    assert!(redis.get::<Dashboard>(&k).await.is_some());
                }
            });
            started.elapsed()
        };
        let raw_json = || {
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..2_000 {
                    let mut conn = raw.clone();
                    let bytes: Vec<u8> = conn.get(k.as_str()).await.expect("GET");
                    serde_json::from_slice::<Dashboard>(&bytes).expect("decodes");
                }
            });
            started.elapsed()
        };
        let ratio = crate::report::paired(21, ours, raw_json);
        crate::report::remember_paired(
            "hit/redis speedlayer vs raw_redis_json",
            "time",
            "<= 1.10",
            ratio,
        );
        latency_percentiles(&rt, &redis, &k);
    }
}

/// p50/p99 of a Redis hit through speedlayer, measured one call at a time.
fn latency_percentiles(rt: &tokio::runtime::Runtime, cache: &Cache, k: &speedlayer::Key) {
    const N: usize = 20_000;
    let mut samples: Vec<Duration> = rt.block_on(async {
        let mut samples = Vec::with_capacity(N);
        for _ in 0..N {
            let started = Instant::now();
            let v: Option<Dashboard> = cache.get(k).await;
            samples.push(started.elapsed());
            assert!(v.is_some());
        }
        samples
    });
    samples.sort();
    let pick = |p: f64| samples[((N - 1) as f64 * p) as usize];
    let line = format!(
        "hit/redis/speedlayer latency over {N} sequential hits: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        pick(0.5),
        pick(0.99),
        pick(0.999),
        samples[N - 1]
    );
    println!("{line}");
    crate::report::remember(line);
}
