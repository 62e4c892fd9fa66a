//! Who counts with whom: layers of one kind, IPv6 networks, tenants, extreme quotas.

use std::time::Duration;

use speedlayer::Cache;
use speedlayer::key::Ident;
use speedlayer::ratelimit::{Identity, LayerKind, Limit, RateLimiter, Route, ServedBy};
use speedlayer::store::BreakerState;

use crate::support::{Backend, nz};

both_backends!(
    two_layers_of_one_kind_count_separately,
    ipv6_clients_share_one_quota_per_network,
    a_tenant_scope_counts_per_tenant,
    a_huge_burst_on_a_long_window_does_not_overflow,
);

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn limit(algorithm: usize, n: u32, window: Duration) -> Limit {
    match algorithm {
        0 => Limit::fixed_window(nz(n), window),
        1 => Limit::sliding_log(nz(n), window),
        2 => Limit::sliding_window(nz(n), window),
        _ => Limit::gcra(nz(n), window, nz(n)),
    }
    .unwrap()
}

/// `per_ip(2/min).per_ip(4/hour)`, for every pair of algorithms: each layer keeps its own
/// count, a denial by one consumes neither, and nothing is a backend failure.
async fn two_layers_of_one_kind_count_separately(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let limiter = RateLimiter::new(&cache);
    for a in 0..4 {
        for b in 0..4 {
            let route = Route::new(Ident::new(&format!("login-{a}-{b}")).unwrap())
                .per_ip(limit(a, 2, MINUTE))
                .per_ip(limit(b, 4, HOUR));
            let who = Identity::ip("198.51.100.20");
            let mut seen = Vec::new();
            for _ in 0..2 {
                let v = limiter.check(&route, &who).await;
                assert!(v.allowed, "pair {a}/{b}: {v:?}");
                assert_eq!(v.served_by, ServedBy::Backend, "pair {a}/{b}");
                assert_eq!(v.layers.len(), 2);
                seen.push((v.layers[0].2.remaining, v.layers[1].2.remaining));
            }
            assert_eq!(
                seen,
                vec![(1, 3), (0, 2)],
                "pair {a}/{b}: each layer counts alone"
            );
            for _ in 0..3 {
                let v = limiter.check(&route, &who).await;
                assert!(!v.allowed, "pair {a}/{b}: the per-minute layer denies");
                assert_eq!(v.served_by, ServedBy::Backend, "pair {a}/{b}");
                assert!(
                    !v.layers[0].2.allowed && v.layers[1].2.allowed,
                    "pair {a}/{b}"
                );
            }
            // The keys differ, and neither is the other's.
            let k1 = limiter.key(&route, LayerKind::Ip, &who).unwrap().unwrap();
            assert!(k1.as_str().contains(&limit(a, 2, MINUTE).slug()), "{k1}");
        }
    }
    let stats = cache.stats();
    assert_eq!(stats.breaker, BreakerState::Closed);
    assert_eq!((stats.errors, stats.fallbacks), (0, 0), "{stats:?}");
    assert_eq!(cache.store().stats().data_errors, 0);
}

/// Any IPv6 client owns a whole /64 and can rotate addresses inside it: 1,000 addresses of one
/// /64 share one quota, while another /64 has its own.
async fn ipv6_clients_share_one_quota_per_network(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let limiter = RateLimiter::new(&cache);
    let route = Route::new(Ident::from_static("signup"))
        .per_ip(Limit::sliding_log(nz(10), MINUTE).unwrap());
    let mut admitted = 0;
    for i in 0..1_000u32 {
        let who = Identity::ip(format!("2001:db8:1:2:{:x}:{:x}::{:x}", i >> 8, i & 0xff, i));
        if limiter.check(&route, &who).await.allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "one /64, one quota");
    assert!(
        limiter
            .check(&route, &Identity::ip("2001:db8:1:3::1"))
            .await
            .allowed,
        "another /64 counts on its own"
    );
    // IPv4-mapped IPv6 is the IPv4 client.
    let v4 =
        Route::new(Ident::from_static("v4")).per_ip(Limit::fixed_window(nz(1), MINUTE).unwrap());
    assert!(limiter.check(&v4, &Identity::ip("192.0.2.9")).await.allowed);
    assert!(
        !limiter
            .check(&v4, &Identity::ip("::ffff:192.0.2.9"))
            .await
            .allowed
    );
    // A /128 prefix counts every address on its own.
    let per_address = RateLimiter::new(&cache).ipv6_prefix(128);
    let route = Route::new(Ident::from_static("per-address"))
        .per_ip(Limit::fixed_window(nz(1), MINUTE).unwrap());
    for i in 0..20u32 {
        let who = Identity::ip(format!("2001:db8:9::{i:x}"));
        assert!(per_address.check(&route, &who).await.allowed);
    }
}

/// A limiter built for a tenant's scope counts per tenant: one school's logins never use up
/// another's quota.
async fn a_tenant_scope_counts_per_tenant(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let ns = cache.namespace().clone();
    let north = RateLimiter::new(&cache).in_scope(&ns.tenant("north-school").unwrap());
    let south = RateLimiter::new(&cache).in_scope(&ns.tenant("south-school").unwrap());
    let route = Route::new(Ident::from_static("auth-login"))
        .per_ip(Limit::fixed_window(nz(2), MINUTE).unwrap());
    let who = Identity::ip("203.0.113.50");
    assert!(north.check(&route, &who).await.allowed);
    assert!(north.check(&route, &who).await.allowed);
    assert!(!north.check(&route, &who).await.allowed);
    assert!(south.check(&route, &who).await.allowed, "another tenant");
    let key = south.key(&route, LayerKind::Ip, &who).unwrap().unwrap();
    assert!(key.as_str().starts_with("@south-school:rate:ip:"), "{key}");
    // The global (tenant-less) limiter is a third counter.
    assert!(RateLimiter::new(&cache).check(&route, &who).await.allowed);
}

/// One per day with a burst of four billion: the arithmetic saturates instead of overflowing.
async fn a_huge_burst_on_a_long_window_does_not_overflow(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let limiter = RateLimiter::new(&cache);
    let route = Route::new(Ident::from_static("export"))
        .per_user(Limit::gcra(nz(1), Duration::from_secs(86_400), nz(u32::MAX)).unwrap());
    let who = Identity::default().with_user("bursar");
    for _ in 0..100 {
        let v = limiter.check(&route, &who).await;
        assert!(v.allowed, "{v:?}");
        // Memory counts in u64 nanoseconds, which saturate after 584 years of burst.
        assert!(v.decision().remaining > 200_000, "{v:?}");
    }
}
