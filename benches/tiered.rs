//! Group `tiered`: the in-process tier. A hit in L1 against raw moka doing the same work (a get
//! plus the JSON decode), a read that misses L1 and hits Redis (then copies the value into L1)
//! against raw redis-rs doing a GET plus the decode, and the lag from one instance's
//! invalidation to another instance's eviction. `raw_redis_json_pttl` is raw redis-rs doing the
//! Redis work of an L2 hit (`GET` and `PTTL` in one pipeline, since a copy never outlives its
//! Redis entry) plus the decode: it splits the L2 hit's cost into that work and the tier's own.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use redis::AsyncCommands;
use speedlayer::Cache;
use speedlayer::config::Config;
use speedlayer::invalidation::{Invalidates, Targets};
use speedlayer::key::{KeyError, Namespace};
use speedlayer::tier::LocalTier;
use speedlayer::ttl::Ttl;

use crate::common::{Dashboard, dashboard, key, runtime};
use crate::support::RedisServer;

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &[
    "tiered/l1_hit",
    "tiered/raw_moka",
    "tiered/l2_hit",
    "tiered/raw_redis_json",
    "tiered/raw_redis_json_pttl",
    "tiered/invalidation_lag",
    "tiered/tracking_modes",
];

/// Keys the L2 benches cycle through: each is read again only long after its 1 ms L1 copy
/// expired.
const CYCLE: u64 = 2_000;

struct Changed(u64);

impl Invalidates for Changed {
    fn targets(&self, _: &Namespace, targets: &mut Targets) -> Result<(), KeyError> {
        targets.key(key(self.0));
        Ok(())
    }
}

async fn tiered_cache(server: &RedisServer, tier: LocalTier) -> Cache {
    let config = Config::redis(server.redis_config())
        .op_timeout(Duration::from_secs(2))
        .local_tier(tier);
    let cache = Cache::new(config).await.expect("cache");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cache.tier_stats().expect("a tier").trusted {
        assert!(
            Instant::now() < deadline,
            "the tier's channel did not come up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cache
}

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    let rt = runtime();
    let value = dashboard(456);
    let json = Bytes::from(serde_json::to_vec(&value).unwrap());
    let k = key(456);

    let l1 = rt.block_on(tiered_cache(server, LocalTier::new()));
    rt.block_on(l1.set(&k, &value, Ttl::seconds(3600))).unwrap();
    // The write's own message may drop the first copy: read until L1 answers.
    rt.block_on(async {
        while !matches!(
            l1.get_served::<Dashboard>(&k).await,
            Some((_, speedlayer::Served::Local))
        ) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let moka = rt.block_on(crate::common::raw_moka_holding(&k, json.clone()));

    let l2 = rt.block_on(tiered_cache(
        server,
        LocalTier::new().ttl(Duration::from_millis(1)),
    ));
    let keys: Vec<_> = (0..CYCLE).map(|i| key(10_000 + i)).collect();
    rt.block_on(async {
        for k in &keys {
            l2.set(k, &value, Ttl::seconds(3600)).await.unwrap();
        }
    });
    let raw = rt
        .block_on(redis::aio::ConnectionManager::new(server.client()))
        .expect("raw connection manager");

    let mut group = c.benchmark_group("tiered");
    group.sample_size(100);
    group.measurement_time(Duration::from_secs(6));
    group.bench_function("l1_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let v: Option<Dashboard> = l1.get(&k).await;
            v.expect("hit")
        })
    });
    group.bench_function("raw_moka", |b| {
        b.to_async(&rt).iter(|| async {
            let bytes = moka.get(k.as_str()).await.expect("hit");
            serde_json::from_slice::<Dashboard>(&bytes).expect("decodes")
        })
    });
    let next = std::cell::Cell::new(0usize);
    let pick = || {
        let i = next.get();
        next.set((i + 1) % keys.len());
        &keys[i]
    };
    group.bench_function("l2_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let v: Option<Dashboard> = l2.get(pick()).await;
            v.expect("hit")
        })
    });
    group.bench_function("raw_redis_json", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = raw.clone();
            let bytes: Vec<u8> = conn.get(pick().as_str()).await.expect("GET");
            serde_json::from_slice::<Dashboard>(&bytes).expect("decodes")
        })
    });
    group.bench_function("raw_redis_json_pttl", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = raw.clone();
            raw_get_pttl(&mut conn, pick()).await
        })
    });
    group.finish();

    crate::report::paired_if_selected(
        ("tiered/l1_hit", "tiered/raw_moka"),
        "time",
        "<= 1.5",
        || {
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..20_000 {
                    assert!(l1.get::<Dashboard>(&k).await.is_some());
                }
            });
            started.elapsed()
        },
        || {
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..20_000 {
                    let bytes = moka.get(k.as_str()).await.expect("hit");
                    serde_json::from_slice::<Dashboard>(&bytes).expect("decodes");
                }
            });
            started.elapsed()
        },
    );
    let raw_read = || {
        let started = Instant::now();
        rt.block_on(async {
            for _ in 0..2_000 {
                let mut conn = raw.clone();
                let bytes: Vec<u8> = conn.get(pick().as_str()).await.expect("GET");
                serde_json::from_slice::<Dashboard>(&bytes).expect("decodes");
            }
        });
        started.elapsed()
    };
    let tiered_read = || {
        let started = Instant::now();
        rt.block_on(async {
            for _ in 0..2_000 {
                assert!(l2.get::<Dashboard>(pick()).await.is_some());
            }
        });
        started.elapsed()
    };
    crate::report::paired_if_selected(
        ("tiered/l2_hit", "tiered/raw_redis_json"),
        "time",
        "<= 1.10",
        tiered_read,
        raw_read,
    );
    // The noise floor of the pair above: the raw read against itself, measured the same way.
    if crate::any_selected(&["tiered/l2_hit", "tiered/raw_redis_json"]) {
        let ratio = crate::report::paired(21, raw_read, raw_read);
        crate::report::remember_paired(
            "tiered/raw_redis_json vs itself (the pair's noise floor)",
            "time",
            "~1.00",
            ratio,
        );
    }
    // The L2 hit's cost split in two: the Redis work it needs, and the tier's own.
    let raw_read_pttl = || {
        let started = Instant::now();
        rt.block_on(async {
            for _ in 0..2_000 {
                let mut conn = raw.clone();
                raw_get_pttl(&mut conn, pick()).await;
            }
        });
        started.elapsed()
    };
    crate::report::paired_if_selected(
        ("tiered/raw_redis_json_pttl", "tiered/raw_redis_json"),
        "time",
        "(the Redis work of a copy's expiry)",
        raw_read_pttl,
        raw_read,
    );
    crate::report::paired_if_selected(
        ("tiered/l2_hit", "tiered/raw_redis_json_pttl"),
        "time",
        "(the tier's own work)",
        tiered_read,
        raw_read_pttl,
    );
    let l1_stats = l1.tier_stats().expect("a tier");
    let l2_stats = l2.tier_stats().expect("a tier");
    let line = format!(
        "tiered: l1_hit cache answered {} reads from L1; l2_hit cache copied {} values into L1 \
         and answered {} reads from it",
        l1_stats.local_hits, l2_stats.fills, l2_stats.local_hits
    );
    println!("{line}");
    crate::report::remember(line);

    if crate::selected("tiered/invalidation_lag") {
        invalidation_lag(&rt, server);
    }
    if crate::selected("tiered/tracking_modes") {
        tracking_modes(&rt, server);
    }
}

