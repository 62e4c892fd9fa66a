//! The typed `Cache` behaviour suite, run on the memory backend, on a real Redis, on a local
//! Redis Cluster and on a primary found through Sentinel.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

mod batch;
mod behaviour;
mod fetch;
mod leases;
mod races;

macro_rules! cache_suite {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = crate::support::Backend::memory();
                    crate::suite::$test(&backend).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = crate::support::Backend::redis().await;
                    crate::suite::$test(&backend).await;
                }
            )*
        }
        #[cfg(feature = "cluster")]
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = crate::support::Backend::cluster().await;
                    crate::suite::$test(&backend).await;
                }
            )*
        }
        #[cfg(feature = "sentinel")]
        mod sentinel {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = crate::support::Backend::sentinel().await;
                    crate::suite::$test(&backend).await;
                }
            )*
        }
    };
}

/// Every behaviour of the suite, whichever file it is written in.
mod suite {
    pub use crate::batch::*;
    pub use crate::behaviour::*;
    pub use crate::fetch::*;
    pub use crate::leases::*;
    pub use crate::races::*;
}

cache_suite!(
    get_or_set_loads_once_then_hits,
    concurrent_callers_share_one_loader_call,
    loader_errors_are_shared_returned_and_never_cached,
    a_cancelled_loader_is_taken_over_by_a_waiter,
    none_is_cached_for_the_negative_ttl,
    values_are_stored_as_plain_json,
    undecodable_values_are_misses_that_are_deleted_and_counted,
    a_changed_schema_is_a_miss,
    ttls_are_jittered_within_the_policy,
    oversized_values_are_refused_or_left_uncached,
    get_many_decodes_each_entry,
    get_many_passes_over_a_load_in_progress,
    delete_removes,
    set_and_get_with_hostile_ids,
    stats_describe_the_backend,
    cancelled_load_releases_its_lease,
    callers_served_by_another_load_count_as_coalesced,
    callers_share_a_load_that_cannot_be_cached,
    a_batch_loads_only_the_misses_in_one_call,
    absent_rows_are_cached_for_the_negative_ttl,
    overlapping_batches_load_each_key_once,
    an_invalidation_during_the_batch_load_is_not_stored,
    a_loader_error_fails_only_the_keys_it_was_for,
    undecodable_entries_and_duplicate_ids,
    batches_across_app_servers_share_leases,
    set_many_exists_remaining_ttl_and_touch,
    touch_keeps_the_entry_reachable_by_its_tags,
    a_cancelled_batch_is_taken_over_by_the_batches_waiting_on_it,
    overlapping_batches_of_two_app_servers_never_hold_each_other_up,
    one_id_under_two_keys_gets_its_row_twice,
    nested_loads_racing_writes_never_serve_older_rows,
    an_entry_built_from_a_cached_entry_during_its_invalidation_is_removed_too,
    concurrent_invalidations_of_one_tag_each_remove_its_entries,
    the_second_of_two_concurrent_invalidations_removes_what_was_built_meanwhile,
    fail_safe_serves_an_expired_value_when_the_loader_fails,
    an_invalidated_value_is_never_served_stale,
    a_soft_timeout_serves_stale_and_the_load_finishes_behind,
    a_hard_timeout_without_a_stale_value_is_an_error,
    a_refresh_racing_a_delete_is_not_stored,
    xfetch_refreshes_a_hot_key_before_it_expires,
);

/// Other clients' data under our keys, on every Redis backend.
mod redis_only {
    use ::redis::AsyncCommands;
    use serde::{Deserialize, Serialize};
    use speedlayer::Cache;
    use speedlayer::ttl::Ttl;

    use crate::support::{Backend, key};

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Row {
        id: u32,
    }

