//! Test support: a real `redis-server` per test, a fault-injecting TCP proxy, and helpers.
//!
//! Tests that need Redis fail loudly when the binary is missing; they never skip. Set
//! `SPEEDLAYER_REDIS_SERVER` to use a binary other than the `redis-server` on `PATH`.

#![allow(dead_code)]

#[cfg(feature = "cluster")]
pub mod cluster;
pub mod fleet;
pub mod postgres;
pub mod proxy;
#[cfg(feature = "sentinel")]
pub mod sentinel;
pub mod server;
pub mod timing;

#[allow(unused_imports)]
pub use proxy::{Mode, Proxy};
pub use server::RedisServer;

use std::sync::Arc;

use speedlayer::config::{Config, RedisConfig};
use speedlayer::key::{Ident, Key, Namespace};
use speedlayer::store::CacheLayer;
use speedlayer::store::MemoryLayer;

/// A `NonZeroU32` from a literal the test knows is not zero.
pub fn nz(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).expect("non-zero")
}

/// One module `$name` of `#[tokio::test]`s, each calling the invoking module's `async
/// fn(Backend)` of the same name with the backend `$backend` builds.
#[allow(unused_macros)]
macro_rules! backend_module {
    ($name:ident, $backend:expr, $($test:ident),*) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($backend).await;
                }
            )*
        }
    };
}

/// Runs each named `async fn(Backend)` of the invoking module on every Redis backend: one
/// server, a local Redis Cluster (feature `cluster`) and a primary found through Sentinel
/// (feature `sentinel`). For what only Redis has: other clients' data under our keys.
#[allow(unused_macros)]
macro_rules! redis_backends {
    ($($test:ident),* $(,)?) => {
        backend_module!(redis, crate::support::Backend::redis().await, $($test),*);
        #[cfg(feature = "cluster")]
        backend_module!(cluster, crate::support::Backend::cluster().await, $($test),*);
        #[cfg(feature = "sentinel")]
        backend_module!(sentinel, crate::support::Backend::sentinel().await, $($test),*);
    };
}

/// Runs each named `async fn(Backend)` of the invoking module on memory, on a real Redis, on a
/// local Redis Cluster (feature `cluster`) and on a primary found through Sentinel (feature
/// `sentinel`).
#[allow(unused_macros)]
macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        backend_module!(memory, crate::support::Backend::memory(), $($test),*);
        backend_module!(redis, crate::support::Backend::redis().await, $($test),*);
        #[cfg(feature = "cluster")]
        backend_module!(cluster, crate::support::Backend::cluster().await, $($test),*);
        #[cfg(feature = "sentinel")]
        backend_module!(sentinel, crate::support::Backend::sentinel().await, $($test),*);
    };
}

pub const TEST: Ident = Ident::from_static("test");
pub const ITEM: Ident = Ident::from_static("item");

/// A key in a fresh keyspace: `test:item:<id>`.
pub fn key(id: impl std::fmt::Display) -> Key {
    Namespace::root()
        .global()
        .key(&TEST, &ITEM, id)
        .expect("test ids are valid")
}

/// Which backend a behaviour test runs on. The Redis variants own their server.
pub enum Backend {
    Memory(Arc<MemoryLayer>),
    Redis {
        layer: Arc<dyn CacheLayer>,
        server: RedisServer,
    },
    /// A local Redis Cluster of three primaries (no replicas: the behaviour suites are about
    /// routing; the failover tests start their own with replicas).
    #[cfg(feature = "cluster")]
    Cluster {
        layer: Arc<dyn CacheLayer>,
        cluster: cluster::RedisCluster,
    },
    /// A primary with a replica, found through three sentinels.
    #[cfg(feature = "sentinel")]
    Sentinel {
        layer: Arc<dyn CacheLayer>,
        set: sentinel::RedisSentinel,
    },
}

/// A raw redis-rs connection to a test backend's Redis (one server, or the cluster), for
/// assertions made beside the library and for another client's writes.
pub enum Raw {
    Single(redis::aio::MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Raw {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Raw::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Raw::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Raw::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Raw::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Raw::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Raw::Cluster(c) => c.get_db(),
        }
    }
}

