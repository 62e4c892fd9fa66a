//! Behaviour every `CacheLayer` promises, whatever the backend.

use std::time::Duration;

use bytes::Bytes;
use speedlayer::ErrorKind;
use speedlayer::key::{Ident, Namespace};
use speedlayer::store::{CacheLayer, Entry, Leased, Remaining, is_lease};
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

const LEASE: Ttl = Ttl::seconds(10);

fn tag(name: &str) -> speedlayer::Tag {
    Namespace::root()
        .global()
        .tag(&Ident::from_static("group"), name)
        .unwrap()
}

pub async fn a_lease_is_granted_once_and_reads_as_a_marker(layer: &dyn CacheLayer) {
    assert_eq!(
        layer.get_or_lease(&key(1), 7, LEASE, None).await.unwrap(),
        Leased::Granted
    );
    assert_eq!(
        layer.get_or_lease(&key(1), 8, LEASE, None).await.unwrap(),
        Leased::Denied
    );
    // Backends return the marker as it is stored; the resilient Store reads it as absence.
    match layer.get(&key(1)).await.unwrap() {
        Some(raw) => assert!(is_lease(&raw)),
        None => assert_eq!(layer.kind(), speedlayer::store::BackendKind::Redis),
    }
    assert!(
        layer.get_many(&[key(1)]).await.unwrap()[0]
            .as_ref()
            .is_none_or(|v| is_lease(v))
    );
    match layer.remaining_ttl(&key(1)).await.unwrap() {
        Remaining::Expires(d) => assert!(d <= Duration::from_secs(10)),
        other => panic!("{other:?}"),
    }
}

pub async fn a_leased_set_stores_only_under_its_own_lease(layer: &dyn CacheLayer) {
    layer.get_or_lease(&key(1), 7, LEASE, None).await.unwrap();
    assert!(
        !layer
            .set_leased(&key(1), 8, b("other"), MINUTE)
            .await
            .unwrap()
    );
    assert!(
        layer
            .set_leased(&key(1), 7, b("mine"), MINUTE)
            .await
            .unwrap()
    );
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("mine")));
    // A lease is good for one store.
    assert!(
        !layer
            .set_leased(&key(1), 7, b("again"), MINUTE)
            .await
            .unwrap()
    );
    match layer.remaining_ttl(&key(1)).await.unwrap() {
        Remaining::Expires(d) => assert!(d > Duration::from_secs(50), "{d:?}"),
        other => panic!("{other:?}"),
    }
    // No lease at all: nothing is stored.
    assert!(!layer.set_leased(&key(2), 7, b("x"), MINUTE).await.unwrap());
    assert_eq!(layer.get(&key(2)).await.unwrap(), None);
}

pub async fn a_delete_during_the_lease_refuses_the_set(layer: &dyn CacheLayer) {
    layer.get_or_lease(&key(1), 7, LEASE, None).await.unwrap();
    layer.delete(&key(1)).await.unwrap();
    assert!(
        !layer
            .set_leased(&key(1), 7, b("stale"), MINUTE)
            .await
            .unwrap()
    );
    assert_eq!(layer.get(&key(1)).await.unwrap(), None);
}

pub async fn a_write_during_the_lease_refuses_the_set(layer: &dyn CacheLayer) {
    layer.get_or_lease(&key(1), 7, LEASE, None).await.unwrap();
    layer.set(&key(1), b("written"), MINUTE).await.unwrap();
    assert!(
        !layer
            .set_leased(&key(1), 7, b("loaded"), MINUTE)
            .await
            .unwrap()
    );
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("written")));
}

pub async fn an_expired_lease_refuses_the_set(layer: &dyn CacheLayer) {
    let short = Ttl::from_millis(40).unwrap();
    layer.get_or_lease(&key(1), 7, short, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !layer
            .set_leased(&key(1), 7, b("late"), MINUTE)
            .await
            .unwrap()
    );
    assert_eq!(
        layer.get_or_lease(&key(1), 9, LEASE, None).await.unwrap(),
        Leased::Granted
    );
}

pub async fn an_existing_value_is_returned_instead_of_a_lease(layer: &dyn CacheLayer) {
    layer.set(&key(1), b("cached"), MINUTE).await.unwrap();
    assert_eq!(
        layer.get_or_lease(&key(1), 7, LEASE, None).await.unwrap(),
        Leased::Value(b("cached"))
    );
    // Naming another value as undecodable changes nothing.
    assert_eq!(
        layer
            .get_or_lease(&key(1), 7, LEASE, Some(b"something else"))
            .await
            .unwrap(),
        Leased::Value(b("cached"))
    );
}

