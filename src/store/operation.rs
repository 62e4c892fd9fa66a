//! How a capability runs an atomic step of its own through the [`Store`](super::Store).
//!
//! A capability (rate limiting, and later locks, idempotency, counters) owns its Redis script and
//! its memory twin with the same semantics. It wraps one call in an [`Operation`] and hands it to
//! [`Store::run`](super::Store::run) with an [`OutageRule`]; the store applies the timeout, the
//! breaker, the failure counters and logs, and the rule. The store itself knows no capability.

use async_trait::async_trait;

use super::MemoryLayer;
use crate::error::Result;

/// The concrete backend an [`Operation`] runs on.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Backend<'a> {
    /// Process memory: the operation runs its memory twin.
    Memory(&'a MemoryLayer),
    /// Redis: the operation runs its script.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    Redis(&'a super::redis::RedisLayer),
    /// A layer that is not one of speedlayer's backends: operations cannot run on it.
    Other,
}

/// One atomic step of a capability, with the same semantics on every backend: on Redis one
/// script (one round trip, every key in one hash slot), in memory its twin.
///
/// Errors from either side are about the data (a key holding another client's type, say):
/// availability problems are the store's business, and [`Store::run`](super::Store::run) turns
/// them into an [`Answered`] according to the [`OutageRule`].
#[async_trait]
pub trait Operation: Send + Sync {
    /// What the step answers.
    type Output: Send;

    /// A short name for logs ("rate limit", "lock").
    fn name(&self) -> &'static str;

    /// Runs the step on Redis.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    async fn on_redis(&self, redis: &super::redis::RedisLayer) -> Result<Self::Output>;

    /// Runs the memory twin. `memory` holds the twin's state (see [`MemoryLayer::twin`]).
    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Self::Output>;
}

/// What happens to an [`Operation`] while the backend is unusable (breaker open, timeout, no
/// connection). Chosen per call, by what is at stake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutageRule {
    /// Run the memory twin on the store's in-process fallback, if one is configured (a cache: a
    /// miss costs a query). Without a fallback this is [`OutageRule::FailClosed`].
    Fallback,
    /// Answer [`Answered::Open`]: the caller lets the request through (a rate limit that must
    /// never block).
    FailOpen,
    /// Answer [`Answered::Closed`]: the caller refuses (a lock: a second holder is worse than a
    /// 503). The fallback is never consulted, whatever the cache does meanwhile.
    FailClosed,
}

/// What [`Store::run`](super::Store::run) answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answered<T> {
    /// The backend ran the operation.
    Backend(T),
    /// The backend was unusable; the in-process fallback ran the twin ([`OutageRule::Fallback`]).
    Fallback(T),
    /// The backend was unusable and the rule is [`OutageRule::FailOpen`].
    Open,
    /// The backend was unusable and the rule is [`OutageRule::FailClosed`] (or
    /// [`OutageRule::Fallback`] without a fallback).
    Closed,
}

impl<T> Answered<T> {
    /// The value, when a backend or the fallback ran the operation.
    pub fn value(self) -> Option<T> {
        match self {
            Answered::Backend(v) | Answered::Fallback(v) => Some(v),
            Answered::Open | Answered::Closed => None,
        }
    }
}
