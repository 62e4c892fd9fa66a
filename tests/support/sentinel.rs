//! A primary with replicas and sentinels on free loopback ports, torn down on drop; the nodes'
//! logs are printed when the test fails (each node is a [`RedisServer`]).
//!
//! [`RedisSentinel::start`]: a primary, `replicas` replicas and `sentinels` sentinels monitoring
//! it as [`MASTER`], waited for until every replica's link is up and every sentinel knows every
//! replica and the other sentinels.

use std::time::{Duration, Instant};

use speedlayer::config::RedisConfig;

use super::server::{RedisServer, info_as};

/// A primary with replicas and sentinels, on loopback.
pub struct RedisSentinel {
    /// The data nodes: the first started as the primary.
    pub data: Vec<RedisServer>,
    /// The sentinels.
    pub sentinels: Vec<RedisServer>,
    /// How long it took to come up.
    pub startup: Duration,
    /// The data nodes' password.
    password: Option<String>,
    /// The sentinels' own password (`requirepass` on each sentinel).
    sentinel_password: Option<String>,
    /// The directory of the certificates, when every node listens with TLS only.
    tls: Option<std::path::PathBuf>,
}

/// The name the sentinels monitor the primary under.
pub const MASTER: &str = "mymaster";

impl RedisSentinel {
    pub fn start(replicas: usize, sentinels: usize) -> RedisSentinel {
        RedisSentinel::start_with::<fn(&std::path::Path)>(replicas, sentinels, None, None)
    }

    /// A set whose nodes (data nodes and sentinels) listen with TLS only, with a certificate
    /// for 127.0.0.1 signed by a fresh CA, whose data nodes require `password` and whose
    /// sentinels require `<password>-sentinels`; `trust` is given the CA's path before the
    /// nodes start, to make the process trust it (`SSL_CERT_FILE`).
    pub fn start_tls(
        replicas: usize,
        sentinels: usize,
        password: &str,
        trust: impl FnOnce(&std::path::Path),
    ) -> RedisSentinel {
        RedisSentinel::start_with(replicas, sentinels, Some(password), Some(trust))
    }