pub async fn an_undecodable_value_named_by_the_caller_is_replaced(layer: &dyn CacheLayer) {
    layer.set(&key(1), b("{garbage"), MINUTE).await.unwrap();
    assert_eq!(
        layer
            .get_or_lease(&key(1), 7, LEASE, Some(b"{garbage"))
            .await
            .unwrap(),
        Leased::Granted
    );
    assert!(layer.set_leased(&key(1), 7, b("{}"), MINUTE).await.unwrap());
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("{}")));
}

pub async fn a_tag_removes_its_members_and_nothing_else(layer: &dyn CacheLayer) {
    for i in 0..10 {
        layer.set(&key(i), b("v"), MINUTE).await.unwrap();
    }
    for i in 0..5 {
        layer
            .tag_add(&[tag("a"), tag("b")], &key(i), MINUTE)
            .await
            .unwrap();
    }
    layer.tag_add(&[tag("b")], &key(9), MINUTE).await.unwrap();
    assert_eq!(layer.invalidate_tag(&tag("a")).await.unwrap(), 5);
    for i in 0..5 {
        assert_eq!(layer.get(&key(i)).await.unwrap(), None);
    }
    for i in 5..10 {
        assert_eq!(layer.get(&key(i)).await.unwrap(), Some(b("v")), "{i}");
    }
    // The index is gone with its members.
    assert_eq!(layer.invalidate_tag(&tag("a")).await.unwrap(), 0);
    // Tag b still lists 0..5 (already gone) and 9.
    assert_eq!(layer.invalidate_tag(&tag("b")).await.unwrap(), 1);
    assert_eq!(layer.get(&key(9)).await.unwrap(), None);
    assert_eq!(layer.invalidate_tag(&tag("never-used")).await.unwrap(), 0);
}

pub async fn a_tag_invalidation_during_the_lease_refuses_the_set(layer: &dyn CacheLayer) {
    layer.get_or_lease(&key(1), 7, LEASE, None).await.unwrap();
    layer.tag_add(&[tag("a")], &key(1), MINUTE).await.unwrap();
    layer.invalidate_tag(&tag("a")).await.unwrap();
    assert!(
        !layer
            .set_leased(&key(1), 7, b("stale"), MINUTE)
            .await
            .unwrap()
    );
    assert_eq!(layer.get(&key(1)).await.unwrap(), None);
}

pub async fn a_tag_index_forgets_expired_members(layer: &dyn CacheLayer) {
    let short = Ttl::from_millis(50).unwrap();
    layer.set(&key(1), b("short"), short).await.unwrap();
    layer.tag_add(&[tag("a")], &key(1), short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    // key 1 expired and was written again without the tag; writing the index prunes it.
    layer.set(&key(1), b("untagged"), MINUTE).await.unwrap();
    layer.set(&key(2), b("tagged"), MINUTE).await.unwrap();
    layer.tag_add(&[tag("a")], &key(2), MINUTE).await.unwrap();
    assert_eq!(layer.invalidate_tag(&tag("a")).await.unwrap(), 1);
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("untagged")));
    assert_eq!(layer.get(&key(2)).await.unwrap(), None);
}

pub async fn a_sweep_removes_matching_keys_within_its_bound(layer: &dyn CacheLayer) {
    let scope = Namespace::root().global();
    let domain = Ident::from_static("test");
    let items = scope.keyspace(&domain, &Ident::from_static("item"));
    let others = scope.keyspace(&domain, &Ident::from_static("items"));
    for i in 0..30 {
        layer
            .set(&items.key(i).unwrap(), b("v"), MINUTE)
            .await
            .unwrap();
        layer
            .set(&others.key(i).unwrap(), b("v"), MINUTE)
            .await
            .unwrap();
    }
    let pattern = items.pattern_all();
    assert_eq!(layer.sweep(&pattern, 7, 10).await.unwrap(), 10);
    assert_eq!(layer.sweep(&pattern, 7, 1_000).await.unwrap(), 20);
    for i in 0..30 {
        assert_eq!(layer.get(&items.key(i).unwrap()).await.unwrap(), None);
        assert_eq!(
            layer.get(&others.key(i).unwrap()).await.unwrap(),
            Some(b("v"))
        );
    }
}

