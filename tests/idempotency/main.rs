//! Idempotency keys: the same behaviour on memory and Redis (first run, replay, 409, 422, a
//! cancelled run retried after its lease, bodies over the limit, scopes), Redis unusable, another
//! client's value at a record, and the axum layer. Duplicates across OS processes are in
//! `tests/fleet`.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

#[cfg(feature = "axum")]
mod axum_layer;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use speedlayer::Cache;
use speedlayer::idempotency::{
    Begin, Fingerprint, Idempotency, IdempotencyKey, Pending, StoredResponse,
};
use speedlayer::key::Ident;
use speedlayer::ttl::Ttl;
use tokio::sync::Barrier;

use support::Backend;

const PAYMENTS: Ident = Ident::from_static("payments");
const REFUNDS: Ident = Ident::from_static("refunds");

both_backends!(
    a_first_run_is_replayed_after_completion,
    a_retry_while_the_first_runs_is_in_progress,
    the_key_with_another_request_is_a_mismatch,
    keys_are_scoped_by_route_client_and_tenant,
    a_cancelled_run_is_retried_once_after_its_lease,
    a_body_over_the_limit_is_not_stored,
    binary_bodies_replay_exactly,
    fifty_concurrent_duplicates_run_once,
    a_run_that_outlived_its_lease_still_stores_when_no_other_run_started,
);

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::parse(text).unwrap()
}

fn payment(body: &str) -> Fingerprint {
    Fingerprint::of("POST", "/api/payments", body.as_bytes())
}

async fn idempotency(backend: &Backend) -> (Cache, Idempotency) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let idempotency = Idempotency::new(&cache);
    (cache, idempotency)
}

fn run(begin: Begin) -> Pending {
    match begin {
        Begin::Run(pending) => pending,
        other => panic!("expected a first run, got {other:?}"),
    }
}

async fn a_first_run_is_replayed_after_completion(backend: Backend) {
    let (_cache, idem) = idempotency(&backend).await;
    let (k, f) = (
        key("8e03978e-40d5-43e8-bc93-6894a57f9324"),
        payment("{\"amount\":100}"),
    );
    let pending = run(idem.begin(&PAYMENTS, "parent-1", &k, &f).await.unwrap());
    let response = StoredResponse::new(201, "{\"payment\":1}")
        .with_header("Content-Type", "application/json")
        .with_header("Location", "/api/payments/1");
    assert!(pending.complete(&response).await.unwrap());
    for _ in 0..3 {
        match idem.begin(&PAYMENTS, "parent-1", &k, &f).await.unwrap() {
            Begin::Replay(stored) => assert_eq!(stored, {
                let mut r = response.clone();
                r.headers = vec![
                    ("content-type".into(), "application/json".into()),
                    ("location".into(), "/api/payments/1".into()),
                ];
                r
            }),
            other => panic!("{other:?}"),
        }
    }
    // Errors are replayed too (Stripe's practice).
    let k2 = key("second");
    let pending = run(idem.begin(&PAYMENTS, "parent-1", &k2, &f).await.unwrap());
    pending
        .complete(&StoredResponse::new(402, "card declined"))
        .await
        .unwrap();
    match idem.begin(&PAYMENTS, "parent-1", &k2, &f).await.unwrap() {
        Begin::Replay(stored) => assert_eq!(stored.status, 402),
        other => panic!("{other:?}"),
    }
    let stats = idem.stats();
    assert_eq!((stats.runs, stats.replays), (2, 4));
}

async fn a_retry_while_the_first_runs_is_in_progress(backend: Backend) {
    let (_cache, idem) = idempotency(&backend).await;
    let (k, f) = (key("k-409"), payment("{}"));
    let pending = run(idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap());
    assert!(matches!(
        idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap(),
        Begin::InProgress
    ));
    pending
        .complete(&StoredResponse::new(200, "ok"))
        .await
        .unwrap();
    assert!(matches!(
        idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap(),
        Begin::Replay(_)
    ));
    assert_eq!(idem.stats().in_progress, 1);
}

