//! Fault tests against a real redis-server: frozen (SIGSTOP), killed and restarted, slowed by a
//! delaying proxy, cut, and down from the start. Every test is bounded in calls and time.
//!
//! The timing bounds here are the promises of the resilience wrapper (no call waits longer than
//! the operation timeout plus the loader; an open breaker adds well under a millisecond), so they
//! are asserted; each test also prints what it measured.

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use speedlayer::config::{Config, Fallback};
use speedlayer::store::{BreakerState, CacheLayer, Source};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Key};

use support::timing::{percentile, within_attempts};
use support::{Mode, Proxy, RedisServer, key, redis_config_at};

const OP_TIMEOUT: Duration = Duration::from_millis(100);
const LOADER_TIME: Duration = Duration::from_millis(20);
/// Scheduling slack for 200 tasks on a 2-core (virtual) machine in a debug build. Measured
/// waits are printed; typical runs stay within 35 ms of the bound, but a noisy neighbour can add
/// tens of milliseconds to a whole run.
const SLACK: Duration = Duration::from_millis(100);
const MINUTE: Ttl = Ttl::seconds(60);

/// The tests here measure time; running them one at a time keeps one test's 200 tasks from
/// skewing another's measurements on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config_at(port: u16) -> Config {
    Config::redis(redis_config_at(port)).op_timeout(OP_TIMEOUT)
}

fn value_for(key: &Key) -> String {
    format!("loaded:{}", key.id())
}

async fn slow_loader(key: Key) -> Result<String, std::io::Error> {
    tokio::time::sleep(LOADER_TIME).await;
    Ok(value_for(&key))
}

/// 200 concurrent cold `get_or_set` calls against an unusable Redis, then 200 calls once the
/// breaker is open. Panics on wrong behaviour; returns `Err` when only a timing bound was missed.
async fn calls_stay_bounded_while_redis_is_unusable(
    name: &str,
    cache: &Cache,
) -> Result<(), String> {
    let mut tasks = Vec::new();
    for i in 0..200 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let k = key(format!("cold-{i}"));
            let started = Instant::now();
            let got = cache
                .get_or_set(&k, MINUTE, || slow_loader(k.clone()))
                .await;
            (k, got, started.elapsed())
        }));
    }
    let mut waits = Vec::new();
    for t in tasks {
        let (k, got, elapsed) = t.await.unwrap();
        assert_eq!(got.expect("no call may fail"), value_for(&k));
        waits.push(elapsed);
    }
    let stats = cache.stats();
    assert_eq!(stats.breaker, BreakerState::Open, "{stats:?}");
    // Each call waited on Redis at most once: at most one timeout per call.
    assert!(stats.timeouts <= 200, "{stats:?}");
    waits.sort();
    let bound = OP_TIMEOUT + LOADER_TIME + SLACK;
    let max = *waits.last().unwrap();
    eprintln!(
        "{name}: 200 concurrent cold calls: p50 {:?}, p99 {:?}, max {max:?} (bound: timeout {OP_TIMEOUT:?} + loader {LOADER_TIME:?} + slack {SLACK:?}); {} timeouts",
        percentile(&waits, 0.5),
        percentile(&waits, 0.99),
        stats.timeouts,
    );

    // Breaker open: a call costs the loader plus fallback bookkeeping, no waiting on Redis.
    let open_phase = Instant::now();
    let mut added = Vec::new();
    for i in 0..200 {
        let k = key(format!("open-{i}"));
        let started = Instant::now();
        let got = cache
            .get_or_set(&k, MINUTE, || async {
                Ok::<_, std::io::Error>(value_for(&k))
            })
            .await
            .unwrap();
        added.push(started.elapsed());
        assert_eq!(got, value_for(&k));
    }
    // An open breaker lets one probe through per cool-down (1 s); nothing else waits on Redis.
    let probes_allowed = open_phase.elapsed().as_secs() + 1;
    let timeouts_after = cache.stats().timeouts;
    assert!(
        timeouts_after - stats.timeouts <= probes_allowed,
        "an open breaker must not wait on Redis: {} timeouts in {:?}",
        timeouts_after - stats.timeouts,
        open_phase.elapsed()
    );
    added.sort();
    let (p50, p90, p99, open_max) = (
        percentile(&added, 0.5),
        percentile(&added, 0.9),
        percentile(&added, 0.99),
        *added.last().unwrap(),
    );
    eprintln!(
        "{name}: breaker open, per call: p50 {p50:?}, p90 {p90:?}, p99 {p99:?}, max {open_max:?}"
    );

    // The fallback serves what was loaded during the outage.
    let k = key("open-7");
    let hit = cache
        .get_or_set(&k, MINUTE, || async {
            Err::<String, _>(std::io::Error::other("must be a fallback hit"))
        })
        .await
        .unwrap();
    assert_eq!(hit, value_for(&k));
    assert!(cache.stats().short_circuited > 0);

    if max > bound {
        return Err(format!("a call waited {max:?}, more than {bound:?}"));
    }
    if p99 >= Duration::from_millis(1) {
        return Err(format!(
            "an open breaker added {p99:?} at p99, not under 1 ms"
        ));
    }
    Ok(())
}

