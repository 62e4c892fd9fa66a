//! The circuit breaker of the resilience wrapper.
//!
//! Closed: calls go to the backend; consecutive failures are counted. After `threshold` of them
//! the breaker opens: calls skip the backend without waiting. After `cool_down` one call (the
//! probe) is let through; its success closes the breaker, its failure opens it for another
//! cool-down. The state is a few atomics so that the closed path costs one load.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go to the backend.
    Closed,
    /// Calls skip the backend until the cool-down has passed.
    Open,
    /// One probe call is testing the backend.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        })
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// What the breaker allows for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Closed: call the backend.
    Call,
    /// The one probe of a half-open breaker.
    Probe,
    /// Open: do not call the backend.
    Skip,
}

/// A change the caller should act on (log it, clear the fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    Opened,
    Closed,
}

pub(crate) struct Breaker {
    threshold: u32,
    cool_down: Duration,
    clock: Arc<dyn Clock>,
    failures: AtomicU32,
    state: AtomicU8,
    /// Clock time (ns) after which an open breaker lets a probe through.
    probe_after: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cool_down: Duration, clock: Arc<dyn Clock>) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cool_down,
            clock,
            failures: AtomicU32::new(0),
            state: AtomicU8::new(CLOSED),
            probe_after: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_nanos(&self) -> u64 {
        self.clock.now().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub(crate) fn admit(&self) -> Admit {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Admit::Call;
        }
        if self.now_nanos() >= self.probe_after.load(Ordering::Acquire)
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.state.store(HALF_OPEN, Ordering::Release);
            return Admit::Probe;
        }
        Admit::Skip
    }

    pub(crate) fn on_success(&self, admit: Admit) -> Transition {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if admit == Admit::Probe {
            self.state.store(CLOSED, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return Transition::Closed;
        }
        Transition::None
    }

    pub(crate) fn on_failure(&self, admit: Admit) -> Transition {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if admit == Admit::Probe {
            self.reopen();
            self.probing.store(false, Ordering::Release);
            return Transition::None;
        }
        if failures >= self.threshold {
            self.probe_after.store(
                self.now_nanos()
                    .saturating_add(self.cool_down.as_nanos() as u64),
                Ordering::Release,
            );
            if self
                .state
                .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Transition::Opened;
            }
        }
        Transition::None
    }

    /// A probe that neither succeeded nor failed (its caller was cancelled): let the next call
    /// probe instead.
    pub(crate) fn on_abandoned(&self, admit: Admit) {
        if admit == Admit::Probe {
            self.state.store(OPEN, Ordering::Release);
            self.probing.store(false, Ordering::Release);
        }
    }

    fn reopen(&self) {
        self.probe_after.store(
            self.now_nanos()
                .saturating_add(self.cool_down.as_nanos() as u64),
            Ordering::Release,
        );
        self.state.store(OPEN, Ordering::Release);
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("failures", &self.consecutive_failures())
            .field("threshold", &self.threshold)
            .field("cool_down", &self.cool_down)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    fn breaker(clock: &FakeClock) -> Breaker {
        Breaker::new(3, Duration::from_secs(1), Arc::new(clock.clone()))
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cool_down() {
        let clock = FakeClock::new();
        let b = breaker(&clock);
        assert_eq!(b.on_failure(Admit::Call), Transition::None);
        assert_eq!(b.on_failure(Admit::Call), Transition::None);
        assert_eq!(b.on_failure(Admit::Call), Transition::Opened);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(), Admit::Skip);
        clock.advance(Duration::from_millis(999));
        assert_eq!(b.admit(), Admit::Skip);
        clock.advance(Duration::from_millis(1));
        assert_eq!(b.admit(), Admit::Probe);
        // Only one probe at a time.
        assert_eq!(b.admit(), Admit::Skip);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.on_success(Admit::Probe), Transition::Closed);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Admit::Call);
    }

    #[test]
    fn a_success_resets_the_count() {
        let clock = FakeClock::new();
        let b = breaker(&clock);
        b.on_failure(Admit::Call);
        b.on_failure(Admit::Call);
        b.on_success(Admit::Call);
        b.on_failure(Admit::Call);
        b.on_failure(Admit::Call);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_cool_down() {
        let clock = FakeClock::new();
        let b = breaker(&clock);
        for _ in 0..3 {
            b.on_failure(Admit::Call);
        }
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.admit(), Admit::Probe);
        b.on_failure(Admit::Probe);
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_millis(500));
        assert_eq!(b.admit(), Admit::Skip);
        clock.advance(Duration::from_millis(500));
        assert_eq!(b.admit(), Admit::Probe);
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let clock = FakeClock::new();
        let b = breaker(&clock);
        for _ in 0..3 {
            b.on_failure(Admit::Call);
        }
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.admit(), Admit::Probe);
        b.on_abandoned(Admit::Probe);
        assert_eq!(b.admit(), Admit::Probe);
    }
}
