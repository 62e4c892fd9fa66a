//! Other clients of the same Redis write what they like, under any key speedlayer touches: a
//! value of another type, a value of another shape, a key without TTL. Each is answered with a
//! clear error or a miss plus a repair; none is a silent no-write, and none is a backend failure
//! (the breaker stays closed, the error counters at zero, unrelated keys keep working).

use std::time::Duration;

use ::redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use speedlayer::key::Ident;
use speedlayer::ratelimit::{Identity, LayerKind, Limit, RateLimiter, Route, ServedBy};
use speedlayer::store::{CacheLayer, lease_key};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, ErrorKind};

use crate::support::{Backend, Raw, assert_healthy, key, nz};

const MINUTE: Ttl = Ttl::seconds(60);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u32,
}

async fn setup(backend: &Backend) -> (Cache, Raw) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let raw = backend.raw().await.expect("a Redis backend");
    (cache, raw)
}

async fn cached(raw: &mut Raw, key: &speedlayer::Key) -> String {
    raw.get::<_, Option<String>>(key.as_str())
        .await
        .unwrap()
        .unwrap_or_default()
}

async fn a_value_key_of_another_type_is_a_miss_then_replaced(backend: Backend) {
    let (cache, mut raw) = setup(&backend).await;
    for i in 0..10 {
        let _: () = raw.hset(key(i).as_str(), "f", "v").await.unwrap();
        let row = cache
            .get_or_set(&key(i), MINUTE, || async {
                Ok::<_, std::io::Error>(Row { id: i })
            })
            .await
            .unwrap();
        assert_eq!(row, Row { id: i });
        assert_eq!(cached(&mut raw, &key(i)).await, format!("{{\"id\":{i}}}"));
    }
    assert_eq!(cache.stats().decode_failures, 10);
    assert_healthy(&cache).await;
}

async fn a_tag_index_of_another_type_is_replaced_and_the_value_written(backend: Backend) {
    let (cache, mut raw) = setup(&backend).await;
    let tag = cache
        .namespace()
        .global()
        .tag(&Ident::from_static("student"), 7)
        .unwrap();
    for i in 0..10u32 {
        // Another client's string, list or hash where the index lives.
        match i % 3 {
            0 => {
                let _: () = raw.set(tag.as_str(), "not an index").await.unwrap();
            }
            1 => {
                let _: () = raw.rpush(tag.as_str(), "x").await.unwrap();
            }
            _ => {
                let _: () = raw.hset(tag.as_str(), "f", "v").await.unwrap();
            }
        }
        cache
            .set_tagged(&key(i), &Row { id: i }, MINUTE, std::slice::from_ref(&tag))
            .await
            .unwrap();
        assert_eq!(
            cache.get::<Row>(&key(i)).await,
            Some(Row { id: i }),
            "the value was written"
        );
        assert_eq!(
            cache.invalidate_tag(&tag).await.unwrap(),
            1,
            "and is reachable by its tag"
        );
        assert_eq!(cache.get::<Row>(&key(i)).await, None);
    }
    // An invalidation that finds a foreign value at the index removes it and reports nothing
    // removed.
    let _: () = raw.set(tag.as_str(), "garbage").await.unwrap();
    assert_eq!(cache.invalidate_tag(&tag).await.unwrap(), 0);
    assert!(!raw.exists::<_, bool>(tag.as_str()).await.unwrap());
    // Members another client put in the index that are not keys of the tag's scope are dropped,
    // never deleted.
    let _: () = raw.set("not:ours:1", "keep me").await.unwrap();
    let _: () = raw
        .zadd(tag.as_str(), "not ours at all", i64::MAX / 2)
        .await
        .unwrap();
    let _: () = raw
        .zadd(tag.as_str(), "@other:test:item:1", 1)
        .await
        .unwrap();
    assert_eq!(cache.invalidate_tag(&tag).await.unwrap(), 0);
    assert_eq!(raw.get::<_, String>("not:ours:1").await.unwrap(), "keep me");
    // A member that is not even text, with a score no pruning ever reaches, beside a real one.
    cache
        .set_tagged(
            &key(50),
            &Row { id: 50 },
            MINUTE,
            std::slice::from_ref(&tag),
        )
        .await
        .unwrap();
    let _: () = ::redis::cmd("ZADD")
        .arg(tag.as_str())
        .arg("-inf")
        .arg(&[0xffu8, 0xfe, 0x00][..])
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = ::redis::cmd("ZADD")
        .arg(tag.as_str())
        .arg("+inf")
        .arg(&b"test:item:\xff"[..])
        .query_async(&mut raw)
        .await
        .unwrap();
    for _ in 0..10 {
        cache.invalidate_tag(&tag).await.unwrap();
    }
    assert_eq!(
        cache.get::<Row>(&key(50)).await,
        None,
        "the real member was reached"
    );
    assert_eq!(cache.stats().pending_invalidations, 0);
    assert_healthy(&cache).await;
}

async fn a_counter_of_another_type_is_a_clear_error(backend: Backend) {
    let (cache, mut raw) = setup(&backend).await;
    let _: () = raw.hset(key(1).as_str(), "f", "v").await.unwrap();
    let _: () = raw.set(key(2).as_str(), "twelve").await.unwrap();
    for _ in 0..10 {
        let err = cache
            .store()
            .increment(&key(1), 1, MINUTE)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WrongType, "{err}");
        assert!(!err.is_unavailable());
        let err = cache
            .store()
            .increment(&key(2), 1, MINUTE)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WrongType, "{err}");
    }
    assert_eq!(cache.store().stats().data_errors, 20);
    assert_healthy(&cache).await;
}

