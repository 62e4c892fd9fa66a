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
use crate::key::Key;
use crate::ttl::Ttl;

mod breaker;
pub mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod resilient;

pub use breaker::BreakerState;
pub use memory::MemoryLayer;
pub use resilient::{Source, Store, StoreStats};

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

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<()>;

    /// Entries held in process memory (0 for remote backends).
    fn memory_entries(&self) -> u64 {
        0
    }
}
