//! The `CacheLayer` behaviour suite, written once and run on every backend: memory, Redis over
//! the multiplexed connection, Redis over the pool, a Redis Cluster, a primary found through
//! Sentinel, and the resilient `Store` wrapping Redis.

#[path = "../support/mod.rs"]
#[macro_use]
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
        #[cfg(feature = "cluster")]
        mod cluster {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = crate::support::Backend::cluster().await;
                    crate::behaviour::$test(&*backend.layer()).await;
                }
            )*
        }
        #[cfg(feature = "sentinel")]
        mod sentinel {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = crate::support::Backend::sentinel().await;
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
    a_member_registered_again_during_an_invalidation_stays_indexed,
    a_lease_is_released_only_by_its_holder,
    a_tag_is_invalidated_in_chunks,
);

mod redis_specific {
    use crate::support::{Backend, key};
    use ::redis::AsyncCommands;
    use speedlayer::ErrorKind;
    use speedlayer::store::CacheLayer;
    use speedlayer::ttl::Ttl;

    async fn values_are_plain_strings_readable_by_other_clients(backend: Backend) {
        let layer = backend.layer();
        layer
            .set(&key(1), "{\"a\":1}".into(), Ttl::seconds(60))
            .await
            .unwrap();
        layer.increment(&key(2), 5, Ttl::seconds(60)).await.unwrap();
        let mut raw = backend.raw().await.expect("a Redis backend");
        let value: String = raw.get(key(1).as_str()).await.unwrap();
        assert_eq!(value, "{\"a\":1}");
        let counter: String = raw.get(key(2).as_str()).await.unwrap();
        assert_eq!(counter, "5");
        let pttl: i64 = raw.pttl(key(1).as_str()).await.unwrap();
        assert!(pttl > 59_000 && pttl <= 60_000, "PTTL {pttl}");
    }

    async fn a_hash_where_a_string_is_expected_is_a_wrong_type_error(backend: Backend) {
        let layer = backend.layer();
        let mut raw = backend.raw().await.expect("a Redis backend");
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

    redis_backends!(
        values_are_plain_strings_readable_by_other_clients,
        a_hash_where_a_string_is_expected_is_a_wrong_type_error,
    );

    fn speedlayer_test_server() -> crate::support::RedisServer {
        crate::support::RedisServer::start()
    }
}

mod foreign;

mod scale {
    use std::time::{Duration, Instant};

    use speedlayer::key::{Ident, Namespace};
    use speedlayer::store::{BreakerState, CacheLayer, MemoryLayer, Store};
    use speedlayer::ttl::Ttl;
    use speedlayer::{Cache, Config};

    use crate::support::{Backend, key};

    /// The memory backend's tag index lives within the cache's bounds: a million tagged writes
    /// into a 1 MiB cache (about 8,000 entries) leave an index of the same order, not a
    /// million members, and `clear` empties it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_million_tagged_writes_leave_the_memory_index_bounded() {
        let memory = MemoryLayer::new(1024 * 1024);
        let scope = Namespace::root().global();
        let shared: Vec<_> = (0..100)
            .map(|i| scope.tag(&Ident::from_static("class"), i).unwrap())
            .collect();
        let started = Instant::now();
        let mut largest = 0;
        for i in 0..1_000_000u32 {
            let own = scope.tag(&Ident::from_static("student"), i).unwrap();
            let tags = [shared[(i % 100) as usize].clone(), own];
            memory
                .tag_add(&tags, &key(i), Ttl::seconds(3600))
                .await
                .unwrap();
            memory
                .set(&key(i), "{}".into(), Ttl::seconds(3600))
                .await
                .unwrap();
            if i % 10_000 == 0 {
                largest = largest.max(memory.tag_index_members());
            }
        }
        largest = largest.max(memory.tag_index_members());
        // Entries the byte budget holds: 1 MiB / (96 bytes of overhead + key + value).
        let capacity = 1024 * 1024 / 96;
        eprintln!(
            "1,000,000 tagged writes (2 tags each) into 1 MiB: at most {largest} index members \
             (cache capacity about {capacity} entries), {:.1} s",
            started.elapsed().as_secs_f64()
        );
        assert!(
            largest <= 8 * capacity,
            "the index grew to {largest} members for a cache of about {capacity} entries"
        );
        // Every member still indexed is removed by its tag: the bound never drops a live entry.
        let live = memory.tag_index_members();
        assert!(live > 0);
        memory.clear();
        assert_eq!(memory.tag_index_members(), 0);
    }

    /// A tag of 100,000 members is invalidated in chunks, each within the operation timeout
    /// (100 ms by default): it finishes, with the breaker closed, on both backends.
    async fn a_tag_of_a_hundred_thousand_members_is_invalidated(backend: Backend) {
        let populate = Store::connect(&backend.config().op_timeout(Duration::from_secs(30)))
            .await
            .unwrap();
        let scope = Namespace::root().global();
        let tag = scope.tag(&Ident::from_static("school"), 1).unwrap();
        let started = Instant::now();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..100_000u32 {
            let (store, tag) = (populate.clone(), tag.clone());
            writes.spawn(async move {
                store
                    .set_tagged(&key(i), "{}".into(), Ttl::seconds(600), &[tag])
                    .await
                    .unwrap();
            });
            if writes.len() >= 2_000 {
                while let Some(done) = writes.join_next().await {
                    done.unwrap();
                }
            }
        }
        while let Some(done) = writes.join_next().await {
            done.unwrap();
        }
        let filled = started.elapsed();
        // The default configuration: a 100 ms operation timeout.
        let cache = match &backend {
            Backend::Memory(_) => Cache::from_store(populate.clone(), &Config::memory()),
            _ => Cache::new(Config::redis(backend.redis_config().unwrap()))
                .await
                .unwrap(),
        };
        let started = Instant::now();
        let removed = cache.invalidate_tag(&tag).await.unwrap();
        let took = started.elapsed();
        eprintln!(
            "{:?}: 100,000 members indexed in {:.1} s, invalidated in {:.2} s",
            cache.stats().backend,
            filled.as_secs_f64(),
            took.as_secs_f64()
        );
        assert_eq!(removed, 100_000);
        let stats = cache.stats();
        assert_eq!(stats.breaker, BreakerState::Closed, "{stats:?}");
        assert_eq!(stats.pending_invalidations, 0);
        for i in (0..100_000u32).step_by(997) {
            assert_eq!(populate.get(&key(i)).await.unwrap(), None, "{i}");
        }
        assert_eq!(cache.invalidate_tag(&tag).await.unwrap(), 0);
    }

    both_backends!(a_tag_of_a_hundred_thousand_members_is_invalidated);
}
