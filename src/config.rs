//! Configuration: which backend, how long to wait for it, what to do when it fails.
//!
//! [`Config::from_env`] reads the variables the services already use:
//!
//! | variable | meaning |
//! | --- | --- |
//! | `REDIS_URL` | `redis://[user][:password@]host[:port][/db]`, or `rediss://` for TLS (feature `tls`) |
//! | `REDIS_HOST`, `REDIS_PORT`, `REDIS_PASSWORD`, `REDIS_DB`, `REDIS_USERNAME` | the same, in parts, when `REDIS_URL` is unset |
//! | `REDIS_CLUSTER_NODES` | Redis Cluster (feature `cluster`): seed nodes `host:port,host:port`, with `REDIS_PASSWORD`/`REDIS_USERNAME`; or `REDIS_URL=redis+cluster://[user][:password@]host:port,host:port` |
//! | `REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER` | Sentinel (feature `sentinel`): sentinels `host:port,host:port` and the primary's name, with `REDIS_PASSWORD`/`REDIS_USERNAME`/`REDIS_DB` for the data nodes; or `REDIS_URL=redis+sentinel://[user][:password@]host:port,host:port/<primary name>[/db]` |
//! | `REDIS_SENTINEL_PASSWORD`, `REDIS_SENTINEL_USERNAME` | The sentinels' own credentials, when they require a password (Sentinel's `requirepass`) |
//!
//! With none of them set, the cache runs on the in-memory backend, and says so once in the log.
//! A password never appears in `Debug`, `Display`, errors or logs: it is held in a type whose
//! only output is `***`, and URLs are shown with the password masked.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::key::Namespace;
use crate::ttl::Ttl;

/// Default byte budget of process memory (the memory backend, or the fallback): 64 MiB.
pub const DEFAULT_MEMORY_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default timeout of one Redis operation.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(100);
/// Default timeout of establishing a Redis connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default number of consecutive failures that opens the circuit breaker.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// Default time an open breaker waits before it lets one probe through.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(1);
/// Default recovery hold: how long Redis must have answered again after an outage before cache
/// calls use it (see [`Config::recovery_hold`]).
pub const DEFAULT_RECOVERY_HOLD: Duration = Duration::from_millis(500);
/// Default largest encoded value the typed cache stores: 1 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Default cap on the TTL of entries written to the memory fallback while Redis is unusable.
pub const DEFAULT_FALLBACK_MAX_TTL: Ttl = Ttl::seconds(60);
/// Default lease TTL: the longest a loader may run and still have its value cached.
pub const DEFAULT_LEASE_TTL: Ttl = Ttl::seconds(10);
/// Default time a load that finds another load's lease waits for that load's value.
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_millis(50);
/// Default size of the pooled transport.
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// A password. Its `Debug` prints `***`; it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Splits `scheme://userinfo@rest` into its parts. The userinfo ends at the *last* `@`, so that
/// a password holding unencoded `/`, `?`, `#` or `@` is still taken for a password.
fn split_userinfo(url: &str) -> Option<(&str, Option<&str>, &str)> {
    let scheme_end = url.find("://")? + 3;
    let (scheme, rest) = url.split_at(scheme_end);
    match rest.rfind('@') {
        Some(at) => Some((scheme, Some(&rest[..at]), &rest[at..])),
        None => Some((scheme, None, rest)),
    }
}

/// Decodes `%XX` escapes; `None` when the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h)? * 16 + hex(l)?) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The password part of a URL's userinfo (`user:password` or a lone `password`).
fn userinfo_password(userinfo: &str) -> &str {
    userinfo.split_once(':').map_or(userinfo, |(_, p)| p)
}

/// Masks the password of a Redis URL (`redis://user:***@host`), and any `pass`/`password` query
/// parameter.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, userinfo, rest)) = split_userinfo(url) else {
        // Not a URL we understand: show nothing of it rather than risk a secret.
        return "<unparseable url>".to_owned();
    };
    let userinfo = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((user, _))
                if user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.%".contains(&b)) =>
            {
                format!("{user}:***")
            }
            // `redis://secret@host`: some clients read a lone userinfo as the password.
            _ => "***".to_owned(),
        },
        None => String::new(),
    };
    let rest = match rest.find('?') {
        Some(q) => {
            let (path, query) = rest.split_at(q + 1);
            let (query, fragment) = match query.find('#') {
                Some(h) => query.split_at(h),
                None => (query, ""),
            };
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("pass") => format!("{k}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}{}{fragment}", masked.join("&"))
        }
        None => rest.to_owned(),
    };
    format!("{scheme}{userinfo}{rest}")
}

