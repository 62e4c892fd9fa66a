//! Rollout switches: one per capability, set from the environment at start and flipped at run
//! time, each with a documented off-state.
//!
//! A team rolling speedlayer out (or rolling a Redis migration through) turns a capability off
//! without a deploy, and back on. Every capability built on one store shares its switches
//! ([`Cache::switches`](crate::Cache::switches)); a flip takes effect on the next call, and no
//! call fails because of it.
//!
//! | capability | off-state |
//! | --- | --- |
//! | [`Cache`](Capability::Cache) | every read goes to the loader (`get` misses, `get_or_set` and `get_or_set_many` call the loader and store nothing); `set` and `set_many` delete instead of writing, and deletes and invalidations still run, so no older value is left for instances where the cache is on, or for when it is back on |
//! | [`RateLimit`](Capability::RateLimit) | every request is admitted ([`ServedBy::SwitchedOff`](crate::ratelimit::ServedBy::SwitchedOff)) |
//! | [`Sessions`](Capability::Sessions) | every lookup asks the loader (the database); revocations still run |
//! | [`Revocations`](Capability::Revocations) | `check` answers `Unknown` and `allows` accepts every token (the blacklist is not consulted); revocations are still recorded, so they apply again once it is back on |
//! | [`Locks`](Capability::Locks) | acquisitions answer `Unavailable` (a lock never fails open) |
//! | [`Idempotency`](Capability::Idempotency) | `begin` answers `Unavailable`: each route's outage rule decides |
//! | [`Counters`](Capability::Counters) | reads ask the loader (the database); updates count nothing |
//! | [`Scratch`](Capability::Scratch) | marks, reads, flushes, presence and draft saves are refused (`ErrorKind::Unavailable`; a draft loads as `None`): write to the database directly |
//!
//! From the environment: `SPEEDLAYER_OFF=cache,ratelimit` (names as in the table, lower case,
//! comma-separated) turns those off at start; an unknown name is a configuration error.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, ErrorKind, Result};

/// A capability with a rollout switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// The typed cache.
    Cache,
    /// Rate limiting.
    RateLimit,
    /// The session index.
    Sessions,
    /// The token blacklist.
    Revocations,
    /// Locks.
    Locks,
    /// Idempotency keys.
    Idempotency,
    /// Live counters.
    Counters,
    /// Scratch hashes, drafts and presence.
    Scratch,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 8] = [
        Capability::Cache,
        Capability::RateLimit,
        Capability::Sessions,
        Capability::Revocations,
        Capability::Locks,
        Capability::Idempotency,
        Capability::Counters,
        Capability::Scratch,
    ];

    /// Its name in `SPEEDLAYER_OFF`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Cache => "cache",
            Capability::RateLimit => "ratelimit",
            Capability::Sessions => "sessions",
            Capability::Revocations => "revocations",
            Capability::Locks => "locks",
            Capability::Idempotency => "idempotency",
            Capability::Counters => "counters",
            Capability::Scratch => "scratch",
        }
    }

    /// The capability named `name` (as in `SPEEDLAYER_OFF`).
    pub fn parse(name: &str) -> Result<Capability> {
        let name = name.trim();
        Capability::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "unknown capability {:?} in SPEEDLAYER_OFF; known: {}",
                        name.chars().take(32).collect::<String>(),
                        known.join(", ")
                    ),
                )
            })
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The switches of one store: every capability is on unless switched off.
#[derive(Debug, Default)]
pub struct Switches {
    off: AtomicU32,
}

impl Switches {
    /// Every capability on, except `off`.
    pub fn with_off(off: &[Capability]) -> Switches {
        let switches = Switches::default();
        for c in off {
            switches.off.fetch_or(c.bit(), Ordering::Relaxed);
        }
        switches
    }

    /// True when `capability` is on.
    pub fn is_on(&self, capability: Capability) -> bool {
        self.off.load(Ordering::Relaxed) & capability.bit() == 0
    }

    /// Turns `capability` on or off (takes effect on the next call); logged when it changes.
    pub fn set(&self, capability: Capability, on: bool) {
        let before = if on {
            self.off.fetch_and(!capability.bit(), Ordering::Relaxed)
        } else {
            self.off.fetch_or(capability.bit(), Ordering::Relaxed)
        };
        let was_on = before & capability.bit() == 0;
        if was_on != on {
            tracing::info!(capability = %capability, on, "speedlayer capability switched");
        }
    }

    /// The capabilities switched off.
    pub fn off(&self) -> Vec<Capability> {
        Capability::ALL
            .into_iter()
            .filter(|c| !self.is_on(*c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_flip_and_parse() {
        let s = Switches::with_off(&[Capability::Cache]);
        assert!(!s.is_on(Capability::Cache));
        assert!(s.is_on(Capability::Locks));
        s.set(Capability::Cache, true);
        s.set(Capability::Scratch, false);
        assert_eq!(s.off(), vec![Capability::Scratch]);
        for c in Capability::ALL {
            assert_eq!(Capability::parse(c.name()).unwrap(), c);
        }
        assert!(Capability::parse("kache").is_err());
    }
}
