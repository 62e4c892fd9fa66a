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
//! Keys are built with the key builder: `rate:<layer>:<id>:<quota>:{<route>}`
//! (`rate:ip:10.0.0.1:log-5-60s:{auth-login}`, `rate:user:42:gcra-100-60s-b10:{auth-login}`,
//! `rate:global:all:fixed-1000-1s:{auth-login}`). The quota segment gives every layer its own
//! counter, so two layers of one kind (`per_ip(5/min).per_ip(100/day)`, the usual login set-up)
//! count separately. The braces are a Redis Cluster hash tag, so all the layers of a check live in
//! one slot and a check is one script. A route whose layers all count one identity (all per IP,
//! or all per user: the usual login and API set-ups) tags each client's keys with a bucket of
//! its id as well, `{auth-login-74a}` ([`Route::spread`]): its clients then spread over every
//! node of a cluster instead of all counting on the node that owns `{auth-login}`. A limiter
//! built for a tenant [`Scope`] ([`RateLimiter::in_scope`]) counts per tenant
//! (`@<tenant>:rate:...`).
//!
//! IPv4 clients are counted by address; IPv6 clients by their /64 network (configurable with
//! [`RateLimiter::ipv6_prefix`]): a single IPv6 client controls a whole /64 and rotates
//! addresses inside it, so counting per address would never limit it (and would flood the
//! insurance limiter with one entry per address). IPv4-mapped IPv6 addresses count as IPv4.
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

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::Cache;
use crate::key::{Ident, Key, KeyError, KeySpace, Scope};
use crate::store::{Answered, OutageRule, Store};

/// How many buckets the clients of a [`spread`](Route::spread) route are hashed into: each is
/// its own Redis Cluster hash tag, so a busy route's counters are spread over every node.
pub const SPREAD_BUCKETS: u32 = 4096;

pub mod headers;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod layer;
mod limit;
mod memory;
pub mod script;
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

/// One layer of a rate-limit check: the counter's key and its quota.
#[derive(Debug, Clone)]
pub struct RateCheck {
    /// The counter.
    pub key: Key,
    /// The quota.
    pub limit: Limit,
}

/// A route's quotas: the layers checked together, and its outage behaviour.
///
/// Each layer counts on its own, also two layers of the same kind with different quotas (5 per
/// minute and 100 per day per IP). Adding a layer identical to one the route already has (same
/// kind and quota) changes nothing.
#[derive(Clone, Debug)]
pub struct Route {
    name: Ident,
    layers: Vec<(LayerKind, Limit)>,
    /// Each layer's key after the id, `:<quota>:{<route>}` (see [`Limit::slug`]), built once;
    /// on a route whose layers all count one identity, the hash tag also names the id's bucket
    /// (see [`Route::spread`]).
    suffixes: Vec<String>,
    /// [`Route::spread`], kept as layers are added (a check reads it for every layer).
    spread: bool,
    outage: Outage,
}

impl Route {
    /// A route without layers (admits everything until layers are added).
    pub fn new(name: Ident) -> Route {
        Route {
            name,
            layers: Vec::new(),
            suffixes: Vec::new(),
            spread: false,
            outage: Outage::default(),
        }
    }

    fn with_layer(mut self, kind: LayerKind, limit: Limit) -> Route {
        if !self.layers.contains(&(kind, limit)) {
            self.layers.push((kind, limit));
            self.suffixes
                .push(format!(":{}:{{{}}}", limit.slug(), self.name));
            let first = self.layers[0].0;
            self.spread =
                first != LayerKind::Global && self.layers.iter().all(|(k, _)| *k == first);
        }
        self
    }

    /// True when every layer counts the same identity (all per user, or all per IP): then the
    /// layers' keys carry `{<route>-<bucket>}` as their Redis Cluster hash tag, where the bucket
    /// (one of [`SPREAD_BUCKETS`], from the id) is the same for all layers of one client, so a
    /// check stays one script in one slot while the route's clients spread over every node.
    /// A route with a global layer, or both per-user and per-IP layers, keeps `{<route>}`: its
    /// keys share one slot, since one check must reach them all.
    pub fn spread(&self) -> bool {
        self.spread
    }

    /// The suffix of layer `index` for the key id `id`.
    fn suffix(&self, index: usize, id: &str) -> Cow<'_, str> {
        let suffix = &self.suffixes[index];
        if !self.spread {
            return Cow::Borrowed(suffix);
        }
        // FNV-1a: stable across processes and versions, so every app server picks the same
        // bucket for a client.
        let mut hash: u32 = 0x811c_9dc5;
        for b in id.bytes() {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let bucket = hash % SPREAD_BUCKETS;
        // `:<quota>:{<route>}` becomes `:<quota>:{<route>-<bucket>}`.
        let open = &suffix[..suffix.len() - 1];
        Cow::Owned(format!("{open}-{bucket:03x}}}"))
    }

