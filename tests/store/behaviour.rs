//! Behaviour every `CacheLayer` promises, whatever the backend.

use std::time::Duration;

use bytes::Bytes;
use speedlayer::ErrorKind;
use speedlayer::key::{Ident, Namespace};
use speedlayer::store::{CacheLayer, Entry, Remaining};
use speedlayer::ttl::Ttl;

use crate::support::key;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

const MINUTE: Ttl = Ttl::seconds(60);

pub async fn get_of_a_missing_key_is_none(layer: &dyn CacheLayer) {
    assert_eq!(layer.get(&key("absent")).await.unwrap(), None);
}

pub async fn set_then_get_round_trips_bytes(layer: &dyn CacheLayer) {
    let binary = Bytes::from_static(&[0, 159, 146, 150, 255, b'\n', b':']);
    layer.set(&key(1), binary.clone(), MINUTE).await.unwrap();
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(binary));
    layer.set(&key(2), Bytes::new(), MINUTE).await.unwrap();
    assert_eq!(layer.get(&key(2)).await.unwrap(), Some(Bytes::new()));
}

pub async fn set_replaces_the_value_and_ttl(layer: &dyn CacheLayer) {
    layer.set(&key(1), b("a"), MINUTE).await.unwrap();
    layer.set(&key(1), b("b"), Ttl::seconds(5)).await.unwrap();
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("b")));
    match layer.remaining_ttl(&key(1)).await.unwrap() {
        Remaining::Expires(d) => assert!(d <= Duration::from_secs(5), "{d:?}"),
        other => panic!("{other:?}"),
    }
}

pub async fn entries_expire(layer: &dyn CacheLayer) {
    layer
        .set(&key(1), b("short"), Ttl::from_millis(50).unwrap())
        .await
        .unwrap();
    layer.set(&key(2), b("long"), MINUTE).await.unwrap();
    // Memory expiry follows std::time::Instant (moka), so this test waits for real.
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(layer.get(&key(1)).await.unwrap(), None);
    assert_eq!(layer.get(&key(2)).await.unwrap(), Some(b("long")));
    assert_eq!(
        layer.remaining_ttl(&key(1)).await.unwrap(),
        Remaining::Missing
    );
}

pub async fn remaining_ttl_reports_the_ttl(layer: &dyn CacheLayer) {
    assert_eq!(
        layer.remaining_ttl(&key(1)).await.unwrap(),
        Remaining::Missing
    );
    layer.set(&key(1), b("v"), Ttl::seconds(10)).await.unwrap();
    match layer.remaining_ttl(&key(1)).await.unwrap() {
        Remaining::Expires(d) => {
            assert!(
                d > Duration::from_secs(9) && d <= Duration::from_secs(10),
                "{d:?}"
            )
        }
        other => panic!("{other:?}"),
    }
}

pub async fn get_many_keeps_order_and_reports_missing(layer: &dyn CacheLayer) {
    layer.set(&key(1), b("one"), MINUTE).await.unwrap();
    layer.set(&key(3), b("three"), MINUTE).await.unwrap();
    let got = layer
        .get_many(&[key(3), key(2), key(1), key(3)])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![Some(b("three")), None, Some(b("one")), Some(b("three"))]
    );
    assert_eq!(
        layer.get_many(&[]).await.unwrap(),
        Vec::<Option<Bytes>>::new()
    );
}

pub async fn set_many_applies_each_ttl(layer: &dyn CacheLayer) {
    let entries = vec![
        Entry {
            key: key(1),
            value: b("a"),
            ttl: Ttl::seconds(10),
        },
        Entry {
            key: key(2),
            value: b("b"),
            ttl: Ttl::seconds(1000),
        },
    ];
    layer.set_many(&entries).await.unwrap();
    layer.set_many(&[]).await.unwrap();
    assert_eq!(
        layer.get_many(&[key(1), key(2)]).await.unwrap(),
        vec![Some(b("a")), Some(b("b"))]
    );
    let Remaining::Expires(first) = layer.remaining_ttl(&key(1)).await.unwrap() else {
        panic!("key 1 has no TTL");
    };
    let Remaining::Expires(second) = layer.remaining_ttl(&key(2)).await.unwrap() else {
        panic!("key 2 has no TTL");
    };
    assert!(first <= Duration::from_secs(10));
    assert!(second > Duration::from_secs(900));
}

pub async fn delete_reports_what_it_removed(layer: &dyn CacheLayer) {
    layer.set(&key(1), b("v"), MINUTE).await.unwrap();
    assert!(layer.delete(&key(1)).await.unwrap());
    assert!(!layer.delete(&key(1)).await.unwrap());
    assert_eq!(layer.get(&key(1)).await.unwrap(), None);
}

