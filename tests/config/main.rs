//! Configuration from the environment, and secrets kept out of every output: `Debug`,
//! `Display`, errors and logs, including against a real password-protected redis-server.

#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use speedlayer::config::{Config, RedisConfig, Secret};
use speedlayer::store::{BackendKind, CacheLayer};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, ErrorKind};

use support::{RedisServer, key};

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

#[test]
fn nothing_set_means_memory() {
    let config = Config::from_lookup(env(&[])).unwrap();
    assert!(config.redis_config().is_none());
    let config = Config::from_lookup(env(&[("REDIS_URL", "  "), ("REDIS_HOST", "")])).unwrap();
    assert!(
        config.redis_config().is_none(),
        "empty variables count as unset"
    );
}

#[test]
fn redis_url_is_used() {
    let config = Config::from_lookup(env(&[("REDIS_URL", "redis://10.0.0.5:6380/2")])).unwrap();
    assert_eq!(
        config.redis_config().unwrap().to_string(),
        "redis://10.0.0.5:6380/2"
    );
}

#[test]
fn redis_url_wins_over_parts() {
    let config =
        Config::from_lookup(env(&[("REDIS_URL", "redis://a:1"), ("REDIS_HOST", "b")])).unwrap();
    assert_eq!(config.redis_config().unwrap().to_string(), "redis://a:1");
}

#[test]
fn parts_are_assembled() {
    let config = Config::from_lookup(env(&[
        ("REDIS_HOST", "cache.internal"),
        ("REDIS_PORT", "6390"),
        ("REDIS_DB", "3"),
        ("REDIS_PASSWORD", "p@ss:word/with#odd?chars"),
    ]))
    .unwrap();
    let redis = config.redis_config().unwrap();
    assert_eq!(redis.to_string(), "redis://:***@cache.internal:6390/3");
    let config = Config::from_lookup(env(&[("REDIS_HOST", "h")])).unwrap();
    assert_eq!(
        config.redis_config().unwrap().to_string(),
        "redis://h:6379/0"
    );
}

#[test]
fn bad_values_say_what_to_fix() {
    for (vars, needle) in [
        (
            vec![("REDIS_HOST", "h"), ("REDIS_PORT", "70000")],
            "REDIS_PORT",
        ),
        (
            vec![("REDIS_HOST", "h"), ("REDIS_PORT", "abc")],
            "REDIS_PORT",
        ),
        (vec![("REDIS_HOST", "h"), ("REDIS_DB", "-1")], "REDIS_DB"),
        (vec![("REDIS_URL", "http://:topsecret1@h")], "REDIS_URL"),
        (
            vec![("REDIS_URL", "redis://:topsecret1@h:notaport")],
            "REDIS_URL",
        ),
        (
            vec![("REDIS_HOST", "default:topsecret1@redis.internal")],
            "REDIS_HOST",
        ),
        (vec![("REDIS_HOST", "redis://h")], "REDIS_HOST"),
    ] {
        let err = Config::from_lookup(env(&vars)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let shown = format!("{err} {err:?}");
        assert!(shown.contains(needle), "{shown}");
        assert!(!shown.contains("topsecret1"), "secret leaked: {shown}");
    }
}

#[cfg(feature = "tls")]
#[test]
fn rediss_urls_parse_with_the_tls_feature() {
    let config = Config::from_lookup(env(&[("REDIS_URL", "rediss://:pw123@h:6380")])).unwrap();
    assert_eq!(
        config.redis_config().unwrap().to_string(),
        "rediss://:***@h:6380"
    );
}

#[test]
fn debug_and_display_never_show_the_password() {
    let secret = "hunter2-very-secret";
    let from_url = RedisConfig::from_url(&format!("redis://admin:{secret}@h:1/0")).unwrap();
    let from_parts = RedisConfig::from_host("h", 1)
        .username("admin")
        .password(Secret::new(secret));
    for shown in [
        format!("{from_url:?}"),
        format!("{from_url}"),
        format!("{from_parts:?}"),
        format!("{from_parts}"),
        format!("{:?}", Config::redis(from_url.clone())),
        format!("{:?}", Secret::new(secret)),
    ] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(format!("{from_url}").contains("admin:***@h"));
}

/// Collects everything written by a tracing subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A wrong password against a real password-protected server: the calls fail over, and neither
/// errors, `Debug` output nor any log line (at every level) carries the password.
#[test]
fn a_wrong_password_never_reaches_logs_or_errors() {
    let server = RedisServer::start_with_password("right-password-123");
    let wrong = "wrong-password-456";
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut shown = Vec::new();
    runtime.block_on(async {
        let url = format!("redis://:{wrong}@127.0.0.1:{}/0", server.port());
        let redis = RedisConfig::from_url(&url).unwrap();
        let layer = speedlayer::store::redis::RedisLayer::connect(&redis)
            .await
            .unwrap();
        let err = layer.get(&key(1)).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        shown.push(format!("{err} / {err:?} / {layer:?}"));
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            shown.push(s.to_string());
            source = s.source();
        }

        let cache = Cache::new(Config::redis(redis)).await.unwrap();
        for i in 0..20 {
            let got = cache
                .get_or_set(&key(i), Ttl::seconds(60), || async {
                    Ok::<_, std::io::Error>(i)
                })
                .await
                .unwrap();
            assert_eq!(got, i);
        }
        assert!(cache.stats().errors > 0);
        shown.push(format!("{cache:?} {:?}", cache.stats()));

        // The right password works, and is not shown either.
        let right = RedisConfig::from_url(&server.url()).unwrap();
        let cache = Cache::new(Config::redis(right)).await.unwrap();
        cache.set(&key(1), &1, Ttl::seconds(60)).await.unwrap();
        assert_eq!(cache.get::<i32>(&key(1)).await, Some(1));
        assert_eq!(cache.stats().backend, BackendKind::Redis);
        assert!(cache.stats().connected);
        shown.push(format!("{cache:?}"));
    });
    let logs = captured.text();
    assert!(
        logs.contains("WRONGPASS") || logs.contains("auth"),
        "the failure is logged: {logs}"
    );
    shown.push(logs);
    for text in shown {
        assert!(!text.contains(wrong), "wrong password leaked: {text}");
        assert!(
            !text.contains("right-password-123"),
            "password leaked: {text}"
        );
    }
}
