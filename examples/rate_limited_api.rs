//! An axum app with speedlayer's rate-limit layer: the login route allows 5 attempts per client
//! address per minute, and the whole API 1,000 requests per second with bursts of 200.
//!
//! ```sh
//! cargo run --example rate_limited_api --features axum                # in-memory limits
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example rate_limited_api --features axum
//! ```
//!
//! It sends its requests in-process (no port is opened) and prints what a client would see.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use http::Request;
use speedlayer::Cache;
use speedlayer::key::Ident;
use speedlayer::ratelimit::layer::RateLimitLayer;
use speedlayer::ratelimit::{Limit, Outage, RateLimiter, Route};
use tower::ServiceExt;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = Cache::from_env().await?;
    // rate:ip:<address>:{auth-login}, exact: never more than 5 in any 60 s. While Redis is
    // down, deny: a login endpoint must not become a password-guessing free-for-all.
    let login = Route::new(Ident::from_static("auth-login"))
        .per_ip(Limit::sliding_log(nz(5), Duration::from_secs(60))?)
        .on_outage(Outage::Deny);
    // Everything else under /api: a token bucket shared by all clients.
    let api = Route::new(Ident::from_static("api")).global(Limit::gcra(
        nz(1_000),
        Duration::from_secs(1),
        nz(200),
    )?);
    let layer = RateLimitLayer::new(RateLimiter::new(&cache))
        .route("POST", "/api/auth/login", login)?
        .route("*", "/api/*", api)?
        // The load balancer: X-Forwarded-For is read only from these peers.
        .trust_proxy("10.0.0.0/8".parse()?);
    let app = Router::new()
        .route("/api/auth/login", post(|| async { "welcome" }))
        .route(
            "/api/fees/summary/{id}",
            get(|| async { "{\"due_cents\":0}" }),
        )
        .layer(layer);

    // In production: axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
    let client: SocketAddr = "203.0.113.7:51000".parse()?;
    for attempt in 1..=7 {
        let mut request = Request::post("/api/auth/login").body(Body::empty())?;
        request.extensions_mut().insert(ConnectInfo(client));
        let response = app.clone().oneshot(request).await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        println!(
            "login attempt {attempt}: {} RateLimit: {} Retry-After: {}",
            response.status(),
            header("ratelimit"),
            header("retry-after"),
        );
    }
    let mut request = Request::get("/api/fees/summary/456").body(Body::empty())?;
    request.extensions_mut().insert(ConnectInfo(client));
    let response = app.oneshot(request).await?;
    println!(
        "fees summary: {} RateLimit-Policy: {:?}",
        response.status(),
        response.headers().get("ratelimit-policy")
    );
    Ok(())
}
