//! `rediss+sentinel://` against a local Sentinel set-up whose nodes (the data nodes and the
//! sentinels) listen with TLS only, with a certificate signed by a CA made for the test and
//! trusted through `SSL_CERT_FILE`, whose data nodes require a password and whose sentinels
//! require another: the sentinels are asked over TLS with theirs, the primary they name is
//! reached over TLS with the URL's, and the client follows a failover there too.
//!
//! One test per binary: it sets `SSL_CERT_FILE` for the whole process.

#![cfg(all(feature = "tls", feature = "sentinel"))]

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use speedlayer::Cache;
use speedlayer::config::{Config, RedisConfig};
use speedlayer::ttl::Ttl;

use support::key;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_sentinel_with_a_password_connects_verifies_and_follows_a_failover() {
    let set = tokio::task::spawn_blocking(|| {
        support::sentinel::RedisSentinel::start_tls(1, 3, "s3cret-pw", |ca| {
            // SAFETY: this binary holds this single test, and no other thread reads the
            // environment while it is set; it is set before any TLS connection is made.
            unsafe { std::env::set_var("SSL_CERT_FILE", ca) };
        })
    })
    .await
    .unwrap();
    eprintln!(
        "a TLS primary, 1 replica and 3 sentinels came up in {} ms",
        set.startup.as_millis()
    );
    let url = set.url();
    assert!(url.starts_with("rediss+sentinel://"), "{url}");
    let sentinel_password = set.sentinel_password().unwrap().to_owned();
    // As a service configures it: the URL, and the sentinels' password beside it.
    let config = Config::from_lookup(|name| match name {
        "REDIS_URL" => Some(url.clone()),
        "REDIS_SENTINEL_PASSWORD" => Some(sentinel_password.clone()),
        _ => None,
    })
    .unwrap();
    let config = config.redis_config().unwrap().clone();
    assert!(
        !format!("{config} {config:?}").contains("s3cret-pw"),
        "no password shows: {config:?}"
    );
    let cache = Cache::new(Config::redis(config).op_timeout(Duration::from_secs(2)))
        .await
        .unwrap();
    for id in 0..20u32 {
        cache.set(&key(id), &id, Ttl::seconds(60)).await.unwrap();
    }
    // Another client, on the primary over TLS with the password, reads them.
    let primary = set.primary();
    let mut raw = set.connect(set.data[primary].port(), true);
    for id in 0..20u32 {
        assert_eq!(cache.get::<u32>(&key(id)).await, Some(id));
        let v: String = redis::Commands::get(&mut raw, key(id).as_str()).unwrap();
        assert_eq!(v, id.to_string());
    }
    support::assert_healthy(&cache).await;

    // The primary fails over: the cache follows the one the sentinels name, over TLS.
    set.failover();
    let deadline = Instant::now() + Duration::from_secs(20);
    while set.primary() == primary {
        assert!(Instant::now() < deadline, "a replica was promoted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = set.primary();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if cache
            .set(&key(100), &100u32, Ttl::seconds(60))
            .await
            .is_ok()
        {
            let mut raw = set.connect(set.data[promoted].port(), true);
            let found: Option<String> = redis::Commands::get(&mut raw, key(100).as_str()).unwrap();
            if found.as_deref() == Some("100") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cache wrote to the promoted primary: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A wrong password for the data nodes, or none for the sentinels: an error that shows no
    // password.
    let wrong = RedisConfig::from_url(&url.replace("s3cret-pw", "not-the-pw"))
        .unwrap()
        .sentinel_password(speedlayer::config::Secret::new(sentinel_password.clone()));
    let without = RedisConfig::from_url(&url).unwrap();
    for config in [wrong, without] {
        let layer = speedlayer::store::redis::RedisLayer::connect(&config)
            .await
            .unwrap();
        let err = speedlayer::store::CacheLayer::get(&layer, &key(1))
            .await
            .unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("pw") && !text.contains("s3cret"), "{text}");
    }
}
