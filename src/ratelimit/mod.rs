//! Rate limiting: fixed window, sliding log, sliding window and GCRA, per route and per layer
//! (user, IP, global), on Redis when it is configured and in memory when it is not.
//!
//! - A check of several layers is one call and, on Redis, one round trip (one script): the
//!   request is denied if any layer denies, and a denied request consumes no layer's quota.
//! - On Redis, time comes from the server (`TIME` inside the script), so that every app server
//!   agrees on the windows.
//! - Being limited is a [`Verdict`] with a [`Decision`], not an error; [`Verdict::headers`]
//!   renders the IETF `RateLimit-Policy`/`RateLimit` fields, `X-RateLimit-*` and `Retry-After`.
//! - While Redis is unusable, each [`Route`] says what happens ([`Outage`]): by default an
//!   in-memory *insurance* limiter with the same quotas answers (per process), at memory speed;
//!   no check waits on a sick Redis longer than one operation timeout, and none once the breaker
//!   is open.
//!
//! Keys are built with the key builder: `rate:<layer>:<id>:{<route>}` (`rate:ip:10.0.0.1:
//! {auth-login}`, `rate:user:42:{auth-login}`, `rate:global:all:{auth-login}`). The route is a
//! Redis Cluster hash tag, so all the layers of a check live in one slot.
//!
//! ```
//! use std::num::NonZeroU32;
//! use std::time::Duration;
//! use speedlayer::key::Ident;
//! use speedlayer::ratelimit::{Identity, Limit, RateLimiter, Route};
//! use speedlayer::Cache;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cache = Cache::memory();
//! let limiter = RateLimiter::new(&cache);
//! let login = Route::new(Ident::from_static("auth-login"))
//!     .per_ip(Limit::sliding_log(NonZeroU32::new(5).unwrap(), Duration::from_secs(60))?)
//!     .global(Limit::gcra(
//!         NonZeroU32::new(1_000).unwrap(),
//!         Duration::from_secs(60),
//!         NonZeroU32::new(100).unwrap(),
//!     )?);
//! let who = Identity::ip("203.0.113.9");
//! for _ in 0..5 {
//!     assert!(limiter.check(&login, &who).await.allowed);
//! }
//! let verdict = limiter.check(&login, &who).await;
//! assert!(!verdict.allowed);
//! assert!(verdict.decision().retry_after.is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::Cache;
use crate::key::{Ident, Key, KeyError, Namespace};
use crate::store::Store;

pub mod headers;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod layer;
mod limit;
mod memory;
pub(crate) mod state;

pub use limit::{Algorithm, Decision, Limit, LimitError, MAX_LOG_LIMIT, MAX_WINDOW};
pub use memory::{DEFAULT_MAX_KEYS, Layer, MemoryLimiter};

const RATE: Ident = Ident::from_static("rate");
static USER: Ident = Ident::from_static("user");
static IP: Ident = Ident::from_static("ip");
static GLOBAL: Ident = Ident::from_static("global");

/// Which requests share a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// One counter per authenticated user.
    User,
    /// One counter per client IP address.
    Ip,
    /// One counter for everybody.
    Global,
}

impl LayerKind {
    fn ident(self) -> &'static Ident {
        match self {
            LayerKind::User => &USER,
            LayerKind::Ip => &IP,
            LayerKind::Global => &GLOBAL,
        }
    }
}

/// What a route does while the backend (Redis) is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outage {
    /// Fail open, within limits: an in-memory limiter with the same quotas answers, per
    /// process (N app servers admit up to N times the quota).
    #[default]
    Insurance,
    /// Fail open: admit everything.
    Allow,
    /// Fail closed: deny everything, with `Retry-After` set to the breaker's cool-down.
    Deny,
}

/// A route's quotas: the layers checked together, and its outage behaviour.
#[derive(Clone)]
pub struct Route {
    name: Ident,
    layers: Vec<(LayerKind, Limit)>,
    outage: Outage,
}

