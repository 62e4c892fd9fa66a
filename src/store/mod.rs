//! The storage core: the [`CacheLayer`] trait (bytes with mandatory TTLs, leases, tags), its
//! backends, the resilience wrapper, and the [`Operation`] hook through which capabilities run
//! their own atomic steps.
//!
//! - [`MemoryLayer`]: process memory (moka), bounded in bytes, per-entry TTL.
//! - [`RedisLayer`](redis::RedisLayer) (feature `redis`): one multiplexed, auto-reconnecting
//!   connection by default, or a bb8 pool (feature `bb8`).
//! - [`Store`]: the one place where timeouts, the circuit breaker, fallback, failure logging and
//!   counters live. Capabilities (the typed [`Cache`](crate::Cache), rate limiting, and later
//!   ones) talk to a `Store`, never to a backend directly.
//!
//! Backends know keys, TTLs and bytes; they know nothing of JSON, loaders or policy. A capability
//! that needs an atomic step of its own (a rate-limit check, a lock with a fence) does not add a
//! method here: it implements [`Operation`] in its own module (its Redis script and its memory
//! twin) and hands it to [`Store::run`] with an [`OutageRule`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::key::{Key, KeyPattern, Tag};
use crate::ttl::Ttl;

mod breaker;
mod lease;
pub mod memory;
mod operation;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod resilient;

pub use breaker::BreakerState;
pub(crate) use lease::{BatchLeases, LeaseHold};
pub use memory::{MemoryEntry, MemoryLayer, MemoryUpdate, TwinTable};
pub use operation::{Answered, Backend, Operation, OutageRule};
pub use resilient::{FAILOVER_REPLAY_WINDOW, Invalidated, Source, Store, StoreStats};

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

/// True when `value` is what a key holds while a load for it is in flight: the empty string.
///
/// During a load the key holds `""` (for at most the lease TTL), and the loader's lease token
/// lives beside it, in [`lease_key`]. The empty string is never valid JSON, so the typed cache
/// never stores it as a value, and a reader written as `if (v) return JSON.parse(v)` (the usual
/// Node service) treats it as a miss. Any `DEL` or `SET` of the key, by speedlayer or by another
/// client, breaks the lease: the load then stores nothing.
pub fn is_lease(value: &[u8]) -> bool {
    value.is_empty()
}

/// The key that holds the lease token of a load of `key`, in the same Redis Cluster hash slot:
/// `{<key>}:~lease`, or `<key>:~lease` when `key` already carries a hash tag. No key built by
/// [`key`](crate::key) contains `~`, so it never names an entry.
pub fn lease_key(key: &Key) -> String {
    sibling_key(key, "lease")
}

/// A key beside `key` for a capability's own state (a lease, a lock's fence, a counter's update
/// marks), in the same Redis Cluster hash slot: `{<key>}:~<suffix>`, or `<key>:~<suffix>` when
/// `key` already carries a hash tag. No key built by [`key`](crate::key) contains `~`, so it
/// never names an entry.
pub fn sibling_key(key: &Key, suffix: &str) -> String {
    let text = key.as_str();
    let mut out = String::with_capacity(text.len() + suffix.len() + 4);
    if text.contains('{') {
        out.push_str(text);
    } else {
        out.push('{');
        out.push_str(text);
        out.push('}');
    }
    out.push_str(":~");
    out.push_str(suffix);
    out
}

/// How long a tag index entry lives so that it outlives the value it points at: registered for
/// the value's longest TTL plus the longest the write can take, the value's TTL is then cut to
/// what is left of the index.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexWindow {
    /// The TTL the index entry is registered with.
    pub(crate) ttl: Ttl,
    deadline: tokio::time::Instant,
}

impl IndexWindow {
    /// An index entry registered now for `longest` plus `slack`.
    pub(crate) fn starting_now(longest: Ttl, slack: Duration) -> IndexWindow {
        let ttl = Ttl::new(longest.as_duration() + slack).unwrap_or(Ttl::MAX);
        IndexWindow {
            ttl,
            deadline: tokio::time::Instant::now() + ttl.as_duration(),
        }
    }

