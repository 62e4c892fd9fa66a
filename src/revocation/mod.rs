//! Token revocation: a blacklist of token ids (`jti`) kept until the token would have expired
//! anyway.
//!
//! A stateless token (a JWT) stays valid until it expires; logging out, or an administrator
//! locking an account, must refuse it at once on every instance. [`Revocations::revoke`] stores
//! the token id under `revoked:token:<jti>` until the token's own expiry, so the blacklist never
//! outlives what it guards; [`Revocations::check`] answers [`Revocation::Revoked`],
//! [`Revocation::NotRevoked`] or [`Revocation::Unknown`] (Redis unusable), and unknown is never
//! folded into "not revoked": each deployment chooses what it means with [`OnUnknown`] (deny by
//! default), and [`Revocations::allows`] applies that choice.
//!
//! - **Outage rule.** Both calls fail closed: a revocation that could not be stored is an error
//!   (answer the logout with a 503, or retry), never a silent success; a check that could not ask
//!   Redis is `Unknown` within the operation timeout.
//! - **Other clients.** The key holds `1`, readable by a Node service (`EXISTS`). Anything
//!   another client stores under a revocation key counts as a revocation: a blacklist errs on the
//!   side of refusing.
//! - **Ids.** A token id is escaped like every id; one too long for a key segment is keyed by its
//!   SHA-256 (`h-<hex>`).
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use speedlayer::revocation::{Revocation, Revocations};
//! use speedlayer::Cache;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cache = Cache::memory();
//! let revocations = Revocations::new(&cache);
//! let expires = SystemTime::now() + Duration::from_secs(900);
//! revocations.revoke("jti-7f3a", expires).await?;
//! assert_eq!(revocations.check("jti-7f3a").await, Revocation::Revoked);
//! assert!(!revocations.allows("jti-7f3a").await);
//! assert!(revocations.allows("jti-other").await);
//! # Ok::<(), speedlayer::Error>(())
//! # }).unwrap();
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use crate::Cache;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Ident, Key, KeyError, KeySpace, Scope};
use crate::store::{Answered, OutageRule, Store};
use crate::ttl::Ttl;

mod script;

use script::{CheckOp, RevokeOp};

/// Writes a marker (`1`) under a key for a TTL, on the backend or nowhere: the session index's
/// revoked-user marker.
pub(crate) use script::RevokeOp as MarkOp;

const REVOKED: Ident = Ident::from_static("revoked");
const TOKEN: Ident = Ident::from_static("token");

/// What [`Revocations::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The token was revoked: refuse it.
    Revoked,
    /// No revocation is recorded for the token.
    NotRevoked,
    /// The blacklist could not be read (Redis unusable): [`OnUnknown`] says what it means.
    Unknown,
}

/// What a deployment does with a token whose revocation is [`Revocation::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnknown {
    /// Refuse the token (the default): a revoked token is never accepted, at the cost of
    /// refusing valid ones while Redis is unusable.
    #[default]
    Deny,
    /// Accept the token: requests keep working while Redis is unusable, at the cost of accepting
    /// a token revoked meanwhile.
    Allow,
}

/// The token blacklist. Cheap to clone; clones share the policy and its log line.
#[derive(Clone, Debug)]
pub struct Revocations {
    store: Store,
    keys: KeySpace,
    on_unknown: OnUnknown,
    logged: Arc<AtomicBool>,
}

impl Revocations {
    /// The blacklist of `cache`'s store, in its namespace's global scope; unknown means deny.
    pub fn new(cache: &Cache) -> Revocations {
        Revocations::from_store(cache.store(), &cache.namespace().global())
    }