/// How the Redis backend talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// One multiplexed connection that reconnects by itself (redis-rs `ConnectionManager`).
    /// The default: on loopback it carried about twice the throughput of a pool of 16.
    Multiplexed,
    /// A bb8 pool of `size` connections (feature `bb8`).
    Pooled {
        /// Number of connections.
        size: u32,
    },
}

/// Which Redis deployment a [`RedisConfig`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Topology {
    /// One server (or a managed endpoint that looks like one). The default.
    Single,
    /// Redis Cluster (feature `cluster`): seed nodes as `(host, port)`. The client learns the
    /// other nodes and the slot map from them, and follows the topology as it changes.
    Cluster {
        /// Seed nodes; one that answers is enough.
        nodes: Vec<(String, u16)>,
    },
    /// A primary found through Sentinel (feature `sentinel`), followed across failovers.
    Sentinel {
        /// The sentinels, as `(host, port)`.
        sentinels: Vec<(String, u16)>,
        /// The name the sentinels monitor the primary under.
        master: String,
    },
}

/// Default port of a Sentinel.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// Parses `host:port,host:port` (`[v6]:port` too; `default_port` where a port is left out).
fn parse_hosts(list: &str, default_port: u16, what: &str) -> Result<Vec<(String, u16)>> {
    // An entry is never echoed: a mistyped one can carry a password.
    let bad = |n: usize, why: &str| {
        Error::new(
            ErrorKind::Config,
            format!("{what} must be host:port entries separated by commas; entry {n} {why}"),
        )
    };
    let mut hosts = Vec::new();
    for (n, entry) in list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .enumerate()
    {
        let n = n + 1;
        let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
            let (host, rest) = v6
                .split_once(']')
                .ok_or_else(|| bad(n, "has no closing ']'"))?;
            (host, rest.strip_prefix(':'))
        } else {
            match entry.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (entry, None),
            }
        };
        if host.is_empty() || host.contains(['@', '/', ' ', '\t', '?', '#', ',']) {
            // Never echo it: an entry with `@` often carries a password.
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{what} must be host:port entries separated by commas (a password goes in \
                     REDIS_PASSWORD or the URL's user info)"
                ),
            ));
        }
        if !entry.starts_with('[') && host.contains(':') {
            return Err(bad(
                n,
                "has more than one ':' (write an IPv6 address as [addr]:port)",
            ));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(n, "has no valid port (1-65535)"))?,
            None => default_port,
        };
        hosts.push((host.to_owned(), port));
    }
    if hosts.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{what} names no host"),
        ));
    }
    Ok(hosts)
}

/// Splits a `redis+cluster://` or `redis+sentinel://` URL (and the `rediss+` forms) into the URL
/// of one data node that carries its credentials, TLS and database (the first host stands in),
/// the host list, and for Sentinel the primary's name. `None` for any other scheme.
fn split_multi_url(url: &str) -> Option<Result<(String, Topology)>> {
    let (scheme, kind) = [
        ("redis+cluster://", "cluster"),
        ("rediss+cluster://", "cluster"),
        ("redis+sentinel://", "sentinel"),
        ("rediss+sentinel://", "sentinel"),
    ]
    .into_iter()
    .find(|(s, _)| {
        url.get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
    })?;
    let base = if scheme.starts_with("rediss") {
        "rediss://"
    } else {
        "redis://"
    };
    let rest = &url[scheme.len()..];
    let (userinfo, rest) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (list, tail) = rest.split_at(end);
    let what = if kind == "cluster" {
        "a redis+cluster:// URL's hosts"
    } else {
        "a redis+sentinel:// URL's sentinels"
    };
    Some((|| {
        if kind == "cluster" {
            let nodes = parse_hosts(list, 6379, what)?;
            let (h, p) = &nodes[0];
            let node = format!("{base}{userinfo}{}{tail}", host_port(h, *p));
            Ok((node, Topology::Cluster { nodes }))
        } else {
            let sentinels = parse_hosts(list, DEFAULT_SENTINEL_PORT, what)?;
            let (path, query) = tail.split_at(tail.find('?').unwrap_or(tail.len()));
            let mut parts = path.trim_start_matches('/').splitn(2, '/');
            let master = parts.next().unwrap_or("").to_owned();
            if master.is_empty() {
                return Err(Error::new(
                    ErrorKind::Config,
                    "a redis+sentinel:// URL needs the primary's name as its path: \
                     redis+sentinel://host:26379,host:26379/<name>[/db]",
                ));
            }
            let db = parts.next().filter(|d| !d.is_empty()).unwrap_or("0");
            let (h, p) = &sentinels[0];
            let node = format!("{base}{userinfo}{}/{db}{query}", host_port(h, *p));
            Ok((node, Topology::Sentinel { sentinels, master }))
        }
    })())
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[derive(Clone)]
enum Target {
    Url(Secret),
    Parts {
        host: String,
        port: u16,
        db: i64,
        username: Option<String>,
        password: Option<Secret>,
    },
}

/// Where and how to reach Redis.
///
/// ```
/// use speedlayer::config::RedisConfig;
///
/// let config = RedisConfig::from_url("redis://:hunter2@127.0.0.1:6379/0")?;
/// assert!(!format!("{config:?}").contains("hunter2"));
/// assert_eq!(config.to_string(), "redis://:***@127.0.0.1:6379/0");
/// # Ok::<(), speedlayer::Error>(())
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    target: Target,
    topology: Topology,
    connect_timeout: Duration,
    transport: Transport,
    /// The sentinels' own user name and password (Sentinel's `requirepass`), when they have
    /// one: the data nodes' credentials are not theirs.
    sentinel_username: Option<String>,
    sentinel_password: Option<Secret>,
}

