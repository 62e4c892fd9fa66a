//! The Redis Cluster transport (feature `cluster`): redis-rs's `cluster-async` connection, which
//! routes each command to the primary owning its key's slot, follows `MOVED` and `ASK`, and
//! refreshes the slot map when the topology changes (a failover, a resharding).
//!
//! It is made lazily, like the single-node transport: a service starts while the cluster is
//! down, and the first call after it is back connects. The connection is made in a task of its
//! own, one at a time: a caller that gives up waiting (the Store's timeout) does not cancel it,
//! so a connect slower than one call (a seed on a dead host waits out the connect timeout) still
//! completes for the calls after it. A call that timed out, or failed on a lost node, drops the
//! connection (at most once per [`REPLACE_INTERVAL`](super::REPLACE_INTERVAL), and only the one
//! the call used); the next call makes a new one from the seed nodes.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{RedisError, RedisResult};
use tokio::sync::Notify;

use crate::config::RedisConfig;
use crate::error::{Error, ErrorKind, Result};

/// The connection and its bookkeeping.
#[derive(Default)]
struct State {
    /// The connection, when it was made, and its generation.
    conn: Option<(ClusterConnection, Instant, u64)>,
    generation: u64,
    /// A connect task is running.
    connecting: bool,
    /// How the last connect failed.
    error: Option<RedisError>,
}

/// A cluster connection, made on first use.
pub(super) struct Sharded {
    client: ClusterClient,
    state: Arc<Mutex<State>>,
    /// Signalled when a connect task ends.
    done: Arc<Notify>,
    /// The nodes are reached over TLS (their TLS ports are the ones to walk).
    tls: bool,
}

impl Sharded {
    pub(super) fn new(config: &RedisConfig, nodes: &[(String, u16)]) -> Result<Sharded> {
        let infos = config.infos_at(nodes)?;
        let tls = infos
            .first()
            .is_some_and(|i| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. }));
        let client = ClusterClientBuilder::new(infos)
            .connection_timeout(config.get_connect_timeout())
            // The Store bounds every call; the driver's own waits only need to be shorter than
            // a failover, so that a call retried after MOVED or a refused connection lands on
            // the new primary once the cluster promoted it.
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "cannot use Redis Cluster at {config}: {}",
                        config.scrub(&e.to_string())
                    ),
                )
            })?;
        Ok(Sharded {
            client,
            state: Arc::default(),
            done: Arc::new(Notify::new()),
            tls,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock still holds consistent state: every update is one assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection and its generation, made now (in a task of its own) if there is none.
    pub(super) async fn conn(&self) -> RedisResult<(ClusterConnection, u64)> {
        loop {
            let notified = {
                let mut state = self.lock();
                if let Some((conn, _, generation)) = &state.conn {
                    return Ok((conn.clone(), *generation));
                }
                // Registered before the task can end: `notify_waiters` reaches it.
                let notified = self.done.clone().notified_owned();
                if !state.connecting {
                    state.connecting = true;
                    state.error = None;
                    let (client, shared, done) =
                        (self.client.clone(), self.state.clone(), self.done.clone());
                    let spawned = crate::store::spawn_detached(async move {
                        let made = client.get_async_connection().await;
                        let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
                        state.connecting = false;
                        match made {
                            Ok(conn) => {
                                state.generation += 1;
                                state.conn = Some((conn, Instant::now(), state.generation));
                            }
                            Err(e) => state.error = Some(e),
                        }
                        drop(state);
                        done.notify_waiters();
                    });
                    if !spawned {
                        state.connecting = false;
                        return Err(RedisError::from((
                            redis::ErrorKind::Io,
                            "no runtime to connect to the cluster on",
                        )));
                    }
                }
                notified
            };
            notified.await;
            let state = self.lock();
            if let Some((conn, _, generation)) = &state.conn {
                return Ok((conn.clone(), *generation));
            }
            if let Some(e) = &state.error {
                return Err(e.clone());
            }
        }
    }

    /// Drops the connection of `generation` (any, when `None`), so that the next call makes a
    /// new one, unless it was made less than [`REPLACE_INTERVAL`](super::REPLACE_INTERVAL) ago.
    pub(super) fn replace(&self, generation: Option<u64>) -> bool {
        let mut state = self.lock();
        let stale = state.conn.as_ref().is_some_and(|(_, at, g)| {
            at.elapsed() >= super::REPLACE_INTERVAL && generation.is_none_or(|want| want == *g)
        });
        if stale {
            state.conn = None;
        }
        stale
    }

    /// After a failed call: a lost connection, or a node that no longer serves (a primary
    /// failed over), drops the connection, so that the next call builds the slot map anew from
    /// the seed nodes. The driver refreshes its map after `MOVED` by itself, but a `PING` (sent
    /// to every primary it knows) can keep reaching a dead primary until then.
    pub(super) fn failed(&self, e: &RedisError, generation: u64) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.code(),
                Some(
                    "CLUSTERDOWN"
                        | "READONLY"
                        | "MASTERDOWN"
                        | "TRYAGAIN"
                        | "LOADING"
                        | "MOVED"
                        | "ASK"
                )
            )
        {
            self.replace(Some(generation));
        }
    }

    /// The primaries' addresses, from `CLUSTER SHARDS` as one node sees them.
    pub(super) async fn primaries(&self) -> RedisResult<Vec<(String, u16)>> {
        let (mut conn, _) = self.conn().await?;
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SHARDS");
        let shards: redis::Value = conn
            .route_command(
                cmd,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await?;
        Ok(primaries_in(&shards, self.tls))
    }

    /// Runs `cmd` on the node at `host:port`.
    pub(super) async fn on_node(
        &self,
        host: &str,
        port: u16,
        cmd: redis::Cmd,
    ) -> RedisResult<redis::Value> {
        let (mut conn, _) = self.conn().await?;
        conn.route_command(
            cmd,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.to_owned(),
                port,
            }),
        )
        .await
    }
}

