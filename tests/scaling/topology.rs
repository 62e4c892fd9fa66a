//! Choosing Cluster or Sentinel: URLs and variables, what a tiered cache says, and one cache
//! used through each.

use std::time::Duration;

use speedlayer::config::{Config, RedisConfig, Topology};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, ErrorKind};

use crate::support;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

#[test]
fn cluster_and_sentinel_urls_and_variables_parse_and_never_show_the_password() {
    let c = RedisConfig::from_url("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001").unwrap();
    assert_eq!(
        c.get_topology(),
        &Topology::Cluster {
            nodes: vec![("10.0.0.1".into(), 7000), ("10.0.0.2".into(), 7001)]
        }
    );
    assert!(!format!("{c} {c:?}").contains("s3cret"), "{c:?}");
    let s =
        RedisConfig::from_url("redis+sentinel://:s3cret@10.0.0.1,10.0.0.2:26380/orders/2").unwrap();
    assert_eq!(
        s.get_topology(),
        &Topology::Sentinel {
            sentinels: vec![("10.0.0.1".into(), 26379), ("10.0.0.2".into(), 26380)],
            master: "orders".into()
        }
    );
    assert!(!format!("{s} {s:?}").contains("s3cret"));
    let v6 = RedisConfig::from_url("redis+cluster://[::1]:7000,[::1]:7001").unwrap();
    assert_eq!(
        v6.get_topology(),
        &Topology::Cluster {
            nodes: vec![("::1".into(), 7000), ("::1".into(), 7001)]
        }
    );
    // Not a URL of ours, and no panic on a multi-byte character where a scheme would end.
    let _ = RedisConfig::from_url("redis://h123456\u{e9}x");

    let config = Config::from_lookup(env(&[
        ("REDIS_CLUSTER_NODES", "10.0.0.1:7000, 10.0.0.2"),
        ("REDIS_PASSWORD", "s3cret"),
    ]))
    .unwrap();
    let redis = config.redis_config().unwrap();
    assert_eq!(
        redis.get_topology(),
        &Topology::Cluster {
            nodes: vec![("10.0.0.1".into(), 7000), ("10.0.0.2".into(), 6379)]
        }
    );
    assert_eq!(
        redis.to_string(),
        "redis+cluster://:***@10.0.0.1:7000,10.0.0.2:6379"
    );
    let config = Config::from_lookup(env(&[
        ("REDIS_SENTINELS", "10.0.0.1:26379,10.0.0.2:26379"),
        ("REDIS_SENTINEL_MASTER", "orders"),
        ("REDIS_DB", "3"),
        ("REDIS_SENTINEL_USERNAME", "watcher"),
        ("REDIS_SENTINEL_PASSWORD", "sentinel-s3cret"),
    ]))
    .unwrap();
    let redis = config.redis_config().unwrap();
    assert_eq!(
        redis.to_string(),
        "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/orders/3"
    );
    let debug = format!("{redis:?}");
    assert!(
        debug.contains("watcher") && !debug.contains("sentinel-s3cret"),
        "{debug}"
    );
}

#[test]
fn bad_cluster_and_sentinel_settings_say_what_to_fix() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("REDIS_SENTINELS", "10.0.0.1:26379")],
            "REDIS_SENTINEL_MASTER",
        ),
        (
            &[("REDIS_CLUSTER_NODES", "10.0.0.1:notaport")],
            "valid port",
        ),
        (&[("REDIS_CLUSTER_NODES", " , ")], "names no host"),
        (
            &[("REDIS_CLUSTER_NODES", "user:pw@10.0.0.1:7000")],
            "REDIS_PASSWORD",
        ),
        (
            &[("REDIS_URL", "redis+sentinel://10.0.0.1:26379")],
            "primary's name",
        ),
        (
            &[("REDIS_URL", "redis+cluster://10.0.0.1:7000/2")],
            "only database 0",
        ),
    ];
    for (vars, expected) in cases {
        let e = Config::from_lookup(env(vars))
            .err()
            .unwrap_or_else(|| panic!("{vars:?} refused"));
        assert_eq!(e.kind(), ErrorKind::Config, "{vars:?}");
        assert!(e.to_string().contains(expected), "{vars:?}: {e}");
        assert!(
            !e.to_string().contains("pw@") && !e.to_string().contains(":pw"),
            "{e}"
        );
    }
}

/// A cache built from a `redis+cluster://` URL writes keys on every primary, and another
/// client (redis-rs's own cluster client) reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_from_a_cluster_url_spreads_keys_over_every_primary() {
    let cluster = tokio::task::spawn_blocking(|| support::cluster::RedisCluster::start(3, 0))
        .await
        .unwrap();
    let config = Config::from_lookup(env(&[("REDIS_URL", &cluster.url())])).unwrap();
    let cache = Cache::new(config.op_timeout(Duration::from_secs(2)))
        .await
        .unwrap();
    for id in 0..60u32 {
        cache
            .set(&support::key(id), &id, Ttl::seconds(60))
            .await
            .unwrap();
    }
    let mut owners = std::collections::HashSet::new();
    for id in 0..60u32 {
        owners.insert(cluster.primary_of(support::key(id).as_str()));
    }
    assert_eq!(owners.len(), 3, "the keys live on all three primaries");
    let mut raw = cluster.raw().await;
    for id in 0..60u32 {
        let v: String = redis::AsyncCommands::get(&mut raw, support::key(id).as_str())
            .await
            .unwrap();
        assert_eq!(v, id.to_string());
    }
    support::assert_healthy(&cache).await;
}

/// A cluster whose nodes require a password: the URL's password reaches every node (the ones
/// found through the seeds too), and a wrong one is an error that never shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_behind_a_password_is_used_with_it_and_a_wrong_one_never_shows() {
    use speedlayer::store::CacheLayer;
    let cluster = tokio::task::spawn_blocking(|| {
        support::cluster::RedisCluster::start_with_password(3, 0, "cl-s3cret")
    })
    .await
    .unwrap();
    let cache =
        Cache::new(Config::redis(cluster.redis_config()).op_timeout(Duration::from_secs(2)))
            .await
            .unwrap();
    for id in 0..30u32 {
        cache
            .set(&support::key(id), &id, Ttl::seconds(60))
            .await
            .unwrap();
    }
    for id in 0..30u32 {
        assert_eq!(cache.get::<u32>(&support::key(id)).await, Some(id));
    }
    support::assert_healthy(&cache).await;

    let wrong = RedisConfig::from_url(&cluster.url().replace("cl-s3cret", "not-it-4x")).unwrap();
    assert!(!format!("{wrong} {wrong:?}").contains("not-it-4x"));
    let layer = speedlayer::store::redis::RedisLayer::connect(&wrong)
        .await
        .unwrap();
    let e = layer.ping().await.expect_err("a wrong password is refused");
    assert!(!e.to_string().contains("not-it-4x"), "{e}");
    assert!(!format!("{e:?}").contains("not-it-4x"), "{e:?}");
}
