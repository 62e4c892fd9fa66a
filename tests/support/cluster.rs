//! A local Redis Cluster, on free loopback ports, torn down on drop; the
//! nodes' logs are printed when the test fails (each node is a [`RedisServer`]).
//!
//! - [`RedisCluster::start`]: `primaries` nodes with `--cluster-enabled yes`, joined by
//!   `redis-cli --cluster create ... --cluster-replicas N --cluster-yes`, then waited for until
//!   every node reports `cluster_state:ok` and every slot is covered (and every replica's link to
//!   its primary is up).

use std::process::Command;
use std::time::{Duration, Instant};

use speedlayer::config::RedisConfig;

use super::server::{RedisServer, blocking, info_as};

/// How long a node may be unreachable before the cluster fails it over.
pub const NODE_TIMEOUT_MS: u64 = 1000;

fn redis_cli() -> String {
    std::env::var("SPEEDLAYER_REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned())
}

/// A Redis Cluster on loopback.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    primaries: usize,
    password: Option<String>,
    /// The directory of the CA and certificate every node of a TLS cluster uses.
    tls: Option<std::path::PathBuf>,
    /// How long it took to come up, from the first `redis-server` to `cluster_state:ok`.
    pub startup: Duration,
}

impl RedisCluster {
    /// Starts `primaries` primaries with `replicas` replicas each; panics (never skips) when it
    /// cannot.
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with(
            primaries,
            replicas,
            None,
            None::<&mut Option<fn(&std::path::Path)>>,
        )
    }

    /// A cluster whose nodes require `password` (`requirepass`, and `masterauth` for replicas).
    pub fn start_with_password(primaries: usize, replicas: usize, password: &str) -> RedisCluster {
        RedisCluster::start_with(
            primaries,
            replicas,
            Some(password),
            None::<&mut Option<fn(&std::path::Path)>>,
        )
    }

    /// A cluster whose nodes listen with TLS only (clients, the cluster bus and replication),
    /// with a certificate for 127.0.0.1 signed by a fresh CA ([`ca_file`](Self::ca_file));
    /// `trust` is given the CA's path before the nodes start, to make the process trust it
    /// (`SSL_CERT_FILE`).
    pub fn start_tls(
        primaries: usize,
        replicas: usize,
        trust: impl FnOnce(&std::path::Path),
    ) -> RedisCluster {
        RedisCluster::start_with(primaries, replicas, None, Some(&mut Some(trust)))
    }

    /// The CA of a TLS cluster.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.tls
            .as_ref()
            .expect("started with start_tls")
            .join("ca.pem")
    }

    fn start_with<T: FnOnce(&std::path::Path)>(
        primaries: usize,
        replicas: usize,
        password: Option<&str>,
        tls: Option<&mut Option<T>>,
    ) -> RedisCluster {
        let began = Instant::now();
        let mut args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "$DIR/nodes.conf",
            "--cluster-node-timeout",
            &NODE_TIMEOUT_MS.to_string(),
            // A replica syncs at once (the default waits 5 s for more replicas to join).
            "--repl-diskless-sync-delay",
            "0",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        if let Some(p) = password {
            args.extend([
                "--requirepass".into(),
                p.into(),
                "--masterauth".into(),
                p.into(),
            ]);
        }
        let tls = tls.map(|trust| {
            let dir = super::server::certificate_dir("cluster");
            if let Some(trust) = trust.take() {
                trust(&dir.join("ca.pem"));
            }
            args.extend(super::server::tls_only_args(&dir));
            args.extend(["--tls-cluster".into(), "yes".into()]);
            dir
        });
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| RedisServer::start_with_args(&args))
            .collect();
        let cluster = RedisCluster {
            nodes,
            primaries,
            password: password.map(str::to_owned),
            tls,
            startup: Duration::ZERO,
        };
        let mut cli = Command::new(redis_cli());
        if let Some(p) = password {
            cli.arg("-a").arg(p).arg("--no-auth-warning");
        }
        if let Some(dir) = &cluster.tls {
            cli.arg("--tls").arg("--cacert").arg(dir.join("ca.pem"));
        }
        let out = cli
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port())),
            )
            .arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes")
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {:?}: {e}. Install it (apt-get install -y redis-tools, as \
                     scripts/test.sh does) or point SPEEDLAYER_REDIS_CLI at a redis-cli binary",
                    redis_cli()
                )
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok(Duration::from_secs(30));
        let mut cluster = cluster;
        cluster.startup = began.elapsed();
        cluster
    }

    /// Waits until every live node reports `cluster_state:ok` with all 16384 slots assigned
    /// and every replica's link to its primary is up.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ready = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                let cluster = self.info(n.port(), &["CLUSTER", "INFO"]);
                let replication = self.info(n.port(), &["INFO", "replication"]);
                cluster.contains("cluster_state:ok")
                    && cluster.contains("cluster_slots_assigned:16384")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within {limit:?}:\n{}",
                self.nodes
                    .iter()
                    .map(|n| format!(
                        "port {}:\n{}",
                        n.port(),
                        self.info(n.port(), &["CLUSTER", "NODES"])
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn info(&self, port: u16, cmd: &[&str]) -> String {
        info_as(port, self.password.as_deref(), self.tls.is_some(), cmd)
    }

    /// The seed nodes (all of them) as a configuration.
    pub fn redis_config(&self) -> RedisConfig {
        RedisConfig::from_url(&self.url()).expect("a valid cluster configuration")
    }

    /// The user info (`:password@`, or nothing) and the scheme (`redis` or `rediss`) of every
    /// node's URL.
    fn auth_and_scheme(&self) -> (String, &'static str) {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        (
            auth,
            if self.tls.is_some() {
                "rediss"
            } else {
                "redis"
            },
        )
    }

    /// `redis+cluster://[:password@]127.0.0.1:p1,127.0.0.1:p2,...` (`rediss+cluster` with TLS)
    pub fn url(&self) -> String {
        let (auth, scheme) = self.auth_and_scheme();
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("{scheme}+cluster://{auth}{}", nodes.join(","))
    }

    /// A redis-rs cluster client, for assertions made beside the library.
    pub fn client(&self) -> redis::cluster::ClusterClient {
        let (auth, scheme) = self.auth_and_scheme();
        redis::cluster::ClusterClient::new(
            self.nodes
                .iter()
                .map(|n| format!("{scheme}://{auth}127.0.0.1:{}/", n.port()))
                .collect::<Vec<_>>(),
        )
        .expect("a cluster client")
    }

    /// A raw cluster connection.
    pub async fn raw(&self) -> redis::cluster_async::ClusterConnection {
        self.client()
            .get_async_connection()
            .await
            .expect("a raw cluster connection")
    }

    /// Every node, primaries first as started (roles change after a failover).
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// Node `n`.
    pub fn node(&self, n: usize) -> &RedisServer {
        &self.nodes[n]
    }

    /// The index of the node that is primary for `key`'s slot now.
    pub fn primary_of(&self, key: &str) -> usize {
        self.owner_of(key)
            .unwrap_or_else(|nodes| panic!("no primary covers {key:?}'s slot:\n{nodes}"))
    }

    /// The index of the node that is primary for `key`'s slot now, as a live node sees it; the
    /// nodes' table when no primary that is not failing covers it (during a failover).
    pub fn owner_of(&self, key: &str) -> Result<usize, String> {
        let mut conn = blocking(self.live().next().expect("a live node").port());
        let slot_no: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .expect("CLUSTER KEYSLOT");
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut conn)
            .expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let covers = fields[8..].iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                match (a.parse::<i64>(), b.parse::<i64>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&slot_no),
                    _ => false,
                }
            });
            if covers {
                let port: u16 = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("a node address");
                return Ok(self
                    .nodes
                    .iter()
                    .position(|n| n.port() == port)
                    .expect("a node of this cluster"));
            }
        }
        Err(format!("slot {slot_no}:\n{nodes}"))
    }

    /// The index of a replica of the node at `primary`.
    pub fn replica_of(&self, primary: usize) -> usize {
        let mut conn = blocking(self.nodes[primary].port());
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut conn)
            .expect("CLUSTER MYID");
        let replicas: Vec<String> = redis::cmd("CLUSTER")
            .arg("REPLICAS")
            .arg(&id)
            .query(&mut conn)
            .expect("CLUSTER REPLICAS");
        let line = replicas
            .iter()
            .find(|l| !l.contains("fail"))
            .expect("a replica");
        let port: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|a| a.split(['@', ':']).nth(1))
            .and_then(|p| p.parse().ok())
            .expect("a node address");
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .expect("a node of this cluster")
    }

    /// `CLUSTER FAILOVER` on the replica at `replica`: a coordinated switch (no data lost).
    pub fn failover(&self, replica: usize) {
        let mut conn = blocking(self.nodes[replica].port());
        let _: () = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query(&mut conn)
            .expect("CLUSTER FAILOVER");
    }

    fn live(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.is_running())
    }

    /// The port of node `n`.
    pub fn port(&self, n: usize) -> u16 {
        self.nodes[n].port()
    }

    /// How many primaries the cluster was started with.
    pub fn primaries(&self) -> usize {
        self.primaries
    }
}

/// Removes a TLS cluster's certificates.
impl Drop for RedisCluster {
    fn drop(&mut self) {
        if let Some(dir) = &self.tls {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