    /// Adds a per-user layer.
    #[must_use]
    pub fn per_user(self, limit: Limit) -> Route {
        self.with_layer(LayerKind::User, limit)
    }

    /// Adds a per-IP layer (per /64 for IPv6 clients, see [`RateLimiter::ipv6_prefix`]).
    #[must_use]
    pub fn per_ip(self, limit: Limit) -> Route {
        self.with_layer(LayerKind::Ip, limit)
    }

    /// Adds a global layer.
    #[must_use]
    pub fn global(self, limit: Limit) -> Route {
        self.with_layer(LayerKind::Global, limit)
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
    /// Nobody: rate limiting is switched off ([`switch`](crate::switch)); every request is
    /// admitted.
    SwitchedOff,
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
    local: Option<Arc<MemoryLimiter>>,
    insurance: MemoryLimiter,
    /// `rate:user`, `rate:ip`, `rate:global` in the limiter's scope, built once.
    keyspaces: Arc<[KeySpace; 3]>,
    cool_down: Duration,
    ipv6_prefix: u8,
}

/// The default network an IPv6 client is counted by: its /64.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

impl RateLimiter {
    /// A limiter on the cache's store (Redis, or memory) and namespace (no tenant), with an
    /// insurance limiter of [`DEFAULT_MAX_KEYS`] keys.
    pub fn new(cache: &Cache) -> RateLimiter {
        RateLimiter::with_insurance(cache, MemoryLimiter::new(DEFAULT_MAX_KEYS))
    }

    /// Like [`RateLimiter::new`] with a given insurance limiter (its size, its clock).
    pub fn with_insurance(cache: &Cache, insurance: MemoryLimiter) -> RateLimiter {
        RateLimiter::from_store(cache.store(), &cache.namespace().global(), insurance)
    }