    /// `ttl` cut to what is left of the index; `None` once the index has expired (a value
    /// written then could not be reached through its tags).
    pub(crate) fn cut(&self, ttl: Ttl) -> Option<Ttl> {
        Ttl::new(
            self.deadline
                .saturating_duration_since(tokio::time::Instant::now()),
        )
        .ok()
        .map(|left| ttl.min(left))
    }
}

/// [`CacheLayer::get_or_lease`] for each request, in order.
pub(crate) async fn lease_each<L: CacheLayer + ?Sized>(
    layer: &L,
    requests: &[LeaseRequest<'_>],
    lease_ttl: Ttl,
) -> Result<Vec<Leased>> {
    let mut out = Vec::with_capacity(requests.len());
    for r in requests {
        out.push(
            layer
                .get_or_lease(r.key, r.token, lease_ttl, r.replace)
                .await?,
        );
    }
    Ok(out)
}

/// A fresh lease or update token: random and never 0 (the memory layer's "no lease").
pub(crate) fn new_token() -> u64 {
    rand::random::<u64>() | 1
}

/// Runs `task` in the background on the current runtime; false when there is none (the process
/// is shutting down), and then the task does not run.
pub(crate) fn spawn_detached(task: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(task);
            true
        }
        Err(_) => false,
    }
}

/// One key of [`CacheLayer::get_or_lease_many`]: the key, the caller's lease token for it, and
/// the value the caller could not use (see [`CacheLayer::get_or_lease`]).
#[derive(Clone, Copy, Debug)]
pub struct LeaseRequest<'a> {
    /// The key to read or lease.
    pub key: &'a Key,
    /// The token the lease is taken with.
    pub token: u64,
    /// A value found earlier that did not decode, replaced if the key still holds it.
    pub replace: Option<&'a [u8]>,
}

/// One entry of [`CacheLayer::set_leased_many`]: stored only if `key` still holds the lease of
/// `token`.
#[derive(Clone, Debug)]
pub struct LeasedEntry {
    /// Where.
    pub key: Key,
    /// The lease token the key must still hold.
    pub token: u64,
    /// What (opaque bytes).
    pub value: Bytes,
    /// For how long.
    pub ttl: Ttl,
}

/// What [`CacheLayer::get_or_lease`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leased {
    /// A value: no load needed.
    Value(Bytes),
    /// The key was empty; it now holds this caller's lease. A later
    /// [`set_leased`](CacheLayer::set_leased) with the same token stores the loaded value unless
    /// the key was invalidated (or written) in between.
    Granted,
    /// Another load holds the key's lease (or no lease can be taken): load, but do not cache.
    Denied,
}

/// One member of a tag index, as [`CacheLayer::tag_members`] reads it: the member's key and the
/// stamp of its latest registration. A member registered again changes its stamp, so that
/// [`CacheLayer::tag_forget`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagMember {
    /// The member.
    pub key: Key,
    /// The registration's stamp (opaque; on Redis the member's score).
    pub stamp: String,
}

/// Where a chunked walk of a tag index goes on from (see [`CacheLayer::tag_members`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagCursor(pub(crate) Option<String>);

impl TagCursor {
    /// The start of the index.
    pub fn start() -> TagCursor {
        TagCursor(None)
    }
}

/// A chunk of a tag index: some members, and where the next chunk starts (`None` at the end).
#[derive(Clone, Debug, Default)]
pub struct TagChunk {
    /// Members to remove.
    pub members: Vec<TagMember>,
    /// The cursor of the next chunk; `None` when this was the last.
    pub next: Option<TagCursor>,
    /// Index entries that are not keys of the tag's scope (written by another client); they were
    /// dropped from the index and nothing was removed for them.
    pub foreign: u64,
}

