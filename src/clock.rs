//! Time sources.
//!
//! Everything in speedlayer that measures time for a decision (the circuit breaker's cool-down,
//! log throttling, and later rate limits and leases) reads a [`Clock`], so that tests move a
//! [`FakeClock`] instead of sleeping. Time that several servers must agree on comes from Redis
//! (`TIME` inside a script), not from a `Clock`.
//!
//! The memory backend's expiry is the exception: moka reads `std::time::Instant` itself, so a
//! fake clock (or `tokio::time::pause`) does not expire memory entries.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A monotonic time source.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Time elapsed since this clock's origin. Never goes backwards.
    fn now(&self) -> Duration;
}

/// The process's monotonic clock (`std::time::Instant`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        origin().elapsed()
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use speedlayer::clock::{Clock, FakeClock};
///
/// let clock = FakeClock::new();
/// let other = clock.clone();
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(other.now(), Duration::from_secs(2));
/// ```
#[derive(Clone, Debug, Default)]
pub struct FakeClock {
    nanos: Arc<AtomicU64>,
}

impl FakeClock {
    /// A fake clock at time zero.
    pub fn new() -> FakeClock {
        FakeClock::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = by.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.nanos.fetch_add(nanos, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}
