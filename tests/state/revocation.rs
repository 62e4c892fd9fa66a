//! The token blacklist: a revocation is seen by every instance at once, lives until the token's
//! own expiry, and unknown is never "not revoked".

use std::time::{Duration, SystemTime};

use speedlayer::revocation::{Revocation, Revocations};
use speedlayer::store::{CacheLayer, Remaining, Store};
use speedlayer::{Cache, ErrorKind};

use crate::support::Backend;

fn in_secs(secs: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(secs)
}

async fn a_revocation_is_seen_by_every_instance_until_the_token_expires(backend: Backend) {
    let config = backend.config();
    let store = Store::connect(&config).await.unwrap();
    let scope = speedlayer::key::Namespace::root().global();
    let api = Revocations::from_store(&store, &scope);
    let websocket = Revocations::from_store(&store, &scope);

    assert!(api.revoke("jti-1", in_secs(900)).await.unwrap());
    assert_eq!(websocket.check("jti-1").await, Revocation::Revoked);
    assert!(!websocket.allows("jti-1").await);
    assert_eq!(websocket.check("jti-2").await, Revocation::NotRevoked);
    assert!(websocket.allows("jti-2").await);
    // Kept exactly as long as the token lives.
    match store
        .remaining_ttl(&api.key_of("jti-1").unwrap())
        .await
        .unwrap()
    {
        Remaining::Expires(left) => {
            assert!(left <= Duration::from_secs(900) && left > Duration::from_secs(800))
        }
        other => panic!("unexpected {other:?}"),
    }

    // A short-lived token: its revocation goes with it.
    assert!(
        api.revoke(
            "jti-short",
            SystemTime::now() + Duration::from_millis(1_500)
        )
        .await
        .unwrap()
    );
    assert_eq!(websocket.check("jti-short").await, Revocation::Revoked);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(websocket.check("jti-short").await, Revocation::NotRevoked);
}

async fn odd_token_ids_and_expiries_get_clear_answers(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let revocations = Revocations::new(&cache);
    // Already expired: nothing to record.
    let past = SystemTime::now() - Duration::from_secs(5);
    assert!(!revocations.revoke("jti-old", past).await.unwrap());
    assert_eq!(revocations.check("jti-old").await, Revocation::NotRevoked);
    // Longer than any key may live: refused, not silently shortened.
    let err = revocations
        .revoke("jti-far", in_secs(40 * 24 * 3600))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTtl);
    // Ids of any shape: escaped, or hashed when too long for a key.
    for jti in ["a:b*c{d}", "ünïcødé 🎫", &"x".repeat(5_000)] {
        assert!(revocations.revoke(jti, in_secs(60)).await.unwrap());
        assert_eq!(
            revocations.check(jti).await,
            Revocation::Revoked,
            "{jti:.20}"
        );
    }
    assert_eq!(
        revocations.check(&"x".repeat(4_999)).await,
        Revocation::NotRevoked
    );
    // An empty id cannot be revoked, and is not revoked.
    assert_eq!(
        revocations
            .revoke("", in_secs(60))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidKey
    );
    assert_eq!(revocations.check("").await, Revocation::NotRevoked);
    crate::support::assert_healthy(&cache).await;
}

both_backends!(
    a_revocation_is_seen_by_every_instance_until_the_token_expires,
    odd_token_ids_and_expiries_get_clear_answers,
);

/// Other clients' data under our keys, on every Redis backend.
mod other_clients {
    use super::*;

    /// Another client's data under a revocation key counts as a revocation.
    async fn another_clients_value_at_a_revocation_key_refuses_the_token(backend: Backend) {
        use ::redis::AsyncCommands;
        let cache = Cache::new(backend.config()).await.unwrap();
        let revocations = Revocations::new(&cache);
        let key = revocations.key_of("jti-foreign").unwrap();
        let mut raw = backend.raw().await.expect("a Redis backend");
        let _: () = raw.hset(key.as_str(), "by", "node").await.unwrap();
        assert_eq!(revocations.check("jti-foreign").await, Revocation::Revoked);
        // And a revocation replaces it with its own value and TTL.
        assert!(
            revocations
                .revoke("jti-foreign", in_secs(60))
                .await
                .unwrap()
        );
        let stored: String = raw.get(key.as_str()).await.unwrap();
        assert_eq!(stored, "1");
        crate::support::assert_healthy(&cache).await;
    }

    redis_backends!(another_clients_value_at_a_revocation_key_refuses_the_token,);
}
