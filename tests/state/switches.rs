//! Rollout switches: set from the environment, flipped at run time under load without failing a
//! request or serving stale data.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use speedlayer::counter::Counters;
use speedlayer::key::{Ident, Namespace};
use speedlayer::ratelimit::{Identity, Limit, RateLimiter, Route, ServedBy};
use speedlayer::revocation::Revocations;
use speedlayer::session::{SessionLookup, SessionRecord, Sessions};
use speedlayer::switch::Capability;
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Config, ErrorKind};

use crate::support::Backend;

const ROWS: Ident = Ident::from_static("rows");
const ROW: Ident = Ident::from_static("row");

#[test]
fn switches_come_from_the_environment() {
    let config = Config::from_lookup(|name| {
        (name == "SPEEDLAYER_OFF").then(|| "cache, ratelimit".to_owned())
    })
    .unwrap();
    let cache = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(Cache::new(config))
        .unwrap();
    assert_eq!(
        cache.switches().off(),
        vec![Capability::Cache, Capability::RateLimit]
    );
    let err = Config::from_lookup(|name| (name == "SPEEDLAYER_OFF").then(|| "kache".to_owned()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("known: cache"), "{err}");
}

/// 8 request loops (cache reads and writes with invalidation, rate-limit checks, session and
/// revocation lookups, counter reads) for 1.5 s while a ninth flips the switches every 20 ms:
/// no request fails, no read shows a row older than the last write that completed before it
/// began, and the off-states were really served.
async fn flipping_switches_under_load_fails_no_request(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let rows = Namespace::root().global().keyspace(&ROWS, &ROW);
    let db: Arc<Vec<AtomicU64>> = Arc::new((0..20).map(|_| AtomicU64::new(0)).collect());
    // Per row, the newest value whose write (database, then invalidation) has returned.
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..20).map(|_| AtomicU64::new(0)).collect());
    let loads = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let stale = Arc::new(AtomicUsize::new(0));
    let switched_off_checks = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let limiter = RateLimiter::new(&cache);
    let route = Route::new(Ident::from_static("api")).per_ip(
        Limit::fixed_window(NonZeroU32::new(1_000_000).unwrap(), Duration::from_secs(60)).unwrap(),
    );
    let sessions = Sessions::new(&cache, Ttl::minutes(5));
    let revocations = Revocations::new(&cache);
    let counters = Counters::new(&cache);

    let mut tasks = Vec::new();
    for worker in 0..8usize {
        let (cache, rows, db, done, loads, failures, stale, stop) = (
            cache.clone(),
            rows.clone(),
            db.clone(),
            done.clone(),
            loads.clone(),
            failures.clone(),
            stale.clone(),
            stop.clone(),
        );
        let (limiter, route, sessions, revocations, counters, off_checks) = (
            limiter.clone(),
            route.clone(),
            sessions.clone(),
            revocations.clone(),
            counters.clone(),
            switched_off_checks.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // The memory backend answers without yielding: let the other tasks run.
                tokio::task::yield_now().await;
                let id = ((n * 7 + worker as u64) % 20) as usize;
                let key = rows.key(id).unwrap();
                if n.is_multiple_of(5) {
                    // A write: the database, then the invalidation.
                    let written = db[id].fetch_add(1, Ordering::SeqCst) + 1;
                    cache.delete(&key).await;
                    done[id].fetch_max(written, Ordering::SeqCst);
                    continue;
                }
                let floor = done[id].load(Ordering::SeqCst);
                let got = cache
                    .get_or_set(&key, Ttl::seconds(60), || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(db[id].load(Ordering::SeqCst))
                    })
                    .await;
                match got {
                    Ok(v) if v < floor => {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let verdict = limiter
                    .check(&route, &Identity::ip(format!("10.0.0.{worker}")))
                    .await;
                if !verdict.allowed {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                if verdict.served_by == ServedBy::SwitchedOff {
                    off_checks.fetch_add(1, Ordering::SeqCst);
                }
                let session = sessions
                    .get(&format!("tok-{worker}"), || async {
                        Ok::<_, std::io::Error>(Some(SessionRecord {
                            user_id: format!("u{worker}"),
                            expires_at: SystemTime::now() + Duration::from_secs(3600),
                            data: (),
                        }))
                    })
                    .await;
                if !matches!(session, Ok(SessionLookup::Present(_))) {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                if !revocations.allows(&format!("jti-{worker}")).await
                    && cache.switches().is_on(Capability::Revocations)
                {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                let count = counters
                    .get(
                        &rows.key(format!("count-{id}")).unwrap(),
                        Ttl::seconds(60),
                        || async { Ok::<_, std::io::Error>(7) },
                    )
                    .await;
                if count.ok() != Some(7) {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let flipper = {
        let (cache, stop) = (cache.clone(), stop.clone());
        tokio::spawn(async move {
            let flipped = [
                Capability::Cache,
                Capability::RateLimit,
                Capability::Sessions,
                Capability::Counters,
            ];
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let c = flipped[i % flipped.len()];
                let on = (i / flipped.len()) % 2 == 1;
                cache.switches().set(c, on);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for c in flipped {
                cache.switches().set(c, true);
            }
        })
    };
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    flipper.await.unwrap();
    eprintln!(
        "{:?}: {} loads, {} checks served switched off",
        started.elapsed(),
        loads.load(Ordering::SeqCst),
        switched_off_checks.load(Ordering::SeqCst)
    );
    assert_eq!(failures.load(Ordering::SeqCst), 0, "failed requests");
    assert_eq!(stale.load(Ordering::SeqCst), 0, "stale reads");
    assert!(
        switched_off_checks.load(Ordering::SeqCst) > 0,
        "rate limiting was off a while"
    );
    // Back on: reads are hits again.
    let key = rows.key(0).unwrap();
    let v: u64 = cache
        .get_or_set(&key, Ttl::seconds(60), || async {
            Ok::<_, std::io::Error>(db[0].load(Ordering::SeqCst))
        })
        .await
        .unwrap();
    assert_eq!(cache.get::<u64>(&key).await, Some(v));
}

/// Each capability's off-state, one by one.
async fn each_off_state_is_the_documented_one(backend: Backend) {
    use speedlayer::lock::{Acquire, Locks};
    use speedlayer::revocation::Revocation;
    use speedlayer::scratch::Scratch;

    let cache = Cache::new(backend.config()).await.unwrap();
    let rows = Namespace::root().global().keyspace(&ROWS, &ROW);
    let key = rows.key(1).unwrap();
    cache.set(&key, &1u32, Ttl::seconds(60)).await.unwrap();
    let s = cache.switches();

    s.set(Capability::Cache, false);
    assert_eq!(cache.get::<u32>(&key).await, None, "reads miss");
    let loaded = cache
        .get_or_set(&key, Ttl::seconds(60), || async {
            Ok::<_, std::io::Error>(2u32)
        })
        .await
        .unwrap();
    assert_eq!(loaded, 2, "the loader answers");
    cache.set(&key, &3u32, Ttl::seconds(60)).await.unwrap();
    s.set(Capability::Cache, true);
    assert_eq!(
        cache.get::<u32>(&key).await,
        None,
        "a write while off deleted the old value"
    );

    s.set(Capability::Locks, false);
    let locks = Locks::new(&cache);
    let name = locks.name(&ROWS, 1).unwrap();
    assert!(matches!(
        locks.acquire(&name, Ttl::seconds(5)).await,
        Acquire::Unavailable
    ));
    s.set(Capability::Locks, true);
    assert!(matches!(
        locks.acquire(&name, Ttl::seconds(5)).await,
        Acquire::Acquired(_)
    ));

    let revocations = Revocations::new(&cache);
    revocations
        .revoke("jti-9", SystemTime::now() + Duration::from_secs(60))
        .await
        .unwrap();
    s.set(Capability::Revocations, false);
    assert_eq!(revocations.check("jti-9").await, Revocation::Unknown);
    assert!(revocations.allows("jti-9").await, "not consulted while off");
    s.set(Capability::Revocations, true);
    assert_eq!(revocations.check("jti-9").await, Revocation::Revoked);

    s.set(Capability::Scratch, false);
    let hash = Scratch::new(&cache).hash(key.clone());
    assert_eq!(
        hash.mark("a", "b").await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );
    let drafts = speedlayer::scratch::Drafts::new(&cache);
    assert_eq!(
        drafts.save("u1", "f1", &1).await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );
    s.set(Capability::Scratch, true);
    hash.mark("a", "b").await.unwrap();
    drafts.save("u1", "f1", &1).await.unwrap();
}

both_backends!(
    flipping_switches_under_load_fails_no_request,
    each_off_state_is_the_documented_one,
);