/// What an L2 hit asks of Redis, done with raw redis-rs: `GET` and `PTTL` in one pipeline, then
/// the decode.
async fn raw_get_pttl(conn: &mut redis::aio::ConnectionManager, k: &speedlayer::Key) -> Dashboard {
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(k.as_str()).cmd("PTTL").arg(k.as_str());
    let (bytes, _left): (Vec<u8>, i64) = pipe.query_async(conn).await.expect("GET and PTTL");
    serde_json::from_slice::<Dashboard>(&bytes).expect("decodes")
}

/// The two ways Redis can tell a client which keys changed, measured with raw redis-rs RESP3
/// connections: `BCAST PREFIX` (what the tier uses: a message for every write under the prefix,
/// whoever wrote it, with reads on any connection) against `OPTIN` (a message only for keys this
/// connection read after `CLIENT CACHING YES`, once per read). 10,000 keys under one prefix; the
/// instance holds 100 of them; another client writes 10,000 times at random. Counted: messages
/// each receives, and the time of a read as each mode must do it (`GET` + `PTTL` on the data
/// connection, or `CLIENT CACHING YES` + `GET` + `PTTL` on the tracking connection).
fn tracking_modes(rt: &tokio::runtime::Runtime, server: &RedisServer) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const KEYS: u64 = 10_000;
    const HELD: u64 = 100;
    const WRITES: u64 = 10_000;
    let lines = rt.block_on(async {
        let info = server
            .client()
            .get_connection_info()
            .clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings)).unwrap();
        let connect = |counter: Arc<AtomicU64>| {
            let client = client.clone();
            async move {
                let config = redis::AsyncConnectionConfig::new().set_push_sender(
                    move |info: redis::PushInfo| -> Result<(), ()> {
                        if info.kind == redis::PushKind::Invalidate
                            && let Some(redis::Value::Array(keys)) = info.data.first()
                        {
                            counter.fetch_add(keys.len() as u64, Ordering::Relaxed);
                        }
                        Ok(())
                    },
                );
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .unwrap()
            }
        };
        let (bcast_seen, optin_seen) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut bcast = connect(bcast_seen.clone()).await;
        let mut optin = connect(optin_seen.clone()).await;
        let mut writer = redis::aio::ConnectionManager::new(server.client()).await.unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg(&["TRACKING", "ON", "BCAST", "PREFIX", "tm:"][..])
            .query_async(&mut bcast)
            .await
            .unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg(&["TRACKING", "ON", "OPTIN"][..])
            .query_async(&mut optin)
            .await
            .unwrap();
        for i in 0..KEYS {
            let _: () = writer.set_ex(format!("tm:{i}"), "1", 3600).await.unwrap();
        }
        let optin_read = |conn: &mut redis::aio::MultiplexedConnection, k: String| {
            let mut pipe = redis::pipe();
            pipe.cmd("CLIENT").arg("CACHING").arg("YES").ignore();
            pipe.cmd("GET").arg(&k).cmd("PTTL").arg(&k);
            let mut conn = conn.clone();
            async move {
                let _: (Option<String>, i64) = pipe.query_async(&mut conn).await.unwrap();
            }
        };
        for i in 0..HELD {
            optin_read(&mut optin, format!("tm:{i}")).await;
        }
        bcast_seen.store(0, Ordering::Relaxed);
        optin_seen.store(0, Ordering::Relaxed);
        let mut rereads = 0;
        for n in 0..WRITES {
            let i = (n * 7_919) % KEYS;
            let _: () = writer.set_ex(format!("tm:{i}"), "2", 3600).await.unwrap();
            // The instance reads a held key again after its copy was dropped.
            if i < HELD {
                optin_read(&mut optin, format!("tm:{i}")).await;
                rereads += 1;
            }
        }
        let _: () = redis::cmd("PING").query_async(&mut bcast).await.unwrap();
        let _: () = redis::cmd("PING").query_async(&mut optin).await.unwrap();
        // Read cost of each mode, 2,000 reads each, alternating.
        let (mut plain, mut opted) = (Duration::ZERO, Duration::ZERO);
        let mut data = redis::aio::ConnectionManager::new(server.client()).await.unwrap();
        for round in 0..2_000u64 {
            let k = format!("tm:{}", round % KEYS);
            let t = Instant::now();
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(&k).cmd("PTTL").arg(&k);
            let _: (Option<String>, i64) = pipe.query_async(&mut data).await.unwrap();
            plain += t.elapsed();
            let t = Instant::now();
            optin_read(&mut optin, k).await;
            opted += t.elapsed();
        }
        vec![
            format!(
                "tiered/tracking_modes: {WRITES} writes over {KEYS} keys by another client, an \
                 instance holding {HELD}: BCAST delivered {} invalidations, OPTIN {} (after {rereads} re-reads)",
                bcast_seen.load(Ordering::Relaxed),
                optin_seen.load(Ordering::Relaxed)
            ),
            format!(
                "tiered/tracking_modes: mean read, GET+PTTL on the data connection (BCAST) {:?}, \
                 CLIENT CACHING YES+GET+PTTL on the tracking connection (OPTIN) {:?}",
                plain / 2_000,
                opted / 2_000
            ),
        ]
    });
    for line in lines {
        println!("{line}");
        crate::report::remember(line);
    }
}