impl Backend {
    pub fn memory() -> Backend {
        Backend::Memory(Arc::new(MemoryLayer::new(16 * 1024 * 1024)))
    }

    pub async fn redis() -> Backend {
        let server = RedisServer::start();
        let layer = speedlayer::store::redis::RedisLayer::connect(&server.redis_config())
            .await
            .expect("valid config");
        Backend::Redis {
            layer: Arc::new(layer),
            server,
        }
    }

    pub async fn redis_pooled() -> Backend {
        let server = RedisServer::start();
        let config = server
            .redis_config()
            .transport(speedlayer::config::Transport::Pooled { size: 4 });
        let layer = speedlayer::store::redis::RedisLayer::connect(&config)
            .await
            .expect("valid config");
        Backend::Redis {
            layer: Arc::new(layer),
            server,
        }
    }

    /// A local cluster of three primaries.
    #[cfg(feature = "cluster")]
    pub async fn cluster() -> Backend {
        let cluster = tokio::task::spawn_blocking(|| cluster::RedisCluster::start(3, 0))
            .await
            .expect("the cluster starts");
        let layer = speedlayer::store::redis::RedisLayer::connect(&cluster.redis_config())
            .await
            .expect("valid config");
        Backend::Cluster {
            layer: Arc::new(layer),
            cluster,
        }
    }

    /// A primary with one replica and three sentinels.
    #[cfg(feature = "sentinel")]
    pub async fn sentinel() -> Backend {
        let set = tokio::task::spawn_blocking(|| sentinel::RedisSentinel::start(1, 3))
            .await
            .expect("the Sentinel set-up starts");
        let layer = speedlayer::store::redis::RedisLayer::connect(&set.redis_config())
            .await
            .expect("valid config");
        Backend::Sentinel {
            layer: Arc::new(layer),
            set,
        }
    }

    pub fn layer(&self) -> Arc<dyn CacheLayer> {
        match self {
            Backend::Memory(m) => m.clone(),
            Backend::Redis { layer, .. } => layer.clone(),
            #[cfg(feature = "cluster")]
            Backend::Cluster { layer, .. } => layer.clone(),
            #[cfg(feature = "sentinel")]
            Backend::Sentinel { layer, .. } => layer.clone(),
        }
    }

    /// The single Redis server, if the backend is one.
    pub fn server(&self) -> Option<&RedisServer> {
        match self {
            Backend::Redis { server, .. } => Some(server),
            _ => None,
        }
    }

    /// True for the backends on Redis (one server or a cluster).
    pub fn is_redis(&self) -> bool {
        !matches!(self, Backend::Memory(_))
    }

    /// A raw connection to the backend's Redis; `None` on memory.
    pub async fn raw(&self) -> Option<Raw> {
        match self {
            Backend::Memory(_) => None,
            Backend::Redis { server, .. } => Some(Raw::Single(server.raw().await)),
            #[cfg(feature = "cluster")]
            Backend::Cluster { cluster, .. } => Some(Raw::Cluster(cluster.raw().await)),
            #[cfg(feature = "sentinel")]
            Backend::Sentinel { set, .. } => Some(Raw::Single(set.data[set.primary()].raw().await)),
        }
    }

    /// The `redis-cli` arguments that reach the backend's Redis (`-c` follows a cluster's
    /// redirections); `None` on memory.
    pub fn cli_args(&self) -> Option<Vec<String>> {
        match self {
            Backend::Memory(_) => None,
            Backend::Redis { server, .. } => Some(vec!["-p".into(), server.port().to_string()]),
            #[cfg(feature = "cluster")]
            Backend::Cluster { cluster, .. } => {
                Some(vec!["-c".into(), "-p".into(), cluster.port(0).to_string()])
            }
            #[cfg(feature = "sentinel")]
            Backend::Sentinel { set, .. } => Some(vec![
                "-p".into(),
                set.data[set.primary()].port().to_string(),
            ]),
        }
    }

