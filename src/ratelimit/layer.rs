//! A tower layer for axum (feature `axum`): per-route quotas, keyed by the client's address or
//! user, answering `429 Too Many Requests` with the limit headers.
//!
//! The client address is the TCP peer (axum's `ConnectInfo<SocketAddr>`, present when the app is
//! served with `into_make_service_with_connect_info`). Only when the peer is one of the
//! configured trusted proxies are `X-Forwarded-For` and `Forwarded` read, and then from the
//! right: each proxy appends the address it received the request from, so the rightmost address
//! that is not a trusted proxy is the client. The leftmost entry is whatever the client chose to
//! send and is never trusted.
//!
//! The user is the [`AuthenticatedUser`] request extension, put there by the app's
//! authentication middleware (which must run before this layer).
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
//!     .route("POST", "/api/auth/login", login)
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

use axum::extract::ConnectInfo;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};

use super::{Identity, RateLimiter, Route, Verdict};

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

/// The client address: the peer, or, when the peer is a trusted proxy, the rightmost forwarded
/// address that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let trusted_ip = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !trusted_ip(peer) {
        return canonical(peer);
    }
    // Every X-Forwarded-For field, in order, then split: the chain, client first.
    let mut chain: Vec<IpAddr> = Vec::new();
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
    if chain.is_empty() {
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

struct RouteRule {
    method: Option<http::Method>,
    path: String,
    prefix: bool,
    route: Route,
}

struct Shared {
    limiter: RateLimiter,
    rules: Vec<RouteRule>,
    fallback: Option<Route>,
    trusted: Vec<IpNet>,
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
                rules: Vec::new(),
                fallback: None,
                trusted: Vec::new(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> RateLimitLayer {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => f(shared),
            None => {
                let old = &*self.shared;
                let mut shared = Shared {
                    limiter: old.limiter.clone(),
                    rules: old
                        .rules
                        .iter()
                        .map(|r| RouteRule {
                            method: r.method.clone(),
                            path: r.path.clone(),
                            prefix: r.prefix,
                            route: r.route.clone(),
                        })
                        .collect(),
                    fallback: old.fallback.clone(),
                    trusted: old.trusted.clone(),
                };
                f(&mut shared);
                self.shared = Arc::new(shared);
            }
        }
        self
    }

    /// Limits `method` (`"*"` for any) on `path`; a path ending in `*` matches every path that
    /// starts with what comes before the `*`. The first matching rule applies.
    pub fn route(self, method: &str, path: &str, route: Route) -> RateLimitLayer {
        let method = if method == "*" {
            None
        } else {
            http::Method::from_bytes(method.as_bytes()).ok()
        };
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p.to_owned(), true),
            None => (path.to_owned(), false),
        };
        self.edit(|s| {
            s.rules.push(RouteRule {
                method,
                path,
                prefix,
                route,
            })
        })
    }

    /// The route for requests no rule matches (none by default: they are not limited).
    pub fn otherwise(self, route: Route) -> RateLimitLayer {
        self.edit(|s| s.fallback = Some(route))
    }

    /// Trusts a proxy network: when the peer is in it, the client address is read from the
    /// forwarded headers (see the module documentation).
    pub fn trust_proxy(self, net: IpNet) -> RateLimitLayer {
        self.edit(|s| s.trusted.push(net))
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
        let path = req.uri().path();
        self.rules
            .iter()
            .find(|r| {
                r.method.as_ref().is_none_or(|m| m == req.method())
                    && if r.prefix {
                        path.starts_with(&r.path)
                    } else {
                        path == r.path
                    }
            })
            .map(|r| &r.route)
            .or(self.fallback.as_ref())
    }

    fn identity<B>(&self, req: &Request<B>) -> Identity {
        let mut who = Identity::default();
        if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
            who = who.with_ip(client_ip(peer.ip(), req.headers(), &self.trusted).to_string());
        }
        if let Some(AuthenticatedUser(user)) = req.extensions().get::<AuthenticatedUser>() {
            who = who.with_user(user.clone());
        }
        who
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
            let who = shared.identity(&req);
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
            client_ip(ip("203.0.113.5"), &spoofed, &trusted),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        // The client sent a spoofed first entry; the proxy appended the real client.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.9")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.9"));
        // Two trusted hops.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.9, 10.0.0.7")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.9"));
        // Several header fields form one list.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.9"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.9"));
        // Forwarded, with ports and IPv6.
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https",
        )]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("2001:db8::7"));
        // Garbage after the client: nothing to the left of it is trusted.
        let h = headers(&[("x-forwarded-for", "198.51.100.9, garbage")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.2"));
        // No header: the proxy itself.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
    }
}
