//! The in-memory backend: moka's future cache with a per-entry expiry policy and a byte budget,
//! a bounded tag index beside it, and the state of capabilities' memory twins.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::Expiry;
use moka::future::Cache as MokaCache;
use moka::ops::compute::{CompResult, Op};

use super::{
    Backend, BackendKind, CacheLayer, Entry, LeaseRequest, Leased, Remaining, TagChunk, TagCursor,
    TagMember,
};
use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Key, KeyPattern, Tag};
use crate::ttl::Ttl;

/// Default byte budget of a [`MemoryLayer`]: 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = crate::config::DEFAULT_MEMORY_MAX_BYTES;

/// Bookkeeping bytes counted per entry on top of its key and value, so that a flood of tiny
/// entries cannot exceed the budget by much.
const ENTRY_OVERHEAD: u64 = 96;

/// A member registered this recently is kept in its tag index even when its entry is not (yet)
/// in the cache: `set_tagged` records the tags just before it writes the value.
const REGISTRATION_GRACE: Duration = Duration::from_millis(100);

/// Smallest size at which a tag is pruned of members whose entries are gone.
const MIN_PRUNE: usize = 32;

/// Smallest total size at which the whole index is pruned.
const MIN_FULL_PRUNE: usize = 1024;

/// A live entry, as [`MemoryLayer::compute`] shows it.
#[derive(Debug, Clone)]
pub struct MemoryEntry {
    /// The bytes (empty while a lease is held).
    pub value: Bytes,
    /// The lease token while a load or recount holds the key; 0 otherwise.
    pub lease: u64,
    /// How long the entry still lives.
    pub ttl_left: Duration,
}

/// What [`MemoryLayer::compute`] does with the entry.
#[derive(Debug, Clone)]
pub enum MemoryUpdate {
    /// Leave it as it is.
    Keep,
    /// Remove it.
    Remove,
    /// Store this (a `lease` of 0 for a value).
    Put {
        /// The bytes.
        value: Bytes,
        /// The lease token, or 0.
        lease: u64,
        /// For how long.
        ttl: Ttl,
    },
}

/// A capability's twin table: state behind a mutex, shared by every user of one memory layer
/// ([`MemoryLayer::twin_table`]).
pub struct TwinTable<T>(Mutex<T>);

impl<T> TwinTable<T> {
    /// Locks the table. A panic while it was locked does not poison it: each capability changes
    /// its table in single assignments, so a panic cannot leave it half-written.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone)]
struct Stored {
    value: Bytes,
    expires_at: Instant,
    /// The lease token while a load is in flight (the value is then empty); 0 otherwise.
    lease: u64,
}

impl Stored {
    fn live(&self, now: Instant) -> bool {
        self.expires_at > now
    }
}

struct PerEntryTtl;

impl Expiry<String, Stored> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, value: &Stored, now: Instant) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &Stored,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }
}

/// Process-memory [`CacheLayer`]: bounded in bytes (keys + values + a fixed overhead per entry),
/// each entry expiring after its own TTL. Clones share the same entries.
///
/// The tag index is bounded with the cache: a tag is pruned of members whose entries expired or
/// were evicted whenever it has doubled since it was last pruned, and the whole index likewise,
/// so it holds at most about twice as many members as the cache holds entries (amortized O(1)
/// per registration). [`clear`](MemoryLayer::clear) empties it with the entries.
///
/// ```
/// use speedlayer::key::{Ident, Namespace};
/// use speedlayer::store::{CacheLayer, MemoryLayer};
/// use speedlayer::ttl::Ttl;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let memory = MemoryLayer::new(8 * 1024 * 1024);
/// let key = Namespace::root().global().key(
///     &Ident::from_static("fees"), &Ident::from_static("summary"), 1)?;
/// memory.set(&key, "{\"due\":0}".into(), Ttl::seconds(60)).await?;
/// assert_eq!(memory.get(&key).await?.as_deref(), Some(&b"{\"due\":0}"[..]));
/// # Ok::<(), speedlayer::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct MemoryLayer {
    cache: MokaCache<String, Stored>,
    max_bytes: u64,
    tags: Arc<Mutex<TagTable>>,
    twins: Arc<Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
    clock: Arc<dyn Clock>,
    /// Held while a batch takes its leases, so that batches never interleave theirs (as the
    /// Redis script makes them atomic).
    batch_leases: Arc<tokio::sync::Mutex<()>>,
}