/// Polls until a value written now is served by Redis again; returns how long that took.
async fn time_until_redis_serves(cache: &Cache, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut n = 0u32;
    loop {
        n += 1;
        let k = key(format!("probe-{n}"));
        cache
            .get_or_set(&k, MINUTE, || async { Ok::<_, std::io::Error>(n) })
            .await
            .unwrap();
        if let Ok((Some(_), Source::Primary)) = cache.store().get_with_source(&k).await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "Redis not serving again after {limit:?}: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis() {
    let _serial = SERIAL.lock().await;
    support::init_tracing();
    within_attempts("frozen_redis", || async {
        let mut server = RedisServer::start();
        let cache = Cache::new(config_at(server.port())).await.unwrap();
        cache.set(&key("warm"), &"ok", MINUTE).await.unwrap();
        assert_eq!(
            cache.get::<String>(&key("warm")).await.as_deref(),
            Some("ok")
        );

        server.freeze();
        let bounded = calls_stay_bounded_while_redis_is_unusable("frozen_redis", &cache).await;
        server.thaw();
        let back = time_until_redis_serves(&cache, Duration::from_secs(10)).await;
        eprintln!("frozen_redis: served by Redis again {back:?} after SIGCONT");
        assert_eq!(cache.stats().breaker, BreakerState::Closed);
        bounded
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis() {
    let _serial = SERIAL.lock().await;
    support::init_tracing();
    within_attempts("slow_redis", || async {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.port()).await;
        let cache = Cache::new(config_at(proxy.port())).await.unwrap();
        cache.set(&key("warm"), &"ok", MINUTE).await.unwrap();

        proxy.set(Mode::Delay(OP_TIMEOUT * 3));
        let bounded = calls_stay_bounded_while_redis_is_unusable("slow_redis", &cache).await;
        proxy.set(Mode::Pass);
        let back = time_until_redis_serves(&cache, Duration::from_secs(10)).await;
        eprintln!("slow_redis: served by Redis again {back:?} after the delay was lifted");
        bounded
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis() {
    let _serial = SERIAL.lock().await;
    support::init_tracing();
    within_attempts("killed_redis", killed_redis_once).await;
}

async fn killed_redis_once() -> Result<(), String> {
    let mut server = RedisServer::start();
    let cache = Cache::new(config_at(server.port())).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..16u64 {
        let (cache, stop, calls, failures) =
            (cache.clone(), stop.clone(), calls.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w;
            // Bounded: at most 30 s of load even if the stop flag were never set.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let k = key(i % 64);
                let got = cache
                    .get_or_set(&k, MINUTE, || async {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        Ok::<_, std::io::Error>(value_for(&k))
                    })
                    .await;
                calls.fetch_add(1, Ordering::Relaxed);
                if got.ok().as_deref() != Some(value_for(&k).as_str()) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                i += 7;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let during_outage = cache.stats();
    server.restart();
    let back = time_until_redis_serves(&cache, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let calls = calls.load(Ordering::Relaxed);
    let failures = failures.load(Ordering::Relaxed);
    eprintln!(
        "killed_redis: {calls} calls, {failures} failed; served by Redis again {back:?} after restart; outage stats {during_outage:?}"
    );
    assert_eq!(failures, 0);
    assert!(calls > 100, "the load ran: {calls} calls");
    assert!(
        during_outage.errors > 0,
        "the outage was seen: {during_outage:?}"
    );
    let stats = cache.stats();
    assert!(stats.connected, "{stats:?}");
    if back >= Duration::from_secs(5) {
        return Err(format!(
            "served by Redis again only after {back:?}, not within 5 s"
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_fail_over_and_recover() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port()).await;
    let cache = Cache::new(config_at(proxy.port())).await.unwrap();
    cache.set(&key(1), &1, MINUTE).await.unwrap();
    proxy.set(Mode::Cut);
    let started = Instant::now();
    for i in 0..50 {
        let got = cache
            .get_or_set(&key(i), MINUTE, || async { Ok::<_, std::io::Error>(i) })
            .await
            .unwrap();
        assert_eq!(got, i);
    }
    eprintln!("cut: 50 calls in {:?}", started.elapsed());
    assert!(cache.stats().errors > 0);
    proxy.set(Mode::Pass);
    let back = time_until_redis_serves(&cache, Duration::from_secs(10)).await;
    eprintln!("cut: served by Redis again {back:?} after the cut was lifted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_serves_from_the_loader_and_connects_later() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    server.kill();
    let cache = Cache::new(config_at(server.port()).cool_down(Duration::from_millis(200)))
        .await
        .expect("a Redis that is down is not a configuration error");
    let got = cache
        .get_or_set(&key(1), MINUTE, || async { Ok::<_, std::io::Error>(1) })
        .await
        .unwrap();
    assert_eq!(got, 1);
    assert!(!cache.stats().connected);
    server.restart();
    let back = time_until_redis_serves(&cache, Duration::from_secs(10)).await;
    eprintln!("down at start: served by Redis {back:?} after it came up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_fallback_reads_miss_and_writes_are_dropped() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let cache = Cache::new(config_at(server.port()).fallback(Fallback::None))
        .await
        .unwrap();
    server.freeze();
    let mut loads = 0;
    for _ in 0..10 {
        let got = cache
            .get_or_set(&key(1), MINUTE, || async {
                loads += 1;
                Ok::<_, std::io::Error>(1)
            })
            .await
            .unwrap();
        assert_eq!(got, 1);
    }
    assert_eq!(loads, 10, "no fallback: every call goes to the loader");
    cache
        .set(&key(2), &2, MINUTE)
        .await
        .expect("a dropped write is not an error");
    assert_eq!(cache.get::<i32>(&key(2)).await, None);
    let err = cache
        .store()
        .increment(&key(3), 1, MINUTE)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), speedlayer::ErrorKind::Unavailable, "{err}");
    assert!(cache.stats().memory_entries == 0);
    server.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_is_emptied_when_redis_returns() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    // The default cool-down (1 s) is far longer than the writes below, so no probe reaches the
    // frozen server during them (a probe's SET would run once it is thawed).
    let cache = Cache::new(config_at(server.port())).await.unwrap();
    server.freeze();
    // The first failures open the breaker (which empties the fallback once).
    for i in 100..105 {
        cache.set(&key(i), &i, MINUTE).await.unwrap();
    }
    assert_eq!(cache.stats().breaker, BreakerState::Open);
    for i in 0..10 {
        cache.set(&key(i), &i, MINUTE).await.unwrap();
    }
    assert_eq!(
        cache.get::<i32>(&key(3)).await,
        Some(3),
        "served by the fallback"
    );
    server.thaw();
    time_until_redis_serves(&cache, Duration::from_secs(10)).await;
    // What was only written to the fallback is gone with it; Redis never had it.
    assert_eq!(cache.get::<i32>(&key(3)).await, None);
}

/// A connection whose peer vanished without closing it (no RST: the proxy swallows everything
/// on the connections open at that moment) answers nothing, and the driver would keep it until
/// the kernel gives up, minutes later. A timed-out call replaces it: Redis serves again, on a
/// fresh connection, within 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_connection_is_replaced() {
    let _serial = SERIAL.lock().await;
    within_attempts("blackholed_connection_is_replaced", || async {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.port()).await;
        let cache = Cache::new(config_at(proxy.port())).await.unwrap();
        cache.set(&key(1), &1, MINUTE).await.unwrap();
        assert_eq!(cache.get::<i32>(&key(1)).await, Some(1));
        let before = proxy.connections();
        proxy.blackhole_open_connections();
        let started = Instant::now();
        let back = loop {
            let (value, source) = cache.store().get_with_source(&key(1)).await.unwrap();
            if source == Source::Primary && value.is_some() {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "Redis never served again over a new connection"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(proxy.connections() > before, "a new connection was made");
        assert!(cache.stats().timeouts > 0);
        eprintln!(
            "blackholed connection: served by Redis again {back:?} later, over connection #{}",
            proxy.connections()
        );
        if back > Duration::from_secs(3) {
            return Err(format!("served again after {back:?}, more than 3 s"));
        }
        Ok(())
    })
    .await;
}

/// The fallback answers only during an outage (breaker open). A single failed call while the
/// breaker is closed is a miss, and a write that failed then is dropped, not kept in the
/// fallback to be served later, when other instances may have invalidated it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_answers_only_while_the_breaker_is_open() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port()).await;
    // Without a recovery hold a lost connection is one failure among others, counted towards
    // the threshold (with it, the breaker opens at once: `a_lost_connection_opens_the_breaker`).
    let cache = Cache::new(
        config_at(proxy.port())
            .failure_threshold(1_000)
            .recovery_hold(Duration::ZERO),
    )
    .await
    .unwrap();
    cache.set(&key(1), &1, MINUTE).await.unwrap();
    proxy.set(Mode::Cut);
    // Fails with the breaker closed: dropped, not written to the fallback.
    cache.set(&key(1), &2, MINUTE).await.unwrap();
    assert!(cache.stats().errors > 0);
    assert_eq!(cache.stats().breaker, BreakerState::Closed);
    assert_eq!(
        cache.get::<i32>(&key(1)).await,
        None,
        "a miss, not the fallback"
    );
    assert_eq!(cache.stats().memory_entries, 0);
    proxy.set(Mode::Pass);
    // Redis kept its value; nothing newer was invented by the fallback.
    let mut seen = None;
    for _ in 0..200 {
        seen = cache.get::<i32>(&key(1)).await;
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, Some(1));
}

/// During an outage the fallback's entries carry their tags: invalidating a tag removes them at
/// once, and the backend's part is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_entries_carry_their_tags() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let cache = support::fragile_cache(&server).await;
    let tag = cache
        .namespace()
        .global()
        .tag(&speedlayer::Ident::from_static("student"), 1)
        .unwrap();
    server.freeze();
    // The first failure opens the breaker.
    assert_eq!(cache.get::<i32>(&key(0)).await, None);
    assert_eq!(cache.stats().breaker, BreakerState::Open);
    cache
        .set_tagged(&key(1), &1, MINUTE, std::slice::from_ref(&tag))
        .await
        .unwrap();
    let got = cache
        .get_or_set_tagged(&key(2), MINUTE, std::slice::from_ref(&tag), || async {
            Ok::<_, std::io::Error>(2)
        })
        .await
        .unwrap();
    assert_eq!(got, 2);
    assert_eq!(
        cache.get::<i32>(&key(1)).await,
        Some(1),
        "the fallback answers"
    );
    assert_eq!(
        cache.get::<i32>(&key(2)).await,
        Some(2),
        "the fallback answers"
    );
    let removed = cache.invalidate_tag(&tag).await.unwrap();
    assert_eq!(removed, 2, "the tag reaches the fallback's entries");
    assert_eq!(cache.get::<i32>(&key(1)).await, None);
    assert_eq!(cache.get::<i32>(&key(2)).await, None);
    assert_eq!(cache.stats().pending_invalidations, 1);
    server.thaw();
}

/// A lost connection opens the breaker at once (the instance cannot know what other instances
/// wrote while it was cut off), and when Redis answers again the recovery hold keeps calls off
/// it: the probe only checks it, calls are answered by the fallback until the hold has passed,
/// and only then does the next call read Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_opens_the_breaker_and_the_hold_keeps_calls_off_redis() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port()).await;
    let hold = Duration::from_millis(400);
    let cache = Cache::new(
        config_at(proxy.port())
            .failure_threshold(1_000)
            .cool_down(Duration::from_millis(100))
            .recovery_hold(hold),
    )
    .await
    .unwrap();
    cache.set(&key(1), &1, MINUTE).await.unwrap();
    proxy.set(Mode::Cut);
    let _ = cache.store().get_with_source(&key(1)).await.unwrap();
    assert_eq!(
        cache.stats().breaker,
        BreakerState::Open,
        "one lost connection opens it, whatever the threshold"
    );
    proxy.set(Mode::Pass);
    // The probe after the cool-down finds Redis answering: the hold begins.
    let started = Instant::now();
    // Taken before the call whose probe began the hold: no later than its start.
    let mut holding = Instant::now();
    while cache.stats().breaker != BreakerState::Recovering {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the breaker never began its hold: {:?}",
            cache.stats().breaker
        );
        holding = Instant::now();
        let (_, source) = cache.store().get_with_source(&key(1)).await.unwrap();
        assert_ne!(
            source,
            Source::Primary,
            "no call reads Redis before the hold"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut held_reads = 0;
    let closed_after = loop {
        let (value, source) = cache.store().get_with_source(&key(1)).await.unwrap();
        if source == Source::Primary {
            assert!(value.is_some());
            break holding.elapsed();
        }
        held_reads += 1;
        assert!(
            holding.elapsed() < Duration::from_secs(5),
            "the hold never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "lost connection: {held_reads} reads held back, Redis read again {closed_after:?} into the hold"
    );
    assert!(held_reads > 0);
    assert!(
        closed_after >= hold,
        "Redis was read {closed_after:?} into a hold of {hold:?}"
    );
    assert_eq!(cache.stats().breaker, BreakerState::Closed);
}

/// The idempotency route of the late-store tests.
fn payments() -> speedlayer::key::Ident {
    speedlayer::key::Ident::from_static("payments")
}

/// A payment run under an Idempotency-Key that completed while its Redis was cut off behind the
/// proxy (its response kept for a late store); the proxy is still cutting.
struct CutRun {
    server: RedisServer,
    proxy: Proxy,
    cache: Cache,
    idem: speedlayer::idempotency::Idempotency,
    order: speedlayer::idempotency::IdempotencyKey,
    print: speedlayer::idempotency::Fingerprint,
    record_key: speedlayer::Key,
}

impl CutRun {
    async fn complete(order: &str) -> CutRun {
        use speedlayer::idempotency::{
            Begin, Fingerprint, Idempotency, IdempotencyKey, StoredResponse,
        };
        let server = RedisServer::start();
        let proxy = Proxy::start(server.port()).await;
        let cache = Cache::new(
            config_at(proxy.port())
                .cool_down(Duration::from_millis(100))
                .recovery_hold(Duration::from_millis(100)),
        )
        .await
        .unwrap();
        let idem = Idempotency::new(&cache).lease(Ttl::seconds(10));
        let order = IdempotencyKey::parse(order).unwrap();
        let print = Fingerprint::of("POST", "/payments", b"{}");
        let Begin::Run(pending) = idem
            .begin(&payments(), "client", &order, &print)
            .await
            .unwrap()
        else {
            panic!("the first request runs");
        };
        let record_key = pending.record_key().clone();
        proxy.set(Mode::Cut);
        let stored = pending
            .complete(&StoredResponse::new(201, "paid"))
            .await
            .unwrap();
        assert!(!stored, "Redis is cut off: not stored now");
        CutRun {
            server,
            proxy,
            cache,
            idem,
            order,
            print,
            record_key,
        }
    }
}

/// A run that completes while Redis is unusable keeps its response and stores it as soon as
/// Redis takes it (within the lease): a retry then gets the replay instead of running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_response_is_stored_once_redis_is_back() {
    use speedlayer::idempotency::Begin;
    let _serial = SERIAL.lock().await;
    let run = CutRun::complete("order-1").await;
    let (proxy, idem) = (&run.proxy, &run.idem);
    proxy.set(Mode::Pass);
    let started = Instant::now();
    loop {
        match idem
            .begin(&payments(), "client", &run.order, &run.print)
            .await
        {
            Ok(Begin::Replay(response)) => {
                assert_eq!(response.status, 201);
                assert_eq!(response.body.as_ref(), b"paid");
                break;
            }
            Ok(Begin::Run(_)) => panic!("a retry ran again"),
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the response was never stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "response stored {:?} after Redis was back",
        started.elapsed()
    );
    assert_eq!(idem.stats().incomplete, 0);
}

/// A response kept for a late store, when Redis comes back holding another client's value (a
/// hash) under the record key: the value is left as it is, the late store gives up (counted as
/// incomplete) instead of retrying or overwriting, and the cache stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_store_leaves_another_clients_value_under_the_record_key_alone() {
    use redis::AsyncCommands;
    let _serial = SERIAL.lock().await;
    let run = CutRun::complete("order-2").await;
    let (proxy, idem, cache, record_key) = (&run.proxy, &run.idem, &run.cache, &run.record_key);
    // Meanwhile another client, with its own connection, puts a hash there.
    let mut raw = run.server.raw().await;
    let _: () = raw.del(record_key.as_str()).await.unwrap();
    let _: () = raw
        .hset(record_key.as_str(), "owner", "node")
        .await
        .unwrap();
    proxy.set(Mode::Pass);
    let started = Instant::now();
    while idem.stats().incomplete == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the late store did not give up on the other client's value"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kind: String = redis::cmd("TYPE")
        .arg(record_key.as_str())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kind, "hash", "the other client's value was replaced");
    let owner: String = raw.hget(record_key.as_str(), "owner").await.unwrap();
    assert_eq!(owner, "node");
    assert_eq!(idem.stats().incomplete, 1);
    // The cache keeps working.
    cache.set(&key(7), &7u64, MINUTE).await.unwrap();
    assert_eq!(cache.get::<u64>(&key(7)).await, Some(7));
}

/// An invalidation that could not reach Redis is applied in the background as soon as Redis
/// answers: no request has to come by, and the breaker's cool-down (a minute here) is not
/// waited out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_invalidations_are_applied_as_soon_as_redis_answers() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let cache = Cache::new(
        config_at(server.port())
            .failure_threshold(1)
            .cool_down(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let mut raw = server.raw().await;
    cache.set(&key(1), &1, MINUTE).await.unwrap();
    server.freeze();
    let done = cache.store().invalidate(&[key(1)], &[]).await.unwrap();
    assert!(done.deferred, "Redis is frozen: the invalidation is queued");
    assert_eq!(cache.stats().breaker, BreakerState::Open);
    server.thaw();
    let thawed = Instant::now();
    assert!(
        cache
            .store()
            .flush_invalidations(Duration::from_secs(10))
            .await,
        "applied in the background"
    );
    let applied = thawed.elapsed();
    let exists: bool = redis::AsyncCommands::exists(&mut raw, key(1).as_str())
        .await
        .unwrap();
    assert!(!exists, "the key is gone from Redis");
    assert_eq!(cache.stats().pending_invalidations, 0);
    assert_eq!(
        cache.stats().breaker,
        BreakerState::Recovering,
        "the replay ended the outage without waiting for the cool-down; the recovery hold runs"
    );
    eprintln!("deferred invalidation applied {applied:?} after Redis answered again");
    assert!(applied < Duration::from_secs(5), "{applied:?}");
    // After the hold, the next call closes the breaker and reads Redis.
    tokio::time::sleep(speedlayer::config::DEFAULT_RECOVERY_HOLD + Duration::from_millis(50)).await;
    cache.set(&key(2), &2, MINUTE).await.unwrap();
    assert_eq!(cache.stats().breaker, BreakerState::Closed);
    assert_eq!(
        cache.store().get_with_source(&key(2)).await.unwrap().1,
        Source::Primary
    );
}

/// A capability written outside the store (here, in this test) runs its own script and memory
/// twin through `Store::run`, and chooses per call what an outage means: during the same outage
/// the cache keeps falling back while a fail-closed operation is never answered from memory.
mod outage_rules {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use speedlayer::store::redis::RedisLayer;
    use speedlayer::store::{Answered, MemoryLayer, Operation, OutageRule};

    use super::*;

    /// Counts calls per key: on Redis with `INCR`, in memory in a twin table.
    struct Bump(&'static str);

    #[async_trait]
    impl Operation for Bump {
        type Output = i64;

        fn name(&self) -> &'static str {
            "bump"
        }

        async fn on_redis(&self, redis: &RedisLayer) -> speedlayer::Result<i64> {
            let script = redis::Script::new("return redis.call('INCR', KEYS[1])");
            let mut invocation = script.prepare_invoke();
            invocation.key(self.0);
            redis.invoke(&invocation).await
        }

        async fn on_memory(&self, memory: &MemoryLayer) -> speedlayer::Result<i64> {
            let twin = memory.twin(|_| Mutex::new(HashMap::<&'static str, i64>::new()));
            let mut table = twin.lock().unwrap();
            let n = table.entry(self.0).or_default();
            *n += 1;
            Ok(*n)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_call_chooses_what_an_outage_means() {
        let _serial = SERIAL.lock().await;
        let mut server = RedisServer::start();
        let cache = support::fragile_cache(&server).await;
        let store = cache.store();
        let bump = Bump("test:bump:1");
        assert_eq!(
            store.run(&bump, OutageRule::FailClosed).await.unwrap(),
            Answered::Backend(1)
        );
        server.freeze();
        // The first failure opens the breaker.
        assert_eq!(
            store.run(&bump, OutageRule::FailClosed).await.unwrap(),
            Answered::Closed
        );
        assert_eq!(cache.stats().breaker, BreakerState::Open);
        cache.set(&key(1), &1, MINUTE).await.unwrap();
        assert_eq!(
            cache.get::<i32>(&key(1)).await,
            Some(1),
            "the cache falls back"
        );
        for _ in 0..3 {
            assert_eq!(
                store.run(&bump, OutageRule::FailClosed).await.unwrap(),
                Answered::Closed,
                "a fail-closed operation is never answered from memory"
            );
            assert_eq!(
                store.run(&bump, OutageRule::FailOpen).await.unwrap(),
                Answered::Open
            );
        }
        assert_eq!(
            store.run(&bump, OutageRule::Fallback).await.unwrap(),
            Answered::Fallback(1),
            "the twin answers on the fallback"
        );
        server.thaw();
    }
}

/// A batch with Redis frozen: every row comes from the one loader call, the call waits on Redis
/// at most once (the read; the leases then go to the fallback), and once the breaker is open the
/// fallback answers the next page without a loader call. After the thaw, Redis serves again and
/// nothing written to the fallback reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_redis_frozen_answers_from_its_loader() {
    use std::collections::HashMap;

    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let cache = Cache::new(config_at(server.port()).failure_threshold(1))
        .await
        .unwrap();
    let page: Vec<(u32, Key)> = (0..20).map(|id| (id, key(format!("page-{id}")))).collect();
    let loads = Arc::new(AtomicU64::new(0));
    let loader = |ids: Vec<u32>| {
        loads.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, std::io::Error>(
                ids.into_iter()
                    .map(|id| (id, id * 2))
                    .collect::<HashMap<_, _>>(),
            )
        }
    };
    server.freeze();
    let started = Instant::now();
    let first = cache.get_or_set_many(&page, MINUTE, MINUTE, loader).await;
    let waited = started.elapsed();
    eprintln!("a batch of 20 with Redis frozen answered in {waited:?}");
    assert!(first.is_complete());
    assert_eq!(first.found().count(), 20);
    assert!(
        first
            .iter()
            .all(|(id, v)| v.as_ref().unwrap() == &Some(id * 2))
    );
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert!(
        waited < OP_TIMEOUT * 2 + SLACK,
        "the batch waited on the frozen server more than once: {waited:?}"
    );
    assert_eq!(cache.stats().breaker, BreakerState::Open);

    let second = cache.get_or_set_many(&page, MINUTE, MINUTE, loader).await;
    assert_eq!(second.found().count(), 20);
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "the fallback holds the page the first batch loaded"
    );

    server.thaw();
    time_until_redis_serves(&cache, Duration::from_secs(10)).await;
    assert!(
        !cache.exists(&page[0].1).await,
        "Redis never had the page written during the outage"
    );
    let third = cache.get_or_set_many(&page, MINUTE, MINUTE, loader).await;
    assert!(third.is_complete());
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    assert!(cache.exists(&page[0].1).await, "stored in Redis again");
}

/// Token revocations with Redis frozen: a check is `Unknown` within the operation timeout, never
/// "not revoked"; the deployment's choice decides (deny by default); a revocation that cannot be
/// recorded is an error. Once Redis is back, the revocation made before the freeze holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_checks_with_redis_frozen_are_unknown_within_the_timeout() {
    use speedlayer::revocation::{OnUnknown, Revocation, Revocations};
    use std::time::SystemTime;

    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let cache = Cache::new(config_at(server.port())).await.unwrap();
    let deny = Revocations::new(&cache);
    let allow = Revocations::new(&cache).on_unknown(OnUnknown::Allow);
    let expiry = SystemTime::now() + Duration::from_secs(900);
    assert!(deny.revoke("jti-1", expiry).await.unwrap());

    server.freeze();
    let started = Instant::now();
    assert_eq!(deny.check("jti-1").await, Revocation::Unknown);
    let waited = started.elapsed();
    eprintln!("revocation check with Redis frozen answered Unknown in {waited:?}");
    assert!(waited < OP_TIMEOUT + SLACK, "waited {waited:?}");
    assert_eq!(deny.check("jti-2").await, Revocation::Unknown);
    assert!(!deny.allows("jti-2").await, "unknown means deny by default");
    assert!(
        allow.allows("jti-2").await,
        "unless the deployment chose allow"
    );
    let refused = deny.revoke("jti-3", expiry).await.unwrap_err();
    assert!(refused.is_unavailable(), "{refused}");

    server.thaw();
    time_until_redis_serves(&cache, Duration::from_secs(10)).await;
    assert_eq!(deny.check("jti-1").await, Revocation::Revoked);
    assert_eq!(deny.check("jti-3").await, Revocation::NotRevoked);
}

/// The session index with Redis frozen: a token whose copy is not in the fallback is `Unknown`
/// within the operation timeout, never `Absent`, and the database is not asked behind the
/// caller's back; revoking a user then is an error (loads elsewhere cannot be told) but its drop
/// is queued, and applied before Redis serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lookups_with_redis_frozen_are_unknown_not_absent() {
    use speedlayer::session::{SessionLookup, SessionRecord, Sessions};
    use std::time::SystemTime;

    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    let cache = Cache::new(config_at(server.port())).await.unwrap();
    let sessions = Sessions::new(&cache, Ttl::minutes(15));
    let queries = Arc::new(AtomicU64::new(0));
    let lookup = |token: &'static str| {
        let (sessions, queries) = (sessions.clone(), queries.clone());
        async move {
            sessions
                .get(token, || async {
                    queries.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(Some(SessionRecord {
                        user_id: "u1".to_owned(),
                        expires_at: SystemTime::now() + Duration::from_secs(3600),
                        data: 1u8,
                    }))
                })
                .await
                .unwrap()
        }
    };
    assert!(matches!(lookup("warm").await, SessionLookup::Present(_)));
    server.freeze();
    let started = Instant::now();
    assert_eq!(lookup("warm").await, SessionLookup::Unknown);
    let waited = started.elapsed();
    eprintln!("session lookup with Redis frozen answered Unknown in {waited:?}");
    assert!(waited < OP_TIMEOUT + SLACK, "waited {waited:?}");
    assert_eq!(lookup("cold").await, SessionLookup::Unknown);
    assert_eq!(
        queries.load(Ordering::SeqCst),
        1,
        "unknown is the caller's to resolve"
    );
    // Revoking a user cannot reach the other instances' loads now: an error, not a silent Ok.
    assert!(
        sessions
            .revoke_user("u1")
            .await
            .unwrap_err()
            .is_unavailable()
    );
    server.thaw();
    time_until_redis_serves(&cache, Duration::from_secs(10)).await;
    // The drop queued during the freeze was applied before Redis served again: the copy made
    // before the freeze is gone, and the database answers.
    assert!(matches!(lookup("warm").await, SessionLookup::Present(_)));
    assert_eq!(
        queries.load(Ordering::SeqCst),
        2,
        "the queued revocation was applied"
    );
}
