//! speedlayer's series through the `metrics` facade, read back from a real Prometheus exporter:
//! the names documented in `speedlayer::telemetry` appear with the counts the scenario caused.
//! One test: the recorder is the process's.

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use speedlayer::tier::LocalTier;
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Config, Served};

use support::{RedisServer, key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_series_count_what_happened() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this test binary");

    let server = RedisServer::start();
    let config = Config::redis(server.redis_config())
        .op_timeout(Duration::from_secs(2))
        .local_tier(LocalTier::new());
    let cache = Cache::new(config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cache.tier_stats().unwrap().trusted {
        assert!(
            Instant::now() < deadline,
            "the tier's channel did not come up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let k = key(1);
    // One miss and load, then hits until L1 answers.
    let v = cache
        .get_or_set(&k, Ttl::seconds(60), || async {
            Ok::<_, std::io::Error>(7u64)
        })
        .await
        .unwrap();
    assert_eq!(v, 7);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !matches!(cache.get_served::<u64>(&k).await, Some((7, Served::Local))) {
        assert!(Instant::now() < deadline, "L1 never answered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A failing load.
    let failed = cache
        .get_or_set(&key(2), Ttl::seconds(60), || async {
            Err::<u64, _>(std::io::Error::other("the database is down"))
        })
        .await;
    assert!(failed.is_err());

    let text = handle.render();
    let stats = cache.stats();
    let tier = cache.tier_stats().unwrap();
    for (name, expected) in [
        ("speedlayer_cache_loads_total", stats.loader_calls),
        ("speedlayer_cache_load_errors_total", stats.loader_errors),
        ("speedlayer_cache_misses_total", stats.misses),
        ("speedlayer_cache_hits_total", stats.hits),
        (
            "speedlayer_tier_hits_total{state=\"fresh\"}",
            tier.local_hits,
        ),
        ("speedlayer_tier_fills_total", tier.fills),
        ("speedlayer_tier_channel_starts_total", tier.channel_starts),
    ] {
        assert_eq!(
            support::prometheus_series(&text, name),
            expected as f64,
            "{name} in\n{text}"
        );
    }
    assert_eq!((stats.loader_calls, stats.loader_errors), (2, 1));
    assert!(tier.local_hits >= 1 && tier.fills >= 1);
    assert!(text.contains("speedlayer_cache_load_seconds"), "{text}");
    assert!(
        text.contains("speedlayer_tier_channel_rtt_seconds"),
        "{text}"
    );

    // The breaker: a frozen Redis opens it, and the gauge says so.
    let fragile = support::fragile_cache(&server).await;
    let mut server = server;
    server.freeze();
    for i in 0..3 {
        let _ = fragile.get::<u64>(&key(100 + i)).await;
    }
    let open = support::prometheus_series(&handle.render(), "speedlayer_breaker_open");
    server.thaw();
    assert_eq!(open, 1.0);
    assert!(support::prometheus_series(&handle.render(), "speedlayer_store_timeouts_total") >= 1.0);
}
