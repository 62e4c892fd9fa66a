//! A tower layer for axum (feature `axum`) that makes routes idempotent.
//!
//! For a request on an idempotent route, the layer reads `Idempotency-Key`, buffers the body (up
//! to [`IdempotencyLayer::max_request_body`], else `413`) to fingerprint it, and then:
//!
//! | situation | answer |
//! | --- | --- |
//! | no key, route requires one | `400 Bad Request` |
//! | key not 1-255 visible ASCII characters | `400 Bad Request` |
//! | first request under the key | the handler runs; its response is stored and returned |
//! | retry after completion | the stored response, with `Idempotent-Replayed: true` |
//! | retry while the first runs | `409 Conflict`, `Retry-After: 1` |
//! | the key with another request | `422 Unprocessable Content` |
//! | Redis unusable, route refuses | `503 Service Unavailable`, `Retry-After` |
//! | Redis unusable, route proceeds | the handler runs without the guarantee (logged, counted) |
//!
//! Keys are scoped by client: the [`AuthenticatedUser`] extension when the authentication
//! middleware put one there, else the peer address (`ConnectInfo`), else `anonymous`. Put the
//! layer inside authentication: a client's address can change between a request and its retry
//! (a mobile network, a NAT pool), and behind a proxy every unauthenticated client has the
//! proxy's address, so only an authenticated scope makes the guarantee hold for every client.
//! Paths are matched like [`RateLimitLayer`](crate::ratelimit::layer::RateLimitLayer)'s: the
//! full path (axum's `OriginalUri` inside nested routers), methods in any case. The fingerprint
//! covers the method, the path with its query, and the body.
//!
//! The response passes through as it comes; its first bytes, up to the idempotency's
//! [`max_body_bytes`](super::Idempotency::max_body_bytes), are kept for the record. A larger
//! body is streamed on without being buffered whole, and stored as omitted.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use axum::{Router, routing::post};
//! use speedlayer::idempotency::layer::{IdempotencyLayer, IdempotentRoute};
//! use speedlayer::idempotency::Idempotency;
//! use speedlayer::key::Ident;
//! use speedlayer::Cache;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = Cache::from_env().await?;
//! let layer = IdempotencyLayer::new(Idempotency::new(&cache))
//!     .route("POST", "/api/payments", IdempotentRoute::new(Ident::from_static("payments")))?;
//! let app = Router::new()
//!     .route("/api/payments", post(|| async { "recorded" }))
//!     .layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use axum::extract::ConnectInfo;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::{
    BODY_OMITTED_HEADER, Begin, Fingerprint, Idempotency, IdempotencyKey, KEY_HEADER, OnOutage,
    REPLAYED_HEADER, StoredResponse,
};
use crate::key::Ident;
use crate::ratelimit::headers::seconds_up;
use crate::ratelimit::layer::{AuthenticatedUser, LayerError, RouteTable, full_uri};

/// Default largest request body the layer buffers to fingerprint: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1024 * 1024;

/// How one route is made idempotent.
#[derive(Debug, Clone)]
pub struct IdempotentRoute {
    name: Ident,
    required: bool,
    outage: OnOutage,
}

impl IdempotentRoute {
    /// A route that requires a key (`400` without one) and refuses while Redis is unusable.
    pub fn new(name: Ident) -> IdempotentRoute {
        IdempotentRoute {
            name,
            required: true,
            outage: OnOutage::Refuse,
        }
    }

    /// Requests without a key run as they are (the key is honoured when sent).
    #[must_use]
    pub fn optional(mut self) -> IdempotentRoute {
        self.required = false;
        self
    }

    /// What happens while Redis is unusable (default [`OnOutage::Refuse`]).
    #[must_use]
    pub fn on_outage(mut self, outage: OnOutage) -> IdempotentRoute {
        self.outage = outage;
        self
    }
}

