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
use speedlayer::ratelimit::layer::{AuthenticatedUser, RateLimitLayer};
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
        .route("GET", "/api/profile*", profile)
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
