//! The in-memory limiter: the memory backend's rate limiting, and the insurance limiter that
//! answers while Redis is unusable. Bounded: at most about `max_keys` keys.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::limit::{Decision, Limit};
use super::state::{State, evaluate, idle_ttl};
use crate::clock::{Clock, SystemClock};

fn nanos(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// Default bound on the number of keys an in-memory limiter tracks.
pub const DEFAULT_MAX_KEYS: u64 = 100_000;

/// Shards of the key table: a check locks one shard (one per layer), so checks of different
/// keys rarely contend.
const SHARDS: usize = 32;

struct Slot {
    state: State,
    /// Clock time (ns) after which the state no longer matters.
    idle_until: u64,
}

type Shard = HashMap<String, Slot>;

/// One layer of a check: the key and the limit that applies to it.
#[derive(Debug, Clone)]
pub struct Layer<'a> {
    /// The counter's key (its text).
    pub key: &'a str,
    /// The quota.
    pub limit: &'a Limit,
}

/// Anything that names a counter and its limit: a [`Layer`], or a store's
/// [`RateCheck`](super::RateCheck).
pub trait AsLayer {
    /// The counter's key.
    fn layer_key(&self) -> &str;
    /// The quota.
    fn layer_limit(&self) -> &Limit;
}

impl AsLayer for Layer<'_> {
    fn layer_key(&self) -> &str {
        self.key
    }
    fn layer_limit(&self) -> &Limit {
        self.limit
    }
}

impl AsLayer for super::RateCheck {
    fn layer_key(&self) -> &str {
        self.key.as_str()
    }
    fn layer_limit(&self) -> &Limit {
        &self.limit
    }
}

struct Inner {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    clock: Arc<dyn Clock>,
    evicted: AtomicU64,
}

/// A process-local rate limiter with the same algorithms as the Redis scripts.
///
/// Memory is bounded: at most about `max_keys` keys. A key whose state no longer matters (its
/// window has passed since it was last used) is dropped when its shard fills up; if a shard is
/// still full of live keys, the key idle the longest goes, which can only make a limit more
/// lenient for that key, never stricter.
#[derive(Clone)]
pub struct MemoryLimiter {
    inner: Arc<Inner>,
}

impl MemoryLimiter {
    /// A limiter tracking at most `max_keys` keys, on the system clock.
    pub fn new(max_keys: u64) -> MemoryLimiter {
        MemoryLimiter::with_clock(max_keys, Arc::new(SystemClock))
    }