pub async fn delete_many_counts_removed_entries(layer: &dyn CacheLayer) {
    for i in 0..5 {
        layer.set(&key(i), b("v"), MINUTE).await.unwrap();
    }
    let removed = layer
        .delete_many(&[key(0), key(1), key(2), key(99)])
        .await
        .unwrap();
    assert_eq!(removed, 3);
    assert_eq!(layer.delete_many(&[]).await.unwrap(), 0);
    assert_eq!(
        layer.get_many(&[key(0), key(3), key(4)]).await.unwrap(),
        vec![None, Some(b("v")), Some(b("v"))]
    );
}

pub async fn set_if_absent_only_stores_once(layer: &dyn CacheLayer) {
    assert!(
        layer
            .set_if_absent(&key(1), b("first"), MINUTE)
            .await
            .unwrap()
    );
    assert!(
        !layer
            .set_if_absent(&key(1), b("second"), MINUTE)
            .await
            .unwrap()
    );
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("first")));
    layer.delete(&key(1)).await.unwrap();
    assert!(
        layer
            .set_if_absent(&key(1), b("third"), MINUTE)
            .await
            .unwrap()
    );
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("third")));
}

pub async fn set_if_absent_succeeds_after_expiry(layer: &dyn CacheLayer) {
    assert!(
        layer
            .set_if_absent(&key(1), b("a"), Ttl::from_millis(40).unwrap())
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(layer.set_if_absent(&key(1), b("b"), MINUTE).await.unwrap());
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("b")));
}

pub async fn increment_counts_from_zero_and_refreshes_the_ttl(layer: &dyn CacheLayer) {
    assert_eq!(
        layer.increment(&key(1), 1, Ttl::seconds(5)).await.unwrap(),
        1
    );
    assert_eq!(
        layer.increment(&key(1), 41, Ttl::seconds(5)).await.unwrap(),
        42
    );
    assert_eq!(layer.increment(&key(1), -50, MINUTE).await.unwrap(), -8);
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("-8")));
    match layer.remaining_ttl(&key(1)).await.unwrap() {
        Remaining::Expires(d) => assert!(d > Duration::from_secs(50), "TTL not refreshed: {d:?}"),
        other => panic!("{other:?}"),
    }
}

pub async fn increment_refuses_a_non_integer(layer: &dyn CacheLayer) {
    layer.set(&key(1), b("not a number"), MINUTE).await.unwrap();
    let err = layer.increment(&key(1), 1, MINUTE).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongType, "{err}");
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("not a number")));
}

pub async fn increment_refuses_overflow(layer: &dyn CacheLayer) {
    layer.increment(&key(1), i64::MAX, MINUTE).await.unwrap();
    let err = layer.increment(&key(1), 1, MINUTE).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overflow, "{err}");
    assert_eq!(layer.increment(&key(1), 0, MINUTE).await.unwrap(), i64::MAX);
}

pub async fn hostile_ids_never_collide(layer: &dyn CacheLayer) {
    let ids = [
        "a:b",
        "a%3Ab",
        "a b",
        "a\nb",
        "*",
        "?",
        "[x]",
        "2001:db8::1",
        "ana@school.org",
        "ü",
        "{tag}",
        "\\",
        &"z".repeat(256),
    ];
    for (i, id) in ids.iter().enumerate() {
        layer
            .set(&key(id), Bytes::from(i.to_string()), MINUTE)
            .await
            .unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            layer.get(&key(id)).await.unwrap(),
            Some(Bytes::from(i.to_string())),
            "{id:?}"
        );
    }
    let tenant_a = Namespace::root().tenant("a").unwrap();
    let tenant_b = Namespace::root().tenant("b").unwrap();
    let entity = Ident::from_static("item");
    let domain = Ident::from_static("test");
    let ka = tenant_a.key(&domain, &entity, 1).unwrap();
    let kb = tenant_b.key(&domain, &entity, 1).unwrap();
    layer.set(&ka, b("a"), MINUTE).await.unwrap();
    assert_eq!(layer.get(&kb).await.unwrap(), None);
}

pub async fn large_values_round_trip(layer: &dyn CacheLayer) {
    let big = Bytes::from(vec![b'x'; 1024 * 1024]);
    layer.set(&key(1), big.clone(), MINUTE).await.unwrap();
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(big));
}

pub async fn ping_answers(layer: &dyn CacheLayer) {
    layer.ping().await.unwrap();
}