impl RedisConfig {
    /// Parses a `redis://` or `rediss://` URL. Fails with [`ErrorKind::Config`] when it does not
    /// parse, or asks for TLS without the `tls` feature.
    ///
    /// `redis+cluster://[user][:password@]host:port,host:port` names a Redis Cluster by its seed
    /// nodes (feature `cluster`); `redis+sentinel://[user][:password@]host:port,host:port/<name>[/db]`
    /// names the primary that the sentinels monitor as `<name>` (feature `sentinel`). The
    /// credentials are the data nodes'; `rediss+` selects TLS for them.
    pub fn from_url(url: &str) -> Result<RedisConfig> {
        let topology = match split_multi_url(url) {
            Some(split) => split?.1,
            None => Topology::Single,
        };
        let config = RedisConfig {
            target: Target::Url(Secret::new(url)),
            topology,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            sentinel_username: None,
            sentinel_password: None,
            transport: Transport::Multiplexed,
        };
        config.validate()?;
        Ok(config)
    }

    /// Host and port, without password or database. The host is checked when the configuration
    /// is used ([`Config::from_env`] refuses a host holding `@`, `/`, `:` or spaces, which is
    /// usually a URL or a password put in the wrong variable).
    pub fn from_host(host: impl Into<String>, port: u16) -> RedisConfig {
        RedisConfig {
            target: Target::Parts {
                host: host.into(),
                port,
                db: 0,
                username: None,
                password: None,
            },
            topology: Topology::Single,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            sentinel_username: None,
            sentinel_password: None,
            transport: Transport::Multiplexed,
        }
    }

    /// A Redis Cluster reached through `nodes` (at least one; feature `cluster`). Credentials
    /// and the connect timeout are set as for one node; a cluster has only database 0.
    pub fn cluster<H: Into<String>>(
        nodes: impl IntoIterator<Item = (H, u16)>,
    ) -> Result<RedisConfig> {
        let nodes: Vec<(String, u16)> = nodes.into_iter().map(|(h, p)| (h.into(), p)).collect();
        let list: Vec<String> = nodes.iter().map(|(h, p)| host_port(h, *p)).collect();
        let nodes = parse_hosts(&list.join(","), 6379, "the cluster's nodes")?;
        let (host, port) = nodes[0].clone();
        let mut config = RedisConfig::from_host(host, port);
        config.topology = Topology::Cluster { nodes };
        config.validate()?;
        Ok(config)
    }