/// What one pass over a tag's index did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TagPass {
    /// Entries removed.
    pub(crate) removed: u64,
    /// Members the index listed, removed or not: an entry listed but already removed (by a
    /// concurrent invalidation of the same tag) may still have been read, meanwhile, by the
    /// load of an entry built from it.
    pub(crate) listed: u64,
}

/// One pass over `tag` on `layer`: its members are removed, then dropped from the index, a
/// chunk at a time.
pub(crate) async fn clear_tag<L: CacheLayer + ?Sized>(layer: &L, tag: &Tag) -> Result<TagPass> {
    let mut pass = TagPass::default();
    let mut cursor = TagCursor::start();
    loop {
        let chunk = layer.tag_members(tag, &cursor, TAG_CHUNK).await?;
        if !chunk.members.is_empty() {
            pass.listed += chunk.members.len() as u64;
            let keys: Vec<Key> = chunk.members.iter().map(|m| m.key.clone()).collect();
            pass.removed += layer.delete_many(&keys).await?;
            layer.tag_forget(tag, &chunk.members).await?;
        }
        match chunk.next {
            Some(next) => cursor = next,
            None => return Ok(pass),
        }
    }
}

/// Members read per chunk when a tag is invalidated.
pub const TAG_CHUNK: usize = 500;

