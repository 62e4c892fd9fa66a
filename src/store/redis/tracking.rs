//! Where the in-process tier's invalidation channel connects: every server that takes writes
//! for the cache's keys, found again each time the channel is made.
//!
//! - **One server**: that server.
//! - **Sentinel** (feature `sentinel`): the primary the sentinels name when the channel is made.
//!   A failover ends the channel: Sentinel closes the clients of a server it reconfigures, a
//!   killed primary closes them itself, and each heartbeat asks the server its `ROLE`.
//! - **Cluster** (feature `cluster`): every online primary `CLUSTER SHARDS` lists, one
//!   connection each (a replica sends no invalidation messages for the writes it replicates).
//!   Each heartbeat asks every tracked server its `ROLE`, and every [`TOPOLOGY_EVERY`] the
//!   primaries are listed again: a demoted primary, or one that is not tracked, ends the
//!   channel, and the next one tracks the new set.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{RedisError, RedisResult, Value};

use crate::config::{RedisConfig, Topology};
use crate::error::{Error, ErrorKind, Result};

/// How often, on Cluster and Sentinel, the channel checks that it tracks the servers that take
/// writes now.
pub(crate) const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// One server for the channel: its address as the cluster lists it or the sentinels name it
/// (`None` for one server) and a client for it that speaks RESP3 (server push).
pub(crate) struct Target {
    pub(crate) addr: Option<(String, u16)>,
    pub(crate) client: redis::Client,
}

/// The servers the channel tracks, found again on each connection.
pub(crate) struct Targets {
    kind: Kind,
}

enum Kind {
    Single(redis::Client),
    #[cfg(feature = "sentinel")]
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
    #[cfg(feature = "cluster")]
    Cluster {
        config: RedisConfig,
        seeds: Vec<(String, u16)>,
        /// The primaries found last: asked first next time (the seeds may be long gone).
        known: std::sync::Mutex<Vec<(String, u16)>>,
    },
}

/// `info` speaking RESP3.
fn resp3(info: redis::ConnectionInfo) -> redis::ConnectionInfo {
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    info.set_redis_settings(settings)
}