/// One instance invalidates a key that another holds in L1; the time until the other has
/// evicted it, from the start of the call and from its return (0 when the eviction came first).
fn invalidation_lag(rt: &tokio::runtime::Runtime, server: &RedisServer) {
    const N: usize = 2_000;
    let (writer, reader) = rt.block_on(async {
        (
            tiered_cache(server, LocalTier::new()).await,
            tiered_cache(server, LocalTier::new()).await,
        )
    });
    let (from_call, from_return) = rt.block_on(async {
        let mut from_call = Vec::with_capacity(N);
        let mut from_return = Vec::with_capacity(N);
        for i in 0..N as u64 {
            let id = 50_000 + i;
            let k = key(id);
            writer.set(&k, &i, Ttl::seconds(60)).await.unwrap();
            while !matches!(
                reader.get_served::<u64>(&k).await,
                Some((_, speedlayer::Served::Local))
            ) {
                tokio::task::yield_now().await;
            }
            let before = reader.tier_stats().unwrap().evicted_by_message;
            let called = Instant::now();
            writer.invalidate(&Changed(id)).await.unwrap();
            let returned = Instant::now();
            let deadline = returned + Duration::from_secs(2);
            while reader.tier_stats().unwrap().evicted_by_message == before {
                assert!(Instant::now() < deadline, "the eviction never came");
                tokio::task::yield_now().await;
            }
            let evicted = Instant::now();
            from_call.push(evicted - called);
            from_return.push(evicted.saturating_duration_since(returned));
        }
        (from_call, from_return)
    });
    for (what, mut samples) in [
        ("from the invalidate call", from_call),
        ("after it returned", from_return),
    ] {
        samples.sort();
        let at = |p: f64| samples[((N - 1) as f64 * p) as usize];
        let line = format!(
            "tiered/invalidation_lag over {N} invalidations, {what}: p50 {:?}, p99 {:?}, max {:?} \
             (target p99 <= 5 ms)",
            at(0.5),
            at(0.99),
            samples[N - 1]
        );
        println!("{line}");
        crate::report::remember(line);
    }
}