    /// The primary that `sentinels` monitor as `master` (feature `sentinel`). Credentials and
    /// the database are the data nodes', set as for one node.
    pub fn sentinel<H: Into<String>>(
        sentinels: impl IntoIterator<Item = (H, u16)>,
        master: impl Into<String>,
    ) -> Result<RedisConfig> {
        let master = master.into();
        if master.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "Sentinel needs the name it monitors the primary under (REDIS_SENTINEL_MASTER)",
            ));
        }
        let sentinels: Vec<(String, u16)> =
            sentinels.into_iter().map(|(h, p)| (h.into(), p)).collect();
        let list: Vec<String> = sentinels.iter().map(|(h, p)| host_port(h, *p)).collect();
        let sentinels = parse_hosts(&list.join(","), DEFAULT_SENTINEL_PORT, "the sentinels")?;
        let (host, port) = sentinels[0].clone();
        let mut config = RedisConfig::from_host(host, port);
        config.topology = Topology::Sentinel {
            sentinels,
            master: master.trim().to_owned(),
        };
        config.validate()?;
        Ok(config)
    }

    /// The deployment this configuration names.
    pub fn get_topology(&self) -> &Topology {
        &self.topology
    }

    /// The password the sentinels themselves require (Sentinel's `requirepass`; feature
    /// `sentinel`), also read from `REDIS_SENTINEL_PASSWORD`. Without it the sentinels are
    /// asked without credentials; the URL's (or [`password`](RedisConfig::password)'s)
    /// credentials are the data nodes'. Unused with other topologies.
    #[must_use]
    pub fn sentinel_password(mut self, password: Secret) -> RedisConfig {
        self.sentinel_password = Some(password);
        self
    }

    /// The ACL user name for the sentinels (with
    /// [`sentinel_password`](RedisConfig::sentinel_password)), also read from
    /// `REDIS_SENTINEL_USERNAME`.
    #[must_use]
    pub fn sentinel_username(mut self, username: impl Into<String>) -> RedisConfig {
        self.sentinel_username = Some(username.into());
        self
    }

    /// The sentinels' credentials: user name and password.
    #[cfg(feature = "sentinel")]
    pub(crate) fn sentinel_credentials(&self) -> (Option<&str>, Option<&str>) {
        (
            self.sentinel_username.as_deref(),
            self.sentinel_password.as_ref().map(Secret::expose),
        )
    }

    /// Sets the password (only for configurations built with [`RedisConfig::from_host`]).
    #[must_use]
    pub fn password(mut self, password: Secret) -> RedisConfig {
        if let Target::Parts { password: p, .. } = &mut self.target {
            *p = Some(password);
        }
        self
    }

    /// Sets the ACL user name (only for configurations built with [`RedisConfig::from_host`]).
    #[must_use]
    pub fn username(mut self, username: impl Into<String>) -> RedisConfig {
        if let Target::Parts { username: u, .. } = &mut self.target {
            *u = Some(username.into());
        }
        self
    }

    /// Sets the database number (only for configurations built with [`RedisConfig::from_host`]).
    #[must_use]
    pub fn db(mut self, db: i64) -> RedisConfig {
        if let Target::Parts { db: d, .. } = &mut self.target {
            *d = db;
        }
        self
    }

    /// How long establishing a connection may take (default 1 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> RedisConfig {
        self.connect_timeout = timeout;
        self
    }

    /// The transport (default [`Transport::Multiplexed`]).
    #[must_use]
    pub fn transport(mut self, transport: Transport) -> RedisConfig {
        self.transport = transport;
        self
    }

    /// The configured connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The configured transport.
    pub fn get_transport(&self) -> Transport {
        self.transport
    }

    /// The secret of this configuration, if any, so that error texts can be scrubbed of it.
    pub(crate) fn secret(&self) -> Option<&str> {
        match &self.target {
            Target::Url(url) => {
                let (_, userinfo, _) = split_userinfo(url.expose())?;
                Some(userinfo_password(userinfo?)).filter(|p| !p.is_empty())
            }
            Target::Parts { password, .. } => password.as_ref().map(Secret::expose),
        }
    }

    /// Removes the secrets from a text (an error message of the driver): the data nodes'
    /// password, in the form it has in the URL and percent-decoded, and the sentinels'.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut secrets: Vec<String> = Vec::new();
        if let Some(secret) = self.secret() {
            secrets.push(secret.to_owned());
            secrets.extend(percent_decode(secret).filter(|d| d != secret));
        }
        secrets.extend(
            self.sentinel_password
                .as_ref()
                .map(|s| s.expose().to_owned()),
        );
        // The longest first: one secret may hold another.
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut out = text.to_owned();
        for secret in &secrets {
            out = out.replace(secret.as_str(), "***");
        }
        out
    }

    #[cfg(feature = "redis")]
    pub(crate) fn connection_info(&self) -> Result<redis::ConnectionInfo> {
        use redis::IntoConnectionInfo;
        match &self.target {
            Target::Url(url) => {
                let node = match split_multi_url(url.expose()) {
                    Some(split) => split?.0,
                    None => url.expose().to_owned(),
                };
                node.as_str().into_connection_info().map_err(|e| {
                    let hint = if node.starts_with("rediss://") && !cfg!(feature = "tls") {
                        "; rediss:// needs speedlayer's `tls` feature"
                    } else {
                        ""
                    };
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "REDIS_URL {} is not a valid Redis URL ({}){hint}",
                            redact_url(url.expose()),
                            self.scrub(&e.to_string())
                        ),
                    )
                })
            }
            Target::Parts {
                host,
                port,
                db,
                username,
                password,
            } => {
                let mut settings = redis::RedisConnectionInfo::default().set_db(*db);
                if let Some(u) = username {
                    settings = settings.set_username(u);
                }
                if let Some(p) = password {
                    settings = settings.set_password(p.expose());
                }
                Ok(redis::ConnectionAddr::Tcp(host.clone(), *port)
                    .into_connection_info()
                    .map_err(|e| Error::new(ErrorKind::Config, e.to_string()))?
                    .set_redis_settings(settings))
            }
        }
    }

    /// The connection details of each of `hosts`: this configuration's credentials, TLS and
    /// database, at another address.
    #[cfg(any(feature = "cluster", feature = "sentinel"))]
    pub(crate) fn infos_at(&self, hosts: &[(String, u16)]) -> Result<Vec<redis::ConnectionInfo>> {
        let base = self.connection_info()?;
        hosts
            .iter()
            .map(|(host, port)| {
                let addr = match base.addr() {
                    redis::ConnectionAddr::Tcp(..) => {
                        redis::ConnectionAddr::Tcp(host.clone(), *port)
                    }
                    redis::ConnectionAddr::TcpTls {
                        insecure,
                        tls_params,
                        ..
                    } => redis::ConnectionAddr::TcpTls {
                        host: host.clone(),
                        port: *port,
                        insecure: *insecure,
                        tls_params: tls_params.clone(),
                    },
                    _ => {
                        return Err(Error::new(
                            ErrorKind::Config,
                            format!("{self}: Cluster and Sentinel nodes are reached over TCP"),
                        ));
                    }
                };
                Ok(base.clone().set_addr(addr))
            })
            .collect()
    }

    fn validate(&self) -> Result<()> {
        #[cfg(feature = "redis")]
        {
            let needs = match self.topology {
                Topology::Single => None,
                Topology::Cluster { .. } if !cfg!(feature = "cluster") => Some("cluster"),
                Topology::Sentinel { .. } if !cfg!(feature = "sentinel") => Some("sentinel"),
                _ => None,
            };
            if let Some(feature) = needs {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{self} needs speedlayer's `{feature}` feature"),
                ));
            }
            let info = self.connection_info()?;
            if matches!(self.topology, Topology::Cluster { .. }) && info.redis_settings().db() != 0
            {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{self}: a Redis Cluster has only database 0"),
                ));
            }
            Ok(())
        }
        #[cfg(not(feature = "redis"))]
        {
            Err(Error::new(
                ErrorKind::Config,
                format!(
                    "Redis is configured ({self}) but speedlayer was built without its `redis` \
                     feature"
                ),
            ))
        }
    }
}

