//! Byte stores: the [`CacheLayer`] trait, its backends, and the resilience wrapper.
//!
//! - [`MemoryLayer`]: process memory (moka), bounded in bytes, per-entry TTL.
//! - [`RedisLayer`](redis::RedisLayer) (feature `redis`): one multiplexed, auto-reconnecting
//!   connection by default, or a bb8 pool (feature `bb8`).
//! - [`Store`]: the one place where timeouts, the circuit breaker, fallback, failure logging and
//!   counters live. Policy modules ([`Cache`](crate::Cache) and later ones) talk to a `Store`,
//!   never to a backend directly.
//!
//! Backends know keys, TTLs and bytes; they know nothing of JSON, loaders or policy.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::key::{Key, KeyPattern, Tag};
use crate::ratelimit::{Decision, Limit};
use crate::ttl::Ttl;

mod breaker;
pub mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod resilient;

pub use breaker::BreakerState;
pub use memory::MemoryLayer;
pub use resilient::{Invalidated, Source, Store, StoreStats};

/// Which backend a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// Process memory.
    Memory,
    /// A Redis (or Valkey) server.
    Redis,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Memory => "memory",
            BackendKind::Redis => "redis",
        })
    }
}

/// One entry of [`CacheLayer::set_many`].
#[derive(Clone, Debug)]
pub struct Entry {
    /// Where.
    pub key: Key,
    /// What (opaque bytes).
    pub value: Bytes,
    /// For how long.
    pub ttl: Ttl,
}

/// What [`CacheLayer::remaining_ttl`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remaining {
    /// No such entry.
    Missing,
    /// The entry exists without expiry. speedlayer never writes one; another client of the same
    /// Redis can.
    NoExpiry,
    /// The entry expires after this long.
    Expires(Duration),
}

/// The bytes a key holds while a load for it is in flight: a lease marker, `\0speedlayer:lease:`
/// followed by the lease token in decimal. It starts with a NUL byte, so it is never valid JSON
/// (or UTF-8 text a client would show as a value); readers treat it as a miss. It lives at most
/// the lease TTL.
pub const LEASE_PREFIX: &[u8] = b"\0speedlayer:lease:";

/// The marker of lease `token`.
pub fn lease_marker(token: u64) -> Bytes {
    let mut marker = Vec::with_capacity(LEASE_PREFIX.len() + 20);
    marker.extend_from_slice(LEASE_PREFIX);
    marker.extend_from_slice(token.to_string().as_bytes());
    Bytes::from(marker)
}

/// True when `value` is a lease marker, not a value.
pub fn is_lease(value: &[u8]) -> bool {
    value.starts_with(LEASE_PREFIX)
}

/// One layer of a rate-limit check: the counter's key and its quota.
#[derive(Debug, Clone)]
pub struct RateCheck {
    /// The counter.
    pub key: Key,
    /// The quota.
    pub limit: Limit,
}

/// What [`CacheLayer::get_or_lease`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leased {
    /// A value: no load needed.
    Value(Bytes),
    /// The key was empty; it now holds this caller's lease marker. A later
    /// [`set_leased`](CacheLayer::set_leased) with the same token stores the loaded value unless
    /// the key was invalidated (or written) in between.
    Granted,
    /// Another load holds the key's lease (or no lease can be taken): load, but do not cache.
    Denied,
}

/// A byte store with mandatory TTLs.
///
/// Object-safe: `Arc<dyn CacheLayer>` works. Every write takes a [`Ttl`]; there is no other way to
/// write. Multi-key operations are one round trip on Redis.
///
/// Errors: a backend returns [`ErrorKind::WrongType`](crate::ErrorKind::WrongType) when the entry
/// has a type the operation cannot use, and availability errors (timeout, connection, backend)
/// when it cannot answer. The [`Store`] wrapper turns the latter into fallbacks.
#[async_trait]
pub trait CacheLayer: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The value under `key`, if any.
    async fn get(&self, key: &Key) -> Result<Option<Bytes>>;

    /// The values under `keys`, in order. Missing entries (and, on Redis, entries that are not
    /// strings) are `None`.
    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>>;

    /// Stores `value` under `key` for `ttl`, replacing what was there.
    async fn set(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<()>;

    /// Stores several entries, each with its own TTL.
    async fn set_many(&self, entries: &[Entry]) -> Result<()>;

    /// Removes `key`. True when an entry was removed.
    async fn delete(&self, key: &Key) -> Result<bool>;

    /// Removes `keys`; returns how many entries were removed.
    async fn delete_many(&self, keys: &[Key]) -> Result<u64>;

    /// How long `key` still lives.
    async fn remaining_ttl(&self, key: &Key) -> Result<Remaining>;

    /// Stores `value` only if `key` holds nothing. True when stored.
    async fn set_if_absent(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<bool>;

    /// Adds `delta` to the integer under `key` (absent counts as 0) and sets its TTL to `ttl`;
    /// returns the new value. The value is stored as decimal text, readable by any client.
    async fn increment(&self, key: &Key, delta: i64, ttl: Ttl) -> Result<i64>;

    /// Reads `key`; when it is absent, stores the lease marker of `token` for `lease_ttl` in the
    /// same atomic step. One round trip on Redis.
    ///
    /// `replace` names a value the caller found unusable (it did not decode): if the key still
    /// holds exactly that value, or holds something other than a string on Redis, it counts as
    /// absent and is replaced by the lease.
    async fn get_or_lease(
        &self,
        key: &Key,
        token: u64,
        lease_ttl: Ttl,
        replace: Option<&[u8]>,
    ) -> Result<Leased>;

    /// Stores `value` for `ttl` only if `key` still holds the lease marker of `token`: any
    /// delete, invalidation or write since the lease was granted makes this a refusal (`false`).
    async fn set_leased(&self, key: &Key, token: u64, value: Bytes, ttl: Ttl) -> Result<bool>;

    /// Records `member` in the index of each tag, for at least `ttl` (the member's lifetime).
    /// Members whose lifetime has passed are pruned from an index as it is written, so an index
    /// holds live members only.
    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()>;

    /// Removes the tag's index and every entry it lists; returns how many entries were removed.
    /// Costs the size of the tag, not of the keyspace.
    async fn invalidate_tag(&self, tag: &Tag) -> Result<u64>;

    /// Maintenance: walks the keyspace for keys matching `pattern` (Redis `SCAN MATCH`, in
    /// batches of `batch`) and removes them (`UNLINK`), stopping after `max_removed` removals.
    /// Costs the size of the keyspace: never call it on a request path.
    async fn sweep(&self, pattern: &KeyPattern, batch: usize, max_removed: u64) -> Result<u64>;

    /// Checks a request against every layer at once (one round trip on Redis, one script, on
    /// server time): admitted only if every layer admits, and then counted in each; a denied
    /// request is counted nowhere. Returns each layer's decision, in order.
    async fn rate_limit(&self, checks: &[RateCheck]) -> Result<Vec<Decision>>;

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<()>;

    /// Entries held in process memory (0 for remote backends).
    fn memory_entries(&self) -> u64 {
        0
    }

    /// The in-process rate limiter, for a backend that is one (the memory backend): checks can
    /// then skip the asynchronous call.
    fn memory_limiter(&self) -> Option<&crate::ratelimit::MemoryLimiter> {
        None
    }
}