async fn the_key_with_another_request_is_a_mismatch(backend: Backend) {
    let (_cache, idem) = idempotency(&backend).await;
    let k = key("k-422");
    let pending = run(idem
        .begin(&PAYMENTS, "c", &k, &payment("{\"amount\":1}"))
        .await
        .unwrap());
    // While the first runs, and after it completed.
    assert!(matches!(
        idem.begin(&PAYMENTS, "c", &k, &payment("{\"amount\":2}"))
            .await
            .unwrap(),
        Begin::Mismatch
    ));
    pending
        .complete(&StoredResponse::new(201, "ok"))
        .await
        .unwrap();
    assert!(matches!(
        idem.begin(&PAYMENTS, "c", &k, &payment("{\"amount\":2}"))
            .await
            .unwrap(),
        Begin::Mismatch
    ));
    let other_method = Fingerprint::of("PUT", "/api/payments", b"{\"amount\":1}");
    assert!(matches!(
        idem.begin(&PAYMENTS, "c", &k, &other_method).await.unwrap(),
        Begin::Mismatch
    ));
    assert_eq!(idem.stats().mismatches, 3);
}

async fn keys_are_scoped_by_route_client_and_tenant(backend: Backend) {
    let (cache, idem) = idempotency(&backend).await;
    let (k, f) = (key("same-key"), payment("{}"));
    let _a = run(idem.begin(&PAYMENTS, "client-a", &k, &f).await.unwrap());
    let _b = run(idem.begin(&PAYMENTS, "client-b", &k, &f).await.unwrap());
    let _r = run(idem.begin(&REFUNDS, "client-a", &k, &f).await.unwrap());
    let tenant = idem
        .clone()
        .in_scope(&cache.namespace().tenant("north").unwrap());
    let _t = run(tenant.begin(&PAYMENTS, "client-a", &k, &f).await.unwrap());
    assert!(matches!(
        tenant.begin(&PAYMENTS, "client-a", &k, &f).await.unwrap(),
        Begin::InProgress
    ));
}