struct TagMemberState {
    until: Instant,
    stamp: u64,
    registered: Instant,
}

#[derive(Default)]
struct TagSet {
    members: HashMap<String, TagMemberState>,
    /// Size after the last prune.
    pruned_len: usize,
}

#[derive(Default)]
struct TagTable {
    tags: HashMap<String, TagSet>,
    /// Members in all tags.
    members: usize,
    /// `members` after the last full prune.
    pruned_members: usize,
    /// The last stamp given.
    stamp: u64,
}

impl MemoryLayer {
    /// A memory layer holding at most about `max_bytes` bytes.
    pub fn new(max_bytes: u64) -> MemoryLayer {
        MemoryLayer::with_clock(max_bytes, Arc::new(crate::clock::SystemClock))
    }

    /// A memory layer whose capabilities' twins read time from `clock` (entry expiry always
    /// follows `std::time::Instant`, as moka does).
    pub fn with_clock(max_bytes: u64, clock: Arc<dyn Clock>) -> MemoryLayer {
        let cache = MokaCache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, value: &Stored| {
                let weight = key.len() as u64 + value.value.len() as u64 + ENTRY_OVERHEAD;
                weight.min(u64::from(u32::MAX)) as u32
            })
            .expire_after(PerEntryTtl)
            .build();
        MemoryLayer {
            cache,
            max_bytes,
            tags: Arc::new(Mutex::new(TagTable::default())),
            twins: Arc::new(Mutex::new(HashMap::new())),
            clock,
            batch_leases: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Drops every entry, every tag index and every twin's state.
    pub fn clear(&self) {
        self.cache.invalidate_all();
        *self.lock_tags() = TagTable::default();
        self.lock_twins().clear();
    }

    /// The byte budget.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The clock capabilities' twins read.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Members held by all tag indexes (for monitoring and tests of the bound).
    pub fn tag_index_members(&self) -> u64 {
        self.lock_tags().members as u64
    }

    /// The state of a capability's memory twin on this layer, created by `init` on first use.
    /// One value per type: a capability keeps its twin's state here (a rate limiter's counters,
    /// a lock table) so that every user of this layer shares it, as they share one Redis.
    pub fn twin<T: Any + Send + Sync>(&self, init: impl FnOnce(&MemoryLayer) -> T) -> Arc<T> {
        let mut twins = self.lock_twins();
        if let Some(existing) = twins.get(&TypeId::of::<T>())
            && let Ok(twin) = existing.clone().downcast::<T>()
        {
            return twin;
        }
        let twin = Arc::new(init(self));
        twins.insert(TypeId::of::<T>(), twin.clone());
        twin
    }

    /// The [`twin`](MemoryLayer::twin) state of a capability that keeps a table behind a
    /// mutex (created empty on first use).
    pub fn twin_table<T: Default + Send + 'static>(&self) -> Arc<TwinTable<T>> {
        self.twin(|_| TwinTable(Mutex::new(T::default())))
    }

    /// Reads and changes the entry of `key` in one atomic step (moka's per-key compute), for
    /// capabilities whose memory twin keeps its state in entries, as their Redis scripts keep it
    /// in keys: deletes, invalidations and [`clear`](MemoryLayer::clear) then reach it the same
    /// way on both backends. `decide` sees the live entry, if any, and says what to do with it;
    /// its second result is returned.
    pub async fn compute<R>(
        &self,
        key: &Key,
        decide: impl FnOnce(Option<MemoryEntry>) -> (MemoryUpdate, R),
    ) -> Result<R> {
        let mut answer = None;
        self.cache
            .entry(key.as_str().to_owned())
            .and_compute_with(|current| {
                let now = Instant::now();
                let live = current
                    .map(|entry| entry.into_value())
                    .filter(|stored| stored.live(now))
                    .map(|stored| MemoryEntry {
                        value: stored.value,
                        lease: stored.lease,
                        ttl_left: stored.expires_at - now,
                    });
                let (update, result) = decide(live);
                answer = Some(result);
                let op = match update {
                    MemoryUpdate::Keep => Op::Nop,
                    MemoryUpdate::Remove => Op::Remove,
                    MemoryUpdate::Put { value, lease, ttl } => Op::Put(Stored {
                        value,
                        expires_at: now + ttl.as_duration(),
                        lease,
                    }),
                };
                std::future::ready(op)
            })
            .await;
        answer.ok_or_else(|| Error::new(ErrorKind::Backend, "the memory entry was not computed"))
    }

