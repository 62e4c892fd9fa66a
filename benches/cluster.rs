//! Group `cluster`: speedlayer on a local Redis Cluster (3 primaries) against speedlayer on one
//! Redis server, in the same run: what a hit costs through the cluster client (target ≤ 1.2× a
//! single node), and the throughput of 64 tasks over three primaries (reported, against one
//! node and against raw redis-rs on the same cluster).
//!
//! On this machine the three primaries share the same two cores as the bench, so the
//! throughput figure shows the client's cost more than the cluster's capacity.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use speedlayer::config::{Config, Transport};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Key};

use crate::common::{Dashboard, dashboard, key, redis_cache, runtime};
use crate::support::RedisServer;
use crate::support::cluster::RedisCluster;
use crate::throughput::{GETS_PER_TASK, TASKS, cache_round as round, raw_round, timed};

const KEYS: u64 = 1_000;

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &[
    "cluster/hit",
    "cluster/hit_single",
    "cluster/throughput64",
    "cluster/throughput64_single",
    "cluster/throughput64_raw",
];

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    let rt = runtime();
    let cluster = RedisCluster::start(3, 0);
    let on_cluster = rt.block_on(async {
        Cache::new(Config::redis(cluster.redis_config()).op_timeout(Duration::from_secs(2)))
            .await
            .expect("a cache on the cluster")
    });
    let single = rt.block_on(redis_cache(server, Transport::Multiplexed));
    for id in 0..KEYS {
        for cache in [&on_cluster, &single] {
            rt.block_on(cache.set(&key(id), &dashboard(id), Ttl::seconds(3600)))
                .unwrap();
        }
    }
    let keys: Arc<Vec<Key>> = Arc::new((0..KEYS).map(key).collect());
    let k = key(456);
    let raw = rt.block_on(cluster.raw());

    let mut group = c.benchmark_group("cluster");
    group.sample_size(50);
    group.measurement_time(Duration::from_secs(4));
    for (name, cache) in [("hit", &on_cluster), ("hit_single", &single)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let v: Option<Dashboard> = cache.get(&k).await;
                v.expect("hit")
            })
        });
    }
    group.throughput(Throughput::Elements(TASKS * GETS_PER_TASK));
    group.sample_size(20);
    for (name, cache) in [
        ("throughput64", &on_cluster),
        ("throughput64_single", &single),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (cache, keys) = (cache.clone(), keys.clone());
                timed(iters, move || {
                    let (cache, keys) = (cache.clone(), keys.clone());
                    async move { round(&cache, &keys).await }
                })
            })
        });
    }
    group.bench_function("throughput64_raw", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (raw, keys) = (raw.clone(), keys.clone());
            timed(iters, move || {
                let (raw, keys) = (raw.clone(), keys.clone());
                async move { raw_round(&raw, &keys).await }
            })
        })
    });
    group.finish();

    let hits = |cache: &Cache| {
        let started = Instant::now();
        rt.block_on(async {
            for _ in 0..2_000 {
                assert!(cache.get::<Dashboard>(&k).await.is_some());
            }
        });
        started.elapsed()
    };
    crate::report::paired_if_selected(
        ("cluster/hit", "cluster/hit_single"),
        "time",
        "<= 1.2",
        || hits(&on_cluster),
        || hits(&single),
    );
    let rounds = |cache: &Cache| {
        let started = Instant::now();
        rt.block_on(round(cache, &keys));
        started.elapsed()
    };
    if crate::any_selected(&IDS[2..]) {
        let (median, q1, q3) =
            crate::report::paired(21, || rounds(&on_cluster), || rounds(&single));
        // Throughput ratio = single-node time / cluster time.
        crate::report::remember_paired(
            "cluster/throughput64 vs cluster/throughput64_single",
            "throughput",
            "reported",
            (1.0 / median, 1.0 / q3, 1.0 / q1),
        );
        let (median, q1, q3) = crate::report::paired(
            21,
            || rounds(&on_cluster),
            || {
                let started = Instant::now();
                rt.block_on(raw_round(&raw, &keys));
                started.elapsed()
            },
        );
        crate::report::remember_paired(
            "cluster/throughput64 vs cluster/throughput64_raw",
            "throughput",
            "reported",
            (1.0 / median, 1.0 / q3, 1.0 / q1),
        );
    }
    for (name, cache) in [("cluster", &on_cluster), ("single", &single)] {
        let stats = cache.stats();
        let line = format!(
            "cluster group, {name}: {} hits, {} misses, {} errors, {} timeouts",
            stats.hits, stats.misses, stats.errors, stats.timeouts
        );
        println!("{line}");
        crate::report::remember(line);
    }
    let line = format!(
        "cluster group: the 3-primary cluster came up in {} ms",
        cluster.startup.as_millis()
    );
    println!("{line}");
    crate::report::remember(line);
}
