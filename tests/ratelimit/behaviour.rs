//! What a check promises on every backend: multi-layer atomicity, decisions, keys, headers.

use std::sync::Arc;
use std::time::Duration;

use speedlayer::Cache;
use speedlayer::key::Ident;
use speedlayer::ratelimit::{Identity, LayerKind, Limit, RateLimiter, Route, ServedBy};

use crate::support::{Backend, nz};

const MINUTE: Duration = Duration::from_secs(60);

both_backends!(
    each_algorithm_admits_its_limit_then_denies,
    a_denied_request_consumes_no_layer,
    layers_without_an_identity_are_skipped,
    keys_follow_the_key_format,
    hostile_identities_are_limited_not_errors,
    fifty_tasks_never_exceed_a_sliding_log_limit,
    headers_describe_the_binding_layer,
);

async fn limiter(backend: &Backend) -> (Cache, RateLimiter) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let limiter = RateLimiter::new(&cache);
    (cache, limiter)
}

async fn each_algorithm_admits_its_limit_then_denies(backend: Backend) {
    let (_cache, limiter) = limiter(&backend).await;
    let limits = [
        Limit::fixed_window(nz(3), MINUTE).unwrap(),
        Limit::sliding_log(nz(3), MINUTE).unwrap(),
        Limit::sliding_window(nz(3), MINUTE).unwrap(),
        Limit::gcra(nz(3), MINUTE, nz(3)).unwrap(),
    ];
    for (i, limit) in limits.iter().enumerate() {
        let route = Route::new(Ident::new(&format!("route-{i}")).unwrap()).per_ip(*limit);
        let who = Identity::ip("198.51.100.7");
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let v = limiter.check(&route, &who).await;
            assert!(v.allowed, "{limit:?}");
            assert_eq!(v.served_by, ServedBy::Backend);
            remaining.push(v.decision().remaining);
        }
        assert_eq!(remaining, vec![2, 1, 0], "{limit:?}");
        let denied = limiter.check(&route, &who).await;
        assert!(!denied.allowed, "{limit:?}");
        let d = denied.decision();
        let retry = d.retry_after.expect("retry_after on a denial");
        // A sliding window may ask for up to two windows (the previous window's weight).
        assert!(
            retry > Duration::ZERO && retry <= 2 * MINUTE,
            "{limit:?}: {retry:?}"
        );
        assert_eq!(d.limit, 3);
        // Another client is not affected.
        assert!(
            limiter
                .check(&route, &Identity::ip("198.51.100.8"))
                .await
                .allowed
        );
    }
}

async fn a_denied_request_consumes_no_layer(backend: Backend) {
    let (_cache, limiter) = limiter(&backend).await;
    let route = Route::new(Ident::from_static("search"))
        .per_ip(Limit::sliding_log(nz(2), MINUTE).unwrap())
        .global(Limit::sliding_log(nz(3), MINUTE).unwrap());
    let a = Identity::ip("203.0.113.1");
    let b = Identity::ip("203.0.113.2");
    assert!(limiter.check(&route, &a).await.allowed);
    assert!(limiter.check(&route, &a).await.allowed);
    // a's third request is denied by its IP layer: the global layer must not count it.
    for _ in 0..5 {
        let v = limiter.check(&route, &a).await;
        assert!(!v.allowed);
        assert!(!v.layers[0].2.allowed && v.layers[1].2.allowed);
    }
    let v = limiter.check(&route, &b).await;
    assert!(v.allowed, "the global layer has one left: {v:?}");
    assert_eq!(v.layers[1].2.remaining, 0);
    let v = limiter.check(&route, &b).await;
    assert!(!v.allowed);
    assert!(
        v.layers[0].2.allowed && !v.layers[1].2.allowed,
        "denied by the global layer"
    );
}

async fn layers_without_an_identity_are_skipped(backend: Backend) {
    let (_cache, limiter) = limiter(&backend).await;
    let route = Route::new(Ident::from_static("profile"))
        .per_user(Limit::fixed_window(nz(1), MINUTE).unwrap())
        .per_ip(Limit::fixed_window(nz(5), MINUTE).unwrap());
    let anonymous = Identity::ip("192.0.2.1");
    let v = limiter.check(&route, &anonymous).await;
    assert_eq!(v.layers.len(), 1);
    assert_eq!(v.layers[0].0, LayerKind::Ip);
    let user = Identity::ip("192.0.2.1").with_user("student_456");
    assert!(limiter.check(&route, &user).await.allowed);
    let v = limiter.check(&route, &user).await;
    assert!(!v.allowed);
    assert_eq!(v.layers[0].0, LayerKind::User);
    assert!(limiter.check(&route, &Identity::default()).await.allowed);
}