#[derive(Clone)]
struct Shared {
    idempotency: Idempotency,
    rules: RouteTable<IdempotentRoute>,
    max_request_body: usize,
    keep: Vec<HeaderName>,
}

/// The tower [`Layer`](tower_layer::Layer) that makes routes of an axum app idempotent.
#[derive(Clone)]
#[must_use]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

impl IdempotencyLayer {
    /// A layer without routes; responses keep `content-type` and `location` when stored.
    pub fn new(idempotency: Idempotency) -> IdempotencyLayer {
        IdempotencyLayer {
            shared: Arc::new(Shared {
                idempotency,
                rules: RouteTable::new(),
                max_request_body: DEFAULT_MAX_REQUEST_BODY,
                keep: vec![http::header::CONTENT_TYPE, http::header::LOCATION],
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> IdempotencyLayer {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// Makes `method` (any case, or `*`) on `path` (a trailing `*` matches a prefix) idempotent.
    pub fn route(
        self,
        method: &str,
        path: &str,
        route: IdempotentRoute,
    ) -> Result<IdempotencyLayer, LayerError> {
        let add = RouteTable::rule(method, path, route)?;
        Ok(self.edit(|s| add(&mut s.rules)))
    }

    /// The largest request body buffered to fingerprint (default 1 MiB); larger ones get `413`.
    pub fn max_request_body(self, bytes: usize) -> IdempotencyLayer {
        self.edit(|s| s.max_request_body = bytes)
    }

    /// Keeps another response header field in stored responses.
    pub fn keep_header(self, name: HeaderName) -> IdempotencyLayer {
        self.edit(|s| s.keep.push(name))
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("rules", &self.shared.rules.len())
            .finish_non_exhaustive()
    }
}

impl<S> tower_layer::Layer<S> for IdempotencyLayer {
    type Service = Idempotent<S>;
    fn layer(&self, inner: S) -> Idempotent<S> {
        Idempotent {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around an app.
#[derive(Clone)]
pub struct Idempotent<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for Idempotent<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent").finish_non_exhaustive()
    }
}

/// A body whose first bytes were already read: they come first, then the rest as it comes.
struct Prefixed {
    head: Option<bytes::Bytes>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(head))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// Logs (the run counted it) when a response could not be stored.
fn report_incomplete(stored: crate::error::Result<bool>) {
    match stored {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                "the response was not stored for replays now: it is stored when Redis takes it, \
                 within the lease (retries get 409 until then)"
            )
        }
        Err(e) => tracing::warn!(error = %e, "the response could not be stored for replays"),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn with_retry_after(mut response: Response<Body>, seconds: u64) -> Response<Body> {
    if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, value);
    }
    response
}

fn replayed(stored: StoredResponse) -> Response<Body> {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    for (name, value) in &stored.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    if stored.body_omitted {
        response
            .headers_mut()
            .insert(BODY_OMITTED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

impl Shared {
    fn rule_for<B>(&self, req: &Request<B>) -> Option<&IdempotentRoute> {
        self.rules.find(req, false)
    }

    fn client<B>(req: &Request<B>) -> String {
        if let Some(AuthenticatedUser(user)) = req.extensions().get::<AuthenticatedUser>() {
            return format!("user:{user}");
        }
        match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(peer)) => format!("ip:{}", peer.ip()),
            None => "anonymous".to_owned(),
        }
    }
}

impl<S> tower_service::Service<Request<Body>> for Idempotent<S>
where
    S: tower_service::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone is the one that was not polled ready: swap so the ready one serves.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let Some(route) = shared.rule_for(&req).cloned() else {
                return inner.call(req).await;
            };
            let key = match req.headers().get(KEY_HEADER) {
                None if route.required => {
                    return Ok(plain(
                        StatusCode::BAD_REQUEST,
                        "this request needs an Idempotency-Key header",
                    ));
                }
                None => return inner.call(req).await,
                Some(value) => match value.to_str().ok().map(IdempotencyKey::parse) {
                    Some(Ok(key)) => key,
                    _ => {
                        return Ok(plain(
                            StatusCode::BAD_REQUEST,
                            "an Idempotency-Key is 1 to 255 visible ASCII characters",
                        ));
                    }
                },
            };
            let client = Shared::client(&req);
            let uri = full_uri(&req);
            let path = uri
                .path_and_query()
                .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned());
            let (parts, body) = req.into_parts();
            let Ok(body) = axum::body::to_bytes(body, shared.max_request_body).await else {
                return Ok(plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body is too large for an idempotent route",
                ));
            };
            let fingerprint = Fingerprint::of(parts.method.as_str(), &path, &body);
            let req = Request::from_parts(parts, Body::from(body));
            let idem = &shared.idempotency;
            let begin = match idem.begin(&route.name, &client, &key, &fingerprint).await {
                Ok(begin) => begin,
                Err(e) => {
                    tracing::warn!(error = %e, "idempotency key refused");
                    return Ok(plain(
                        StatusCode::BAD_REQUEST,
                        "the Idempotency-Key cannot be used for this client",
                    ));
                }
            };
            let pending = match begin {
                Begin::Run(pending) => pending,
                Begin::Replay(stored) => return Ok(replayed(stored)),
                Begin::InProgress => {
                    return Ok(with_retry_after(
                        plain(
                            StatusCode::CONFLICT,
                            "a request with this Idempotency-Key is in progress",
                        ),
                        1,
                    ));
                }
                Begin::Mismatch => {
                    return Ok(plain(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "this Idempotency-Key was used with another request",
                    ));
                }
                Begin::Unavailable => match route.outage {
                    OnOutage::Proceed => {
                        tracing::warn!(
                            route = %route.name,
                            "idempotency unavailable: the request runs without the guarantee"
                        );
                        return inner.call(req).await;
                    }
                    OnOutage::Refuse => {
                        return Ok(with_retry_after(
                            plain(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "idempotency is unavailable; retry with the same key",
                            ),
                            seconds_up(idem.retry_after()),
                        ));
                    }
                },
            };
            let response = inner.call(req).await?;
            let (parts, mut body) = response.into_parts();
            let max = idem.max_body();
            let mut kept = bytes::BytesMut::new();
            let complete = |status: u16, headers: &http::HeaderMap, body: bytes::Bytes, omitted| {
                let mut stored = StoredResponse::new(status, body);
                stored.body_omitted = omitted;
                for name in &shared.keep {
                    for value in headers.get_all(name) {
                        if let Ok(value) = value.to_str() {
                            stored = stored.with_header(name.as_str(), value);
                        }
                    }
                }
                stored
            };
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            kept.extend_from_slice(&data);
                            if kept.len() > max {
                                // Too large to store: recorded without its body, and the rest
                                // streamed on as it comes.
                                let stored = complete(
                                    parts.status.as_u16(),
                                    &parts.headers,
                                    bytes::Bytes::new(),
                                    true,
                                );
                                report_incomplete(pending.complete(&stored).await);
                                let body = Body::new(Prefixed {
                                    head: Some(kept.freeze()),
                                    rest: body,
                                });
                                return Ok(Response::from_parts(parts, body));
                            }
                        }
                    }
                    Some(Err(e)) => {
                        // The handler's body failed mid-way: nothing to store; the in-progress
                        // record expires with its lease.
                        tracing::warn!(error = %e, "response body failed; not stored");
                        let mut response = Response::from_parts(parts, Body::empty());
                        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        return Ok(response);
                    }
                    None => break,
                }
            }
            let body = kept.freeze();
            let stored = complete(parts.status.as_u16(), &parts.headers, body.clone(), false);
            report_incomplete(pending.complete(&stored).await);
            Ok(Response::from_parts(parts, Body::from(body)))
        })
    }
}