async fn a_lease_left_without_ttl_or_token_does_not_block_the_key(backend: Backend) {
    let (cache, mut raw) = setup(&backend).await;
    // An empty value without TTL (no token beside it): not a live lease.
    let _: () = raw.set(key(1).as_str(), "").await.unwrap();
    // An empty value with a TTL but no token: not a live lease either.
    let _: () = raw.set_ex(key(2).as_str(), "", 3600).await.unwrap();
    // A token without TTL beside an empty value without TTL: not live (the value has no TTL).
    let _: () = raw.set(key(3).as_str(), "").await.unwrap();
    let _: () = raw.set(lease_key(&key(3)), "123").await.unwrap();
    // The marker of earlier versions, without TTL: a value that does not decode.
    let _: () = raw
        .set(key(4).as_str(), "\0speedlayer:lease:123")
        .await
        .unwrap();
    for i in 1..=4 {
        let row = cache
            .get_or_set(&key(i), MINUTE, || async {
                Ok::<_, std::io::Error>(Row { id: i })
            })
            .await
            .unwrap();
        assert_eq!(row, Row { id: i });
        assert_eq!(
            cached(&mut raw, &key(i)).await,
            format!("{{\"id\":{i}}}"),
            "key {i} is cacheable again"
        );
        let ttl: i64 = raw.pttl(key(i).as_str()).await.unwrap();
        assert!(ttl > 0, "key {i} has a TTL");
    }
    assert_eq!(cache.stats().leases_denied, 0);
    assert_healthy(&cache).await;
}

async fn rate_limit_keys_of_another_type_are_repaired(backend: Backend) {
    let (cache, mut raw) = setup(&backend).await;
    let limiter = RateLimiter::new(&cache);
    let who = Identity::ip("192.0.2.44");
    let algorithms = [
        Limit::fixed_window(nz(3), Duration::from_secs(60)).unwrap(),
        Limit::sliding_log(nz(3), Duration::from_secs(60)).unwrap(),
        Limit::sliding_window(nz(3), Duration::from_secs(60)).unwrap(),
        Limit::gcra(nz(3), Duration::from_secs(60), nz(3)).unwrap(),
    ];
    for (i, limit) in algorithms.iter().enumerate() {
        for multi in [false, true] {
            let name = Ident::new(&format!("foreign-{i}-{multi}")).unwrap();
            let mut route = Route::new(name).per_ip(*limit);
            if multi {
                route =
                    route.global(Limit::fixed_window(nz(1000), Duration::from_secs(60)).unwrap());
            }
            let k = limiter.key(&route, LayerKind::Ip, &who).unwrap().unwrap();
            // A list where a string or a sorted set is kept, then a string of another shape.
            let _: () = raw.rpush(k.as_str(), "x").await.unwrap();
            let v = limiter.check(&route, &who).await;
            assert!(v.allowed, "{limit:?}: {v:?}");
            assert_eq!(v.served_by, ServedBy::Backend);
            let _: () = raw.set(k.as_str(), "12:not:a:state").await.unwrap();
            let v = limiter.check(&route, &who).await;
            assert!(
                v.allowed && v.served_by == ServedBy::Backend,
                "{limit:?}: {v:?}"
            );
            // Numbers no admission can have left: infinite, not a number, far in the future.
            for odd in ["inf", "-inf", "nan", "1e300", "0x7fffffffffffffff"] {
                let _: () = raw.set(k.as_str(), odd).await.unwrap();
                let v = limiter.check(&route, &who).await;
                assert!(
                    v.allowed && v.served_by == ServedBy::Backend,
                    "{limit:?} with {odd}: {v:?}"
                );
                let stored: String = raw.get(k.as_str()).await.unwrap_or_default();
                assert_ne!(stored, odd, "{limit:?}: the value was repaired");
            }
            let ttl: i64 = raw.pttl(k.as_str()).await.unwrap();
            assert!(ttl > 0, "{limit:?}: the repaired key has a TTL");
        }
    }
    assert_eq!(cache.store().stats().data_errors, 0);
    assert_healthy(&cache).await;
}

async fn a_value_without_ttl_written_by_another_client_is_read_and_kept(backend: Backend) {
    let (cache, mut raw) = setup(&backend).await;
    let _: () = raw.set(key(1).as_str(), "{\"id\":5}").await.unwrap();
    assert_eq!(cache.get::<Row>(&key(1)).await, Some(Row { id: 5 }));
    assert_eq!(
        cache.store().remaining_ttl(&key(1)).await.unwrap(),
        speedlayer::store::Remaining::NoExpiry
    );
    assert_healthy(&cache).await;
}

redis_backends!(
    a_value_key_of_another_type_is_a_miss_then_replaced,
    a_tag_index_of_another_type_is_replaced_and_the_value_written,
    a_counter_of_another_type_is_a_clear_error,
    a_lease_left_without_ttl_or_token_does_not_block_the_key,
    rate_limit_keys_of_another_type_are_repaired,
    a_value_without_ttl_written_by_another_client_is_read_and_kept,
);