impl Route {
    /// A route without layers (admits everything until layers are added).
    pub fn new(name: Ident) -> Route {
        Route {
            name,
            layers: Vec::new(),
            outage: Outage::default(),
        }
    }

    /// Adds a per-user layer.
    #[must_use]
    pub fn per_user(mut self, limit: Limit) -> Route {
        self.layers.push((LayerKind::User, limit));
        self
    }

    /// Adds a per-IP layer.
    #[must_use]
    pub fn per_ip(mut self, limit: Limit) -> Route {
        self.layers.push((LayerKind::Ip, limit));
        self
    }

    /// Adds a global layer.
    #[must_use]
    pub fn global(mut self, limit: Limit) -> Route {
        self.layers.push((LayerKind::Global, limit));
        self
    }

    /// Sets the outage behaviour (default [`Outage::Insurance`]).
    #[must_use]
    pub fn on_outage(mut self, outage: Outage) -> Route {
        self.outage = outage;
        self
    }

    /// The route's name.
    pub fn name(&self) -> &Ident {
        &self.name
    }

    /// The layers.
    pub fn layers(&self) -> &[(LayerKind, Limit)] {
        &self.layers
    }

    /// The outage behaviour.
    pub fn outage(&self) -> Outage {
        self.outage
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("layers", &self.layers)
            .field("outage", &self.outage)
            .finish()
    }
}

/// Who is asking: the identities the layers count by. A layer whose identity is unknown (a
/// per-user layer for an anonymous request) is skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    ip: Option<String>,
    user: Option<String>,
}

impl Identity {
    /// A client known by its IP address.
    pub fn ip(ip: impl Into<String>) -> Identity {
        Identity {
            ip: Some(ip.into()),
            user: None,
        }
    }

    /// Adds the authenticated user.
    #[must_use]
    pub fn with_user(mut self, user: impl Into<String>) -> Identity {
        self.user = Some(user.into());
        self
    }

    /// Sets the IP address.
    #[must_use]
    pub fn with_ip(mut self, ip: impl Into<String>) -> Identity {
        self.ip = Some(ip.into());
        self
    }

    /// The IP address, if known.
    pub fn ip_addr(&self) -> Option<&str> {
        self.ip.as_deref()
    }

    /// The user, if known.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

/// Who answered a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedBy {
    /// The backend (Redis, or the memory backend when no Redis is configured).
    Backend,
    /// The in-memory insurance limiter, while the backend is unusable.
    Insurance,
    /// Nobody: the backend is unusable and the route fails open.
    FailOpen,
    /// Nobody: the backend is unusable and the route fails closed.
    FailClosed,
}

/// The answer to a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The request may proceed; it was counted in every layer.
    pub allowed: bool,
    /// Each checked layer's decision, with its limit.
    pub layers: Vec<(LayerKind, Limit, Decision)>,
    /// Who answered.
    pub served_by: ServedBy,
}

impl Verdict {
    /// The decision that binds: the first layer that denied, or else the layer with the fewest
    /// requests remaining. A route without layers admits with an empty decision.
    pub fn decision(&self) -> Decision {
        self.binding().map(|(_, _, d)| *d).unwrap_or(Decision {
            allowed: true,
            limit: 0,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: None,
        })
    }

    fn binding(&self) -> Option<&(LayerKind, Limit, Decision)> {
        self.layers
            .iter()
            .find(|(_, _, d)| !d.allowed)
            .or_else(|| self.layers.iter().min_by_key(|(_, _, d)| d.remaining))
    }

    /// The response header fields for this verdict, for the route `policy` (see [`headers`]).
    pub fn headers(&self, policy: &str) -> Vec<(&'static str, String)> {
        match self.binding() {
            Some((_, limit, decision)) => headers::fields(policy, limit, decision),
            None => Vec::new(),
        }
    }
}

/// Checks routes against their quotas. Cheap to clone.
#[derive(Clone)]
pub struct RateLimiter {
    store: Store,
    insurance: MemoryLimiter,
    namespace: Namespace,
    cool_down: Duration,
}