    fn lock_twins(&self) -> std::sync::MutexGuard<'_, HashMap<TypeId, Arc<dyn Any + Send + Sync>>> {
        // Every change is one insert or a clear: a panic cannot leave it half-written.
        self.twins.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_tags(&self) -> std::sync::MutexGuard<'_, TagTable> {
        // A std mutex, never held across an await. A panic while holding it cannot leave a
        // member half-registered in a way that matters: each update is one insert or remove,
        // and the counts are only used to decide when to prune.
        self.tags.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deadline(ttl: Ttl) -> Instant {
        Instant::now() + ttl.as_duration()
    }

    /// A member is kept by a prune while it may still live and its entry is in the cache (or it
    /// was registered a moment ago and its entry is about to be written).
    fn keeps(&self, member: &str, state: &TagMemberState, now: Instant) -> bool {
        state.until > now
            && (now.duration_since(state.registered) < REGISTRATION_GRACE
                || self.cache.contains_key(member))
    }

    fn prune_tag(&self, set: &mut TagSet, now: Instant) -> usize {
        let before = set.members.len();
        set.members.retain(|m, s| self.keeps(m, s, now));
        set.pruned_len = set.members.len();
        before - set.members.len()
    }

    // Every write goes through moka's compute, which serializes operations on one key. A plain
    // `insert` or `remove` does not take that lock, so a lease's compare-and-set could otherwise
    // store a loaded value right after a concurrent delete removed its lease: a stale set.

    async fn put(&self, key: &str, stored: Stored) {
        self.cache
            .entry(key.to_owned())
            .and_compute_with(|_| std::future::ready(Op::Put(stored)))
            .await;
    }

    /// Removes `key`; true when it held a live entry.
    async fn remove_key(&self, key: &str) -> bool {
        let result = self
            .cache
            .entry(key.to_owned())
            .and_compute_with(|_| std::future::ready(Op::Remove))
            .await;
        match result {
            CompResult::Removed(entry) => entry.value().live(Instant::now()),
            _ => false,
        }
    }
}

impl Default for MemoryLayer {
    fn default() -> Self {
        MemoryLayer::new(DEFAULT_MAX_BYTES)
    }
}

impl fmt::Debug for MemoryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLayer")
            .field("max_bytes", &self.max_bytes)
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

fn parse_counter(bytes: &[u8]) -> Result<i64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::WrongType,
                "the value under this key is not an integer",
            )
        })
}