    /// A limiter reading time from `clock` (a [`FakeClock`](crate::clock::FakeClock) in tests).
    pub fn with_clock(max_keys: u64, clock: Arc<dyn Clock>) -> MemoryLimiter {
        let per_shard = (max_keys as usize).div_ceil(SHARDS).max(1);
        MemoryLimiter {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                per_shard,
                clock,
                evicted: AtomicU64::new(0),
            }),
        }
    }

    fn shard_of(key: &str) -> usize {
        // A word-at-a-time multiplicative hash: cheap, and the shard only spreads load (the maps
        // themselves use SipHash, which client-chosen keys cannot flood).
        let mut hash: u64 = key.len() as u64;
        let mut chunks = key.as_bytes().chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            hash = (hash.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        hash = (hash.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(0x517c_c1b7_2722_0a95);
        ((hash >> 32) % SHARDS as u64) as usize
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A poisoned shard still holds valid states: every update is one assignment.
        self.inner.shards[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for one more key in a full shard.
    fn make_room(&self, shard: &mut Shard, now: u64) {
        if shard.len() < self.inner.per_shard {
            return;
        }
        let before = shard.len();
        shard.retain(|_, slot| slot.idle_until > now);
        if shard.len() >= self.inner.per_shard
            && let Some(oldest) = shard
                .iter()
                .min_by_key(|(_, slot)| slot.idle_until)
                .map(|(k, _)| k.clone())
        {
            shard.remove(&oldest);
        }
        self.inner
            .evicted
            .fetch_add((before - shard.len()) as u64, Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.inner.clock.now().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    /// Checks every layer at once: admitted only if every layer admits, and then counted in
    /// every layer; a denied request is counted nowhere.
    pub fn check<L: AsLayer>(&self, layers: &[L]) -> Vec<Decision> {
        let mut decisions = Vec::with_capacity(layers.len());
        self.check_each(layers, |_, d| decisions.push(d));
        decisions
    }

    /// [`MemoryLimiter::check`], handing each layer's decision, in order, to `each`.
    pub fn check_each<L: AsLayer>(&self, layers: &[L], mut each: impl FnMut(usize, Decision)) {
        let now = self.now();
        if let [layer] = layers {
            // One layer: decide and commit under one lock.
            let (key, limit) = (layer.layer_key(), layer.layer_limit());
            let mut shard = self.lock(Self::shard_of(key));
            let decision = match shard.get_mut(key) {
                Some(slot) => Self::decide(slot, limit, now),
                None => {
                    self.make_room(&mut shard, now);
                    let mut slot = Slot {
                        state: State::Empty,
                        idle_until: 0,
                    };
                    let decision = Self::decide(&mut slot, limit, now);
                    shard.insert(key.to_owned(), slot);
                    decision
                }
            };
            each(0, decision);
            return;
        }
        // Several layers: lock their shards in order (so that checks cannot deadlock), decide
        // all, commit all or none.
        let mut shard_ids: Vec<usize> = layers
            .iter()
            .map(|l| Self::shard_of(l.layer_key()))
            .collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            shard_ids.iter().map(|&i| (i, self.lock(i))).collect();
        let mut decisions = Vec::with_capacity(layers.len());
        let mut next_states = Vec::with_capacity(layers.len());
        let empty = State::default();
        for layer in layers {
            let shard_id = Self::shard_of(layer.layer_key());
            let shard = guards
                .iter()
                .find(|(i, _)| *i == shard_id)
                .map(|(_, g)| &**g);
            let state = shard
                .and_then(|s| s.get(layer.layer_key()))
                .map_or(&empty, |slot| &slot.state);
            let (decision, next) = evaluate(layer.layer_limit(), state, now);
            decisions.push(decision);
            next_states.push(next);
        }
        if decisions.iter().all(|d| d.allowed) {
            for (layer, next) in layers.iter().zip(next_states) {
                let Some(next) = next else { continue };
                let key = layer.layer_key();
                let shard_id = Self::shard_of(key);
                if let Some((_, guard)) = guards.iter_mut().find(|(i, _)| *i == shard_id) {
                    let idle_until = now.saturating_add(nanos(idle_ttl(layer.layer_limit())));
                    if let Some(slot) = guard.get_mut(key) {
                        slot.state = next;
                        slot.idle_until = idle_until;
                    } else {
                        self.make_room(guard, now);
                        guard.insert(
                            key.to_owned(),
                            Slot {
                                state: next,
                                idle_until,
                            },
                        );
                    }
                }
            }
        }
        for (i, decision) in decisions.into_iter().enumerate() {
            each(i, decision);
        }
    }

    fn decide(slot: &mut Slot, limit: &Limit, now: u64) -> Decision {
        let (decision, next) = evaluate(limit, &slot.state, now);
        if let Some(next) = next {
            slot.state = next;
            slot.idle_until = now.saturating_add(nanos(idle_ttl(limit)));
        }
        decision
    }

    /// Keys tracked now (including keys whose state no longer matters and that have not been
    /// dropped yet).
    pub fn keys(&self) -> u64 {
        (0..SHARDS).map(|i| self.lock(i).len() as u64).sum()
    }

    /// Keys dropped to keep within the bound.
    pub fn evicted(&self) -> u64 {
        self.inner.evicted.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("keys", &self.keys())
            .field("max_keys", &(self.inner.per_shard * SHARDS))
            .finish()
    }
}
