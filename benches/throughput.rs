//! Group `throughput`: 64 tasks share a fixed total of GETs, over speedlayer (multiplexed), raw
//! redis-rs (the same multiplexed connection manager, GET plus decode) and speedlayer over the
//! bb8 pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use redis::AsyncCommands;
use speedlayer::Key;
use speedlayer::config::Transport;
use speedlayer::ttl::Ttl;

use crate::common::{Dashboard, dashboard, key, redis_cache, runtime};
use crate::support::RedisServer;

pub const TASKS: u64 = 64;
pub const GETS_PER_TASK: u64 = 200;
const KEYS: u64 = 1_000;

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &[
    "throughput/redis64/speedlayer",
    "throughput/redis64/pooled",
    "throughput/redis64/raw",
];

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    let rt = runtime();
    let multiplexed = rt.block_on(redis_cache(server, Transport::Multiplexed));
    let pooled = rt.block_on(redis_cache(server, Transport::Pooled { size: 16 }));
    for id in 0..KEYS {
        rt.block_on(multiplexed.set(&key(id), &dashboard(id), Ttl::seconds(3600)))
            .unwrap();
    }
    let raw = rt
        .block_on(redis::aio::ConnectionManager::new(server.client()))
        .expect("raw connection manager");
    let keys: Arc<Vec<speedlayer::Key>> = Arc::new((0..KEYS).map(key).collect());

    let mut group = c.benchmark_group("throughput");
    group.throughput(Throughput::Elements(TASKS * GETS_PER_TASK));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for (name, cache) in [
        ("redis64/speedlayer", &multiplexed),
        ("redis64/pooled", &pooled),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (cache, keys) = (cache.clone(), keys.clone());
                timed(iters, move || {
                    let (cache, keys) = (cache.clone(), keys.clone());
                    async move { cache_round(&cache, &keys).await }
                })
            })
        });
    }
    group.bench_function("redis64/raw", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (raw, keys) = (raw.clone(), keys.clone());
            timed(iters, move || {
                let (raw, keys) = (raw.clone(), keys.clone());
                async move { raw_round(&raw, &keys).await }
            })
        })
    });
    group.finish();

    // Paired rounds: one 64-task round of each, alternating, 21 times.
    let round_cache = |cache: &speedlayer::Cache| {
        let started = Instant::now();
        rt.block_on(cache_round(cache, &keys));
        started.elapsed()
    };
    let round_raw = || {
        let started = Instant::now();
        rt.block_on(raw_round(&raw, &keys));
        started.elapsed()
    };
    let (median, q1, q3) = crate::report::paired(21, || round_cache(&multiplexed), round_raw);
    // Every GET is of a present key: a miss means the call failed over (timed out or failed).
    for (name, cache) in [("speedlayer", &multiplexed), ("pooled", &pooled)] {
        let stats = cache.stats();
        let line = format!(
            "throughput/redis64/{name}: {} hits, {} misses, {} errors, {} timeouts over the whole group",
            stats.hits, stats.misses, stats.errors, stats.timeouts
        );
        println!("{line}");
        crate::report::remember(line);
    }
    // Throughput ratio = raw time / our time.
    crate::report::remember_paired(
        "throughput/redis64 speedlayer vs raw",
        "throughput",
        ">= 0.90",
        (1.0 / median, 1.0 / q3, 1.0 / q1),
    );
    let (median, q1, q3) = crate::report::paired(21, || round_cache(&pooled), round_raw);
    crate::report::remember_paired(
        "throughput/redis64 pooled vs raw",
        "throughput",
        "reported",
        (1.0 / median, 1.0 / q3, 1.0 / q1),
    );
}

/// One round: 64 tasks share 12,800 hits (`GETS_PER_TASK` each) over `keys`.
pub async fn cache_round(cache: &speedlayer::Cache, keys: &Arc<Vec<Key>>) {
    let count = keys.len() as u64;
    run_tasks(|task| {
        let (cache, keys) = (cache.clone(), keys.clone());
        async move {
            for i in 0..GETS_PER_TASK {
                let k = &keys[((task * GETS_PER_TASK + i) % count) as usize];
                let v: Option<Dashboard> = cache.get(k).await;
                std::hint::black_box(v);
            }
        }
    })
    .await;
}

/// The same round with raw redis-rs over `raw` (one server's connection manager, or a
/// cluster connection): `GET` plus the same JSON decode.
pub async fn raw_round<C>(raw: &C, keys: &Arc<Vec<Key>>)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let count = keys.len() as u64;
    run_tasks(|task| {
        let (mut conn, keys) = (raw.clone(), keys.clone());
        async move {
            for i in 0..GETS_PER_TASK {
                let k = &keys[((task * GETS_PER_TASK + i) % count) as usize];
                let bytes: Vec<u8> = conn.get(k.as_str()).await.expect("GET");
                let _: Dashboard = serde_json::from_slice(&bytes).expect("decodes");
            }
        }
    })
    .await;
}

/// `iters` runs of `round`, timed: the body of criterion's `iter_custom`.
pub async fn timed<F, Fut>(iters: u64, round: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    for _ in 0..iters {
        round().await;
    }
    started.elapsed()
}

pub async fn run_tasks<F, Fut>(make: F)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        set.spawn(make(task));
    }
    while let Some(done) = set.join_next().await {
        done.expect("bench task");
    }
}
