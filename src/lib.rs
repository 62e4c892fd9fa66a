//! # speedlayer
//!
//! The speed layer in front of a service's database: caching (and, as the crate grows, rate
//! limiting and short-lived coordination state) on Redis, or in process memory when no Redis is
//! configured, with its policy enforced by types:
//!
//! - every key is namespaced `<domain>:<entity>:<id>` and ids are escaped ([`key`]);
//! - every write has a TTL ([`ttl`]); there is no write API without one;
//! - Redis being slow or down never breaks a request: every call is bounded by a timeout, a
//!   circuit breaker skips a sick server, and a fallback serves meanwhile ([`store::Store`]);
//! - a loader's error is never cached, and a cached value that no longer decodes is a miss.
//!
//! The database stores facts; the speed layer stores convenience. Facts are permanent;
//! convenience expires.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use speedlayer::key::{Ident, Namespace};
//! use speedlayer::ttl::{Jitter, Ttl, TtlPolicy};
//! use speedlayer::Cache;
//!
//! const DASHBOARD: Ident = Ident::from_static("dashboard");
//! const STUDENT: Ident = Ident::from_static("student");
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Dashboard { attendance_pct: f32, fees_due_cents: i64 }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! // Redis when REDIS_URL is set, process memory otherwise.
//! let cache = Cache::from_env().await?;
//! let key = Namespace::root().global().key(&DASHBOARD, &STUDENT, "student_456")?;
//! let policy = TtlPolicy::new(Ttl::seconds(300)).with_jitter(Jitter::fraction(0.1)?)?;
//!
//! let dashboard = cache
//!     .get_or_set(&key, policy, || async {
//!         // The database query; its error is returned, never cached.
//!         Ok::<_, std::io::Error>(Dashboard { attendance_pct: 97.5, fees_due_cents: 0 })
//!     })
//!     .await
//!     .map_err(|e| std::io::Error::other(e.to_string()))?;
//! assert_eq!(dashboard.fees_due_cents, 0);
//! println!("{:?}", cache.stats());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Feature flags
//!
//! - `redis` (default): the Redis backend over one multiplexed, auto-reconnecting connection.
//! - `bb8`: a pooled transport (bb8) as an alternative to the multiplexed connection.
//! - `tls`: `rediss://` URLs, with rustls, trusting the system certificate store (and
//!   `SSL_CERT_FILE` / `SSL_CERT_DIR`).
//! - `axum`: [`ratelimit::layer`] and [`idempotency::layer`], tower layers for axum.
//! - `fleet-node`: a test helper only (the `speedlayer-fleet-node` process of the fleet tests).
//!
//! # Layout
//!
//! Data flows down: capabilities use the store; the store uses the leaves.
//!
//! - Leaves, which import nothing of the crate above them:
//!   - [`key`]: validated keys, scopes (prefix, tenant) and patterns.
//!   - [`ttl`]: TTLs that cannot be zero or absurd, jitter and ranges.
//!   - [`clock`]: the time source of breakers and throttles, with a fake clock for tests.
//!   - [`error`]: the crate's [`Error`].
//!   - [`config`]: configuration from the environment, secrets kept out of output.
//!   - [`switch`]: rollout switches, one per capability, with documented off-states.
//! - [`store`]: the storage core. The [`CacheLayer`](store::CacheLayer) trait (bytes with
//!   mandatory TTLs, leases, tag indexes), the memory and Redis backends, the resilience wrapper
//!   [`Store`](store::Store) (timeouts, breaker, fallback, failure logs, counters), and
//!   [`Operation`](store::Operation) / [`OutageRule`](store::OutageRule), through which a
//!   capability runs its own atomic step. The store knows no capability.
//! - Capabilities, each a folder owning its Redis scripts and memory twin:
//!   - [`cache`]: the typed [`Cache`] with get-or-set (one key, or many with one loader call),
//!     single-flight loading and leases.
//!   - [`query`]: keys for filtered queries: declared dimensions, normalised values, a tag per
//!     family.
//!   - [`invalidation`]: write events ([`Invalidates`](invalidation::Invalidates)), tags and tag
//!     rules.
//!   - [`ratelimit`]: fixed window, sliding log, sliding window and GCRA limits per route and
//!     layer, with outage rules and response headers.
//!   - [`lock`]: locks with fencing tokens, failing closed.
//!   - [`counter`]: live counters that recount from the database and never drift for long.
//!   - [`idempotency`]: idempotency keys for retried requests, with a tower layer for axum.
//!   - [`scratch`]: temporary data that reaches its sink: hashes flushed crash-safely to the
//!     database, form drafts, presence and typing.
//!   - [`session`]: a read-through session index, revocable per session or per user.
//!   - [`revocation`]: a token blacklist kept until each token's own expiry, with an explicit
//!     answer for "unknown".

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// Scripts, URL parsing and secret scrubbing serve the Redis backend only.
#![cfg_attr(not(feature = "redis"), allow(dead_code, unused_imports))]

pub mod cache;
pub mod clock;
pub mod config;
pub mod counter;
pub mod error;
pub mod idempotency;
pub mod invalidation;
pub mod key;
pub mod lock;
#[cfg(any(feature = "outbox-postgres", feature = "outbox-sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "outbox-postgres", feature = "outbox-sqlite")))
)]
pub mod outbox;
pub mod query;
pub mod ratelimit;
pub mod revocation;
pub mod scratch;
pub mod session;
pub mod store;
pub mod switch;
pub mod telemetry;
pub mod tier;
pub mod ttl;

pub use cache::{Batch, BatchEntry, Cache, CacheStats, Served};
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use key::{Ident, Key, KeyPattern, KeySpace, Namespace, Scope, Tag};
pub use ttl::{Jitter, Ttl, TtlPolicy};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
