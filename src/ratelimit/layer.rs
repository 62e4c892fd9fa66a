//! A tower layer for axum (feature `axum`): per-route quotas, keyed by the client's address or
//! user, answering `429 Too Many Requests` with the limit headers.
//!
//! The client address is the TCP peer (axum's `ConnectInfo<SocketAddr>`, present when the app is
//! served with `into_make_service_with_connect_info`). A route with a per-IP layer never admits a
//! request silently when the peer address is missing: it answers `500 Internal Server Error` and
//! logs an error that says how to serve the app, so the mistake shows on the first request.
//!
//! Only when the peer is one of the configured trusted proxies is the forwarded header read (the
//! one [`ProxyHeader`] names, `X-Forwarded-For` by default, and only that one: a client can send
//! the other header, which the proxy passes on untouched), and then from the right: each proxy
//! appends the address it received the request from, so the rightmost address that is not a
//! trusted proxy is the client. The leftmost entry is whatever the client chose to send and is
//! never trusted.
//!
//! The user is the [`AuthenticatedUser`] request extension, put there by the app's
//! authentication middleware (which must run before this layer).
//!
//! Methods are matched as HTTP defines them: case-insensitively when the rule is written, and a
//! `GET` rule applies to `HEAD` as well (a `HEAD` is a `GET` without the body, and costs the
//! same). Paths are matched against the request's full path, also when the layer is applied
//! inside a nested router (`Router::nest` strips the prefix from the URI it hands on; the layer
//! reads axum's `OriginalUri` when it is there), so rules are written the same wherever the
//! layer sits.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::num::NonZeroU32;
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use speedlayer::key::Ident;
//! use speedlayer::ratelimit::layer::RateLimitLayer;
//! use speedlayer::ratelimit::{Limit, RateLimiter, Route};
//! use speedlayer::Cache;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = Cache::from_env().await?;
//! let login = Route::new(Ident::from_static("auth-login"))
//!     .per_ip(Limit::sliding_log(NonZeroU32::new(5).unwrap(), Duration::from_secs(60))?);
//! let layer = RateLimitLayer::new(RateLimiter::new(&cache))
//!     .route("POST", "/api/auth/login", login)?
//!     .trust_proxy("10.0.0.0/8".parse()?);
//! let app = Router::new()
//!     .route("/api/auth/login", post(|| async { "welcome" }))
//!     .layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{ConnectInfo, OriginalUri};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};

use super::{Identity, LayerKind, RateLimiter, Route, Verdict};

/// Which forwarded header the trusted proxies write (see [`RateLimitLayer::proxy_header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, most cloud load balancers).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

/// Why a rule could not be added to a [`RateLimitLayer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// The method is not an HTTP method (or `*`).
    #[error(
        "{0:?} is not an HTTP method: use GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, CONNECT, \
         TRACE (any case), or \"*\" for every method"
    )]
    UnknownMethod(String),
    /// The path does not start with `/`.
    #[error("a route path starts with '/', like the request paths it matches: {0:?}")]
    InvalidPath(String),
}

/// Parses a rule's method: the standard methods in any case, or `*`.
fn parse_method(method: &str) -> Result<Option<Method>, LayerError> {
    let trimmed = method.trim();
    if trimmed == "*" {
        return Ok(None);
    }
    let upper = trimmed.to_ascii_uppercase();
    let known = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    known
        .into_iter()
        .find(|m| m.as_str() == upper)
        .map(Some)
        .ok_or_else(|| LayerError::UnknownMethod(method.chars().take(32).collect()))
}

/// Routes matched by method and full path, first match wins: the rule table of this crate's
/// axum layers.
#[derive(Clone)]
pub(crate) struct RouteTable<R> {
    rules: Vec<RouteRule<R>>,
}

#[derive(Clone)]
struct RouteRule<R> {
    method: Option<Method>,
    path: String,
    prefix: bool,
    route: R,
}

impl<R> RouteTable<R> {
    pub(crate) fn new() -> RouteTable<R> {
        RouteTable { rules: Vec::new() }
    }

    /// A rule for `method` (any case, or `*`) on `path` (a trailing `*` matches a prefix),
    /// checked before it is added.
    pub(crate) fn rule(
        method: &str,
        path: &str,
        route: R,
    ) -> Result<impl FnOnce(&mut RouteTable<R>), LayerError> {
        let method = parse_method(method)?;
        if !path.starts_with('/') {
            return Err(LayerError::InvalidPath(path.chars().take(64).collect()));
        }
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p.to_owned(), true),
            None => (path.to_owned(), false),
        };
        Ok(move |table: &mut RouteTable<R>| {
            table.rules.push(RouteRule {
                method,
                path,
                prefix,
                route,
            })
        })
    }

    /// The route of the first rule that matches `req`; with `head_as_get`, a `GET` rule also
    /// matches `HEAD`.
    pub(crate) fn find<B>(&self, req: &Request<B>, head_as_get: bool) -> Option<&R> {
        let path = full_uri(req).path();
        let method = req.method();
        self.rules
            .iter()
            .find(|r| {
                r.method.as_ref().is_none_or(|m| {
                    m == method || (head_as_get && *m == Method::GET && *method == Method::HEAD)
                }) && if r.prefix {
                    path.starts_with(&r.path)
                } else {
                    path == r.path
                }
            })
            .map(|r| &r.route)
    }

    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }
}

