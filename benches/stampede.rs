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
pub const IDS: &[&str] = &["stampede/cold1000/speedlayer", "stampede/xfetch"];

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    if crate::selected("stampede/xfetch") {
        xfetch(server);
    }
    if !crate::selected("stampede/cold1000/speedlayer") {
        return;
    }
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

/// `stampede/xfetch`: 64 readers on one hot key (each reads, then sleeps 2 ms: about 18,000
/// reads a second), no grace: without early refresh every expiry is a miss that readers wait
/// on. Loader calls per expiry and readers that waited on a load, for XFetch (β = 1), a fixed
/// threshold (refresh when 2 load times are left) and no early refresh, in two shapes:
///
/// - TTL 200 ms, a 20 ms loader, 3 s (15 expiries): a TTL only 10 load times long.
/// - TTL 1 s, a 10 ms loader, 10 s (10 expiries): a TTL 100 load times long, as for a real hot
///   key (a 60 s TTL over a 20 ms query is 3,000).
///
/// XFetch starts a refresh about `load × β × ln(reads per second × load)` before expiry (the
/// first read whose draw says so): here about 6 load times, most of a 10-load TTL, so the short
/// shape refreshes about twice per TTL; the long one close to once.
fn xfetch(server: &RedisServer) {
    xfetch_shape(server, 200, 20, Duration::from_secs(3));
    xfetch_shape(server, 1_000, 10, Duration::from_secs(10));
}

fn xfetch_shape(server: &RedisServer, ttl_ms: u64, load_ms: u64, run: Duration) {
    use speedlayer::cache::{EarlyRefresh, FetchPolicy};
    const READERS: usize = 64;
    let load = Duration::from_millis(load_ms);
    let rt = runtime();
    for (name, early) in [
        ("xfetch", Some(EarlyRefresh::xfetch())),
        (
            "fixed 2 loads",
            Some(EarlyRefresh::Fixed {
                before_expiry: load * 2,
            }),
        ),
        ("none", None),
    ] {
        let cache = rt.block_on(redis_cache(server, Transport::Multiplexed));
        let mut policy = FetchPolicy::new(Ttl::from_millis(ttl_ms).unwrap()).expected_load(load);
        if let Some(early) = early {
            policy = policy.early_refresh(early);
        }
        let k = key(7_000_000 + ttl_ms * 100 + name.len() as u64);
        let loads = Arc::new(AtomicU64::new(0));
        let loader = {
            let loads = loads.clone();
            move || {
                loads.fetch_add(1, Ordering::Relaxed);
                async move {
                    tokio::time::sleep(load).await;
                    Ok::<_, std::io::Error>(dashboard(7))
                }
            }
        };
        let (waited, reads) = rt.block_on(async {
            cache
                .fetch::<Dashboard, _, _, _>(&k, &policy, loader.clone())
                .await
                .unwrap();
            let before = cache.stats();
            let started = Instant::now();
            let tasks: Vec<_> = (0..READERS)
                .map(|_| {
                    let (cache, k, policy, loader) =
                        (cache.clone(), k.clone(), policy.clone(), loader.clone());
                    tokio::spawn(async move {
                        let mut reads = 0u64;
                        while started.elapsed() < run {
                            let _ = cache
                                .fetch::<Dashboard, _, _, _>(&k, &policy, loader.clone())
                                .await;
                            reads += 1;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        reads
                    })
                })
                .collect();
            let mut reads = 0;
            for t in tasks {
                reads += t.await.unwrap();
            }
            let after = cache.stats();
            let waited = (after.misses + after.coalesced) - (before.misses + before.coalesced);
            (waited, reads)
        });
        let expiries = run.as_millis() as f64 / ttl_ms as f64;
        let calls = loads.load(Ordering::Relaxed) - 1;
        let line = format!(
            "stampede/xfetch [{name}; TTL {ttl_ms} ms, {load_ms} ms loader]: {:.2} loader calls \
             per expiry ({calls} in {run:?}), {waited} of {reads} reads waited on a load",
            calls as f64 / expiries,
        );
        println!("{line}");
        crate::report::remember(line);
    }
}
