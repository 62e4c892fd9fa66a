//! Domains declared never cached: no cache key can be built in them, while coordination state
//! about them (an idempotency record, a lock) stays allowed.

use speedlayer::idempotency::{Begin, Fingerprint, Idempotency, IdempotencyKey, StoredResponse};
use speedlayer::key::{Ident, KeyError, Namespace};
use speedlayer::lock::{Acquire, Locks};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, ErrorKind};

use crate::support::Backend;

const PAYMENTS: Ident = Ident::from_static("payments");
const MARKS: Ident = Ident::from_static("marks");
const RECEIPT: Ident = Ident::from_static("receipt");
const FEES: Ident = Ident::from_static("fees");
const SUMMARY: Ident = Ident::from_static("summary");

fn namespace() -> Namespace {
    Namespace::with_prefix(Ident::from_static("prod"))
        .never_cache(&[PAYMENTS, MARKS])
        .unwrap()
}

async fn building_a_cache_key_in_a_never_cached_domain_is_refused(backend: Backend) {
    let cache = Cache::new(backend.config().namespace(namespace()))
        .await
        .unwrap();
    let ns = cache.namespace();
    let refused = ns.global().key(&PAYMENTS, &RECEIPT, 7).unwrap_err();
    assert_eq!(
        refused,
        KeyError::NeverCached {
            domain: "payments".into()
        }
    );
    assert!(refused.to_string().contains("never cached"), "{refused}");
    let tenant = ns.tenant("north-school").unwrap();
    assert!(tenant.key(&MARKS, &RECEIPT, 1).is_err());
    assert!(tenant.keyspace(&MARKS, &RECEIPT).keys([1, 2]).is_err());
    assert!(tenant.keyspace(&MARKS, &RECEIPT).key_str("x").is_err());
    assert!(ns.global().parse("prod:payments:receipt:7").is_err());
    // As a crate error, it says what it is.
    let as_error: speedlayer::Error = refused.into();
    assert_eq!(as_error.kind(), ErrorKind::InvalidKey);

    // Other domains are cached as usual.
    let fees = ns.global().key(&FEES, &SUMMARY, 7).unwrap();
    cache.set(&fees, &1, Ttl::seconds(60)).await.unwrap();
    assert_eq!(cache.get::<i32>(&fees).await, Some(1));
    assert!(!ns.is_never_cached(&FEES));
    assert!(ns.is_never_cached(&PAYMENTS));

    // A key built from another namespace, without the declaration, is refused by the cache too:
    // written never, read from the loader every time.
    let smuggled = Namespace::with_prefix(Ident::from_static("prod"))
        .global()
        .key(&PAYMENTS, &RECEIPT, 7)
        .unwrap();
    assert_eq!(
        cache
            .set(&smuggled, &1, Ttl::seconds(60))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidKey
    );
    for _ in 0..2 {
        let loaded = cache
            .get_or_set(&smuggled, Ttl::seconds(60), || async {
                Ok::<_, std::io::Error>(5)
            })
            .await
            .unwrap();
        assert_eq!(loaded, 5);
    }
    assert_eq!(cache.stats().loader_calls, 2, "never stored");
    assert_eq!(cache.get::<i32>(&smuggled).await, None);
}

async fn coordination_state_about_a_never_cached_domain_stays_allowed(backend: Backend) {
    let cache = Cache::new(backend.config().namespace(namespace()))
        .await
        .unwrap();
    // An idempotency record for a payment.
    let idempotency = Idempotency::new(&cache);
    let key = IdempotencyKey::parse("pay-0001").unwrap();
    let fingerprint = Fingerprint::of("POST", "/api/payments", b"{\"cents\":100}");
    match idempotency
        .begin(&PAYMENTS, "parent-7", &key, &fingerprint)
        .await
        .unwrap()
    {
        Begin::Run(pending) => {
            assert!(
                pending
                    .complete(&StoredResponse::new(201, "paid"))
                    .await
                    .unwrap()
            )
        }
        _ => panic!("the first request runs"),
    }
    assert!(matches!(
        idempotency
            .begin(&PAYMENTS, "parent-7", &key, &fingerprint)
            .await
            .unwrap(),
        Begin::Replay(_)
    ));
    // A lock on a payment.
    let locks = Locks::new(&cache);
    let name = locks.name(&PAYMENTS, 7).unwrap();
    match locks.acquire(&name, Ttl::seconds(5)).await {
        Acquire::Acquired(guard) => assert!(guard.release().await.unwrap()),
        _ => panic!("the lock is free"),
    }
}

#[test]
fn coordination_domains_cannot_be_declared_never_cached() {
    for domain in speedlayer::key::COORDINATION_DOMAINS {
        let refused = Namespace::root().never_cache(&[Ident::new(domain).unwrap()]);
        assert!(matches!(refused, Err(KeyError::ReservedDomain { .. })));
    }
}

both_backends!(
    building_a_cache_key_in_a_never_cached_domain_is_refused,
    coordination_state_about_a_never_cached_domain_stays_allowed,
);