/// An invalidation reads a chunk of the index, removes those entries, then drops them from the
/// index; a member registered again in between (a new load, even one with a shorter lifetime)
/// must stay in the index, or its new entry could never be invalidated through the tag.
pub async fn a_member_registered_again_during_an_invalidation_stays_indexed(
    layer: &dyn CacheLayer,
) {
    use speedlayer::store::TagCursor;
    layer.set(&key(1), b("old"), MINUTE).await.unwrap();
    layer
        .tag_add(&[tag("a")], &key(1), Ttl::seconds(3600))
        .await
        .unwrap();
    let chunk = layer
        .tag_members(&tag("a"), &TagCursor::start(), 10)
        .await
        .unwrap();
    assert_eq!(chunk.members.len(), 1);
    assert_eq!(chunk.members[0].key, key(1));
    assert_eq!(layer.delete_many(&[key(1)]).await.unwrap(), 1);
    // A new load registers the key again, with a shorter lifetime, and stores its value.
    layer.tag_add(&[tag("a")], &key(1), MINUTE).await.unwrap();
    layer.set(&key(1), b("new"), MINUTE).await.unwrap();
    // The invalidation finishes its chunk: the member registered again is kept.
    assert_eq!(
        layer.tag_forget(&tag("a"), &chunk.members).await.unwrap(),
        0
    );
    assert_eq!(layer.invalidate_tag(&tag("a")).await.unwrap(), 1);
    assert_eq!(layer.get(&key(1)).await.unwrap(), None);
    // Forgetting what was read does drop members that were not registered again.
    layer.set(&key(2), b("v"), MINUTE).await.unwrap();
    layer.tag_add(&[tag("b")], &key(2), MINUTE).await.unwrap();
    let chunk = layer
        .tag_members(&tag("b"), &TagCursor::start(), 10)
        .await
        .unwrap();
    assert_eq!(
        layer.tag_forget(&tag("b"), &chunk.members).await.unwrap(),
        1
    );
    assert_eq!(layer.invalidate_tag(&tag("b")).await.unwrap(), 0);
    assert_eq!(layer.get(&key(2)).await.unwrap(), Some(b("v")));
}

/// A load that gives its lease up (it failed, or was cancelled) leaves the key empty, and only
/// the lease's own token can give it up.
pub async fn a_lease_is_released_only_by_its_holder(layer: &dyn CacheLayer) {
    assert_eq!(
        layer.get_or_lease(&key(1), 7, LEASE, None).await.unwrap(),
        Leased::Granted
    );
    assert!(!layer.release_lease(&key(1), 8).await.unwrap());
    assert_eq!(
        layer.get_or_lease(&key(1), 9, LEASE, None).await.unwrap(),
        Leased::Denied
    );
    assert!(layer.release_lease(&key(1), 7).await.unwrap());
    assert_eq!(layer.get(&key(1)).await.unwrap(), None);
    assert_eq!(
        layer.get_or_lease(&key(1), 9, LEASE, None).await.unwrap(),
        Leased::Granted
    );
    // A stored value is never released as a lease.
    assert!(layer.set_leased(&key(1), 9, b("v"), MINUTE).await.unwrap());
    assert!(!layer.release_lease(&key(1), 9).await.unwrap());
    assert_eq!(layer.get(&key(1)).await.unwrap(), Some(b("v")));
}

/// A chunked walk of a tag index visits every member once, in chunks of the size asked.
pub async fn a_tag_is_invalidated_in_chunks(layer: &dyn CacheLayer) {
    use speedlayer::store::TagCursor;
    for i in 0..25 {
        layer.set(&key(i), b("v"), MINUTE).await.unwrap();
        layer.tag_add(&[tag("a")], &key(i), MINUTE).await.unwrap();
    }
    let first = layer
        .tag_members(&tag("a"), &TagCursor::start(), 10)
        .await
        .unwrap();
    assert_eq!(first.members.len(), 10);
    let next = first.next.clone().expect("more members follow");
    // The first chunk's entries are removed and leave the index; the walk goes on from there.
    let keys: Vec<_> = first.members.iter().map(|m| m.key.clone()).collect();
    assert_eq!(layer.delete_many(&keys).await.unwrap(), 10);
    assert_eq!(
        layer.tag_forget(&tag("a"), &first.members).await.unwrap(),
        10
    );
    let second = layer.tag_members(&tag("a"), &next, 10).await.unwrap();
    assert_eq!(second.members.len(), 10);
    assert!(second.members.iter().all(|m| !keys.contains(&m.key)));
    // An invalidation cut short after the first chunk goes on where it stopped.
    assert_eq!(layer.invalidate_tag(&tag("a")).await.unwrap(), 15);
    for i in 0..25 {
        assert_eq!(layer.get(&key(i)).await.unwrap(), None, "{i}");
    }
}