#[async_trait]
impl CacheLayer for MemoryLayer {
    fn kind(&self) -> BackendKind {
        BackendKind::Memory
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        // moka checks the entry's expiry (from the Expiry policy) on every read.
        Ok(self.cache.get(key.as_str()).await.map(|s| s.value))
    }

    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.cache.get(key.as_str()).await.map(|s| s.value));
        }
        Ok(out)
    }

    async fn set(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<()> {
        let stored = Stored {
            value,
            expires_at: Self::deadline(ttl),
            lease: 0,
        };
        self.put(key.as_str(), stored).await;
        Ok(())
    }

    async fn set_many(&self, entries: &[Entry]) -> Result<()> {
        for entry in entries {
            self.set(&entry.key, entry.value.clone(), entry.ttl).await?;
        }
        Ok(())
    }

    async fn delete(&self, key: &Key) -> Result<bool> {
        Ok(self.remove_key(key.as_str()).await)
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<u64> {
        let mut removed = 0;
        for key in keys {
            if self.delete(key).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn remaining_ttl(&self, key: &Key) -> Result<Remaining> {
        let now = Instant::now();
        Ok(match self.cache.get(key.as_str()).await {
            Some(s) if s.live(now) => Remaining::Expires(s.expires_at - now),
            _ => Remaining::Missing,
        })
    }

    async fn get_or_lease_many(
        &self,
        requests: &[LeaseRequest<'_>],
        lease_ttl: Ttl,
    ) -> Result<Vec<Leased>> {
        let _one_batch_at_a_time = self.batch_leases.lock().await;
        super::lease_each(self, requests, lease_ttl).await
    }

    async fn peek(&self, key: &Key) -> Result<Option<Remaining>> {
        let now = Instant::now();
        Ok(match self.cache.get(key.as_str()).await {
            Some(s) if s.live(now) && s.lease == 0 && !s.value.is_empty() => {
                Some(Remaining::Expires(s.expires_at - now))
            }
            _ => None,
        })
    }

    async fn touch(&self, key: &Key, ttl: Ttl) -> Result<bool> {
        self.compute(key, |live| match live {
            // A value: not a lease, and not the empty string a lease leaves.
            Some(entry) if entry.lease == 0 && !entry.value.is_empty() => {
                let value = entry.value;
                (
                    MemoryUpdate::Put {
                        value,
                        lease: 0,
                        ttl,
                    },
                    true,
                )
            }
            _ => (MemoryUpdate::Keep, false),
        })
        .await
    }

    async fn set_if_absent(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<bool> {
        let expires_at = Self::deadline(ttl);
        let result = self
            .cache
            .entry(key.as_str().to_owned())
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if entry.value().live(Instant::now()) => Op::Nop,
                    _ => Op::Put(Stored {
                        value,
                        expires_at,
                        lease: 0,
                    }),
                };
                std::future::ready(op)
            })
            .await;
        Ok(matches!(
            result,
            CompResult::Inserted(_) | CompResult::ReplacedWith(_)
        ))
    }

    async fn increment(&self, key: &Key, delta: i64, ttl: Ttl) -> Result<i64> {
        let result = self
            .cache
            .entry(key.as_str().to_owned())
            .and_try_compute_with(|current| {
                let now = Instant::now();
                let next = match current {
                    Some(entry) if entry.value().live(now) => parse_counter(&entry.value().value)
                        .and_then(|n| {
                            n.checked_add(delta).ok_or_else(|| {
                                Error::new(
                                    ErrorKind::Overflow,
                                    "incrementing this counter would overflow an i64",
                                )
                            })
                        }),
                    _ => Ok(delta),
                };
                std::future::ready(next.map(|n| {
                    Op::Put(Stored {
                        value: Bytes::from(n.to_string()),
                        expires_at: now + ttl.as_duration(),
                        lease: 0,
                    })
                }))
            })
            .await?;
        match result {
            CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) => {
                parse_counter(&entry.value().value)
            }
            // Op::Put always inserts or replaces.
            _ => Err(Error::new(
                ErrorKind::Backend,
                "the memory counter was not updated",
            )),
        }
    }

    async fn get_or_lease(
        &self,
        key: &Key,
        token: u64,
        lease_ttl: Ttl,
        replace: Option<&[u8]>,
    ) -> Result<Leased> {
        let result = self
            .cache
            .entry(key.as_str().to_owned())
            .and_compute_with(|current| {
                let now = Instant::now();
                let op = match current {
                    // A live load, or a value that is not the one the caller could not use.
                    Some(entry)
                        if entry.value().live(now)
                            && (entry.value().lease != 0
                                || (!entry.value().value.is_empty()
                                    && replace != Some(entry.value().value.as_ref()))) =>
                    {
                        Op::Nop
                    }
                    _ => Op::Put(Stored {
                        value: Bytes::new(),
                        expires_at: now + lease_ttl.as_duration(),
                        lease: token,
                    }),
                };
                std::future::ready(op)
            })
            .await;
        Ok(match result {
            CompResult::Unchanged(entry) => {
                let stored = entry.into_value();
                if stored.lease != 0 {
                    Leased::Denied
                } else {
                    Leased::Value(stored.value)
                }
            }
            CompResult::Inserted(_) | CompResult::ReplacedWith(_) => Leased::Granted,
            _ => Leased::Denied,
        })
    }

    async fn set_leased(&self, key: &Key, token: u64, value: Bytes, ttl: Ttl) -> Result<bool> {
        let result = self
            .cache
            .entry(key.as_str().to_owned())
            .and_compute_with(|current| {
                let now = Instant::now();
                let op = match current {
                    Some(entry) if entry.value().live(now) && entry.value().lease == token => {
                        Op::Put(Stored {
                            value,
                            expires_at: now + ttl.as_duration(),
                            lease: 0,
                        })
                    }
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        Ok(matches!(result, CompResult::ReplacedWith(_)))
    }

    async fn release_lease(&self, key: &Key, token: u64) -> Result<bool> {
        let result = self
            .cache
            .entry(key.as_str().to_owned())
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if entry.value().lease == token => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        Ok(matches!(result, CompResult::Removed(_)))
    }

    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()> {
        let now = Instant::now();
        let until = now + ttl.as_duration();
        let mut table = self.lock_tags();
        for tag in tags {
            table.stamp += 1;
            let stamp = table.stamp;
            if !table.tags.contains_key(tag.as_str()) {
                table
                    .tags
                    .insert(tag.as_str().to_owned(), TagSet::default());
            }
            let Some(set) = table.tags.get_mut(tag.as_str()) else {
                continue;
            };
            let mut removed = 0;
            if set.members.len() >= (2 * set.pruned_len).max(MIN_PRUNE) {
                removed = self.prune_tag(set, now);
            }
            let added = match set.members.get_mut(member.as_str()) {
                Some(state) => {
                    state.until = state.until.max(until);
                    state.stamp = stamp;
                    state.registered = now;
                    0
                }
                None => {
                    set.members.insert(
                        member.as_str().to_owned(),
                        TagMemberState {
                            until,
                            stamp,
                            registered: now,
                        },
                    );
                    1
                }
            };
            table.members = (table.members + added).saturating_sub(removed);
        }
        if table.members >= (2 * table.pruned_members).max(MIN_FULL_PRUNE) {
            // Tags never written again keep members whose entries are gone; a full prune when
            // the index has doubled keeps the cost amortized O(1) per registration.
            let mut total = 0;
            let mut tags = std::mem::take(&mut table.tags);
            tags.retain(|_, set| {
                self.prune_tag(set, now);
                total += set.members.len();
                !set.members.is_empty()
            });
            table.tags = tags;
            table.members = total;
            table.pruned_members = total;
        }
        Ok(())
    }

    async fn tag_members(&self, tag: &Tag, cursor: &TagCursor, limit: usize) -> Result<TagChunk> {
        let after: u64 = cursor
            .0
            .as_deref()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let now = Instant::now();
        let table = self.lock_tags();
        let Some(set) = table.tags.get(tag.as_str()) else {
            return Ok(TagChunk::default());
        };
        let mut found: Vec<(u64, &String)> = set
            .members
            .iter()
            .filter(|(_, s)| s.stamp > after && s.until > now)
            .map(|(m, s)| (s.stamp, m))
            .collect();
        found.sort_unstable();
        let more = found.len() > limit;
        found.truncate(limit.max(1));
        let mut chunk = TagChunk::default();
        for (stamp, member) in &found {
            match tag.member_key(member) {
                Some(key) => chunk.members.push(TagMember {
                    key,
                    stamp: stamp.to_string(),
                }),
                None => chunk.foreign += 1,
            }
        }
        if more && let Some((last, _)) = found.last() {
            chunk.next = Some(TagCursor(Some(last.to_string())));
        }
        Ok(chunk)
    }

    async fn tag_forget(&self, tag: &Tag, members: &[TagMember]) -> Result<u64> {
        let mut table = self.lock_tags();
        let mut forgotten = 0;
        let mut empty = false;
        if let Some(set) = table.tags.get_mut(tag.as_str()) {
            for m in members {
                if set
                    .members
                    .get(m.key.as_str())
                    .is_some_and(|s| s.stamp.to_string() == m.stamp)
                {
                    set.members.remove(m.key.as_str());
                    forgotten += 1;
                }
            }
            empty = set.members.is_empty();
        }
        if empty {
            table.tags.remove(tag.as_str());
        }
        table.members -= forgotten as usize;
        Ok(forgotten)
    }

    async fn sweep(&self, pattern: &KeyPattern, _batch: usize, max_removed: u64) -> Result<u64> {
        let victims: Vec<String> = self
            .cache
            .iter()
            .filter(|(k, _)| pattern.matches_str(k))
            .take(max_removed.min(usize::MAX as u64) as usize)
            .map(|(k, _)| (*k).clone())
            .collect();
        let mut removed = 0;
        for key in victims {
            if self.remove_key(&key).await {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn memory_entries(&self) -> u64 {
        self.cache.entry_count()
    }

    fn backend(&self) -> Backend<'_> {
        Backend::Memory(self)
    }
}
