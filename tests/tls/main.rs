//! `rediss://` against a real TLS redis-server whose certificate is signed by a CA made for the
//! test and trusted through `SSL_CERT_FILE`, the way a deployment trusts a private CA.
//!
//! One test per binary: it sets `SSL_CERT_FILE` for the whole process.

#![cfg(feature = "tls")]

#[path = "../support/mod.rs"]
mod support;

use speedlayer::Cache;
use speedlayer::config::{Config, RedisConfig};
use speedlayer::store::{CacheLayer, Source};
use speedlayer::ttl::Ttl;

use support::{RedisServer, key};

#[tokio::test]
async fn rediss_connects_verifies_and_serves() {
    let server = RedisServer::start_tls();
    // SAFETY: this binary holds this single test, and no other thread reads the environment
    // while it is set; it is set before any TLS connection is made.
    unsafe { std::env::set_var("SSL_CERT_FILE", server.ca_file()) };

    let url = format!("rediss://127.0.0.1:{}/0", server.tls_port());
    let cache = Cache::new(Config::redis(RedisConfig::from_url(&url).unwrap()))
        .await
        .unwrap();
    cache
        .set(&key(1), &"over tls", Ttl::seconds(60))
        .await
        .unwrap();
    let (value, source) = cache.store().get_with_source(&key(1)).await.unwrap();
    assert_eq!(source, Source::Primary, "{:?}", cache.stats());
    assert_eq!(value.as_deref(), Some(&b"\"over tls\""[..]));

    // The certificate names 127.0.0.1 only: reaching it as "localhost" must fail verification,
    // and the cache keeps serving around it.
    let url = format!("rediss://localhost:{}/0", server.tls_port());
    let layer =
        speedlayer::store::redis::RedisLayer::connect(&RedisConfig::from_url(&url).unwrap())
            .await
            .unwrap();
    let err = layer.get(&key(1)).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}