    /// Another client's data where `fetch` looks (a hash, text that is not JSON, a value
    /// without a TTL): a miss that the load replaces, or a value served as it is; never an error
    /// and never a breaker trip.
    async fn fetch_over_another_clients_data(backend: Backend) {
        use speedlayer::cache::FetchPolicy;
        let cache = Cache::new(backend.config()).await.unwrap();
        let mut raw = backend.raw().await.expect("a Redis backend");
        let (hash, text, forever) = (key("f-hash"), key("f-text"), key("f-forever"));
        let _: () = raw.hset(hash.as_str(), "f", "v").await.unwrap();
        let _: () = raw.set(text.as_str(), "not json").await.unwrap();
        let _: () = raw.set(forever.as_str(), r#"{"id":9}"#).await.unwrap();
        let policy = FetchPolicy::new(Ttl::seconds(60)).grace(std::time::Duration::from_secs(60));
        for k in [&hash, &text] {
            let got = cache
                .fetch(k, &policy, || async {
                    Ok::<_, std::io::Error>(Row { id: 1 })
                })
                .await
                .unwrap();
            assert_eq!((got.value, got.stale), (Row { id: 1 }, false));
            let again = cache
                .fetch(k, &policy, || async {
                    Ok::<_, std::io::Error>(Row { id: 2 })
                })
                .await
                .unwrap();
            assert_eq!(
                again.value,
                Row { id: 1 },
                "the load replaced it and is cached"
            );
        }
        // Without a TTL it never goes stale: served as it is.
        let got = cache
            .fetch(&forever, &policy, || async {
                Ok::<_, std::io::Error>(Row { id: 1 })
            })
            .await
            .unwrap();
        assert_eq!((got.value, got.stale), (Row { id: 9 }, false));
        crate::support::assert_healthy(&cache).await;
    }

    async fn a_wrong_redis_type_is_a_counted_miss_and_is_deleted(backend: Backend) {
        let cache = Cache::new(backend.config()).await.unwrap();
        let mut raw = backend.raw().await.expect("a Redis backend");
        let _: () = raw.hset(key(1).as_str(), "id", "1").await.unwrap();
        let _: () = raw.lpush(key(2).as_str(), "x").await.unwrap();

        assert_eq!(cache.get::<Row>(&key(1)).await, None);
        // Deleted beside the request: wait for it, bounded (a busy machine may time a call out,
        // and then the delete is queued and applied by the next probe).
        let mut exists = true;
        for _ in 0..500 {
            exists = raw.exists(key(1).as_str()).await.unwrap();
            if !exists {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!exists, "the hash must be deleted");
        let row = cache
            .get_or_set(&key(2), Ttl::seconds(60), || async {
                Ok::<_, std::io::Error>(Row { id: 2 })
            })
            .await
            .unwrap();
        assert_eq!(row, Row { id: 2 });
        let stored: String = raw.get(key(2).as_str()).await.unwrap();
        assert_eq!(stored, r#"{"id":2}"#);
        assert_eq!(cache.stats().decode_failures, 2);
        assert_eq!(
            cache.stats().errors,
            0,
            "a wrong type is not a backend failure"
        );
    }

    /// Another client's keys of other types inside a batch are loaded over (the batch's lease
    /// replaces them), and `exists`, `remaining_ttl` and `touch` treat them as no value and leave
    /// them alone; a value another client wrote without a TTL reads as `NoExpiry`.
    async fn foreign_types_in_batches_and_the_typed_helpers(backend: Backend) {
        use speedlayer::store::Remaining;
        use std::collections::HashMap;
        let cache = Cache::new(backend.config()).await.unwrap();
        let mut raw = backend.raw().await.expect("a Redis backend");
        let _: () = raw.hset(key(1).as_str(), "id", "1").await.unwrap();
        let _: () = raw.lpush(key(2).as_str(), "x").await.unwrap();
        let _: () = raw.set(key(3).as_str(), r#"{"id":3}"#).await.unwrap();

        assert!(!cache.exists(&key(1)).await);
        assert_eq!(cache.remaining_ttl(&key(2)).await, Remaining::Missing);
        assert!(!cache.touch(&key(1), Ttl::seconds(60)).await);
        let ttl: i64 = raw.pttl(key(1).as_str()).await.unwrap();
        assert_eq!(ttl, -1, "another client's hash is left as it was");
        assert!(cache.exists(&key(3)).await);
        assert_eq!(cache.remaining_ttl(&key(3)).await, Remaining::NoExpiry);

        let ids: Vec<(u32, speedlayer::Key)> = (1..=4).map(|id| (id, key(id))).collect();
        let batch = cache
            .get_or_set_many(
                &ids,
                Ttl::seconds(60),
                Ttl::seconds(5),
                |ids: Vec<u32>| async move {
                    Ok::<_, std::io::Error>(
                        ids.into_iter()
                            .map(|id| (id, Row { id }))
                            .collect::<HashMap<_, _>>(),
                    )
                },
            )
            .await;
        assert!(batch.is_complete());
        for id in 1..=4 {
            assert_eq!(batch.get(&id).unwrap().as_ref().unwrap(), &Some(Row { id }));
        }
        for id in [1, 2, 4] {
            let stored: String = raw.get(key(id).as_str()).await.unwrap();
            assert_eq!(stored, format!(r#"{{"id":{id}}}"#));
        }
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.loader_calls), (1, 3, 1));
        assert_eq!(s.errors, 0, "a wrong type is not a backend failure");
    }

    redis_backends!(
        fetch_over_another_clients_data,
        a_wrong_redis_type_is_a_counted_miss_and_is_deleted,
        foreign_types_in_batches_and_the_typed_helpers,
    );
}