impl Targets {
    /// The channel's servers for `config`.
    pub(crate) fn new(config: &RedisConfig) -> Result<Targets> {
        let unusable = |e: RedisError| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "cannot use Redis at {config} for the in-process tier: {}",
                    config.scrub(&e.to_string())
                ),
            )
        };
        let info = resp3(config.connection_info()?);
        let kind = match config.get_topology() {
            #[cfg(feature = "cluster")]
            Topology::Cluster { nodes } => {
                // Checked here, so that a bad seed is a configuration error now.
                config.infos_at(nodes)?;
                Kind::Cluster {
                    config: config.clone(),
                    seeds: nodes.clone(),
                    known: Default::default(),
                }
            }
            #[cfg(feature = "sentinel")]
            Topology::Sentinel { sentinels, master } => Kind::Sentinel(tokio::sync::Mutex::new(
                super::sentinel_client(config, &info, sentinels, master)?,
            )),
            Topology::Single => Kind::Single(redis::Client::open(info).map_err(unusable)?),
            #[allow(unreachable_patterns)]
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{config}: this topology needs a feature this build does not have"),
                ));
            }
        };
        Ok(Targets { kind })
    }

    /// True when a tracked server can stop taking writes while its connection stays up (a
    /// failover): every heartbeat then asks it its `ROLE`.
    pub(crate) fn fails_over(&self) -> bool {
        !matches!(self.kind, Kind::Single(_))
    }

    /// The servers that take writes now, as addresses (sorted), to compare with the tracked
    /// ones every [`TOPOLOGY_EVERY`]: on a cluster, as the node behind `conn` lists them; with
    /// Sentinel, as the sentinels name the primary (a `SENTINEL FAILOVER` leaves the old one up,
    /// taking writes, for seconds). `None` with one server: nothing to compare.
    pub(crate) async fn listed(
        &self,
        conn: &mut MultiplexedConnection,
        timeout: Duration,
    ) -> Option<RedisResult<Vec<(String, u16)>>> {
        let _ = (&conn, timeout);
        match &self.kind {
            Kind::Single(_) => None,
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(_) => Some(
                self.resolve(timeout)
                    .await
                    .map(|found| found.into_iter().filter_map(|t| t.addr).collect()),
            ),
            #[cfg(feature = "cluster")]
            Kind::Cluster { config, .. } => Some(
                tokio::time::timeout(timeout, primaries_on(conn, tls_of(config)))
                    .await
                    .unwrap_or_else(|_| Err(timed_out("listing the primaries")))
                    .map(|mut primaries| {
                        primaries.sort();
                        primaries
                    }),
            ),
        }
    }

    /// The servers to track now; `timeout` bounds each question asked to find them.
    pub(crate) async fn resolve(&self, timeout: Duration) -> RedisResult<Vec<Target>> {
        match &self.kind {
            Kind::Single(client) => {
                let _ = timeout;
                Ok(vec![Target {
                    addr: None,
                    client: client.clone(),
                }])
            }
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(sentinel) => {
                let asked = async { sentinel.lock().await.async_get_client().await };
                let client = tokio::time::timeout(timeout, asked)
                    .await
                    .map_err(|_| timed_out("asking the sentinels"))??;
                Ok(vec![Target {
                    addr: super::address_of(&client),
                    client,
                }])
            }
            #[cfg(feature = "cluster")]
            Kind::Cluster {
                config,
                seeds,
                known,
            } => {
                let mut candidates = known.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for seed in seeds {
                    if !candidates.contains(seed) {
                        candidates.push(seed.clone());
                    }
                }
                // Asked all at once, the first answer taken: a seed on a dead host costs nothing
                // while another answers.
                use futures_util::StreamExt;
                let mut answers: futures_util::stream::FuturesUnordered<_> = candidates
                    .iter()
                    .map(|candidate| primaries_at(config, candidate, timeout))
                    .collect();
                let mut last = timed_out("listing the primaries");
                while let Some(answer) = answers.next().await {
                    match answer {
                        Ok(primaries) if !primaries.is_empty() => {
                            let targets = config
                                .infos_at(&primaries)
                                .map_err(|e| {
                                    RedisError::from((
                                        redis::ErrorKind::InvalidClientConfig,
                                        "a primary's address",
                                        e.to_string(),
                                    ))
                                })?
                                .into_iter()
                                .zip(primaries.iter().cloned())
                                .map(|(info, addr)| {
                                    Ok(Target {
                                        addr: Some(addr),
                                        client: redis::Client::open(resp3(info))?,
                                    })
                                })
                                .collect::<RedisResult<Vec<_>>>()?;
                            *known.lock().unwrap_or_else(|e| e.into_inner()) = primaries;
                            return Ok(targets);
                        }
                        Ok(_) => {
                            last = RedisError::from((
                                redis::ErrorKind::Io,
                                "the cluster lists no online primary",
                            ));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
}

/// True when `config` reaches its nodes over TLS.
#[cfg(feature = "cluster")]
fn tls_of(config: &RedisConfig) -> bool {
    config
        .connection_info()
        .is_ok_and(|i| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. }))
}

#[cfg(any(feature = "cluster", feature = "sentinel"))]
fn timed_out(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}

/// The online primaries as the cluster node at `addr` lists them.
#[cfg(feature = "cluster")]
async fn primaries_at(
    config: &RedisConfig,
    addr: &(String, u16),
    timeout: Duration,
) -> RedisResult<Vec<(String, u16)>> {
    let info = config
        .infos_at(std::slice::from_ref(addr))
        .ok()
        .and_then(|mut infos| infos.pop())
        .ok_or_else(|| timed_out("a node's address"))?;
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    let client = redis::Client::open(resp3(info))?;
    let asked = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        primaries_on(&mut conn, tls).await
    };
    tokio::time::timeout(timeout, asked)
        .await
        .map_err(|_| timed_out("listing the primaries"))?
}

/// The online primaries as the cluster node behind `conn` lists them (`CLUSTER SHARDS`), at
/// their TLS ports when `tls`.
#[cfg(feature = "cluster")]
pub(crate) async fn primaries_on(
    conn: &mut MultiplexedConnection,
    tls: bool,
) -> RedisResult<Vec<(String, u16)>> {
    let shards: Value = redis::cmd("CLUSTER")
        .arg("SHARDS")
        .query_async(conn)
        .await?;
    Ok(super::cluster::primaries_in(&shards, tls))
}

/// One round trip on `conn`: `Ok(true)` when answered and, with `role`, the server still takes
/// writes (`ROLE` says `master`).
pub(crate) async fn probe(conn: &mut MultiplexedConnection, role: bool) -> RedisResult<bool> {
    if !role {
        redis::cmd("PING").query_async::<()>(conn).await?;
        return Ok(true);
    }
    let reply: Value = redis::cmd("ROLE").query_async(conn).await?;
    Ok(match reply {
        Value::Array(items) => match items.first() {
            Some(Value::BulkString(b)) => b == b"master",
            Some(Value::SimpleString(s)) => s == "master",
            _ => false,
        },
        _ => false,
    })
}
