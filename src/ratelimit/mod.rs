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
use crate::key::{Ident, Key, KeyError, KeySpace};
use crate::store::Store;

pub mod headers;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod layer;
mod limit;
mod memory;
pub(crate) mod state;

pub use limit::{Algorithm, Decision, Limit, LimitError, MAX_LOG_LIMIT, MAX_WINDOW};
pub use memory::{AsLayer, DEFAULT_MAX_KEYS, Layer, MemoryLimiter};

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
#[derive(Clone, Debug)]
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
    /// The memory backend's limiter, when the cache runs on memory: checked directly.
    local: Option<MemoryLimiter>,
    insurance: MemoryLimiter,
    /// `rate:user`, `rate:ip`, `rate:global` in the cache's namespace, built once.
    keyspaces: Arc<[KeySpace; 3]>,
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
        let scope = cache.namespace().global();
        let keyspaces = [LayerKind::User, LayerKind::Ip, LayerKind::Global]
            .map(|kind| scope.keyspace(&RATE, kind.ident()));
        RateLimiter {
            store: cache.store().clone(),
            local: cache.store().primary_memory_limiter(),
            insurance,
            keyspaces: Arc::new(keyspaces),
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
        let id = self.key_id(kind, who)?;
        Some(
            self.keyspace(kind)
                .key_str(id)
                .and_then(|k| k.with_hash_tag(&route.name)),
        )
    }

    fn keyspace(&self, kind: LayerKind) -> &KeySpace {
        match kind {
            LayerKind::User => &self.keyspaces[0],
            LayerKind::Ip => &self.keyspaces[1],
            LayerKind::Global => &self.keyspaces[2],
        }
    }

    /// Checks `who` against every layer of `route` at once.
    ///
    /// Never fails: an identity that cannot form a key (an id longer than keys allow) is
    /// counted under a shared `invalid` id of that layer, so that hostile input is limited
    /// rather than unlimited.
    pub async fn check(&self, route: &Route, who: &Identity) -> Verdict {
        if let (Some(local), [(kind, limit)]) = (&self.local, route.layers.as_slice()) {
            return self.check_one_locally(local, route, *kind, limit, who);
        }
        let mut checks = Vec::with_capacity(route.layers.len());
        for (kind, limit) in &route.layers {
            let key = match self.key(route, *kind, who) {
                None => continue,
                Some(Ok(key)) => key,
                Some(Err(e)) => {
                    tracing::debug!(route = %route.name, error = %e, "identity cannot form a key");
                    match self
                        .keyspace(*kind)
                        .key("invalid")
                        .and_then(|k| k.with_hash_tag(&route.name))
                    {
                        Ok(key) => key,
                        Err(_) => continue,
                    }
                }
            };
            checks.push(crate::store::RateCheck { key, limit: *limit });
        }
        // The kinds of the layers checked, in order (layers without an identity were skipped).
        let kinds = route
            .layers
            .iter()
            .map(|(kind, _)| *kind)
            .filter(|kind| self.key_id(*kind, who).is_some());
        let mut layers = Vec::with_capacity(checks.len());
        if let Some(local) = &self.local {
            let mut kinds = kinds;
            local.check_each(&checks, |i, decision| {
                if let Some(kind) = kinds.next() {
                    layers.push((kind, checks[i].limit, decision));
                }
            });
            return Verdict {
                allowed: layers.iter().all(|(_, _, d)| d.allowed),
                layers,
                served_by: ServedBy::Backend,
            };
        }
        let (decisions, served_by) = match self.store.rate_limit_primary(&checks).await {
            Some(decisions) => (decisions, ServedBy::Backend),
            None => match route.outage {
                Outage::Insurance => (self.insurance.check(&checks), ServedBy::Insurance),
                Outage::Allow => (
                    checks
                        .iter()
                        .map(|c| Decision::unlimited(&c.limit))
                        .collect(),
                    ServedBy::FailOpen,
                ),
                Outage::Deny => (
                    checks
                        .iter()
                        .map(|c| Decision::refused(&c.limit, self.cool_down))
                        .collect(),
                    ServedBy::FailClosed,
                ),
            },
        };
        layers.extend(
            kinds
                .zip(&checks)
                .zip(decisions)
                .map(|((kind, check), decision)| (kind, check.limit, decision)),
        );
        Verdict {
            allowed: layers.iter().all(|(_, _, d)| d.allowed),
            layers,
            served_by,
        }
    }

    /// The common case on the memory backend: one layer, checked without building an owned key
    /// (the key's text goes into a reused buffer).
    fn check_one_locally(
        &self,
        local: &MemoryLimiter,
        route: &Route,
        kind: LayerKind,
        limit: &Limit,
        who: &Identity,
    ) -> Verdict {
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let Some(id) = self.key_id(kind, who) else {
            return Verdict {
                allowed: true,
                layers: Vec::new(),
                served_by: ServedBy::Backend,
            };
        };
        let decision = KEY.with_borrow_mut(|key| {
            let keyspace = self.keyspace(kind);
            if let Err(e) = keyspace.write_tagged(id, &route.name, key) {
                tracing::debug!(route = %route.name, error = %e, "identity cannot form a key");
                // Counted under the layer's shared `invalid` id, as in the general path.
                if keyspace.write_tagged("invalid", &route.name, key).is_err() {
                    return None;
                }
            }
            let mut decision = None;
            local.check_each(&[Layer { key, limit }], |_, d| decision = Some(d));
            decision
        });
        let layers: Vec<(LayerKind, Limit, Decision)> = decision
            .map(|d| vec![(kind, *limit, d)])
            .unwrap_or_default();
        Verdict {
            allowed: layers.iter().all(|(_, _, d)| d.allowed),
            layers,
            served_by: ServedBy::Backend,
        }
    }

    fn key_id<'a>(&self, kind: LayerKind, who: &'a Identity) -> Option<&'a str> {
        match kind {
            LayerKind::User => who.user(),
            LayerKind::Ip => who.ip_addr(),
            LayerKind::Global => Some("all"),
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
