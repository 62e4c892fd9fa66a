//! The tower layer in an axum app: 429 with headers, keys from the peer, from a trusted proxy's
//! forwarded addresses (never the spoofable first entry), or from the authenticated user.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use http::{Request, StatusCode};
use speedlayer::Cache;
use speedlayer::key::Ident;
use speedlayer::ratelimit::layer::{AuthenticatedUser, ProxyHeader, RateLimitLayer};
use speedlayer::ratelimit::{Limit, RateLimiter, Route};
use tower::ServiceExt;

use crate::support::nz;

fn app() -> Router {
    let cache = Cache::memory();
    let minute = Duration::from_secs(60);
    let two = nz(2);
    let login = Route::new(Ident::from_static("auth-login"))
        .per_ip(Limit::sliding_log(two, minute).unwrap());
    let profile = Route::new(Ident::from_static("profile"))
        .per_user(Limit::fixed_window(nz(1), minute).unwrap());
    let layer = RateLimitLayer::new(RateLimiter::new(&cache))
        .route("POST", "/api/auth/login", login)
        .unwrap()
        .route("GET", "/api/profile*", profile)
        .unwrap()
        .trust_proxy("10.0.0.0/8".parse().unwrap());
    Router::new()
        .route("/api/auth/login", post(|| async { "welcome" }))
        .route("/api/profile/me", get(|| async { "me" }))
        .route("/health", get(|| async { "ok" }))
        .layer(layer)
}

fn request(method: &str, path: &str, peer: &str, xff: Option<&str>) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(xff) = xff {
        req = req.header("x-forwarded-for", xff);
    }
    let mut req = req.body(Body::empty()).unwrap();
    let peer: SocketAddr = format!("{peer}:40000").parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

async fn status(app: &Router, req: Request<Body>) -> (StatusCode, http::HeaderMap) {
    let response = app.clone().oneshot(req).await.unwrap();
    (response.status(), response.headers().clone())
}