/// The online primaries a `CLUSTER SHARDS` reply lists (RESP2 or RESP3), at their TLS ports
/// when `tls` (a node may listen on both).
pub(super) fn primaries_in(shards: &redis::Value, tls: bool) -> Vec<(String, u16)> {
    let mut primaries = Vec::new();
    for shard in as_items(shards) {
        let nodes = field(shard, "nodes");
        for node in nodes.map(as_items).unwrap_or_default() {
            let text = |name: &str| match field(node, name) {
                Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                Some(redis::Value::SimpleString(s)) => Some(s.clone()),
                _ => None,
            };
            let (first, then) = if tls {
                ("tls-port", "port")
            } else {
                ("port", "tls-port")
            };
            let port = match field(node, first).or_else(|| field(node, then)) {
                Some(redis::Value::Int(p)) => u16::try_from(*p).ok(),
                _ => None,
            };
            // A failed or loading node (a primary left behind after a failover) is no node
            // to walk.
            if text("role").as_deref() == Some("master")
                && text("health").as_deref() == Some("online")
                && let (Some(ip), Some(port)) = (text("ip").or_else(|| text("endpoint")), port)
            {
                primaries.push((ip, port));
            }
        }
    }
    primaries
}

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The slot of a key (CRC16 of its hash tag, or of the whole key): commands of one pipeline or
/// script must share it.
pub(super) fn slot(key: &str) -> u16 {
    let key = key.as_bytes();
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let len = key[open + 1..].iter().position(|b| *b == b'}')?;
        (len > 0).then(|| &key[open + 1..open + 1 + len])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

fn as_items(value: &redis::Value) -> Vec<&redis::Value> {
    match value {
        redis::Value::Array(items) | redis::Value::Set(items) => items.iter().collect(),
        _ => Vec::new(),
    }
}

/// A field of a RESP2 flat key/value array or a RESP3 map.
fn field<'a>(value: &'a redis::Value, name: &str) -> Option<&'a redis::Value> {
    let is = |k: &redis::Value| match k {
        redis::Value::BulkString(b) => b == name.as_bytes(),
        redis::Value::SimpleString(s) => s == name,
        _ => false,
    };
    match value {
        redis::Value::Map(pairs) => pairs.iter().find(|(k, _)| is(k)).map(|(_, v)| v),
        redis::Value::Array(items) => items
            .chunks(2)
            .find(|pair| pair.len() == 2 && is(&pair[0]))
            .map(|pair| &pair[1]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{primaries_in, slot};

    /// A `CLUSTER SHARDS` reply (RESP3) naming one online primary listening on both a plain and
    /// a TLS port, a failed primary and a replica: only the online primary, at the port the
    /// transport speaks.
    #[test]
    fn primaries_are_the_online_ones_at_the_port_the_transport_speaks() {
        use redis::Value;
        let text = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let node = |ip: &str, role: &str, health: &str, tls_port: i64| {
            Value::Map(vec![
                (text("ip"), text(ip)),
                (text("port"), Value::Int(7000)),
                (text("tls-port"), Value::Int(tls_port)),
                (text("role"), text(role)),
                (text("health"), text(health)),
            ])
        };
        let shards = Value::Array(vec![Value::Map(vec![(
            text("nodes"),
            Value::Array(vec![
                node("10.0.0.1", "master", "online", 8000),
                node("10.0.0.2", "master", "failed", 8001),
                node("10.0.0.3", "replica", "online", 8002),
            ]),
        )])]);
        assert_eq!(
            primaries_in(&shards, false),
            vec![("10.0.0.1".to_owned(), 7000)]
        );
        assert_eq!(
            primaries_in(&shards, true),
            vec![("10.0.0.1".to_owned(), 8000)]
        );
    }

    #[test]
    fn slots_agree_with_redis_rs() {
        for key in [
            "",
            "a",
            "user:1000",
            "{user}:1",
            "a{}b",
            "a{b}c{d}",
            "{",
            "x}{y}",
        ] {
            let ours = slot(key);
            let theirs = redis::cluster_routing::Slot::for_key(key);
            assert_eq!(format!("Slot({ours})"), format!("{theirs:?}"), "{key:?}");
        }
        // Redis's own documentation example: CLUSTER KEYSLOT somekey is 11058.
        assert_eq!(slot("somekey"), 11058);
        assert_eq!(slot("{somekey}:~lease"), 11058);
    }
}