    /// A limiter on `store` whose keys are built in `scope` (a tenant's scope counts per
    /// tenant).
    pub fn from_store(store: &Store, scope: &Scope, insurance: MemoryLimiter) -> RateLimiter {
        RateLimiter {
            store: store.clone(),
            local: store.primary_memory().map(script::twin),
            insurance,
            keyspaces: Arc::new(RateLimiter::keyspaces(scope)),
            cool_down: store.cool_down(),
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
    }

    fn keyspaces(scope: &Scope) -> [KeySpace; 3] {
        [LayerKind::User, LayerKind::Ip, LayerKind::Global]
            .map(|kind| scope.keyspace(&RATE, kind.ident()))
    }

    /// This limiter with its keys built in `scope`: a tenant's scope
    /// (`Namespace::tenant(org_id)`) gives every tenant its own counters, so one organization's
    /// traffic never uses up another's quota.
    #[must_use]
    pub fn in_scope(mut self, scope: &Scope) -> RateLimiter {
        self.keyspaces = Arc::new(RateLimiter::keyspaces(scope));
        self
    }

    /// Counts IPv6 clients by their network of `prefix` bits (default 64, clamped to 128):
    /// every address of that network shares one counter. IPv4 clients are always counted by
    /// address.
    #[must_use]
    pub fn ipv6_prefix(mut self, prefix: u8) -> RateLimiter {
        self.ipv6_prefix = prefix.min(128);
        self
    }

    /// The key of one layer of `route` for `who`; `None` when `who` lacks that identity or
    /// `route` has no such layer.
    pub fn key(
        &self,
        route: &Route,
        kind: LayerKind,
        who: &Identity,
    ) -> Option<Result<Key, KeyError>> {
        let index = route.layers.iter().position(|(k, _)| *k == kind)?;
        let id = self.key_id(kind, who)?;
        Some(self.layer_key(route, index, &id))
    }

    fn layer_key(&self, route: &Route, index: usize, id: &str) -> Result<Key, KeyError> {
        let (kind, _) = route.layers[index];
        // The suffix is a context segment (the quota) and the route's hash tag.
        self.keyspace(kind)
            .key_with_suffix(id, &route.suffix(index, id), 2)
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
        let verdict = self.check_counted(route, who).await;
        if !verdict.allowed {
            crate::telemetry::rate_limited(route.name.as_str());
        }
        verdict
    }

    async fn check_counted(&self, route: &Route, who: &Identity) -> Verdict {
        if !self.store.is_on(crate::switch::Capability::RateLimit) {
            return Verdict {
                allowed: true,
                layers: Vec::new(),
                served_by: ServedBy::SwitchedOff,
            };
        }
        if let (Some(local), [(kind, limit)]) = (&self.local, route.layers.as_slice()) {
            return self.check_one_locally(local, route, *kind, limit, who);
        }
        let mut checks = Vec::with_capacity(route.layers.len());
        let mut kinds = Vec::with_capacity(route.layers.len());
        for (index, (kind, limit)) in route.layers.iter().enumerate() {
            let Some(id) = self.key_id(*kind, who) else {
                continue;
            };
            let key = match self.layer_key(route, index, &id) {
                Ok(key) => key,
                Err(e) => {
                    tracing::debug!(route = %route.name, error = %e, "identity cannot form a key");
                    match self.layer_key(route, index, "invalid") {
                        Ok(key) => key,
                        Err(_) => continue,
                    }
                }
            };
            checks.push(RateCheck { key, limit: *limit });
            kinds.push(*kind);
        }
        let mut layers = Vec::with_capacity(checks.len());
        if let Some(local) = &self.local {
            local.check_each(&checks, |i, decision| {
                layers.push((kinds[i], checks[i].limit, decision));
            });
            return Verdict {
                allowed: layers.iter().all(|(_, _, d)| d.allowed),
                layers,
                served_by: ServedBy::Backend,
            };
        }
        let rule = match route.outage {
            Outage::Allow => OutageRule::FailOpen,
            // The insurance limiter is this limiter's own, not the store's fallback.
            Outage::Insurance | Outage::Deny => OutageRule::FailClosed,
        };
        let answered = match self
            .store
            .run(&script::Check { checks: &checks }, rule)
            .await
        {
            Ok(answered) => answered,
            Err(e) => {
                // The server answered with an error about the data (the scripts repair what
                // other clients leave, so this is not expected): the route's outage rule
                // answers, and the server's health is not in question.
                tracing::warn!(route = %route.name, error = %e, "rate-limit check refused by the backend");
                match rule {
                    OutageRule::FailOpen => Answered::Open,
                    _ => Answered::Closed,
                }
            }
        };
        let (decisions, served_by) = match answered {
            Answered::Backend(decisions) | Answered::Fallback(decisions) => {
                (decisions, ServedBy::Backend)
            }
            Answered::Open => (
                checks
                    .iter()
                    .map(|c| Decision::unlimited(&c.limit))
                    .collect(),
                ServedBy::FailOpen,
            ),
            _ if route.outage == Outage::Insurance => {
                (self.insurance.check(&checks), ServedBy::Insurance)
            }
            _ => (
                checks
                    .iter()
                    .map(|c| Decision::refused(&c.limit, self.cool_down))
                    .collect(),
                ServedBy::FailClosed,
            ),
        };
        layers.extend(
            kinds
                .into_iter()
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
        // A limiter of this process only: no Redis slot to choose, the route's plain suffix.
        let suffix = &route.suffixes[0];
        let decision = KEY.with_borrow_mut(|key| {
            let keyspace = self.keyspace(kind);
            if let Err(e) = keyspace.write_with_suffix(&id, suffix, key) {
                tracing::debug!(route = %route.name, error = %e, "identity cannot form a key");
                // Counted under the layer's shared `invalid` id, as in the general path.
                if keyspace.write_with_suffix("invalid", suffix, key).is_err() {
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

    /// The id a layer counts `who` by: the user, the client's address (an IPv6 client's
    /// network), or `all`.
    fn key_id<'a>(&self, kind: LayerKind, who: &'a Identity) -> Option<Cow<'a, str>> {
        match kind {
            LayerKind::User => who.user().map(Cow::Borrowed),
            LayerKind::Ip => who.ip_addr().map(|ip| client_network(ip, self.ipv6_prefix)),
            LayerKind::Global => Some(Cow::Borrowed("all")),
        }
    }

    /// The insurance limiter.
    pub fn insurance(&self) -> &MemoryLimiter {
        &self.insurance
    }
}

/// What a per-IP layer counts an address by: an IPv4 address as it is, an IPv6 address by its
/// network of `prefix` bits (`2001:db8:1:2::/64`), an IPv4-mapped IPv6 address as IPv4. Text
/// that is not an address is counted as it is (escaped in the key like any id).
pub fn client_network(ip: &str, prefix: u8) -> Cow<'_, str> {
    // Only IPv6 text has a colon: an IPv4 address (the common case) is counted as it is,
    // without parsing.
    if !ip.contains(':') {
        return Cow::Borrowed(ip);
    }
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => Cow::Borrowed(ip),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => Cow::Owned(v4.to_string()),
            None => {
                let prefix = prefix.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                let net = std::net::Ipv6Addr::from(u128::from(v6) & mask);
                Cow::Owned(format!("{net}/{prefix}"))
            }
        },
        Err(_) => Cow::Borrowed(ip),
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("store", &self.store)
            .field("insurance", &self.insurance)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .finish()
    }
}

/// Shared so that a tower layer and handlers can hold one limiter.
pub type SharedRateLimiter = Arc<RateLimiter>;
