//! The in-memory limiter: the memory backend's rate limiting, and the insurance limiter that
//! answers while Redis is unusable. Bounded: at most `max_keys` keys, and a key is dropped once
//! its state no longer matters (its window has passed since it was last used).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use super::limit::{Decision, Limit};
use super::state::{State, evaluate, idle_ttl};
use crate::clock::{Clock, SystemClock};

/// Default bound on the number of keys an in-memory limiter tracks.
pub const DEFAULT_MAX_KEYS: u64 = 100_000;

struct Slot {
    state: Mutex<State>,
    idle: Duration,
}

struct IdleExpiry;

impl Expiry<String, Arc<Slot>> for IdleExpiry {
    fn expire_after_create(&self, _: &String, slot: &Arc<Slot>, _: Instant) -> Option<Duration> {
        Some(slot.idle)
    }

    fn expire_after_read(
        &self,
        _: &String,
        slot: &Arc<Slot>,
        _: Instant,
        _: Option<Duration>,
        _: Instant,
    ) -> Option<Duration> {
        Some(slot.idle)
    }
}

/// One layer of a check: the key and the limit that applies to it.
#[derive(Debug, Clone)]
pub struct Layer<'a> {
    /// The counter's key (its text).
    pub key: &'a str,
    /// The quota.
    pub limit: &'a Limit,
}

/// A process-local rate limiter with the same algorithms as the Redis scripts.
#[derive(Clone)]
pub struct MemoryLimiter {
    slots: Cache<String, Arc<Slot>>,
    clock: Arc<dyn Clock>,
}

impl MemoryLimiter {
    /// A limiter tracking at most `max_keys` keys, on the system clock.
    pub fn new(max_keys: u64) -> MemoryLimiter {
        MemoryLimiter::with_clock(max_keys, Arc::new(SystemClock))
    }

    /// A limiter reading time from `clock` (a [`FakeClock`](crate::clock::FakeClock) in tests).
    pub fn with_clock(max_keys: u64, clock: Arc<dyn Clock>) -> MemoryLimiter {
        MemoryLimiter {
            slots: Cache::builder()
                .max_capacity(max_keys)
                .expire_after(IdleExpiry)
                .build(),
            clock,
        }
    }

    fn slot(&self, key: &str, limit: &Limit) -> Arc<Slot> {
        self.slots.get_with_by_ref(key, || {
            Arc::new(Slot {
                state: Mutex::new(State::Empty),
                idle: idle_ttl(limit),
            })
        })
    }

    /// Checks every layer at once: admitted only if every layer admits, and then counted in
    /// every layer; a denied request is counted nowhere.
    pub fn check(&self, layers: &[Layer<'_>]) -> Vec<Decision> {
        let now = self.clock.now().as_nanos().min(u128::from(u64::MAX)) as u64;
        let slots: Vec<Arc<Slot>> = layers.iter().map(|l| self.slot(l.key, l.limit)).collect();
        // Lock in key order so that two checks over the same keys cannot deadlock.
        let mut order: Vec<usize> = (0..layers.len()).collect();
        order.sort_by(|a, b| layers[*a].key.cmp(layers[*b].key));
        order.dedup_by(|a, b| layers[*a].key == layers[*b].key);
        let mut guards: Vec<Option<std::sync::MutexGuard<'_, State>>> =
            (0..layers.len()).map(|_| None).collect();
        for &i in &order {
            // A poisoned state is still a valid state (every update is one assignment).
            guards[i] = Some(slots[i].state.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let mut decisions = Vec::with_capacity(layers.len());
        let mut next_states = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let state = match &guards[i] {
                Some(g) => (**g).clone(),
                // The same key twice in one check: it was locked under its first position.
                None => State::Empty,
            };
            let (decision, next) = evaluate(layer.limit, &state, now);
            decisions.push(decision);
            next_states.push(next);
        }
        if decisions.iter().all(|d| d.allowed) {
            for (i, next) in next_states.into_iter().enumerate() {
                if let (Some(guard), Some(next)) = (guards[i].as_mut(), next) {
                    **guard = next;
                }
            }
        }
        decisions
    }

    /// Keys tracked now (approximate: moka counts lazily).
    pub fn keys(&self) -> u64 {
        self.slots.entry_count()
    }
}

impl fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("keys", &self.slots.entry_count())
            .finish()
    }
}
