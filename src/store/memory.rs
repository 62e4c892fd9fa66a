//! The in-memory backend: moka's future cache with a per-entry expiry policy and a byte budget.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::Expiry;
use moka::future::Cache as MokaCache;
use moka::ops::compute::{CompResult, Op};

use super::{BackendKind, CacheLayer, Entry, Leased, RateCheck, Remaining, is_lease, lease_marker};
use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Key, KeyPattern, Tag};
use crate::ratelimit::{Decision, MemoryLimiter};
use crate::ttl::Ttl;

/// Default byte budget of a [`MemoryLayer`]: 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Bookkeeping bytes counted per entry on top of its key and value, so that a flood of tiny
/// entries cannot exceed the budget by much.
const ENTRY_OVERHEAD: u64 = 96;

#[derive(Clone)]
struct Stored {
    value: Bytes,
    expires_at: Instant,
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
    tags: Arc<TagIndex>,
    limiter: MemoryLimiter,
}

/// Tag → member → until when the member can live. A std mutex: it is never held across an await.
#[derive(Default)]
struct TagIndex {
    members: Mutex<HashMap<String, HashMap<String, Instant>>>,
    adds: AtomicU64,
}

/// Every this many tag additions, tags whose members have all expired are dropped, so that tags
/// never touched again do not accumulate.
const TAG_SWEEP_EVERY: u64 = 1024;

impl TagIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Instant>>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that matters:
        // every operation is a single insert or remove.
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MemoryLayer {
    /// A memory layer holding at most about `max_bytes` bytes.
    pub fn new(max_bytes: u64) -> MemoryLayer {
        MemoryLayer::with_clock(max_bytes, Arc::new(crate::clock::SystemClock))
    }

    /// A memory layer whose rate limiting reads time from `clock` (entry expiry always follows
    /// `std::time::Instant`, as moka does).
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
            tags: Arc::new(TagIndex::default()),
            limiter: MemoryLimiter::with_clock(crate::ratelimit::DEFAULT_MAX_KEYS, clock),
        }
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// The byte budget.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn deadline(ttl: Ttl) -> Instant {
        Instant::now() + ttl.as_duration()
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

    async fn set_if_absent(&self, key: &Key, value: Bytes, ttl: Ttl) -> Result<bool> {
        let expires_at = Self::deadline(ttl);
        let result = self
            .cache
            .entry(key.as_str().to_owned())
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if entry.value().live(Instant::now()) => Op::Nop,
                    _ => Op::Put(Stored { value, expires_at }),
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
        let marker = lease_marker(token);
        let result = self
            .cache
            .entry(key.as_str().to_owned())
            .and_compute_with(|current| {
                let now = Instant::now();
                let op = match current {
                    Some(entry)
                        if entry.value().live(now)
                            && replace != Some(entry.value().value.as_ref()) =>
                    {
                        Op::Nop
                    }
                    _ => Op::Put(Stored {
                        value: marker,
                        expires_at: now + lease_ttl.as_duration(),
                    }),
                };
                std::future::ready(op)
            })
            .await;
        Ok(match result {
            CompResult::Unchanged(entry) => {
                let value = entry.into_value().value;
                if is_lease(&value) {
                    Leased::Denied
                } else {
                    Leased::Value(value)
                }
            }
            CompResult::Inserted(_) | CompResult::ReplacedWith(_) => Leased::Granted,
            _ => Leased::Denied,
        })
    }

    async fn set_leased(&self, key: &Key, token: u64, value: Bytes, ttl: Ttl) -> Result<bool> {
        let marker = lease_marker(token);
        let result = self
            .cache
            .entry(key.as_str().to_owned())
            .and_compute_with(|current| {
                let now = Instant::now();
                let op = match current {
                    Some(entry) if entry.value().live(now) && entry.value().value == marker => {
                        Op::Put(Stored {
                            value,
                            expires_at: now + ttl.as_duration(),
                        })
                    }
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        Ok(matches!(result, CompResult::ReplacedWith(_)))
    }

    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> Result<()> {
        let now = Instant::now();
        let until = now + ttl.as_duration();
        let mut index = self.tags.lock();
        for tag in tags {
            let members = index.entry(tag.as_str().to_owned()).or_default();
            members.retain(|_, live_until| *live_until > now);
            let slot = members.entry(member.as_str().to_owned()).or_insert(until);
            if *slot < until {
                *slot = until;
            }
        }
        if self.tags.adds.fetch_add(1, Ordering::Relaxed) % TAG_SWEEP_EVERY == TAG_SWEEP_EVERY - 1 {
            index.retain(|_, members| {
                members.retain(|_, live_until| *live_until > now);
                !members.is_empty()
            });
        }
        Ok(())
    }

    async fn invalidate_tag(&self, tag: &Tag) -> Result<u64> {
        let members = self.tags.lock().remove(tag.as_str()).unwrap_or_default();
        let mut removed = 0;
        for (member, _) in members {
            if self.remove_key(&member).await {
                removed += 1;
            }
        }
        Ok(removed)
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

    async fn rate_limit(&self, checks: &[RateCheck]) -> Result<Vec<Decision>> {
        Ok(self.limiter.check(checks))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn memory_entries(&self) -> u64 {
        self.cache.entry_count()
    }

    fn memory_limiter(&self) -> Option<&MemoryLimiter> {
        Some(&self.limiter)
    }
}
