//! Group `coordination`: locks, idempotency records and counters on Redis, each against the raw
//! thing over the same kind of connection: the lock's own scripts sent raw, a raw `GET` (one
//! round trip, to express the idempotency layer's cost in round trips), and for a counter update
//! (marked before the database write, added after it) a raw `INCRBY` plus `PEXPIRE` in one
//! pipeline, and the same two round trips as the update sent raw (`ZADD` + `PEXPIRE` of the
//! mark, then `ZREM` + `INCRBY` + `PEXPIRE`).

use std::time::{Duration, Instant};

use criterion::Criterion;
use speedlayer::config::Transport;
use speedlayer::counter::Counters;
use speedlayer::idempotency::{Begin, Fingerprint, Idempotency, IdempotencyKey, StoredResponse};
use speedlayer::key::{Ident, Namespace};
use speedlayer::lock::{Locks, script as lock_script};
use speedlayer::ttl::Ttl;

use crate::common::{redis_cache, runtime};
use crate::support::RedisServer;

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &[
    "coordination/lock/redis/acquire_release",
    "coordination/lock/redis/raw",
    "coordination/idempotency/redis/first_request",
    "coordination/idempotency/redis/replay",
    "coordination/idempotency/redis/raw_get",
    "coordination/counter/redis/incr",
    "coordination/counter/redis/raw_incr",
    "coordination/counter/redis/raw_begin_incr",
];

