//! The `CacheLayer` behaviour suite, written once and run on every backend: memory, Redis over
//! the multiplexed connection, Redis over the pool, and the resilient `Store` wrapping Redis.

#[path = "../support/mod.rs"]
mod support;

mod behaviour;

macro_rules! behaviour_suite {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = crate::support::Backend::memory();
                    crate::behaviour::$test(&*backend.layer()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = crate::support::Backend::redis().await;
                    crate::behaviour::$test(&*backend.layer()).await;
                }
            )*
        }
        mod redis_pooled {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = crate::support::Backend::redis_pooled().await;
                    crate::behaviour::$test(&*backend.layer()).await;
                }
            )*
        }
        mod store_over_redis {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = crate::support::Backend::redis().await;
                    let store = speedlayer::store::Store::from_layer(
                        backend.layer(),
                        &backend.config(),
                    );
                    crate::behaviour::$test(&store).await;
                }
            )*
        }
    };
}

behaviour_suite!(
    get_of_a_missing_key_is_none,
    set_then_get_round_trips_bytes,
    set_replaces_the_value_and_ttl,
    entries_expire,
    remaining_ttl_reports_the_ttl,
    get_many_keeps_order_and_reports_missing,
    set_many_applies_each_ttl,
    delete_reports_what_it_removed,
    delete_many_counts_removed_entries,
    set_if_absent_only_stores_once,
    set_if_absent_succeeds_after_expiry,
    increment_counts_from_zero_and_refreshes_the_ttl,
    increment_refuses_a_non_integer,
    increment_refuses_overflow,
    hostile_ids_never_collide,
    large_values_round_trip,
    ping_answers,
    a_lease_is_granted_once_and_reads_as_a_marker,
    a_leased_set_stores_only_under_its_own_lease,
    a_delete_during_the_lease_refuses_the_set,
    a_write_during_the_lease_refuses_the_set,
    an_expired_lease_refuses_the_set,
    an_existing_value_is_returned_instead_of_a_lease,
    an_undecodable_value_named_by_the_caller_is_replaced,
    a_tag_removes_its_members_and_nothing_else,
    a_tag_invalidation_during_the_lease_refuses_the_set,
    a_tag_index_forgets_expired_members,
    a_sweep_removes_matching_keys_within_its_bound,
);

mod redis_specific {
    use crate::support::{Backend, key};
    use redis::AsyncCommands;
    use speedlayer::ErrorKind;
    use speedlayer::store::CacheLayer;
    use speedlayer::ttl::Ttl;

    #[tokio::test]
    async fn values_are_plain_strings_readable_by_other_clients() {
        let backend = Backend::redis().await;
        let layer = backend.layer();
        let server = backend.server().unwrap();
        layer
            .set(&key(1), "{\"a\":1}".into(), Ttl::seconds(60))
            .await
            .unwrap();
        layer.increment(&key(2), 5, Ttl::seconds(60)).await.unwrap();
        let mut raw = server.raw().await;
        let value: String = raw.get(key(1).as_str()).await.unwrap();
        assert_eq!(value, "{\"a\":1}");
        let counter: String = raw.get(key(2).as_str()).await.unwrap();
        assert_eq!(counter, "5");
        let pttl: i64 = raw.pttl(key(1).as_str()).await.unwrap();
        assert!(pttl > 59_000 && pttl <= 60_000, "PTTL {pttl}");
    }

    #[tokio::test]
    async fn a_hash_where_a_string_is_expected_is_a_wrong_type_error() {
        let backend = Backend::redis().await;
        let layer = backend.layer();
        let mut raw = backend.server().unwrap().raw().await;
        let _: () = raw.hset(key(1).as_str(), "f", "v").await.unwrap();
        let err = layer.get(&key(1)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WrongType, "{err}");
        assert!(!err.is_unavailable());
        // MGET reads a non-string as nil.
        assert_eq!(layer.get_many(&[key(1)]).await.unwrap(), vec![None]);
        let err = layer
            .increment(&key(1), 1, Ttl::seconds(1))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WrongType, "{err}");
        // SET replaces any type.
        layer
            .set(&key(1), "x".into(), Ttl::seconds(5))
            .await
            .unwrap();
        assert_eq!(
            layer.get(&key(1)).await.unwrap().as_deref(),
            Some(&b"x"[..])
        );
    }

    #[tokio::test]
    async fn a_server_that_is_down_at_start_is_reached_once_it_is_up() {
        let mut server = speedlayer_test_server();
        server.kill();
        let layer = speedlayer::store::redis::RedisLayer::connect(&server.redis_config())
            .await
            .expect("connecting is lazy");
        let err = layer.get(&key(1)).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        server.restart();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match layer.get(&key(1)).await {
                Ok(v) => {
                    assert_eq!(v, None);
                    break;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("not reconnected within 5 s: {e}\n{}", server.log()),
            }
        }
    }

    fn speedlayer_test_server() -> crate::support::RedisServer {
        crate::support::RedisServer::start()
    }
}