/// The most passes [`Store::invalidate`] makes over an event's keys and tags: enough for
/// entries built from cached entries that are themselves built from cached entries.
pub const INVALIDATION_PASSES: usize = 3;

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

    /// Reads `key`; when it is absent, takes the lease of `token` on it for `lease_ttl` in the
    /// same atomic step (see [`is_lease`]). One round trip on Redis.
    ///
    /// `replace` names a value the caller found unusable (it did not decode): if the key still
    /// holds exactly that value, or holds something other than a string on Redis, it counts as
    /// absent and is replaced by the lease. A lease without a live token beside it (left by
    /// another client, or without a TTL) counts as absent too.
    async fn get_or_lease(
        &self,
        key: &Key,
        token: u64,
        lease_ttl: Ttl,
        replace: Option<&[u8]>,
    ) -> Result<Leased>;

    /// Stores `value` for `ttl` only if `key` still holds the lease of `token`: any delete,
    /// invalidation or write since the lease was granted makes this a refusal (`false`).
    async fn set_leased(&self, key: &Key, token: u64, value: Bytes, ttl: Ttl) -> Result<bool>;

    /// Gives up the lease of `token` on `key` if it still holds it (a load that failed or was
    /// cancelled), so that the next reader loads at once instead of waiting out the lease TTL.
    /// True when the lease was released.
    async fn release_lease(&self, key: &Key, token: u64) -> Result<bool>;

    /// [`get_or_lease`](CacheLayer::get_or_lease) for several keys, in order, each under its own
    /// lease. On Redis one script, atomic for the whole batch (two batches never interleave their
    /// leases); the default calls `get_or_lease` per key.
    async fn get_or_lease_many(
        &self,
        requests: &[LeaseRequest<'_>],
        lease_ttl: Ttl,
    ) -> Result<Vec<Leased>> {
        lease_each(self, requests, lease_ttl).await
    }

    /// [`set_leased`](CacheLayer::set_leased) for several entries, in order: for each, whether it
    /// was stored. One round trip on Redis; the default calls `set_leased` per entry.
    async fn set_leased_many(&self, entries: &[LeasedEntry]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            out.push(
                self.set_leased(&e.key, e.token, e.value.clone(), e.ttl)
                    .await?,
            );
        }
        Ok(out)
    }

    /// [`release_lease`](CacheLayer::release_lease) for several `(key, token)` pairs; returns how
    /// many were released. One round trip on Redis; the default calls `release_lease` per pair.
    async fn release_leases(&self, leases: &[(Key, u64)]) -> Result<u64> {
        let mut released = 0;
        for (key, token) in leases {
            released += u64::from(self.release_lease(key, *token).await?);
        }
        Ok(released)
    }

    /// [`tag_add`](CacheLayer::tag_add) for several members, each with its own tags, all for
    /// `ttl`. One round trip on Redis; the default calls `tag_add` per member.
    async fn tag_add_many(&self, members: &[(Key, Vec<Tag>)], ttl: Ttl) -> Result<()> {
        for (member, tags) in members {
            self.tag_add(tags, member, ttl).await?;
        }
        Ok(())
    }

    /// How long the value under `key` still lives, or `None` when there is no value to read: the
    /// key is absent, holds a lease (a load in flight), or (on Redis) holds another type than a
    /// string. Reads no value.
    async fn peek(&self, key: &Key) -> Result<Option<Remaining>>;

    /// Sets the TTL of the value under `key` to `ttl`, counted from now, if there is a value (as
    /// [`peek`](CacheLayer::peek) sees it): a lease or another client's key of another type is
    /// left alone. True when the TTL was set.
    async fn touch(&self, key: &Key, ttl: Ttl) -> Result<bool>;

    /// Records `member` in the index of each tag, for at least `ttl` (the member's lifetime).
    /// Members whose lifetime has passed are pruned from an index as it is written, so an index
    /// holds live members only. Every registration changes the member's stamp.
    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()>;

    /// Reads up to `limit` members of the tag's index, from `cursor`. Cheap: bounded by `limit`.
    async fn tag_members(&self, tag: &Tag, cursor: &TagCursor, limit: usize) -> Result<TagChunk>;

    /// Drops `members` from the tag's index, each only if its stamp is still the one read: a
    /// member registered again since (a new load) stays. Returns how many were dropped.
    async fn tag_forget(&self, tag: &Tag, members: &[TagMember]) -> Result<u64>;

    /// Removes every entry the tag's index lists, and the index; returns how many entries were
    /// removed. Costs the size of the tag, not of the keyspace, in chunks of [`TAG_CHUNK`]: each
    /// chunk's members are removed before they leave the index, so an invalidation cut short can
    /// be run again and goes on where it stopped.
    async fn invalidate_tag(&self, tag: &Tag) -> Result<u64> {
        clear_tag(self, tag).await.map(|pass| pass.removed)
    }

    /// Maintenance: walks the keyspace for keys matching `pattern` (Redis `SCAN MATCH`, in
    /// batches of `batch`) and removes them (`UNLINK`), stopping after `max_removed` removals.
    /// Costs the size of the keyspace: never call it on a request path.
    async fn sweep(&self, pattern: &KeyPattern, batch: usize, max_removed: u64) -> Result<u64>;

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<()>;

    /// Entries held in process memory (0 for remote backends).
    fn memory_entries(&self) -> u64 {
        0
    }

    /// The concrete backend, for capabilities' [`Operation`]s. Layers other than speedlayer's own
    /// answer [`Backend::Other`] and cannot run operations.
    fn backend(&self) -> Backend<'_> {
        Backend::Other
    }

    /// The [`Store`] gave up waiting on a call to this layer: a connection that no longer
    /// answers (a peer that vanished without closing it) should be replaced. The default does
    /// nothing.
    fn call_timed_out(&self) {}

    /// True for a backend whose primary can be replaced by a replica (Redis Cluster, Sentinel):
    /// the [`Store`] then applies recent invalidations again after an outage, since writes the
    /// old primary had not replicated are gone.
    fn fails_over(&self) -> bool {
        false
    }

    /// How many times this layer found its primary replaced while the old one still answered
    /// (with Sentinel: the sentinels name another primary); always 0 by default. The [`Store`]
    /// applies again the invalidations made shortly before each change (the old primary may
    /// have taken them after the switch, and drops them when it is made a replica), and does
    /// not trust a call that overlapped one. The count is raised before any call can reach the
    /// new primary.
    fn primary_changes(&self) -> u64 {
        0
    }

    /// For the last change [`primary_changes`](CacheLayer::primary_changes) counts: since when
    /// calls may have reached the old primary after it stopped being the primary (when it was
    /// last known to be the primary); `None` when not known (everything recent is suspect).
    fn primary_changed_since(&self) -> Option<std::time::Instant> {
        None
    }
}