#[tokio::test]
async fn over_the_limit_is_429_with_headers() {
    let app = app();
    for remaining in ["1", "0"] {
        let (code, headers) = status(
            &app,
            request("POST", "/api/auth/login", "203.0.113.1", None),
        )
        .await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(headers["x-ratelimit-remaining"], remaining);
        assert_eq!(headers["ratelimit-policy"], "\"auth-login\";q=2;w=60");
    }
    let (code, headers) = status(
        &app,
        request("POST", "/api/auth/login", "203.0.113.1", None),
    )
    .await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert!(
        headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"auth-login\";r=0;t=")
    );
    // Another client, and another route, are not affected.
    let (code, _) = status(
        &app,
        request("POST", "/api/auth/login", "203.0.113.2", None),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, headers) = status(&app, request("GET", "/health", "203.0.113.1", None)).await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        headers.get("ratelimit").is_none(),
        "unlisted routes are not limited"
    );
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
    let app = app();
    // A client rotating X-Forwarded-For values still has one counter: its own address.
    for (i, expected) in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ]
    .into_iter()
    .enumerate()
    {
        let spoof = format!("192.0.2.{i}");
        let (code, _) = status(
            &app,
            request("POST", "/api/auth/login", "203.0.113.9", Some(&spoof)),
        )
        .await;
        assert_eq!(code, expected, "request {i}");
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_rightmost_untrusted_address_counts() {
    let app = app();
    // The client puts a different address first each time; the proxy (10.0.0.5) appends the
    // address it saw. Taking the first entry would give each request a fresh counter.
    for (i, expected) in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ]
    .into_iter()
    .enumerate()
    {
        let xff = format!("192.0.2.{i}, 198.51.100.20");
        let (code, _) = status(
            &app,
            request("POST", "/api/auth/login", "10.0.0.5", Some(&xff)),
        )
        .await;
        assert_eq!(code, expected, "request {i}");
    }
    // A different real client behind the same proxy has its own counter.
    let (code, _) = status(
        &app,
        request(
            "POST",
            "/api/auth/login",
            "10.0.0.5",
            Some("192.0.2.1, 198.51.100.21"),
        ),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn per_user_routes_count_the_authenticated_user() {
    let app = app();
    let as_user = |peer: &str| {
        let mut req = request("GET", "/api/profile/me", peer, None);
        req.extensions_mut()
            .insert(AuthenticatedUser("student_456".to_owned()));
        req
    };
    let (code, _) = status(&app, as_user("203.0.113.30")).await;
    assert_eq!(code, StatusCode::OK);
    // Same user from another address: still limited.
    let (code, _) = status(&app, as_user("203.0.113.31")).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    // Anonymous requests have no user layer to count.
    let (code, _) = status(
        &app,
        request("GET", "/api/profile/me", "203.0.113.30", None),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
}

fn one_per_minute(name: &'static str) -> Route {
    Route::new(Ident::from_static(name))
        .per_ip(Limit::fixed_window(nz(1), Duration::from_secs(60)).unwrap())
}

/// Without `ConnectInfo` a per-IP route cannot know its client: it answers 500 (and logs how to
/// serve the app) instead of admitting every request silently. Routes that do not count per IP
/// are unaffected.
#[tokio::test]
async fn a_missing_peer_address_is_an_error_not_a_silent_admit() {
    let app = app();
    for _ in 0..3 {
        let req = Request::builder()
            .method("POST")
            .uri("/api/auth/login")
            .body(Body::empty())
            .unwrap();
        let (code, _) = status(&app, req).await;
        assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let mut req = Request::builder()
        .method("GET")
        .uri("/api/profile/me")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(AuthenticatedUser("student_456".to_owned()));
    assert_eq!(status(&app, req).await.0, StatusCode::OK);
    let req = Request::builder()
        .uri("/health")
        .body(Body::empty())
        .unwrap();
    assert_eq!(status(&app, req).await.0, StatusCode::OK);
}

/// Methods are written in any case, a GET rule covers HEAD, and a method that is not one is an
/// error when the rule is added, never a wildcard.
#[tokio::test]
async fn methods_are_matched_as_http_defines_them() {
    let cache = Cache::memory();
    let layer = RateLimitLayer::new(RateLimiter::new(&cache))
        .route("get", "/report", one_per_minute("report"))
        .unwrap();
    let app = Router::new()
        .route("/report", get(|| async { "report" }))
        .route("/other", post(|| async { "other" }))
        .layer(layer);
    assert_eq!(
        status(&app, request("HEAD", "/report", "192.0.2.1", None))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, request("GET", "/report", "192.0.2.1", None))
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS,
        "the HEAD was counted as a GET"
    );
    assert_eq!(
        status(&app, request("POST", "/report", "192.0.2.2", None))
            .await
            .0,
        StatusCode::METHOD_NOT_ALLOWED,
        "a POST is not limited by the GET rule"
    );
    for bad in ["GETT", "", "fetch"] {
        let err = RateLimitLayer::new(RateLimiter::new(&cache))
            .route(bad, "/x", one_per_minute("x"))
            .unwrap_err();
        assert!(err.to_string().contains("not an HTTP method"), "{err}");
    }
    assert!(
        RateLimitLayer::new(RateLimiter::new(&cache))
            .route("GET", "no-slash", one_per_minute("x"))
            .is_err()
    );
}

/// Behind a proxy that writes `Forwarded`, an `X-Forwarded-For` the client sent is ignored (and
/// the other way round): only the header the proxy writes is read.
#[tokio::test]
async fn only_the_header_the_proxy_writes_is_read() {
    for (header, spoofed, written) in [
        (
            ProxyHeader::XForwardedFor,
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "198.51.100.9"),
        ),
        (
            ProxyHeader::Forwarded,
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=198.51.100.9"),
        ),
    ] {
        let cache = Cache::memory();
        let layer = RateLimitLayer::new(RateLimiter::new(&cache))
            .route("POST", "/login", one_per_minute("login"))
            .unwrap()
            .trust_proxy("10.0.0.0/8".parse().unwrap())
            .proxy_header(header);
        let app = Router::new()
            .route("/login", post(|| async { "welcome" }))
            .layer(layer);
        // Each request spoofs a new address in the header the proxy does not write; the proxy's
        // header names the same client every time, so the second request is limited.
        for (i, expected) in [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]
            .into_iter()
            .enumerate()
        {
            let mut req = request("POST", "/login", "10.0.0.2", None);
            req.headers_mut().insert(
                spoofed.0,
                spoofed
                    .1
                    .replace("6.6.6.6", &format!("6.6.6.{i}"))
                    .parse()
                    .unwrap(),
            );
            req.headers_mut()
                .insert(written.0, written.1.parse().unwrap());
            assert_eq!(status(&app, req).await.0, expected, "{header:?}");
        }
    }
}

/// Rules name full paths wherever the layer sits: applied inside a nested router, it still
/// matches `/api/auth/login`, not the stripped `/auth/login`.
#[tokio::test]
async fn rules_match_full_paths_inside_nested_routers() {
    let cache = Cache::memory();
    let layer = RateLimitLayer::new(RateLimiter::new(&cache))
        .route("POST", "/api/auth/login", one_per_minute("login"))
        .unwrap();
    let api = Router::new()
        .route("/auth/login", post(|| async { "welcome" }))
        .layer(layer);
    let app = Router::new().nest("/api", api);
    assert_eq!(
        status(&app, request("POST", "/api/auth/login", "192.0.2.7", None))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, request("POST", "/api/auth/login", "192.0.2.7", None))
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
}
