//! Group `stampede`: 1,000 concurrent `get_or_set` calls on one cold Redis key; one loader call
//! is expected per round (checked, and reported).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use speedlayer::config::Transport;
use speedlayer::ttl::Ttl;

use crate::common::{Dashboard, dashboard, key, redis_cache, runtime};
use crate::support::RedisServer;

const CALLERS: u64 = 1_000;
const LOADER_TIME: Duration = Duration::from_millis(2);

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &["stampede/cold1000/speedlayer"];

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    let rt = runtime();
    let cache = rt.block_on(redis_cache(server, Transport::Multiplexed));
    let round = Arc::new(AtomicU64::new(1_000_000));
    let loads = Arc::new(AtomicU64::new(0));
    let rounds = Arc::new(AtomicU64::new(0));

    let mut group = c.benchmark_group("stampede");
    group.throughput(Throughput::Elements(CALLERS));
    group.sample_size(20);
    group.bench_function("cold1000/speedlayer", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (cache, round, loads, rounds) =
                (cache.clone(), round.clone(), loads.clone(), rounds.clone());
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    // A fresh key per round: every round starts cold.
                    let id = round.fetch_add(1, Ordering::Relaxed);
                    let k = key(id);
                    let mut set = tokio::task::JoinSet::new();
                    for _ in 0..CALLERS {
                        let (cache, k, loads) = (cache.clone(), k.clone(), loads.clone());
                        set.spawn(async move {
                            cache
                                .get_or_set(&k, Ttl::seconds(60), || async {
                                    loads.fetch_add(1, Ordering::Relaxed);
                                    tokio::time::sleep(LOADER_TIME).await;
                                    Ok::<Dashboard, std::io::Error>(dashboard(id))
                                })
                                .await
                                .expect("loads")
                        });
                    }
                    while let Some(done) = set.join_next().await {
                        done.expect("caller");
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
                started.elapsed()
            }
        })
    });
    group.finish();
    let (loads, rounds) = (
        loads.load(Ordering::Relaxed),
        rounds.load(Ordering::Relaxed),
    );
    if rounds > 0 {
        let line = format!(
            "stampede/cold1000/speedlayer: {loads} loader calls over {rounds} rounds of {CALLERS} callers ({:.3} per round)",
            loads as f64 / rounds as f64
        );
        println!("{line}");
        crate::report::remember(line);
    }
}