/// A run that never completes (crashed, cancelled) leaves its record, which expires with its
/// lease: until then retries are refused; after it one retry runs, once.
async fn a_cancelled_run_is_retried_once_after_its_lease(backend: Backend) {
    let (_cache, idem) = idempotency(&backend).await;
    let idem = idem.lease(Ttl::from_millis(300).unwrap());
    let (k, f) = (key("k-cancel"), payment("{}"));
    drop(run(idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap()));
    assert!(matches!(
        idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap(),
        Begin::InProgress
    ));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut retries = Vec::new();
    for _ in 0..10 {
        let (idem, k, f, runs) = (idem.clone(), k.clone(), f.clone(), runs.clone());
        retries.push(tokio::spawn(async move {
            if let Begin::Run(pending) = idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap() {
                runs.fetch_add(1, Ordering::SeqCst);
                pending
                    .complete(&StoredResponse::new(201, "ok"))
                    .await
                    .unwrap();
            }
        }));
    }
    for r in retries {
        r.await.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A body over the limit is not stored: a retry gets the status and headers, an empty body, and
/// `body_omitted` (the `Idempotent-Body-Omitted` header in the axum layer).
async fn a_body_over_the_limit_is_not_stored(backend: Backend) {
    let (_cache, idem) = idempotency(&backend).await;
    let idem = idem.max_body_bytes(16);
    let (k, f) = (key("k-big"), payment("{}"));
    let pending = run(idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap());
    let big = StoredResponse::new(201, "x".repeat(100)).with_header("location", "/p/9");
    pending.complete(&big).await.unwrap();
    match idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap() {
        Begin::Replay(stored) => {
            assert_eq!(stored.status, 201);
            assert!(stored.body.is_empty() && stored.body_omitted);
            assert_eq!(stored.headers, vec![("location".into(), "/p/9".into())]);
        }
        other => panic!("{other:?}"),
    }
}

async fn binary_bodies_replay_exactly(backend: Backend) {
    let (_cache, idem) = idempotency(&backend).await;
    let (k, f) = (key("k-bin"), payment("{}"));
    let body: Vec<u8> = (0..=255u8).collect();
    let pending = run(idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap());
    pending
        .complete(&StoredResponse::new(200, body.clone()))
        .await
        .unwrap();
    match idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap() {
        Begin::Replay(stored) => assert_eq!(stored.body.as_ref(), body.as_slice()),
        other => panic!("{other:?}"),
    }
}

/// 50 concurrent duplicates of one payment in one process: the handler runs once; the others
/// get the replay or 409.
async fn fifty_concurrent_duplicates_run_once(backend: Backend) {
    let (_cache, idem) = idempotency(&backend).await;
    let (k, f) = (key("k-50"), payment("{\"amount\":100}"));
    let runs = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(50));
    let mut requests = Vec::new();
    for _ in 0..50 {
        let (idem, k, f, runs, start) = (
            idem.clone(),
            k.clone(),
            f.clone(),
            runs.clone(),
            start.clone(),
        );
        requests.push(tokio::spawn(async move {
            start.wait().await;
            match idem.begin(&PAYMENTS, "parent", &k, &f).await.unwrap() {
                Begin::Run(pending) => {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    pending
                        .complete(&StoredResponse::new(201, "{\"payment\":7}"))
                        .await
                        .unwrap();
                    "run"
                }
                Begin::Replay(stored) => {
                    assert_eq!(stored.status, 201);
                    "replay"
                }
                Begin::InProgress => "409",
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut outcomes = Vec::new();
    for r in requests {
        outcomes.push(r.await.unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(outcomes.iter().filter(|o| **o == "run").count(), 1);
}

#[test]
fn keys_are_validated() {
    assert!(IdempotencyKey::parse("").is_err());
    assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
    assert!(IdempotencyKey::parse("has space").is_err());
    assert!(IdempotencyKey::parse("ümlaut").is_err());
    assert!(IdempotencyKey::parse("line\nbreak").is_err());
    assert_eq!(
        IdempotencyKey::parse("\"8e03978e\"").unwrap().as_str(),
        "8e03978e"
    );
    assert_eq!(
        IdempotencyKey::parse("a:b*c?[d]{e}~f").unwrap().as_str(),
        "a:b*c?[d]{e}~f"
    );
}

mod redis_only {
    use ::redis::AsyncCommands;

    use super::*;
    use support::RedisServer;

    /// Redis unusable: `Unavailable`, never a record in the memory fallback (which would let
    /// another process run the same request).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_unusable_is_unavailable_never_a_memory_record() {
        let mut server = RedisServer::start();
        let cache = support::fragile_cache(&server).await;
        let idem = Idempotency::new(&cache);
        let (k, f) = (key("k-down"), payment("{}"));
        server.freeze();
        for _ in 0..5 {
            assert!(matches!(
                idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap(),
                Begin::Unavailable
            ));
        }
        assert_eq!(idem.stats().unavailable, 5);
        server.thaw();
        let mut started = None;
        for _ in 0..200 {
            if let Begin::Run(p) = idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap() {
                started = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.is_some(), "Redis serves the key once it is back");
    }

    /// Another client's value under a record key guards nothing: the request is refused as in
    /// progress rather than run a second time, and the record is JSON readable by others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_are_json_and_foreign_values_refuse() {
        let server = RedisServer::start();
        let cache = Cache::new(
            speedlayer::Config::redis(server.redis_config()).op_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
        let idem = Idempotency::new(&cache);
        let mut raw = server.raw().await;
        let (k, f) = (key("k-json"), payment("{}"));
        let pending = run(idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap());
        let record_key = pending.record_key().clone();
        let in_progress: String = raw.get(record_key.as_str()).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&in_progress).unwrap();
        assert_eq!(json["state"], "in_progress");
        assert_eq!(json["key"], "k-json");
        let ttl: i64 = raw.pttl(record_key.as_str()).await.unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
        pending
            .complete(&StoredResponse::new(201, "{\"payment\":3}"))
            .await
            .unwrap();
        let done: String = raw.get(record_key.as_str()).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&done).unwrap();
        assert_eq!(json["state"], "completed");
        assert_eq!(json["body"], "{\"payment\":3}");
        let ttl: i64 = raw.pttl(record_key.as_str()).await.unwrap();
        assert!(ttl > 23 * 3600 * 1000, "{ttl}");
        // Garbage under the key: refused, not run.
        let _: () = raw.set(record_key.as_str(), "garbage").await.unwrap();
        assert!(matches!(
            idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap(),
            Begin::InProgress
        ));
        // Written without a TTL, it gets one: it cannot refuse the key for good.
        let ttl: i64 = raw.pttl(record_key.as_str()).await.unwrap();
        assert!(ttl > 0, "{ttl}");
        // Another type under the key: replaced by a new run's record.
        let _: () = raw.del(record_key.as_str()).await.unwrap();
        let _: () = raw.hset(record_key.as_str(), "f", "v").await.unwrap();
        assert!(matches!(
            idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap(),
            Begin::Run(_)
        ));
        support::assert_healthy(&cache).await;
        assert_eq!(cache.store().stats().data_errors, 0);
    }
}

/// A run slower than its lease, with no retry meanwhile: its response is still stored (no other
/// run can have started, it would have written its own record), so a later retry replays it.
async fn a_run_that_outlived_its_lease_still_stores_when_no_other_run_started(backend: Backend) {
    let (_cache, idem) = idempotency(&backend).await;
    let idem = idem.lease(Ttl::from_millis(100).unwrap());
    let (k, f) = (key("k-slow"), payment("{}"));
    let pending = run(idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        pending
            .complete(&StoredResponse::new(201, "late"))
            .await
            .unwrap()
    );
    assert!(matches!(
        idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap(),
        Begin::Replay(_)
    ));
    // But when another run started meanwhile, the late one does not overwrite it.
    let (k2, f2) = (key("k-slow-2"), payment("{}"));
    let late = run(idem.begin(&PAYMENTS, "c", &k2, &f2).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    let retry = run(idem.begin(&PAYMENTS, "c", &k2, &f2).await.unwrap());
    assert!(
        !late
            .complete(&StoredResponse::new(201, "late"))
            .await
            .unwrap()
    );
    assert!(
        retry
            .complete(&StoredResponse::new(201, "retry"))
            .await
            .unwrap()
    );
    match idem.begin(&PAYMENTS, "c", &k2, &f2).await.unwrap() {
        Begin::Replay(stored) => assert_eq!(stored.body.as_ref(), b"retry"),
        other => panic!("{other:?}"),
    }
    assert_eq!(idem.stats().incomplete, 1);
}

/// On the memory backend records are kept apart from the cache's entries: a cache full of
/// values never evicts a record (which would let a retry run twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_records_survive_a_full_cache() {
    let cache = Cache::new(speedlayer::Config::memory().memory_max_bytes(64 * 1024))
        .await
        .unwrap();
    let idem = Idempotency::new(&cache);
    let (k, f) = (key("k-survives"), payment("{}"));
    let _pending = run(idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap());
    for i in 0..20_000u32 {
        cache
            .set(&support::key(i), &"x".repeat(100), Ttl::seconds(60))
            .await
            .unwrap();
    }
    assert!(matches!(
        idem.begin(&PAYMENTS, "c", &k, &f).await.unwrap(),
        Begin::InProgress
    ));
}