impl fmt::Display for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Url(url) => f.write_str(&redact_url(url.expose())),
            Target::Parts {
                host,
                port,
                db,
                username,
                password,
            } => {
                f.write_str(match self.topology {
                    Topology::Single => "redis://",
                    Topology::Cluster { .. } => "redis+cluster://",
                    Topology::Sentinel { .. } => "redis+sentinel://",
                })?;
                match (username, password) {
                    (Some(u), Some(_)) => write!(f, "{u}:***@")?,
                    (Some(u), None) => write!(f, "{u}@")?,
                    (None, Some(_)) => f.write_str(":***@")?,
                    (None, None) => {}
                }
                let list = |hosts: &[(String, u16)]| -> String {
                    let hosts: Vec<String> = hosts.iter().map(|(h, p)| host_port(h, *p)).collect();
                    hosts.join(",")
                };
                match &self.topology {
                    Topology::Single => write!(f, "{}/{db}", host_port(host, *port)),
                    Topology::Cluster { nodes } => f.write_str(&list(nodes)),
                    Topology::Sentinel { sentinels, master } => {
                        write!(f, "{}/{master}/{db}", list(sentinels))
                    }
                }
            }
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("target", &format_args!("{self}"))
            .field("connect_timeout", &self.connect_timeout)
            .field("transport", &self.transport)
            .field("topology", &self.topology)
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &self.sentinel_password)
            .finish()
    }
}

/// `REDIS_DB`, when set.
fn db_of(value: Option<String>) -> Result<i64> {
    match value {
        Some(d) => d
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|d| *d >= 0)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("REDIS_DB must be a database number (0, 1, ...), not {d:?}"),
                )
            }),
        None => Ok(0),
    }
}

/// What serves while Redis is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fallback {
    /// An in-process memory layer: reads and writes go there until Redis is back. Its entries
    /// live at most [`Config::fallback_max_ttl`], and it is emptied whenever the breaker opens
    /// or closes, so it never serves entries from before an outage. Other instances'
    /// invalidations cannot reach it: in a fleet, an entry it holds can be served after another
    /// instance changed the data (up to `fallback_max_ttl`).
    Memory,
    /// Nothing: reads miss (straight to the loader), writes are dropped. For a fleet whose reads
    /// must never show what another instance changed, at the price of loader calls during an
    /// outage.
    None,
}