    /// Kills (`CLIENT KILL`) the in-process tier's tracking connections that carry `key`'s
    /// invalidations: on the server, the cluster node owning it, or the primary the sentinels
    /// name; `expected` of them must be there (one per tiered instance).
    pub fn kill_tier_channels_of(&self, key: &str, expected: usize) {
        match self {
            Backend::Memory(_) => panic!("no tier channel on memory"),
            Backend::Redis { server, .. } => server.kill_tier_channels(expected),
            #[cfg(feature = "cluster")]
            Backend::Cluster { cluster, .. } => cluster
                .node(cluster.primary_of(key))
                .kill_tier_channels(expected),
            #[cfg(feature = "sentinel")]
            Backend::Sentinel { set, .. } => set.data[set.primary()].kill_tier_channels(expected),
        }
    }

    /// The URL of the backend's Redis, for processes started beside the test; `None` on
    /// memory.
    pub fn url(&self) -> Option<String> {
        match self {
            Backend::Memory(_) => None,
            Backend::Redis { server, .. } => Some(server.url()),
            #[cfg(feature = "cluster")]
            Backend::Cluster { cluster, .. } => Some(cluster.url()),
            #[cfg(feature = "sentinel")]
            Backend::Sentinel { set, .. } => Some(set.url()),
        }
    }

    /// The Redis configuration of the backend; `None` on memory.
    pub fn redis_config(&self) -> Option<RedisConfig> {
        match self {
            Backend::Memory(_) => None,
            Backend::Redis { server, .. } => Some(server.redis_config()),
            #[cfg(feature = "cluster")]
            Backend::Cluster { cluster, .. } => Some(cluster.redis_config()),
            #[cfg(feature = "sentinel")]
            Backend::Sentinel { set, .. } => Some(set.redis_config()),
        }
    }

    /// A cache config for this backend (memory, or Redis at this backend's server). Behaviour
    /// tests get a 2 s operation timeout: on a busy shared machine a loopback call can take more
    /// than the 100 ms default, and these tests are about behaviour, not about outages (the
    /// fault tests set their own timeouts).
    pub fn config(&self) -> Config {
        match self.redis_config() {
            None => Config::memory(),
            Some(redis) => Config::redis(redis).op_timeout(std::time::Duration::from_secs(2)),
        }
    }
}

/// A cache on `server` that gives up on an operation after 100 ms and opens its breaker at the
/// first failure: for the tests of what each capability does while Redis is unusable.
#[allow(dead_code)]
pub async fn fragile_cache(server: &RedisServer) -> speedlayer::Cache {
    speedlayer::Cache::new(
        Config::redis(server.redis_config())
            .op_timeout(std::time::Duration::from_millis(100))
            .failure_threshold(1),
    )
    .await
    .expect("a cache on the test server")
}

/// Another client's data did no harm: the breaker is closed, nothing counted as a failure or a
/// timeout, and an unrelated key still works.
#[allow(dead_code)]
pub async fn assert_healthy(cache: &speedlayer::Cache) {
    let stats = cache.stats();
    assert_eq!(
        stats.breaker,
        speedlayer::store::BreakerState::Closed,
        "{stats:?}"
    );
    assert_eq!((stats.errors, stats.timeouts), (0, 0), "{stats:?}");
    let unrelated = key("unrelated");
    cache
        .set(&unrelated, &1u32, speedlayer::ttl::Ttl::seconds(60))
        .await
        .expect("an unrelated key is written");
    assert_eq!(cache.get::<u32>(&unrelated).await, Some(1));
}

/// The value of the series `name` (with its labels, as rendered) in a Prometheus text scrape;
/// 0 when absent.
pub fn prometheus_series(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Redis config pointing at `port` on loopback.
pub fn redis_config_at(port: u16) -> RedisConfig {
    RedisConfig::from_url(&format!("redis://127.0.0.1:{port}/0")).expect("valid url")
}

/// Installs a tracing subscriber writing to the test's captured output (once per process).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "speedlayer=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Reads `key` (a `u64`) through `cache` until its in-process tier answers, within `limit`: the
/// message of the write that stored it may come after the first read copied it, and drop that
/// copy. Returns the value.
#[allow(dead_code)]
pub async fn until_local(cache: &speedlayer::Cache, key: &Key, limit: std::time::Duration) -> u64 {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match cache.get_served::<u64>(key).await {
            Some((v, speedlayer::Served::Local)) => return v,
            other => assert!(
                std::time::Instant::now() < deadline,
                "L1 never answered: {other:?}, {:?}",
                cache.tier_stats()
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
