//! The seed events through `Cache::invalidate`, tags, tag rules, outages and restarts.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use speedlayer::Cache;
use speedlayer::key::{Ident, Namespace};
use speedlayer::store::CacheLayer;
use speedlayer::ttl::Ttl;

use crate::school::*;
use crate::support::Backend;

const MINUTE: Ttl = Ttl::seconds(60);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub version: u32,
}

async fn fill(cache: &Cache, key: &speedlayer::Key, tags: &[speedlayer::Tag]) {
    cache
        .get_or_set_tagged(key, MINUTE, tags, || async {
            Ok::<_, std::io::Error>(View { version: 1 })
        })
        .await
        .unwrap();
    assert!(cache.get::<View>(key).await.is_some(), "{key} cached");
}

async fn cached(cache: &Cache, key: &speedlayer::Key) -> bool {
    cache.get::<View>(key).await.is_some()
}

both_backends!(
    student_profile_updated_removes_the_dashboard_and_the_role,
    fee_payment_removes_the_summary_and_every_dashboard_showing_it,
    user_suspended_reaches_every_dashboard_through_the_tag_rule,
    role_changed_removes_only_the_role,
    a_prefixed_deployment_invalidates_its_own_keys_only,
    a_tag_over_many_unrelated_keys_removes_exactly_its_members,
);

async fn student_profile_updated_removes_the_dashboard_and_the_role(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    for k in [
        dashboard(&ns, &STUDENT, 1),
        role(&ns, 1),
        dashboard(&ns, &STUDENT, 2),
    ] {
        fill(&cache, &k, &[]).await;
    }
    let report = cache
        .invalidate(&StudentProfileUpdated { student_id: 1 })
        .await
        .unwrap();
    assert_eq!(report.keys, vec![dashboard(&ns, &STUDENT, 1), role(&ns, 1)]);
    assert_eq!(report.keys_removed, 2);
    assert_eq!(report.removed(), 2);
    assert!(!report.deferred);
    assert!(
        report.event.ends_with("StudentProfileUpdated"),
        "{}",
        report.event
    );
    assert!(!cached(&cache, &dashboard(&ns, &STUDENT, 1)).await);
    assert!(!cached(&cache, &role(&ns, 1)).await);
    assert!(cached(&cache, &dashboard(&ns, &STUDENT, 2)).await);
    assert_eq!(cache.stats().invalidations, 1);
}

async fn fee_payment_removes_the_summary_and_every_dashboard_showing_it(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    fill(&cache, &fees(&ns, 5), &[]).await;
    fill(&cache, &fees(&ns, 6), &[]).await;
    fill(
        &cache,
        &dashboard(&ns, &STUDENT, 5),
        &[shows_student(&ns, 5)],
    )
    .await;
    // A parent of students 5 and 6, and a parent of student 6 only.
    fill(
        &cache,
        &dashboard(&ns, &PARENT, 90),
        &[shows_student(&ns, 5), shows_student(&ns, 6)],
    )
    .await;
    fill(
        &cache,
        &dashboard(&ns, &PARENT, 91),
        &[shows_student(&ns, 6)],
    )
    .await;

    let report = cache
        .invalidate(&FeePaymentRecorded { student_id: 5 })
        .await
        .unwrap();
    assert_eq!((report.keys_removed, report.tag_entries_removed), (1, 2));
    assert!(!cached(&cache, &fees(&ns, 5)).await);
    assert!(!cached(&cache, &dashboard(&ns, &STUDENT, 5)).await);
    assert!(!cached(&cache, &dashboard(&ns, &PARENT, 90)).await);
    assert!(cached(&cache, &fees(&ns, 6)).await);
    assert!(cached(&cache, &dashboard(&ns, &PARENT, 91)).await);
    // Invalidating again finds nothing left.
    let again = cache
        .invalidate(&FeePaymentRecorded { student_id: 5 })
        .await
        .unwrap();
    assert_eq!(again.removed(), 0);
}