/// Everything a [`Cache`](crate::Cache) or [`Store`](crate::store::Store) is built from.
///
/// ```
/// use std::time::Duration;
/// use speedlayer::config::Config;
///
/// let config = Config::memory().op_timeout(Duration::from_millis(50));
/// assert!(config.redis_config().is_none());
/// ```
#[derive(Clone)]
#[must_use]
pub struct Config {
    redis: Option<RedisConfig>,
    fallback: Fallback,
    op_timeout: Duration,
    failure_threshold: u32,
    cool_down: Duration,
    recovery_hold: Duration,
    memory_max_bytes: u64,
    fallback_max_ttl: Ttl,
    max_value_bytes: usize,
    log_interval: Duration,
    clock: Arc<dyn Clock>,
    namespace: Namespace,
    lease_ttl: Ttl,
    lease_wait: Duration,
    switched_off: Vec<crate::switch::Capability>,
    local_tier: Option<crate::tier::LocalTier>,
}

impl Config {
    fn base(redis: Option<RedisConfig>) -> Config {
        Config {
            redis,
            fallback: Fallback::Memory,
            op_timeout: DEFAULT_OP_TIMEOUT,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            cool_down: DEFAULT_COOL_DOWN,
            recovery_hold: DEFAULT_RECOVERY_HOLD,
            memory_max_bytes: DEFAULT_MEMORY_MAX_BYTES,
            fallback_max_ttl: DEFAULT_FALLBACK_MAX_TTL,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            log_interval: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
            namespace: Namespace::root(),
            lease_ttl: DEFAULT_LEASE_TTL,
            lease_wait: DEFAULT_LEASE_WAIT,
            switched_off: Vec::new(),
            local_tier: None,
        }
    }

    /// The in-memory backend.
    pub fn memory() -> Config {
        Config::base(None)
    }

    /// The Redis backend, with the memory fallback.
    pub fn redis(redis: RedisConfig) -> Config {
        Config::base(Some(redis))
    }