const LEASE: Ttl = Ttl::seconds(10);
const DAY: Ttl = Ttl::hours(24);
const PAYMENTS: Ident = Ident::from_static("payments");

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    let rt = runtime();
    let cache = rt.block_on(redis_cache(server, Transport::Multiplexed));
    let raw = rt
        .block_on(redis::aio::ConnectionManager::new(server.client()))
        .expect("raw connection manager");
    let locks = Locks::new(&cache);
    let lock = locks.name(&Ident::from_static("bench"), 1).unwrap();
    let raw_lock = "bench:rawlock:1".to_owned();
    let raw_fence = format!("{{{raw_lock}}}:~fence");
    let acquire = redis::Script::new(lock_script::ACQUIRE_SCRIPT);
    let release = redis::Script::new(lock_script::RELEASE_SCRIPT);

    let idem = Idempotency::new(&cache);
    let fingerprint = Fingerprint::of("POST", "/api/payments", b"{\"amount\":100}");
    let replay_key = IdempotencyKey::parse("bench-replay").unwrap();
    rt.block_on(async {
        if let Begin::Run(p) = idem
            .begin(&PAYMENTS, "bench", &replay_key, &fingerprint)
            .await
            .unwrap()
        {
            p.complete(&StoredResponse::new(201, "{\"payment\":1}"))
                .await
                .unwrap();
        }
    });

    let counters = Counters::new(&cache);
    let counter = Namespace::root()
        .global()
        .key(
            &Ident::from_static("notifications"),
            &Ident::from_static("count"),
            1,
        )
        .unwrap();
    rt.block_on(async {
        counters
            .get(&counter, DAY, || async { Ok::<_, std::io::Error>(0) })
            .await
            .unwrap();
    });

    let lock_ours = || async {
        let guard = locks
            .acquire(&lock, LEASE)
            .await
            .guard()
            .expect("free lock");
        assert!(guard.release().await.expect("released"));
    };
    let lock_raw = || {
        let mut conn = raw.clone();
        let (acquire, release, raw_lock, raw_fence) = (&acquire, &release, &raw_lock, &raw_fence);
        async move {
            let (granted, token): (i64, String) = acquire
                .key(raw_lock)
                .key(raw_fence)
                .arg(LEASE.as_millis())
                .arg(Ttl::MAX.as_millis())
                .invoke_async(&mut conn)
                .await
                .expect("acquire");
            assert_eq!(granted, 1);
            let released: i64 = release
                .key(raw_lock)
                .arg(token)
                .invoke_async(&mut conn)
                .await
                .expect("release");
            assert_eq!(released, 1);
        }
    };
    let mut first = 0u64;
    let idem_first = |n: u64| {
        let (idem, fingerprint) = (&idem, &fingerprint);
        async move {
            let key = IdempotencyKey::parse(&format!("bench-first-{n}")).unwrap();
            match idem
                .begin(&PAYMENTS, "bench", &key, fingerprint)
                .await
                .unwrap()
            {
                Begin::Run(p) => {
                    p.complete(&StoredResponse::new(201, "{\"payment\":1}"))
                        .await
                        .unwrap();
                }
                other => panic!("{other:?}"),
            }
        }
    };
    let idem_replay = || async {
        assert!(matches!(
            idem.begin(&PAYMENTS, "bench", &replay_key, &fingerprint)
                .await
                .unwrap(),
            Begin::Replay(_)
        ));
    };
    let raw_get = || {
        let mut conn = raw.clone();
        async move {
            let _: Option<String> = redis::cmd("GET")
                .arg("bench:absent")
                .query_async(&mut conn)
                .await
                .expect("GET");
        }
    };
    let counter_ours = || async {
        let update = counters.begin(&counter).await;
        assert!(update.increment(DAY).await.value().is_some());
    };
    let counter_raw = || {
        let mut conn = raw.clone();
        async move {
            let (n,): (i64,) = redis::pipe()
                .cmd("INCRBY")
                .arg("bench:rawcount:1")
                .arg(1)
                .cmd("PEXPIRE")
                .arg("bench:rawcount:1")
                .arg(DAY.as_millis())
                .ignore()
                .query_async(&mut conn)
                .await
                .expect("INCRBY");
            assert!(n > 0);
        }
    };

    let counter_raw_two = || {
        let mut conn = raw.clone();
        async move {
            let token = rand::random::<u64>();
            let deadline = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis()
                + 30_000;
            let () = redis::pipe()
                .cmd("ZADD")
                .arg("{bench:rawcount:2}:~writes")
                .arg(deadline as u64)
                .arg(token)
                .ignore()
                .cmd("PEXPIRE")
                .arg("{bench:rawcount:2}:~writes")
                .arg(30_000)
                .ignore()
                .query_async(&mut conn)
                .await
                .expect("ZADD");
            let (n,): (i64,) = redis::pipe()
                .cmd("ZREM")
                .arg("{bench:rawcount:2}:~writes")
                .arg(token)
                .ignore()
                .cmd("INCRBY")
                .arg("bench:rawcount:2")
                .arg(1)
                .cmd("PEXPIRE")
                .arg("bench:rawcount:2")
                .arg(DAY.as_millis())
                .ignore()
                .query_async(&mut conn)
                .await
                .expect("INCRBY");
            assert!(n > 0);
        }
    };

    let mut group = c.benchmark_group("coordination");
    group.bench_function("lock/redis/acquire_release", |b| {
        b.to_async(&rt).iter(lock_ours)
    });
    group.bench_function("lock/redis/raw", |b| b.to_async(&rt).iter(lock_raw));
    group.bench_function("idempotency/redis/first_request", |b| {
        b.to_async(&rt).iter(|| {
            first += 1;
            idem_first(first)
        })
    });
    group.bench_function("idempotency/redis/replay", |b| {
        b.to_async(&rt).iter(idem_replay)
    });
    group.bench_function("idempotency/redis/raw_get", |b| {
        b.to_async(&rt).iter(raw_get)
    });
    group.bench_function("counter/redis/incr", |b| b.to_async(&rt).iter(counter_ours));
    group.bench_function("counter/redis/raw_incr", |b| {
        b.to_async(&rt).iter(counter_raw)
    });
    group.bench_function("counter/redis/raw_begin_incr", |b| {
        b.to_async(&rt).iter(counter_raw_two)
    });
    group.finish();

    // Paired rounds: 300 operations a side, alternating, 21 times.
    crate::report::paired_if_selected(
        (
            "coordination/lock/redis/acquire_release",
            "coordination/lock/redis/raw",
        ),
        "time",
        "<= 1.15",
        || timed(&rt, &lock_ours),
        || timed(&rt, &lock_raw),
    );
    crate::report::paired_if_selected(
        (
            "coordination/counter/redis/incr",
            "coordination/counter/redis/raw_incr",
        ),
        "time",
        "reported (an update is 2 round trips)",
        || timed(&rt, &counter_ours),
        || timed(&rt, &counter_raw),
    );
    crate::report::paired_if_selected(
        (
            "coordination/counter/redis/incr",
            "coordination/counter/redis/raw_begin_incr",
        ),
        "time",
        "<= 1.10",
        || timed(&rt, &counter_ours),
        || timed(&rt, &counter_raw_two),
    );
    let next = std::cell::Cell::new(1_000_000u64);
    let idem_next = || {
        next.set(next.get() + 1);
        idem_first(next.get())
    };
    crate::report::paired_if_selected(
        (
            "coordination/idempotency/redis/first_request",
            "coordination/idempotency/redis/raw_get",
        ),
        "round trips",
        "reported (begin and complete: 2)",
        || timed(&rt, &idem_next),
        || timed(&rt, &raw_get),
    );
    crate::report::paired_if_selected(
        (
            "coordination/idempotency/redis/replay",
            "coordination/idempotency/redis/raw_get",
        ),
        "round trips",
        "reported (begin: 1)",
        || timed(&rt, &idem_replay),
        || timed(&rt, &raw_get),
    );
}

/// 300 runs of `f`, one after the other.
fn timed<F, Fut>(rt: &tokio::runtime::Runtime, f: &F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    rt.block_on(async {
        for _ in 0..300 {
            f().await;
        }
    });
    started.elapsed()
}