async fn user_suspended_reaches_every_dashboard_through_the_tag_rule(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    // User 7 is a teacher and a parent; the rule tags both dashboards with user:7.
    fill(&cache, &dashboard(&ns, &TEACHER, 7), &[]).await;
    fill(&cache, &dashboard(&ns, &PARENT, 7), &[]).await;
    fill(&cache, &dashboard(&ns, &TEACHER, 8), &[]).await;
    fill(&cache, &role(&ns, 7), &[]).await;
    let report = cache
        .invalidate(&UserSuspended { user_id: 7 })
        .await
        .unwrap();
    assert_eq!((report.keys_removed, report.tag_entries_removed), (1, 2));
    assert!(!cached(&cache, &dashboard(&ns, &TEACHER, 7)).await);
    assert!(!cached(&cache, &dashboard(&ns, &PARENT, 7)).await);
    assert!(!cached(&cache, &role(&ns, 7)).await);
    assert!(cached(&cache, &dashboard(&ns, &TEACHER, 8)).await);
}

async fn role_changed_removes_only_the_role(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    fill(&cache, &role(&ns, 3), &[]).await;
    fill(&cache, &dashboard(&ns, &TEACHER, 3), &[]).await;
    let report = cache.invalidate(&RoleChanged { user_id: 3 }).await.unwrap();
    assert_eq!(report.removed(), 1);
    assert!(!cached(&cache, &role(&ns, 3)).await);
    assert!(cached(&cache, &dashboard(&ns, &TEACHER, 3)).await);
}

async fn a_prefixed_deployment_invalidates_its_own_keys_only(backend: Backend) {
    let staging_ns = Namespace::with_prefix(Ident::from_static("staging"));
    let prod_ns = Namespace::with_prefix(Ident::from_static("prod"));
    let staging = cache_with_registry(backend.config().namespace(staging_ns.clone())).await;
    // On Redis both deployments share the server; on memory each cache is its own process.
    let prod = cache_with_registry(backend.config().namespace(prod_ns.clone())).await;
    fill(&staging, &role(&staging_ns, 1), &[]).await;
    fill(&prod, &role(&prod_ns, 1), &[]).await;
    assert_eq!(role(&staging_ns, 1).as_str(), "staging:auth:role:1");
    let report = staging
        .invalidate(&RoleChanged { user_id: 1 })
        .await
        .unwrap();
    assert_eq!(report.keys, vec![role(&staging_ns, 1)]);
    assert!(!cached(&staging, &role(&staging_ns, 1)).await);
    assert!(cached(&prod, &role(&prod_ns, 1)).await);
}

async fn a_tag_over_many_unrelated_keys_removes_exactly_its_members(backend: Backend) {
    let cache = cache_with_registry(backend.config()).await;
    let ns = cache.namespace().clone();
    let unrelated = ns
        .global()
        .keyspace(&Ident::from_static("noise"), &Ident::from_static("row"));
    let entries: Vec<_> = (0..5_000)
        .map(|i| speedlayer::store::Entry {
            key: unrelated.key(i).unwrap(),
            value: bytes::Bytes::from_static(b"{\"version\":0}"),
            ttl: MINUTE,
        })
        .collect();
    cache.store().set_many(&entries).await.unwrap();
    let tag = shows_student(&ns, 1);
    for i in 0..100 {
        fill(
            &cache,
            &dashboard(&ns, &PARENT, 1_000 + i),
            std::slice::from_ref(&tag),
        )
        .await;
    }
    assert_eq!(cache.invalidate_tag(&tag).await.unwrap(), 100);
    for i in 0..100 {
        assert!(!cached(&cache, &dashboard(&ns, &PARENT, 1_000 + i)).await);
    }
    let sample: Vec<_> = (0..5_000)
        .step_by(97)
        .map(|i| unrelated.key(i).unwrap())
        .collect();
    assert!(
        cache
            .store()
            .get_many(&sample)
            .await
            .unwrap()
            .iter()
            .all(Option::is_some)
    );
}

mod redis_only {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use ::redis::AsyncCommands;

    use super::*;
    use crate::support::RedisServer;

    fn config(server: &RedisServer) -> speedlayer::Config {
        speedlayer::Config::redis(server.redis_config()).op_timeout(Duration::from_millis(250))
    }

    /// Polls `get_or_set` until Redis serves again; every value seen must be the new one.
    async fn read_until_primary(cache: &Cache, key: &speedlayer::Key) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = cache
                .get_or_set(key, MINUTE, || async {
                    Ok::<_, std::io::Error>(View { version: 2 })
                })
                .await
                .unwrap();
            assert_eq!(seen, View { version: 2 }, "a stale value was served");
            if cache.stats().connected && cache.stats().pending_invalidations == 0 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{:?}", cache.stats());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invalidation_during_an_outage_is_applied_before_redis_serves_again() {
        let mut server = RedisServer::start();
        let cache = cache_with_registry(config(&server)).await;
        let ns = cache.namespace().clone();
        fill(&cache, &role(&ns, 1), &[]).await;
        fill(
            &cache,
            &dashboard(&ns, &STUDENT, 5),
            &[shows_student(&ns, 5)],
        )
        .await;