    fn start_with<T: FnOnce(&std::path::Path)>(
        replicas: usize,
        sentinels: usize,
        password: Option<&str>,
        trust: Option<T>,
    ) -> RedisSentinel {
        let began = Instant::now();
        let tls = trust.map(|trust| {
            let dir = super::server::certificate_dir("sentinel");
            trust(&dir.join("ca.pem"));
            dir
        });
        // Both kinds of node listen with TLS only and speak it to each other.
        let tls_args = tls
            .as_deref()
            .map(super::server::tls_only_args)
            .unwrap_or_default();
        let mut data_args: Vec<String> = vec!["--repl-diskless-sync-delay".into(), "0".into()];
        if let Some(p) = password {
            data_args.extend([
                "--requirepass".into(),
                p.into(),
                "--masterauth".into(),
                p.into(),
            ]);
        }
        data_args.extend(tls_args.iter().cloned());
        let primary = RedisServer::start_with_args(&data_args);
        let mut data = vec![];
        let primary_port = primary.port();
        data.push(primary);
        for _ in 0..replicas {
            let mut args = data_args.clone();
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary_port.to_string(),
            ]);
            data.push(RedisServer::start_with_args(&args));
        }
        let quorum = sentinels / 2 + 1;
        let mut sentinel_args: Vec<String> = vec![
            "$DIR/sentinel.conf".into(),
            "--sentinel".into(),
            "monitor".into(),
            MASTER.into(),
            "127.0.0.1".into(),
            primary_port.to_string(),
            quorum.to_string(),
        ];
        let sentinel_password = password.map(|p| format!("{p}-sentinels"));
        if let Some(p) = &sentinel_password {
            // Each sentinel requires it, and gives it to the others.
            sentinel_args.extend([
                "--requirepass".into(),
                p.clone(),
                "--sentinel".into(),
                "sentinel-pass".into(),
                p.clone(),
            ]);
        }
        sentinel_args.extend(tls_args);
        let mut set = RedisSentinel {
            data,
            sentinels: Vec::new(),
            startup: Duration::ZERO,
            password: password.map(str::to_owned),
            sentinel_password,
            tls,
        };
        set.sentinels = (0..sentinels)
            .map(|_| {
                let s = RedisServer::start_with_args(&sentinel_args);
                let mut conn = set.connect(s.port(), false);
                let mut options = vec![
                    ("down-after-milliseconds", "1000"),
                    ("failover-timeout", "5000"),
                ];
                if let Some(p) = password {
                    options.push(("auth-pass", p));
                }
                for (option, value) in options {
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
        // Every sentinel knows every replica and every other sentinel, and every replica's link
        // is up: a failover can then happen.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let links = set.data[1..].iter().all(|r| {
                set.info(r.port(), true, &["INFO", "replication"])
                    .contains("master_link_status:up")
            });
            let known = set.sentinels.iter().all(|s| {
                let text = set.info(s.port(), false, &["INFO", "sentinel"]);
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
                    .map(|s| set.info(s.port(), false, &["INFO", "sentinel"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        set.startup = began.elapsed();
        set
    }

    /// The user info (`:password@`, or nothing) for `password` and the scheme (`redis` or
    /// `rediss`) of the set's URLs.
    fn auth_and_scheme(&self, password: Option<&str>) -> (String, &'static str) {
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        (
            auth,
            if self.tls.is_some() {
                "rediss"
            } else {
                "redis"
            },
        )
    }

    /// The URL of the node at `port` (a data node when `data`, else a sentinel), with its
    /// password, over TLS when the set speaks it.
    fn node_url(&self, port: u16, data: bool) -> String {
        let (auth, scheme) = self.auth_and_scheme(self.password_of(data));
        format!("{scheme}://{auth}127.0.0.1:{port}/")
    }

    /// The data nodes' password when `data`, else the sentinels'.
    fn password_of(&self, data: bool) -> Option<&str> {
        if data {
            self.password.as_deref()
        } else {
            self.sentinel_password.as_deref()
        }
    }

    /// A blocking connection to the node at `port` (a data node when `data`).
    pub fn connect(&self, port: u16, data: bool) -> redis::Connection {
        redis::Client::open(self.node_url(port, data))
            .expect("valid url")
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a connection to 127.0.0.1:{port}: {e}"))
    }

    /// [`info`](super::server::info) on the node at `port` (a data node when `data`).
    pub fn info(&self, port: u16, data: bool, cmd: &[&str]) -> String {
        info_as(port, self.password_of(data), self.tls.is_some(), cmd)
    }

    /// `SENTINEL FAILOVER` on the first sentinel: a replica is promoted while the old primary
    /// stays up (taking writes until the sentinels make it a replica).
    pub fn failover(&self) {
        let mut conn = self.connect(self.sentinels[0].port(), false);
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(MASTER)
            .query(&mut conn)
            .expect("SENTINEL FAILOVER");
    }

    /// Waits (25 s at most) until the data node `n` is a replica in sync with its primary (an
    /// old primary made a replica has then dropped what it took meanwhile); how long that took.
    pub fn wait_in_sync(&self, n: usize) -> Duration {
        let began = Instant::now();
        loop {
            let replication = self.info(self.data[n].port(), true, &["INFO", "replication"]);
            if replication.contains("role:slave") && replication.contains("master_link_status:up") {
                return began.elapsed();
            }
            assert!(
                began.elapsed() < Duration::from_secs(25),
                "node {n} was a replica in sync within 25 s:\n{replication}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The sentinels and the primary's name as a configuration.
    pub fn redis_config(&self) -> RedisConfig {
        if self.password.is_none() && self.tls.is_none() {
            return RedisConfig::sentinel(
                self.sentinels.iter().map(|s| ("127.0.0.1", s.port())),
                MASTER,
            )
            .expect("a valid Sentinel configuration");
        }
        let config = RedisConfig::from_url(&self.url()).expect("a valid Sentinel URL");
        match &self.sentinel_password {
            Some(p) => config.sentinel_password(speedlayer::config::Secret::new(p.clone())),
            None => config,
        }
    }

    /// The sentinels and the primary's name as a `redis+sentinel://` (or `rediss+sentinel://`)
    /// URL, with the data nodes' password (the sentinels' own is in
    /// [`redis_config`](Self::redis_config) and [`sentinel_password`](Self::sentinel_password)).
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        let (auth, scheme) = self.auth_and_scheme(self.password_of(true));
        format!("{scheme}+sentinel://{auth}{}/{MASTER}", sentinels.join(","))
    }

    /// The sentinels' own password, if they require one.
    pub fn sentinel_password(&self) -> Option<&str> {
        self.sentinel_password.as_deref()
    }

    /// The index in `data` of the node the sentinels name as primary now.
    pub fn primary(&self) -> usize {
        for s in &self.sentinels {
            let Ok(mut conn) = redis::Client::open(self.node_url(s.port(), false))
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

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(dir) = &self.tls {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
