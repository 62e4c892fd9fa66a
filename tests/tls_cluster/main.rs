//! `rediss+cluster://` against a local Redis Cluster whose nodes listen with TLS only (clients,
//! the cluster bus and replication), with a certificate signed by a CA made for the test and
//! trusted through `SSL_CERT_FILE`, the way a deployment trusts a private CA.
//!
//! One test per binary: it sets `SSL_CERT_FILE` for the whole process.

#![cfg(all(feature = "tls", feature = "cluster"))]

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use speedlayer::Cache;
use speedlayer::config::{Config, RedisConfig};
use speedlayer::ttl::Ttl;

use support::key;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_cluster_connects_verifies_and_serves_every_primary() {
    // The process trusts the cluster's CA before any TLS connection: the support's own
    // readiness checks use TLS too.
    let cluster = tokio::task::spawn_blocking(|| {
        support::cluster::RedisCluster::start_tls(3, 0, |ca| {
            // SAFETY: this binary holds this single test, and no other thread reads the
            // environment while it is set; it is set before any TLS connection is made.
            unsafe { std::env::set_var("SSL_CERT_FILE", ca) };
        })
    })
    .await
    .unwrap();
    let url = cluster.url();
    assert!(url.starts_with("rediss+cluster://"), "{url}");
    let cache = Cache::new(
        Config::redis(RedisConfig::from_url(&url).unwrap()).op_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    for id in 0..60u32 {
        cache.set(&key(id), &id, Ttl::seconds(60)).await.unwrap();
    }
    // Another client (redis-rs's own cluster client, over TLS) reads them.
    let mut raw = cluster.raw().await;
    for id in 0..60u32 {
        assert_eq!(cache.get::<u32>(&key(id)).await, Some(id));
        let v: String = redis::AsyncCommands::get(&mut raw, key(id).as_str())
            .await
            .unwrap();
        assert_eq!(v, id.to_string());
    }
    support::assert_healthy(&cache).await;

    // The certificate names 127.0.0.1 only: reaching the nodes as "localhost" must fail
    // verification, with an error, not a panic.
    let wrong = url.replace("127.0.0.1", "localhost");
    let layer =
        speedlayer::store::redis::RedisLayer::connect(&RedisConfig::from_url(&wrong).unwrap())
            .await
            .unwrap();
    let err = speedlayer::store::CacheLayer::get(&layer, &key(1))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}
