//! A primary with replicas and sentinels on free loopback ports, torn down on drop; the nodes'
//! logs are printed when the test fails (each node is a [`RedisServer`]).
//!
//! [`RedisSentinel::start`]: a primary, `replicas` replicas and `sentinels` sentinels monitoring
//! it as [`MASTER`], waited for until every replica's link is up and every sentinel knows every
//! replica and the other sentinels.

use std::time::{Duration, Instant};

use speedlayer::config::RedisConfig;

use super::server::{RedisServer, blocking, info};

/// A primary with replicas and sentinels, on loopback.
pub struct RedisSentinel {
    /// The data nodes: the first started as the primary.
    pub data: Vec<RedisServer>,
    /// The sentinels.
    pub sentinels: Vec<RedisServer>,
    /// How long it took to come up.
    pub startup: Duration,
}

/// The name the sentinels monitor the primary under.
pub const MASTER: &str = "mymaster";

impl RedisSentinel {
    pub fn start(replicas: usize, sentinels: usize) -> RedisSentinel {
        let began = Instant::now();
        let fast_sync: Vec<String> = vec!["--repl-diskless-sync-delay".into(), "0".into()];
        let primary = RedisServer::start_with_args(&fast_sync);
        let mut data = vec![];
        let primary_port = primary.port();
        data.push(primary);
        for _ in 0..replicas {
            let mut args = fast_sync.clone();
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary_port.to_string(),
            ]);
            data.push(RedisServer::start_with_args(&args));
        }
        let quorum = sentinels / 2 + 1;
        let sentinel_args: Vec<String> = vec![
            "$DIR/sentinel.conf".into(),
            "--sentinel".into(),
            "monitor".into(),
            MASTER.into(),
            "127.0.0.1".into(),
            primary_port.to_string(),
            quorum.to_string(),
        ];
        let sentinels: Vec<RedisServer> = (0..sentinels)
            .map(|_| {
                let s = RedisServer::start_with_args(&sentinel_args);
                let mut conn = blocking(s.port());
                for (option, value) in [
                    ("down-after-milliseconds", "1000"),
                    ("failover-timeout", "5000"),
                ] {
                    let _: () = redis::cmd("SENTINEL")
                        .arg("SET")
                        .arg(MASTER)
                        .arg(option)
                        .arg(value)
                        .query(&mut conn)
                        .expect("SENTINEL SET");
                }
                s
            })
            .collect();
        let set = RedisSentinel {
            data,
            sentinels,
            startup: Duration::ZERO,
        };
        // Every sentinel knows every replica and every other sentinel, and every replica's link
        // is up: a failover can then happen.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let links = set.data[1..].iter().all(|r| {
                info(r.port(), &["INFO", "replication"]).contains("master_link_status:up")
            });
            let known = set.sentinels.iter().all(|s| {
                let text = info(s.port(), &["INFO", "sentinel"]);
                text.contains(&format!(
                    "slaves={},sentinels={}",
                    set.data.len() - 1,
                    set.sentinels.len()
                ))
            });
            if links && known {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not see the whole set-up within 30 s:\n{}",
                set.sentinels
                    .iter()
                    .map(|s| info(s.port(), &["INFO", "sentinel"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisSentinel {
            startup: began.elapsed(),
            ..set
        }
    }

    /// The sentinels and the primary's name as a configuration.
    pub fn redis_config(&self) -> RedisConfig {
        RedisConfig::sentinel(
            self.sentinels.iter().map(|s| ("127.0.0.1", s.port())),
            MASTER,
        )
        .expect("a valid Sentinel configuration")
    }

    /// The sentinels and the primary's name as a `redis+sentinel://` URL.
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", sentinels.join(","))
    }

    /// The index in `data` of the node the sentinels name as primary now.
    pub fn primary(&self) -> usize {
        for s in &self.sentinels {
            let Ok(mut conn) = redis::Client::open(format!("redis://127.0.0.1:{}/", s.port()))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
            else {
                continue;
            };
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER)
                .query(&mut conn)
                .ok();
            if let Some((_, port)) = addr
                && let Some(i) = self.data.iter().position(|d| d.port() == port)
            {
                return i;
            }
        }
        panic!("no sentinel names a primary");
    }
}