/// The request's full URI, also inside a nested router (which strips its prefix from the URI
/// it hands on, and keeps the original in axum's `OriginalUri`).
pub(crate) fn full_uri<B>(req: &Request<B>) -> &http::Uri {
    match req.extensions().get::<OriginalUri>() {
        Some(OriginalUri(uri)) => uri,
        None => req.uri(),
    }
}

/// The authenticated user of a request, as a request extension. Insert it in the
/// authentication middleware; per-user layers count by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedUser(pub String);

/// An IP network, `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why an [`IpNet`] did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an IP network (expected an address, or address/prefix like 10.0.0.0/8): {0:?}")]
pub struct IpNetError(String);

impl FromStr for IpNet {
    type Err = IpNetError;
    fn from_str(s: &str) -> Result<IpNet, IpNetError> {
        let err = || IpNetError(s.chars().take(64).collect());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.trim().parse::<IpAddr>().map_err(|_| err())?,
                Some(p.trim().parse::<u8>().map_err(|_| err())?),
            ),
            None => (s.trim().parse::<IpAddr>().map_err(|_| err())?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(err());
        }
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    /// True when `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, as dual-stack sockets report them) compare as
/// IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Parses one forwarded address: `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]:80`, `2001:db8::1`.
fn parse_forwarded_addr(text: &str) -> Option<IpAddr> {
    let text = text.trim().trim_matches('"');
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = text.parse::<SocketAddr>() {
        return Some(sock.ip());
    }
    let inner = text.strip_prefix('[')?.split(']').next()?;
    inner.parse().ok()
}

/// The client address: the peer, or, when the peer is a trusted proxy, the rightmost address
/// that is not a trusted proxy in the forwarded header `header` (the other forwarded header is
/// never read: the proxy does not write it, so the client did).
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ProxyHeader,
) -> IpAddr {
    let trusted_ip = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !trusted_ip(peer) {
        return canonical(peer);
    }
    // Every field of the header, in order, then split: the chain, client first.
    let mut chain: Vec<IpAddr> = Vec::new();
    if header == ProxyHeader::XForwardedFor {
        for value in headers.get_all("x-forwarded-for") {
            let Ok(value) = value.to_str() else {
                return canonical(peer);
            };
            for part in value.split(',') {
                match parse_forwarded_addr(part) {
                    Some(ip) => chain.push(ip),
                    // An unparseable hop: nothing left of it can be trusted.
                    None => chain.clear(),
                }
            }
        }
    } else {
        for value in headers.get_all("forwarded") {
            let Ok(value) = value.to_str() else {
                return canonical(peer);
            };
            for element in value.split(',') {
                let for_param = element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then_some(v)
                });
                match for_param.and_then(parse_forwarded_addr) {
                    Some(ip) => chain.push(ip),
                    None => chain.clear(),
                }
            }
        }
    }
    for ip in chain.iter().rev() {
        if !trusted_ip(*ip) {
            return canonical(*ip);
        }
    }
    // Every hop is a trusted proxy: the first one is where the request entered.
    chain
        .first()
        .copied()
        .map(canonical)
        .unwrap_or(canonical(peer))
}

#[derive(Clone)]
struct Shared {
    limiter: RateLimiter,
    rules: RouteTable<Route>,
    fallback: Option<Route>,
    trusted: Vec<IpNet>,
    header: ProxyHeader,
}