    /// The blacklist of `store`, keyed in `scope`.
    pub fn from_store(store: &Store, scope: &Scope) -> Revocations {
        Revocations {
            store: store.clone(),
            keys: scope.keyspace(&REVOKED, &TOKEN),
            on_unknown: OnUnknown::Deny,
            logged: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What [`allows`](Revocations::allows) answers for an unknown revocation.
    pub fn on_unknown(mut self, policy: OnUnknown) -> Revocations {
        self.on_unknown = policy;
        self
    }

    /// The policy for unknown revocations.
    pub fn unknown_policy(&self) -> OnUnknown {
        self.on_unknown
    }

    /// The key of a token id: escaped, or the SHA-256 of one too long for a key.
    pub fn key_of(&self, jti: &str) -> Result<Key> {
        match self.keys.key_str(jti) {
            Err(KeyError::SegmentTooLong { .. }) | Err(KeyError::KeyTooLong { .. }) => {
                let hex = crate::key::sha256_hex(jti.as_bytes(), 32);
                Ok(self.keys.key_str(&format!("h-{hex}"))?)
            }
            other => Ok(other?),
        }
    }

    /// Records that the token `jti` is revoked until `token_expires_at` (after which the token is
    /// refused for having expired anyway). True when recorded; false when the token has already
    /// expired (nothing to record). An error when the id is empty or when Redis is unusable: the
    /// revocation was not recorded, so do not report the logout as done.
    pub async fn revoke(&self, jti: &str, token_expires_at: SystemTime) -> Result<bool> {
        let key = self.key_of(jti)?;
        let left = token_expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        // Beyond the longest TTL a key can have, the token would outlive its revocation: refuse.
        if left > Ttl::MAX.as_duration() {
            return Err(Error::new(
                ErrorKind::InvalidTtl,
                "the token expires later than the longest revocation speedlayer keeps (30 days); \
                 issue shorter-lived tokens",
            ));
        }
        let Ok(ttl) = Ttl::new(left) else {
            // Expired, or closer to it than the shortest TTL.
            return Ok(false);
        };
        match self
            .store
            .run(&RevokeOp { key: &key, ttl }, OutageRule::FailClosed)
            .await?
        {
            Answered::Backend(()) | Answered::Fallback(()) => Ok(true),
            Answered::Open | Answered::Closed => Err(Error::new(
                ErrorKind::Unavailable,
                "the revocation was not recorded: the backend is unusable; answer the logout \
                 with an error or retry it",
            )),
        }
    }

    /// Whether the token `jti` is revoked. [`Revocation::Unknown`] when Redis is unusable (within
    /// the operation timeout), never [`Revocation::NotRevoked`]. An id that cannot have been
    /// revoked (empty) is not revoked.
    pub async fn check(&self, jti: &str) -> Revocation {
        if !self.store.is_on(crate::switch::Capability::Revocations) {
            return Revocation::Unknown;
        }
        let Ok(key) = self.key_of(jti) else {
            return Revocation::NotRevoked;
        };
        match self
            .store
            .run(&CheckOp { key: &key }, OutageRule::FailClosed)
            .await
        {
            Ok(Answered::Backend(true)) | Ok(Answered::Fallback(true)) => Revocation::Revoked,
            Ok(Answered::Backend(false)) | Ok(Answered::Fallback(false)) => Revocation::NotRevoked,
            Ok(_) => Revocation::Unknown,
            Err(e) => {
                tracing::warn!(error = %e, "revocation check failed; treating it as unknown");
                Revocation::Unknown
            }
        }
    }

    /// Whether to accept the token `jti`: not revoked, or unknown under [`OnUnknown::Allow`].
    /// The first unknown answer logs which choice this deployment made.
    pub async fn allows(&self, jti: &str) -> bool {
        if !self.store.is_on(crate::switch::Capability::Revocations) {
            // Switched off: tokens are not checked, and accepted.
            return true;
        }
        match self.check(jti).await {
            Revocation::Revoked => false,
            Revocation::NotRevoked => true,
            Revocation::Unknown => {
                if !self.logged.swap(true, Ordering::Relaxed) {
                    match self.on_unknown {
                        OnUnknown::Deny => tracing::warn!(
                            "token revocations cannot be read (the backend is unusable): tokens \
                             are refused until it answers (OnUnknown::Deny)"
                        ),
                        OnUnknown::Allow => tracing::warn!(
                            "token revocations cannot be read (the backend is unusable): tokens \
                             are accepted unchecked until it answers (OnUnknown::Allow)"
                        ),
                    }
                }
                self.on_unknown == OnUnknown::Allow
            }
        }
    }
}
