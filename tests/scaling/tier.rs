//! The in-process tier across a failover: a copy held in L1 must not outlive the write another
//! client makes on the promoted primary. A replica sends no invalidation messages for the
//! writes it replicates, so a channel left on the old primary would keep the copy for the
//! tier's whole TTL (a minute here).

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use speedlayer::config::{Config, RedisConfig};
use speedlayer::tier::{LocalTier, TierStats};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Key};

use crate::support;

const MINUTE: Ttl = Ttl::seconds(60);

/// A tiered cache on `config` whose channel is on, holding `1` under `key(id)` in L1.
async fn warm(config: RedisConfig, id: u64) -> (Cache, Key) {
    let config = Config::redis(config).local_tier(LocalTier::new().ttl(Duration::from_secs(60)));
    let cache = Cache::new(config).await.expect("a tiered cache");
    let k = support::key(id);
    cache.set(&k, &1u64, MINUTE).await.unwrap();
    assert_eq!(
        support::until_local(&cache, &k, Duration::from_secs(5)).await,
        1
    );
    (cache, k)
}

/// After another client wrote `2` under `key` on the promoted primary: reads until the cache
/// returns it (within `limit`), checks that `1` never comes back, that the channel was lost and
/// made again, and that L1 answers again. Returns how long the new value took to be read.
async fn follows(cache: &Cache, key: &Key, before: &TierStats, limit: Duration) -> Duration {
    let written = Instant::now();
    loop {
        let v = cache.get::<u64>(key).await;
        if v == Some(2) {
            break;
        }
        assert!(
            written.elapsed() < limit,
            "still {v:?} {limit:?} after the write on the new primary: {:?}",
            cache.tier_stats()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seen = written.elapsed();
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        assert_eq!(
            cache.get::<u64>(key).await,
            Some(2),
            "the old copy came back"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        support::until_local(cache, key, Duration::from_secs(10)).await,
        2,
        "L1 answers again, on the new topology"
    );
    let after = cache.tier_stats().unwrap();
    assert!(
        after.channel_losses > before.channel_losses
            && after.channel_starts > before.channel_starts,
        "the channel was made again: {before:?} -> {after:?}"
    );
    seen
}

/// A 3-primary/3-replica cluster whose primary of `key(id)` is struck by `fault` (given the
/// cluster, the primary and its replica) while a tiered cache holds the key in L1; another
/// client, which knows the new topology, then writes the key on the promoted replica, and the
/// cache must read it within `limit`.
async fn cluster_fault(
    name: &str,
    id: u64,
    limit: Duration,
    fault: impl FnOnce(&mut support::cluster::RedisCluster, usize, usize) + Send + 'static,
) {
    let cluster = tokio::task::spawn_blocking(|| support::cluster::RedisCluster::start(3, 1))
        .await
        .unwrap();
    let (cache, k) = warm(cluster.redis_config(), id).await;
    let primary = cluster.primary_of(k.as_str());
    let replica = cluster.replica_of(primary);
    let before = cache.tier_stats().unwrap();
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        fault(&mut cluster, primary, replica);
        crate::promoted(|| cluster.owner_of(support::key(id).as_str()) == Ok(replica));
        cluster
    })
    .await
    .unwrap();
    let mut other = cluster.raw().await;
    let _: () = other.set_ex(k.as_str(), "2", 60).await.unwrap();
    let seen = follows(&cache, &k, &before, limit).await;
    eprintln!(
        "{name}: a tiered cache read the new primary's write {} ms after it returned",
        seen.as_millis()
    );
}

/// `CLUSTER FAILOVER`: the old primary stays up as a replica and keeps the channel's connection
/// open; the channel must notice that it no longer takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiered_cache_follows_a_cluster_failover() {
    cluster_fault(
        "CLUSTER FAILOVER",
        1,
        Duration::from_secs(3),
        |cluster, _, replica| cluster.failover(replica),
    )
    .await;
}

/// A cluster primary killed with SIGKILL: its connection closes, L1 is emptied, and the channel
/// tracks the promoted replica once the cluster lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiered_cache_follows_a_killed_cluster_primary() {
    cluster_fault(
        "Cluster primary SIGKILL",
        2,
        Duration::from_secs(10),
        |cluster, primary, _| cluster.nodes()[primary].kill(),
    )
    .await;
}

/// The Sentinel-monitored primary killed with SIGKILL, or failed over with `SENTINEL
/// FAILOVER` (the old primary stays up as a replica): the channel follows the primary the
/// sentinels name.
async fn sentinel_fault(name: &str, id: u64, kill: bool) {
    let set = tokio::task::spawn_blocking(|| support::sentinel::RedisSentinel::start(2, 3))
        .await
        .unwrap();
    let (cache, k) = warm(set.redis_config(), id).await;
    let before_primary = set.primary();
    let before = cache.tier_stats().unwrap();
    let set = tokio::task::spawn_blocking(move || {
        let mut set = set;
        if kill {
            set.data[before_primary].kill();
        } else {
            set.failover();
        }
        crate::promoted(|| set.primary() != before_primary);
        set
    })
    .await
    .unwrap();
    let now = set.primary();
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", set.data[now].port()))
        .expect("a client");
    // The promoted replica may refuse writes for a moment (it is told it is a primary by the
    // sentinel that led the failover).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let written: redis::RedisResult<()> = async {
            let mut other = client.get_multiplexed_async_connection().await?;
            other.set_ex(k.as_str(), "2", 60).await
        }
        .await;
        match written {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the new primary took no write: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = follows(&cache, &k, &before, Duration::from_secs(10)).await;
    eprintln!(
        "{name}: a tiered cache read the new primary's write {} ms after it returned",
        seen.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiered_cache_follows_a_killed_sentinel_primary() {
    sentinel_fault("Sentinel primary SIGKILL", 3, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiered_cache_follows_a_sentinel_failover() {
    sentinel_fault("SENTINEL FAILOVER", 4, false).await;
}