/// The tower [`Layer`](tower_layer::Layer) that rate limits an axum app.
#[derive(Clone)]
#[must_use]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// A layer with no routes (it limits nothing until routes are added).
    pub fn new(limiter: RateLimiter) -> RateLimitLayer {
        RateLimitLayer {
            shared: Arc::new(Shared {
                limiter,
                rules: RouteTable::new(),
                fallback: None,
                trusted: Vec::new(),
                header: ProxyHeader::default(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> RateLimitLayer {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// Limits `method` (`"*"` for any; any case; a `GET` rule also applies to `HEAD`) on
    /// `path`; a path ending in `*` matches every path that starts with what comes before the
    /// `*`. The first matching rule applies. Fails for a method that is not an HTTP method and
    /// a path that does not start with `/`.
    pub fn route(
        self,
        method: &str,
        path: &str,
        route: Route,
    ) -> Result<RateLimitLayer, LayerError> {
        let add = RouteTable::rule(method, path, route)?;
        Ok(self.edit(|s| add(&mut s.rules)))
    }

    /// The route for requests no rule matches (none by default: they are not limited).
    pub fn otherwise(self, route: Route) -> RateLimitLayer {
        self.edit(|s| s.fallback = Some(route))
    }

    /// Trusts a proxy network: when the peer is in it, the client address is read from the
    /// forwarded header (see the module documentation).
    pub fn trust_proxy(self, net: IpNet) -> RateLimitLayer {
        self.edit(|s| s.trusted.push(net))
    }

    /// Which forwarded header the trusted proxies write (default
    /// [`ProxyHeader::XForwardedFor`]). Only that one is read: the other one reaches the app
    /// as the client sent it.
    pub fn proxy_header(self, header: ProxyHeader) -> RateLimitLayer {
        self.edit(|s| s.header = header)
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("rules", &self.shared.rules.len())
            .field("trusted", &self.shared.trusted)
            .finish()
    }
}

impl<S> tower_layer::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] wraps around an app.
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit").finish_non_exhaustive()
    }
}

impl Shared {
    fn route_for<B>(&self, req: &Request<B>) -> Option<&Route> {
        self.rules.find(req, true).or(self.fallback.as_ref())
    }

    /// Who is asking; `None` when the route counts per IP and the peer address is unknown.
    fn identity<B>(&self, req: &Request<B>, route: &Route) -> Option<Identity> {
        let mut who = Identity::default();
        match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(peer)) => {
                who = who.with_ip(
                    client_ip(peer.ip(), req.headers(), &self.trusted, self.header).to_string(),
                );
            }
            None if route.layers().iter().any(|(k, _)| *k == LayerKind::Ip) => return None,
            None => {}
        }
        if let Some(AuthenticatedUser(user)) = req.extensions().get::<AuthenticatedUser>() {
            who = who.with_user(user.clone());
        }
        Some(who)
    }
}

fn apply_headers(headers: &mut HeaderMap, verdict: &Verdict, route: &Route) {
    for (name, value) in verdict.headers(route.name().as_str()) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(name, value);
        }
    }
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for RateLimit<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone is the one that was not polled ready: swap so the ready one serves.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let Some(route) = shared.route_for(&req) else {
                return inner.call(req).await;
            };
            let Some(who) = shared.identity(&req, route) else {
                // Admitting would turn the limit off without a word; refusing shows the mistake
                // on the first request.
                tracing::error!(
                    route = %route.name(),
                    "the rate-limit route counts per IP but the request has no peer address: \
                     serve the app with `into_make_service_with_connect_info::<SocketAddr>()`"
                );
                let mut response = Response::new(ResBody::default());
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return Ok(response);
            };
            let verdict = shared.limiter.check(route, &who).await;
            if !verdict.allowed {
                let mut response = Response::new(ResBody::default());
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                apply_headers(response.headers_mut(), &verdict, route);
                return Ok(response);
            }
            let mut response = inner.call(req).await?;
            apply_headers(response.headers_mut(), &verdict, route);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const XFF: ProxyHeader = ProxyHeader::XForwardedFor;

    #[test]
    fn methods_parse_in_any_case_and_unknown_ones_are_errors() {
        assert_eq!(parse_method("get"), Ok(Some(Method::GET)));
        assert_eq!(parse_method("Post"), Ok(Some(Method::POST)));
        assert_eq!(parse_method("*"), Ok(None));
        for bad in ["GETT", "", "G ET", "any"] {
            assert!(
                matches!(parse_method(bad), Err(LayerError::UnknownMethod(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn networks() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.1.2.3")));
        assert!(net.contains(ip("::ffff:10.1.2.3")));
        assert!(!net.contains(ip("11.0.0.1")));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
    }

    #[test]
    fn forwarded_headers_are_ignored_from_untrusted_peers() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let spoofed = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(
            client_ip(
                ip("203.0.113.5"),
                &spoofed,
                &trusted,
                ProxyHeader::XForwardedFor
            ),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        // The client sent a spoofed first entry; the proxy appended the real client.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.9")]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("198.51.100.9")
        );
        // Two trusted hops.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.9, 10.0.0.7")]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("198.51.100.9")
        );
        // Several header fields form one list.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.9"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("198.51.100.9")
        );
        // Forwarded, with ports and IPv6.
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https",
        )]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, ProxyHeader::Forwarded),
            ip("2001:db8::7")
        );
        // The header the proxies do not write is never read.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, ProxyHeader::XForwardedFor),
            ip("10.0.0.2")
        );
        let both = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=198.51.100.9"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &both, &trusted, ProxyHeader::Forwarded),
            ip("198.51.100.9")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &both, &trusted, ProxyHeader::XForwardedFor),
            ip("6.6.6.6")
        );
        // Garbage after the client: nothing to the left of it is trusted.
        let h = headers(&[("x-forwarded-for", "198.51.100.9, garbage")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted, XFF), ip("10.0.0.2"));
        // No header: the proxy itself.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &HeaderMap::new(), &trusted, XFF),
            ip("10.0.0.2")
        );
    }
}