        server.freeze();
        let report = cache.invalidate(&RoleChanged { user_id: 1 }).await.unwrap();
        assert!(report.deferred);
        let report = cache
            .invalidate(&FeePaymentRecorded { student_id: 5 })
            .await
            .unwrap();
        assert!(report.deferred);
        assert_eq!(
            cache.stats().pending_invalidations,
            3,
            "{:?}",
            cache.stats()
        );
        server.thaw();

        read_until_primary(&cache, &role(&ns, 1)).await;
        read_until_primary(&cache, &dashboard(&ns, &STUDENT, 5)).await;
        let mut raw = server.raw().await;
        let index: u64 = raw.zcard(shows_student(&ns, 5).as_str()).await.unwrap();
        assert_eq!(index, 0, "the tag index was consumed by the replay");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_loses_leases_and_indexes_together() {
        let mut server = RedisServer::start();
        let cache = cache_with_registry(config(&server)).await;
        let ns = cache.namespace().clone();
        let store = cache.store();
        let key = role(&ns, 1);
        assert_eq!(
            store.get_or_lease(&key, 42, MINUTE, None).await.unwrap(),
            speedlayer::store::Leased::Granted
        );
        store
            .tag_add(&[user_tag(&ns, "1").unwrap()], &key, MINUTE)
            .await
            .unwrap();
        server.restart();
        // Until the connection is back, the store may be unusable; then the lease is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stored = store
                .set_leased_at(
                    &key,
                    42,
                    "\"old\"".into(),
                    MINUTE,
                    speedlayer::store::Source::Primary,
                )
                .await
                .unwrap();
            assert!(!stored, "a lease from before the restart must not store");
            if cache.stats().connected {
                break;
            }
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Tags work on the new server.
        fill(&cache, &dashboard(&ns, &TEACHER, 1), &[]).await;
        let report = cache
            .invalidate(&UserSuspended { user_id: 1 })
            .await
            .unwrap();
        assert_eq!(report.tag_entries_removed, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_added_while_invalidations_run_never_escape_the_index() {
        let server = RedisServer::start();
        let cache = cache_with_registry(config(&server)).await;
        let ns = cache.namespace().clone();
        let tag = shows_student(&ns, 1);
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..8u64 {
            let (cache, tag, ns, stop) = (cache.clone(), tag.clone(), ns.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 2_000 {
                    let k = dashboard(&ns, &PARENT, w * 10_000 + n);
                    cache
                        .get_or_set_tagged(&k, MINUTE, std::slice::from_ref(&tag), || async {
                            Ok::<_, std::io::Error>(View { version: 1 })
                        })
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            }));
        }
        let invalidator = {
            let (cache, tag, stop) = (cache.clone(), tag.clone(), stop.clone());
            tokio::spawn(async move {
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) {
                    cache.invalidate_tag(&tag).await.unwrap();
                    rounds += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                rounds
            })
        };
        tokio::time::sleep(Duration::from_millis(800)).await;
        stop.store(true, Ordering::Relaxed);
        let mut written = 0;
        for w in writers {
            written += w.await.unwrap();
        }
        let rounds = invalidator.await.unwrap();
        // Every entry written so far is reachable through the tag: one more invalidation leaves
        // no tagged entry behind and an empty index.
        cache.invalidate_tag(&tag).await.unwrap();
        let mut raw = server.raw().await;
        let left: Vec<String> = raw.keys("dashboard:parent:*").await.unwrap();
        let index: u64 = raw.zcard(tag.as_str()).await.unwrap();
        eprintln!("{written} tagged writes, {rounds} concurrent invalidations");
        assert!(
            written > 50 && rounds > 5,
            "{written} writes, {rounds} rounds"
        );
        assert!(
            left.is_empty(),
            "{} entries escaped the tag: {:?}",
            left.len(),
            &left[..left.len().min(5)]
        );
        assert_eq!(index, 0);
    }
}