impl RateLimiter {
    /// A limiter on the cache's store (Redis, or memory) and namespace, with an insurance
    /// limiter of [`DEFAULT_MAX_KEYS`] keys.
    pub fn new(cache: &Cache) -> RateLimiter {
        RateLimiter::with_insurance(cache, MemoryLimiter::new(DEFAULT_MAX_KEYS))
    }

    /// Like [`RateLimiter::new`] with a given insurance limiter (its size, its clock).
    pub fn with_insurance(cache: &Cache, insurance: MemoryLimiter) -> RateLimiter {
        RateLimiter {
            store: cache.store().clone(),
            insurance,
            namespace: cache.namespace().clone(),
            cool_down: cache.store().cool_down(),
        }
    }

    /// The key of one layer of `route` for `who`; `None` when `who` lacks that identity.
    pub fn key(
        &self,
        route: &Route,
        kind: LayerKind,
        who: &Identity,
    ) -> Option<Result<Key, KeyError>> {
        let id = match kind {
            LayerKind::User => who.user()?,
            LayerKind::Ip => who.ip_addr()?,
            LayerKind::Global => "all",
        };
        Some(
            self.namespace
                .global()
                .key(&RATE, kind.ident(), id)
                .and_then(|k| k.with_hash_tag(&route.name)),
        )
    }

    /// Checks `who` against every layer of `route` at once.
    ///
    /// Never fails: an identity that cannot form a key (an id longer than keys allow) is
    /// counted under a shared `invalid` id of that layer, so that hostile input is limited
    /// rather than unlimited.
    pub async fn check(&self, route: &Route, who: &Identity) -> Verdict {
        let mut keys = Vec::with_capacity(route.layers.len());
        let mut limits = Vec::with_capacity(route.layers.len());
        for (kind, limit) in &route.layers {
            let key = match self.key(route, *kind, who) {
                None => continue,
                Some(Ok(key)) => key,
                Some(Err(e)) => {
                    tracing::debug!(route = %route.name, error = %e, "identity cannot form a key");
                    match self
                        .namespace
                        .global()
                        .key(&RATE, kind.ident(), "invalid")
                        .and_then(|k| k.with_hash_tag(&route.name))
                    {
                        Ok(key) => key,
                        Err(_) => continue,
                    }
                }
            };
            keys.push((*kind, key));
            limits.push(*limit);
        }
        let checks: Vec<crate::store::RateCheck<'_>> = keys
            .iter()
            .zip(&limits)
            .map(|((_, key), limit)| crate::store::RateCheck { key, limit })
            .collect();
        let (decisions, served_by) = match self.store.rate_limit_primary(&checks).await {
            Some(decisions) => (decisions, ServedBy::Backend),
            None => match route.outage {
                Outage::Insurance => {
                    let layers: Vec<Layer<'_>> = checks
                        .iter()
                        .map(|c| Layer {
                            key: c.key.as_str(),
                            limit: c.limit,
                        })
                        .collect();
                    (self.insurance.check(&layers), ServedBy::Insurance)
                }
                Outage::Allow => (
                    limits.iter().map(Decision::unlimited).collect(),
                    ServedBy::FailOpen,
                ),
                Outage::Deny => (
                    limits
                        .iter()
                        .map(|l| Decision::refused(l, self.cool_down))
                        .collect(),
                    ServedBy::FailClosed,
                ),
            },
        };
        let allowed = decisions.iter().all(|d| d.allowed);
        Verdict {
            allowed,
            layers: keys
                .into_iter()
                .zip(limits)
                .zip(decisions)
                .map(|(((kind, _), limit), decision)| (kind, limit, decision))
                .collect(),
            served_by,
        }
    }

    /// The insurance limiter.
    pub fn insurance(&self) -> &MemoryLimiter {
        &self.insurance
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("store", &self.store)
            .field("insurance", &self.insurance)
            .finish()
    }
}

/// Shared so that a tower layer and handlers can hold one limiter.
pub type SharedRateLimiter = Arc<RateLimiter>;