    /// Reads `REDIS_URL`, or `REDIS_HOST`/`REDIS_PORT`/`REDIS_PASSWORD`/`REDIS_DB`/
    /// `REDIS_USERNAME`. Neither set (or set to empty strings): the memory backend.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`], reading variables through `lookup` (for tests and for
    /// configuration systems other than the process environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut off = Vec::new();
        if let Some(list) = lookup("SPEEDLAYER_OFF") {
            for name in list.split(',').filter(|n| !n.trim().is_empty()) {
                off.push(crate::switch::Capability::parse(name)?);
            }
        }
        Ok(Config::backend_from_lookup(lookup)?.switched_off(&off))
    }

    fn backend_from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        // The sentinels' own credentials, whichever way Sentinel is selected.
        let sentinel_auth = |mut redis: RedisConfig| -> RedisConfig {
            if let Some(user) = get("REDIS_SENTINEL_USERNAME") {
                redis = redis.sentinel_username(user.trim());
            }
            if let Some(password) = lookup("REDIS_SENTINEL_PASSWORD").filter(|p| !p.is_empty()) {
                redis = redis.sentinel_password(Secret::new(password));
            }
            redis
        };
        if let Some(url) = get("REDIS_URL") {
            return Ok(Config::redis(sentinel_auth(RedisConfig::from_url(
                url.trim(),
            )?)));
        }
        let credentials = |mut redis: RedisConfig| -> Result<RedisConfig> {
            if let Some(user) = get("REDIS_USERNAME") {
                redis = redis.username(user);
            }
            if let Some(password) = lookup("REDIS_PASSWORD").filter(|p| !p.is_empty()) {
                redis = redis.password(Secret::new(password));
            }
            redis.validate()?;
            Ok(redis)
        };
        if let Some(nodes) = get("REDIS_CLUSTER_NODES") {
            if db_of(get("REDIS_DB"))? != 0 {
                return Err(Error::new(
                    ErrorKind::Config,
                    "REDIS_DB is set with REDIS_CLUSTER_NODES: a Redis Cluster has only database 0",
                ));
            }
            let nodes = parse_hosts(&nodes, 6379, "REDIS_CLUSTER_NODES")?;
            return Ok(Config::redis(credentials(RedisConfig::cluster(nodes)?)?));
        }
        if let Some(sentinels) = get("REDIS_SENTINELS") {
            let sentinels = parse_hosts(&sentinels, DEFAULT_SENTINEL_PORT, "REDIS_SENTINELS")?;
            let master = get("REDIS_SENTINEL_MASTER").ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is not: name the primary \
                     the sentinels monitor",
                )
            })?;
            let db = db_of(get("REDIS_DB"))?;
            return Ok(Config::redis(sentinel_auth(credentials(
                RedisConfig::sentinel(sentinels, master)?.db(db),
            )?)));
        }
        let Some(host) = get("REDIS_HOST") else {
            return Ok(Config::memory());
        };
        let host = host.trim().to_owned();
        if host.contains(['@', '/', ':', ' ', '\t', '?', '#']) {
            // Never echo it: a host with `@` often carries a password.
            return Err(Error::new(
                ErrorKind::Config,
                "REDIS_HOST must be a host name or IPv4 address only; put a full URL in REDIS_URL \
                 and a password in REDIS_PASSWORD",
            ));
        }
        let port = match get("REDIS_PORT") {
            Some(p) => p.trim().parse::<u16>().map_err(|_| {
                Error::new(
                    ErrorKind::Config,
                    format!("REDIS_PORT must be a port number (1-65535), not {p:?}"),
                )
            })?,
            None => 6379,
        };
        let db = db_of(get("REDIS_DB"))?;
        Ok(Config::redis(credentials(
            RedisConfig::from_host(host, port).db(db),
        )?))
    }

    /// The Redis configuration, if this config uses Redis.
    pub fn redis_config(&self) -> Option<&RedisConfig> {
        self.redis.as_ref()
    }

    /// Changes the Redis configuration (transport, connect timeout) in place.
    pub fn map_redis(mut self, f: impl FnOnce(RedisConfig) -> RedisConfig) -> Config {
        self.redis = self.redis.map(f);
        self
    }

    /// What serves while Redis is unusable (default [`Fallback::Memory`]).
    pub fn fallback(mut self, fallback: Fallback) -> Config {
        self.fallback = fallback;
        self
    }

    /// Longest wait for one Redis operation (default 100 ms). A zero duration is raised to 1 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Config {
        self.op_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Consecutive failures that open the breaker (default 5, at least 1).
    pub fn failure_threshold(mut self, failures: u32) -> Config {
        self.failure_threshold = failures.max(1);
        self
    }

    /// How long an open breaker skips Redis before probing it (default 1 s).
    pub fn cool_down(mut self, cool_down: Duration) -> Config {
        self.cool_down = cool_down;
        self
    }

    /// How long Redis must have answered again after an outage before calls use it (default
    /// 500 ms; `Duration::ZERO` turns the hold off).
    ///
    /// During an outage every instance of a fleet queues the invalidations it cannot deliver,
    /// and applies them as soon as Redis answers a `PING` (it tries every 100 ms at most). A
    /// Redis that comes back with its data (a restart with persistence, a healed partition, a
    /// thawed process) still holds the entries those invalidations are for, so an instance that
    /// read it at once could serve what another instance's write replaced. With the hold, the
    /// probe that finds Redis answering only checks it (`PING`); calls keep skipping Redis (the
    /// fallback or the loader answers) until the hold has passed, and then a second probe
    /// closes the breaker; deletes and invalidations go through during the hold. A call that
    /// fails on a lost connection (Redis restarted, the network failed) opens the breaker at
    /// once, without waiting for the failure threshold, because the instance cannot know what
    /// was written meanwhile; an instance that made no call during the outage learns of it from
    /// its first call after, which fails on the dropped connection. (A data connection set to
    /// RESP3 in the URL is reconnected by redis-rs without an error, so an idle instance on it
    /// gets no hold.)
    ///
    /// The hold is a bound in time: it assumes every instance's background replay gets to run
    /// within it. It covers instances that are alive; an instance that dies with queued
    /// invalidations loses them, which is what the [transactional outbox](crate::outbox) is for.
    pub fn recovery_hold(mut self, hold: Duration) -> Config {
        self.recovery_hold = hold;
        self
    }

    /// Byte budget of the memory backend or fallback (default 64 MiB).
    pub fn memory_max_bytes(mut self, bytes: u64) -> Config {
        self.memory_max_bytes = bytes;
        self
    }

    /// Longest TTL of an entry written to the memory fallback (default 60 s).
    pub fn fallback_max_ttl(mut self, ttl: Ttl) -> Config {
        self.fallback_max_ttl = ttl;
        self
    }

    /// Largest encoded value the typed cache stores (default 1 MiB). Larger values are refused
    /// by `set` and returned uncached by `get_or_set`.
    pub fn max_value_bytes(mut self, bytes: usize) -> Config {
        self.max_value_bytes = bytes;
        self
    }

    /// How often a run of identical failures is logged (default every 10 s, with a count of
    /// the ones not logged).
    pub fn log_interval(mut self, interval: Duration) -> Config {
        self.log_interval = interval;
        self
    }

    /// Caches built from this config keep an in-process tier in front of Redis (see
    /// [`tier`](crate::tier)); off by default. Ignored on the memory backend, which already is
    /// process memory.
    pub fn local_tier(mut self, tier: crate::tier::LocalTier) -> Config {
        self.local_tier = Some(tier);
        self
    }

    /// The deployment namespace (default [`Namespace::root`], no prefix). Invalidation events
    /// build their keys from it.
    pub fn namespace(mut self, namespace: Namespace) -> Config {
        self.namespace = namespace;
        self
    }

    /// How long a load holds its key's lease (default 10 s). A loader that runs longer still
    /// returns its value, but does not cache it.
    pub fn lease_ttl(mut self, ttl: Ttl) -> Config {
        self.lease_ttl = ttl;
        self
    }

    /// How long a load that finds another load's lease on its key (usually another process)
    /// waits for that load's value before it queries the database itself, without caching
    /// (default 50 ms). Longer waits protect a slow database better from a fleet-wide stampede;
    /// shorter ones bound the latency a request can gain behind another's load.
    pub fn lease_wait(mut self, wait: Duration) -> Config {
        self.lease_wait = wait;
        self
    }

    /// Capabilities switched off at start (see [`switch`](crate::switch); from the environment:
    /// `SPEEDLAYER_OFF`). Flip them at run time with [`Store::switches`](crate::store::Store::switches).
    pub fn switched_off(mut self, off: &[crate::switch::Capability]) -> Config {
        self.switched_off = off.to_vec();
        self
    }

    /// The clock of the breaker and log throttling (default [`SystemClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Config {
        self.clock = clock;
        self
    }

    pub(crate) fn get_fallback(&self) -> Fallback {
        self.fallback
    }
    pub(crate) fn get_op_timeout(&self) -> Duration {
        self.op_timeout
    }
    pub(crate) fn get_failure_threshold(&self) -> u32 {
        self.failure_threshold
    }
    pub(crate) fn get_cool_down(&self) -> Duration {
        self.cool_down
    }
    pub(crate) fn get_recovery_hold(&self) -> Duration {
        self.recovery_hold
    }
    pub(crate) fn get_memory_max_bytes(&self) -> u64 {
        self.memory_max_bytes
    }
    pub(crate) fn get_fallback_max_ttl(&self) -> Ttl {
        self.fallback_max_ttl
    }
    pub(crate) fn get_max_value_bytes(&self) -> usize {
        self.max_value_bytes
    }
    pub(crate) fn get_log_interval(&self) -> Duration {
        self.log_interval
    }
    pub(crate) fn get_clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }
    pub(crate) fn get_local_tier(&self) -> Option<&crate::tier::LocalTier> {
        self.local_tier.as_ref()
    }
    pub(crate) fn get_namespace(&self) -> &Namespace {
        &self.namespace
    }
    pub(crate) fn get_lease_ttl(&self) -> Ttl {
        self.lease_ttl
    }
    pub(crate) fn get_lease_wait(&self) -> Duration {
        self.lease_wait
    }

    pub(crate) fn get_switched_off(&self) -> &[crate::switch::Capability] {
        &self.switched_off
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("redis", &self.redis)
            .field("fallback", &self.fallback)
            .field("op_timeout", &self.op_timeout)
            .field("failure_threshold", &self.failure_threshold)
            .field("cool_down", &self.cool_down)
            .field("recovery_hold", &self.recovery_hold)
            .field("memory_max_bytes", &self.memory_max_bytes)
            .field("fallback_max_ttl", &self.fallback_max_ttl)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("namespace", &self.namespace)
            .field("lease_ttl", &self.lease_ttl)
            .field("lease_wait", &self.lease_wait)
            .field("switched_off", &self.switched_off)
            .field("local_tier", &self.local_tier)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_the_secret_in_both_spellings() {
        let config = RedisConfig::from_url("redis://:p%40ss@127.0.0.1:1/0").unwrap();
        assert_eq!(
            config.scrub("auth with p@ss failed; url had p%40ss"),
            "auth with *** failed; url had ***"
        );
        let short = RedisConfig::from_host("h", 1).password(Secret::new("x"));
        assert_eq!(short.scrub("axb"), "a***b");
    }

    #[test]
    fn scrub_removes_the_sentinels_password_even_when_it_holds_the_data_nodes() {
        let config = RedisConfig::from_url("redis+sentinel://:pw@127.0.0.1:26379/m")
            .unwrap()
            .sentinel_password(Secret::new("pw-sentinels"));
        assert_eq!(
            config.scrub("sentinel said pw-sentinels; node said pw"),
            "sentinel said ***; node said ***"
        );
        assert!(!format!("{config:?}").contains("pw-sentinels"));
    }

    #[test]
    fn urls_are_redacted() {
        let cases = [
            ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
            ("redis://user:pw@h", "redis://user:***@h"),
            ("rediss://u:p%40ss@h:6380", "rediss://u:***@h:6380"),
            ("redis://pw@h", "redis://***@h"),
            (
                "redis://h:6379/?pass=pw&protocol=resp3",
                "redis://h:6379/?pass=***&protocol=resp3",
            ),
            ("redis://h", "redis://h"),
            ("no url here pw", "<unparseable url>"),
            ("redis://:pa/ss?x#y@h:1", "redis://:***@h:1"),
            ("redis://u:a@b@h", "redis://u:***@h"),
            ("redis://:p%40ss@h", "redis://:***@h"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown);
        }
    }
}