async fn keys_follow_the_key_format(backend: Backend) {
    let (_cache, limiter) = limiter(&backend).await;
    let route = Route::new(Ident::from_static("auth-login"))
        .per_ip(Limit::sliding_log(nz(5), MINUTE).unwrap())
        .per_user(Limit::gcra(nz(100), MINUTE, nz(10)).unwrap())
        .global(Limit::fixed_window(nz(1000), Duration::from_millis(1500)).unwrap());
    let who = Identity::ip("2001:db8::1").with_user("ana@school.org");
    let key = |kind| limiter.key(&route, kind, &who).unwrap().unwrap();
    // An IPv6 client is counted by its /64; every layer's key names its quota.
    assert_eq!(
        key(LayerKind::Ip).as_str(),
        "rate:ip:2001%3Adb8%3A%3A%2F64:log-5-60s:{auth-login}"
    );
    assert_eq!(
        key(LayerKind::User).as_str(),
        "rate:user:ana@school.org:gcra-100-60s-b10:{auth-login}"
    );
    assert_eq!(
        key(LayerKind::Global).as_str(),
        "rate:global:all:fixed-1000-1500ms:{auth-login}"
    );
    let v4 = Identity::ip("192.0.2.7");
    assert_eq!(
        limiter
            .key(&route, LayerKind::Ip, &v4)
            .unwrap()
            .unwrap()
            .as_str(),
        "rate:ip:192.0.2.7:log-5-60s:{auth-login}"
    );
    // A route whose layers all count one identity spreads its clients over buckets, each its
    // own hash tag (so a Redis Cluster spreads them over its nodes); every layer of one client
    // shares the bucket, so that a check stays one script in one slot.
    let login = Route::new(Ident::from_static("auth-login"))
        .per_ip(Limit::sliding_log(nz(5), MINUTE).unwrap())
        .per_ip(Limit::fixed_window(nz(100), Duration::from_secs(86_400)).unwrap());
    assert!(login.spread() && !route.spread());
    let layer = |i: usize, ip: &str| {
        let keys: Vec<String> = (0..2)
            .map(|n| {
                let one = Route::new(Ident::from_static("auth-login")).per_ip(login.layers()[n].1);
                limiter
                    .key(&one, LayerKind::Ip, &Identity::ip(ip))
                    .unwrap()
                    .unwrap()
                    .as_str()
                    .to_owned()
            })
            .collect();
        keys[i].clone()
    };
    // The bucket is FNV-1a of the id, modulo 4096 (0x74a for 192.0.2.7), in hexadecimal.
    assert_eq!(
        layer(0, "192.0.2.7"),
        "rate:ip:192.0.2.7:log-5-60s:{auth-login-74a}"
    );
    let tag = |k: &str| k[k.find('{').unwrap()..].to_owned();
    assert_eq!(tag(&layer(0, "192.0.2.7")), tag(&layer(1, "192.0.2.7")));
    let buckets: std::collections::HashSet<String> = (0..200)
        .map(|i| tag(&layer(0, &format!("198.51.100.{i}"))))
        .collect();
    assert!(
        buckets.len() > 150,
        "clients spread: {} buckets",
        buckets.len()
    );
    // No such layer in the route, or no such identity: no key.
    assert!(
        limiter
            .key(&Route::new(Ident::from_static("x")), LayerKind::Ip, &who)
            .is_none()
    );
    assert!(
        limiter
            .key(&route, LayerKind::User, &Identity::ip("192.0.2.7"))
            .is_none()
    );
}

async fn hostile_identities_are_limited_not_errors(backend: Backend) {
    let (_cache, limiter) = limiter(&backend).await;
    let route = Route::new(Ident::from_static("signup"))
        .per_ip(Limit::fixed_window(nz(2), MINUTE).unwrap());
    // Too long to be a key: all such requests share one counter.
    let huge = "x".repeat(10_000);
    let other_huge = "y".repeat(10_000);
    assert!(limiter.check(&route, &Identity::ip(&huge)).await.allowed);
    assert!(
        limiter
            .check(&route, &Identity::ip(&other_huge))
            .await
            .allowed
    );
    assert!(!limiter.check(&route, &Identity::ip(&huge)).await.allowed);
    for hostile in ["a:b", "*", "x\ny", "{slot}"] {
        assert!(limiter.check(&route, &Identity::ip(hostile)).await.allowed);
    }
}

async fn fifty_tasks_never_exceed_a_sliding_log_limit(backend: Backend) {
    let (_cache, limiter) = limiter(&backend).await;
    let limiter = Arc::new(limiter);
    let route = Arc::new(
        Route::new(Ident::from_static("report"))
            .global(Limit::sliding_log(nz(100), MINUTE).unwrap()),
    );
    let mut tasks = Vec::new();
    for t in 0..50 {
        let (limiter, route) = (limiter.clone(), route.clone());
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0;
            for _ in 0..10 {
                if limiter
                    .check(&route, &Identity::ip(format!("10.0.0.{t}")))
                    .await
                    .allowed
                {
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(admitted, 100, "500 requests, a limit of 100 per minute");
}

async fn headers_describe_the_binding_layer(backend: Backend) {
    let (_cache, limiter) = limiter(&backend).await;
    let route = Route::new(Ident::from_static("auth-login"))
        .per_ip(Limit::fixed_window(nz(1), MINUTE).unwrap())
        .global(Limit::fixed_window(nz(100), MINUTE).unwrap());
    let who = Identity::ip("203.0.113.50");
    let ok = limiter.check(&route, &who).await;
    let fields = ok.headers("auth-login");
    let get = |fields: &[(&str, String)], name: &str| {
        fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get(&fields, "X-RateLimit-Limit").as_deref(), Some("1"));
    assert_eq!(get(&fields, "X-RateLimit-Remaining").as_deref(), Some("0"));
    assert_eq!(get(&fields, "Retry-After"), None);
    let denied = limiter.check(&route, &who).await;
    let fields = denied.headers("auth-login");
    assert_eq!(
        get(&fields, "RateLimit-Policy").as_deref(),
        Some("\"auth-login\";q=1;w=60")
    );
    let retry: u64 = get(&fields, "Retry-After").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(
        get(&fields, "RateLimit")
            .unwrap()
            .starts_with("\"auth-login\";r=0;t=")
    );
}
