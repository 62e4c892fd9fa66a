//! The idempotency layer in an axum app: 400, first run, replay, 409, 422, 413, outages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::post;
use http::{Request, StatusCode};
use speedlayer::Cache;
use speedlayer::idempotency::layer::{IdempotencyLayer, IdempotentRoute};
use speedlayer::idempotency::{Idempotency, OnOutage};
use speedlayer::key::Ident;
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::support::RedisServer;

const PAYMENTS: Ident = Ident::from_static("payments");

/// An app whose payment handler counts its runs and can be held.
fn app(idem: Idempotency, runs: Arc<AtomicUsize>, hold: Option<Arc<Notify>>) -> Router {
    let layer = IdempotencyLayer::new(idem)
        .max_request_body(1024)
        .route("POST", "/api/payments", IdempotentRoute::new(PAYMENTS))
        .unwrap()
        .route(
            "post",
            "/api/notes",
            IdempotentRoute::new(Ident::from_static("notes"))
                .optional()
                .on_outage(OnOutage::Proceed),
        )
        .unwrap();
    let handler = move |body: String| {
        let (runs, hold) = (runs.clone(), hold.clone());
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(hold) = hold {
                hold.notified().await;
            }
            (
                StatusCode::CREATED,
                [("location", format!("/api/payments/{n}"))],
                format!("{{\"payment\":{n},\"body\":{body:?}}}"),
            )
        }
    };
    Router::new()
        .route("/api/payments", post(handler.clone()))
        .route("/api/notes", post(handler))
        .layer(layer)
}

fn request(path: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut req = Request::builder().method("POST").uri(path);
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let mut req = req.body(Body::from(body.to_owned())).unwrap();
    let peer: SocketAddr = "192.0.2.5:40000".parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let response = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn the_layer_answers_as_the_draft_says() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(Idempotency::new(&Cache::memory()), runs.clone(), None);
    // No key where one is required: 400. A bad key: 400.
    let (status, _, _) = send(&app, request("/api/payments", None, "{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = send(&app, request("/api/payments", Some("has space"), "{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // First run.
    let (status, headers, body) =
        send(&app, request("/api/payments", Some("k1"), "{\"a\":1}")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(headers.get("idempotent-replayed").is_none());
    // Replay: the same response, marked.
    let (status, headers, replay) =
        send(&app, request("/api/payments", Some("k1"), "{\"a\":1}")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(headers["location"], "/api/payments/1");
    assert_eq!(replay, body);
    // Another body under the key: 422.
    let (status, _, _) = send(&app, request("/api/payments", Some("k1"), "{\"a\":2}")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Too large to fingerprint: 413.
    let big = "x".repeat(2048);
    let (status, _, _) = send(&app, request("/api/payments", Some("k2"), &big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // An optional route runs without a key, and honours one.
    let (status, _, _) = send(&app, request("/api/notes", None, "n")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    send(&app, request("/api/notes", Some("n1"), "n")).await;
    let (_, headers, _) = send(&app, request("/api/notes", Some("n1"), "n")).await;
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_the_first_runs_gets_409() {
    let runs = Arc::new(AtomicUsize::new(0));
    let hold = Arc::new(Notify::new());
    let app = app(
        Idempotency::new(&Cache::memory()),
        runs.clone(),
        Some(hold.clone()),
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/api/payments", Some("k"), "{}")).await }
    });
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (status, headers, _) = send(&app, request("/api/payments", Some("k"), "{}")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["retry-after"], "1");
    hold.notify_one();
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    let (status, headers, _) = send(&app, request("/api/payments", Some("k"), "{}")).await;
    assert_eq!(
        (status, &headers["idempotent-replayed"]),
        (StatusCode::CREATED, &"true".parse().unwrap())
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Redis unusable: the payment route refuses with 503 and `Retry-After`; the notes route runs
/// without the guarantee.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unusable_refuses_or_proceeds_as_the_route_says() {
    let mut server = RedisServer::start();
    let cache = crate::support::fragile_cache(&server).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(Idempotency::new(&cache), runs.clone(), None);
    server.freeze();
    let (status, headers, _) = send(&app, request("/api/payments", Some("k"), "{}")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the payment did not run");
    let (status, _, _) = send(&app, request("/api/notes", Some("n"), "x")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the note ran without the guarantee"
    );
    server.thaw();
}

/// A body larger than the stored maximum reaches the client whole; the record keeps the status
/// and headers, and a retry gets them with `Idempotent-Body-Omitted: true`. The query is part of
/// the fingerprint.
#[tokio::test]
async fn large_bodies_stream_and_queries_count() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(Idempotency::new(&Cache::memory()).max_body_bytes(1_000))
        .route(
            "POST",
            "/export",
            IdempotentRoute::new(Ident::from_static("export")),
        )
        .unwrap();
    let handler = {
        let runs = runs.clone();
        move || {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::CREATED,
                    [("location", "/exports/1")],
                    "y".repeat(100_000),
                )
            }
        }
    };
    let app = Router::new().route("/export", post(handler)).layer(layer);
    let (status, _, body) = send(&app, request("/export?format=csv", Some("e1"), "")).await;
    assert_eq!((status, body.len()), (StatusCode::CREATED, 100_000));
    let (status, headers, body) = send(&app, request("/export?format=csv", Some("e1"), "")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(headers["idempotent-body-omitted"], "true");
    assert_eq!(headers["location"], "/exports/1");
    assert!(body.is_empty());
    let (status, _, _) = send(&app, request("/export?format=pdf", Some("e1"), "")).await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "another query, another request"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
