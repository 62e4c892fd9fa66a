//! The circuit breaker of the resilience wrapper.
//!
//! Closed: calls go to the backend; consecutive failures are counted. After `threshold` of them
//! the breaker opens: calls skip the backend without waiting. After `cool_down` one call (the
//! probe) is let through; its failure opens the breaker for another cool-down. Its success
//! closes the breaker, or, with a recovery hold, moves it to recovering: calls still skip the
//! backend until the hold has passed, and then one more probe closes it. The state is one atomic
//! word, so that the closed path costs one load and every transition is a single
//! compare-and-swap.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go to the backend.
    Closed,
    /// Calls skip the backend until the cool-down has passed.
    Open,
    /// One probe call is testing the backend.
    HalfOpen,
    /// The backend answers again after an outage, and calls still skip it until the recovery
    /// hold has passed (see [`Config::recovery_hold`](crate::config::Config::recovery_hold)):
    /// meanwhile the other instances apply the invalidations they queued.
    Recovering,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Recovering => "recovering",
        })
    }
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const RECOVERING: u64 = 3;
const STATE_BITS: u64 = 2;
const STATE_MASK: u64 = 0b11;

/// What the breaker allows for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Closed: call the backend.
    Call,
    /// The one probe of a half-open breaker; carries the breaker word it installed, so that only
    /// this probe's outcome can move the breaker on. See [`Breaker::closes`].
    Probe(u64),
    /// Open: do not call the backend.
    Skip,
}

/// A change the caller should act on (log it, clear the fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    Opened,
    Closed,
    /// A probe succeeded and the recovery hold began.
    Recovering,
}

/// The whole state is one atomic word, changed only by compare-and-swap, so that no two
/// transitions can interleave: `payload << 2 | state`, where the payload of an open or recovering
/// breaker is the clock time (ms) after which a probe may go, and that of a half-open one is a
/// probe number shifted left once, with the low bit set when the probe's success closes the
/// breaker (no hold, or the hold has passed).
pub(crate) struct Breaker {
    threshold: u32,
    cool_down_ms: u64,
    hold_ms: u64,
    clock: Arc<dyn Clock>,
    failures: AtomicU32,
    word: AtomicU64,
    probes: AtomicU64,
}

fn state_of(word: u64) -> u64 {
    word & STATE_MASK
}

fn open_until(ms: u64) -> u64 {
    (ms.min(u64::MAX >> STATE_BITS) << STATE_BITS) | OPEN
}

fn recovering_until(ms: u64) -> u64 {
    (ms.min(u64::MAX >> STATE_BITS) << STATE_BITS) | RECOVERING
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX >> STATE_BITS)) as u64
}

impl Breaker {
    pub(crate) fn new(
        threshold: u32,
        cool_down: Duration,
        hold: Duration,
        clock: Arc<dyn Clock>,
    ) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cool_down_ms: millis(cool_down),
            hold_ms: millis(hold),
            clock,
            failures: AtomicU32::new(0),
            word: AtomicU64::new(CLOSED),
            probes: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock
            .now()
            .as_millis()
            .min(u128::from(u64::MAX >> STATE_BITS)) as u64
    }

    fn reopen_word(&self) -> u64 {
        open_until(self.now_ms().saturating_add(self.cool_down_ms))
    }

    pub(crate) fn cool_down(&self) -> Duration {
        Duration::from_millis(self.cool_down_ms)
    }

    pub(crate) fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms)
    }

    pub(crate) fn state(&self) -> BreakerState {
        match state_of(self.word.load(Ordering::Acquire)) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Recovering,
        }
    }

    /// What the breaker allows for a removal (a delete, a tag invalidation, a lease release),
    /// decided from one reading of the state. Closed: call. With a recovery hold, recovering or
    /// probing: call too (a removal is always safe to send, the hold is there for removals to
    /// land, and one sent to a backend that is still down fails like any call). Open: skip,
    /// without becoming the probe: the caller queues the removal, and the background replay
    /// probes.
    pub(crate) fn admit_removal(&self) -> Admit {
        let word = self.word.load(Ordering::Acquire);
        match state_of(word) {
            CLOSED => Admit::Call,
            RECOVERING | HALF_OPEN if self.hold_ms > 0 => Admit::Call,
            _ => Admit::Skip,
        }
    }

    /// True when `admit` is a probe whose success closes the breaker; false for a probe whose
    /// success begins the recovery hold (the caller then only checks that the backend answers,
    /// and does not use it for the call).
    pub(crate) fn closes(&self, admit: Admit) -> bool {
        match admit {
            Admit::Probe(word) => self.hold_ms == 0 || (word >> STATE_BITS) & 1 == 1,
            _ => true,
        }
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub(crate) fn admit(&self) -> Admit {
        self.admit_with(false)
    }

    /// A probe now, without waiting for the cool-down, for work that already found the backend
    /// answering (the background replay of queued invalidations). A closed breaker answers
    /// `Call`; a probing one `Skip`.
    pub(crate) fn probe_now(&self) -> Admit {
        self.admit_with(true)
    }

    /// Closed: call. Open past its cool-down (or at once, with `now`): this call becomes the one
    /// probe, if it wins the compare-and-swap. Recovering past its hold: the probe that closes
    /// (with `now` before that: a probe that begins the hold again). Otherwise: skip.
    fn admit_with(&self, now: bool) -> Admit {
        let word = self.word.load(Ordering::Acquire);
        let due = || self.now_ms() >= word >> STATE_BITS;
        match state_of(word) {
            CLOSED => Admit::Call,
            OPEN if now || due() => self.start_probe(word, self.hold_ms == 0),
            RECOVERING if due() => self.start_probe(word, true),
            RECOVERING if now => self.start_probe(word, false),
            _ => Admit::Skip,
        }
    }

    fn start_probe(&self, word: u64, closes: bool) -> Admit {
        let probe = self.probes.fetch_add(1, Ordering::Relaxed) & (u64::MAX >> (STATE_BITS + 1));
        let half_open = (((probe << 1) | u64::from(closes)) << STATE_BITS) | HALF_OPEN;
        match self
            .word
            .compare_exchange(word, half_open, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Admit::Probe(half_open),
            Err(_) => Admit::Skip,
        }
    }

    pub(crate) fn on_success(&self, admit: Admit) -> Transition {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if let Admit::Probe(word) = admit {
            let closes = self.closes(admit);
            let next = if closes {
                CLOSED
            } else {
                recovering_until(self.now_ms().saturating_add(self.hold_ms))
            };
            if self
                .word
                .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return if closes {
                    Transition::Closed
                } else {
                    Transition::Recovering
                };
            }
        }
        Transition::None
    }

    pub(crate) fn on_failure(&self, admit: Admit) -> Transition {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        match admit {
            Admit::Probe(word) => {
                let _ = self.word.compare_exchange(
                    word,
                    self.reopen_word(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                Transition::None
            }
            // Only the call that moves a closed breaker to open sets the cool-down: late
            // failures of calls admitted earlier do not push the probe back.
            _ if failures >= self.threshold => match self.word.compare_exchange(
                CLOSED,
                self.reopen_word(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => Transition::Opened,
                Err(_) => Transition::None,
            },
            _ => Transition::None,
        }
    }

    /// A failure of a call that lost its connection (Redis restarted, the network failed): with
    /// a recovery hold, a call admitted while closed opens the breaker at once, whatever the
    /// count, since what other instances wrote meanwhile is unknown. Otherwise as
    /// [`on_failure`](Breaker::on_failure).
    pub(crate) fn on_connection_lost(&self, admit: Admit) -> Transition {
        match self.on_failure(admit) {
            Transition::None if admit == Admit::Call && self.hold_ms > 0 && self.trip() => {
                Transition::Opened
            }
            transition => transition,
        }
    }

    /// A probe that neither succeeded nor failed (its caller was cancelled, or it made progress
    /// on work that must finish before the breaker closes): the next call probes at once.
    pub(crate) fn on_abandoned(&self, admit: Admit) {
        if let Admit::Probe(word) = admit {
            // A closing probe leaves the hold passed; an opening one leaves the breaker open.
            let next = if self.hold_ms > 0 && self.closes(admit) {
                recovering_until(self.now_ms())
            } else {
                open_until(self.now_ms())
            };
            let _ = self
                .word
                .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Opens the breaker now, whatever its state (work the backend must see first is waiting);
    /// an open breaker keeps its cool-down. True when this call opened it.
    pub(crate) fn trip(&self) -> bool {
        loop {
            let word = self.word.load(Ordering::Acquire);
            if state_of(word) == OPEN {
                return false;
            }
            if self
                .word
                .compare_exchange(
                    word,
                    self.reopen_word(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                return true;
            }
        }
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("failures", &self.consecutive_failures())
            .field("threshold", &self.threshold)
            .field("cool_down_ms", &self.cool_down_ms)
            .field("hold_ms", &self.hold_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    fn breaker(clock: &FakeClock) -> Breaker {
        Breaker::new(
            3,
            Duration::from_secs(1),
            Duration::ZERO,
            Arc::new(clock.clone()),
        )
    }

    /// [`breaker`] with a recovery hold of 500 ms.
    fn held(clock: &FakeClock) -> Breaker {
        Breaker::new(
            3,
            Duration::from_secs(1),
            Duration::from_millis(500),
            Arc::new(clock.clone()),
        )
    }

    /// Three failures: open (the breakers here have a threshold of 3).
    fn open(b: &Breaker) {
        for _ in 0..3 {
            b.on_failure(Admit::Call);
        }
    }

    /// Opens `b`, waits out its 1 s cool-down and asks again: the probe.
    fn probe_after_cool_down(clock: &FakeClock, b: &Breaker) -> Admit {
        open(b);
        clock.advance(Duration::from_secs(1));
        b.admit()
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
        let probe = b.admit();
        assert!(matches!(probe, Admit::Probe(_)));
        // Only one probe at a time.
        assert_eq!(b.admit(), Admit::Skip);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.on_success(probe), Transition::Closed);
        // A stale probe outcome changes nothing.
        assert_eq!(b.on_success(probe), Transition::None);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Admit::Call);
    }

    #[test]
    fn probe_now_skips_the_cool_down() {
        let clock = FakeClock::new();
        let b = breaker(&clock);
        assert_eq!(b.probe_now(), Admit::Call);
        open(&b);
        let probe = b.probe_now();
        assert!(matches!(probe, Admit::Probe(_)));
        assert_eq!(b.probe_now(), Admit::Skip);
        assert_eq!(b.admit(), Admit::Skip);
        assert_eq!(b.on_success(probe), Transition::Closed);
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
        let probe = probe_after_cool_down(&clock, &b);
        assert!(matches!(probe, Admit::Probe(_)));
        b.on_failure(probe);
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_millis(500));
        assert_eq!(b.admit(), Admit::Skip);
        clock.advance(Duration::from_millis(500));
        assert!(matches!(b.admit(), Admit::Probe(_)));
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let clock = FakeClock::new();
        let b = breaker(&clock);
        let probe = probe_after_cool_down(&clock, &b);
        b.on_abandoned(probe);
        assert!(matches!(b.admit(), Admit::Probe(_)));
    }

    #[test]
    fn late_failures_do_not_push_the_probe_back() {
        let clock = FakeClock::new();
        let b = breaker(&clock);
        open(&b);
        clock.advance(Duration::from_millis(900));
        // Calls admitted before the breaker opened fail late.
        b.on_failure(Admit::Call);
        b.on_failure(Admit::Call);
        clock.advance(Duration::from_millis(100));
        assert!(matches!(b.admit(), Admit::Probe(_)));
    }

    #[test]
    fn trip_opens_and_a_running_probe_cannot_close_it() {
        let clock = FakeClock::new();
        let b = breaker(&clock);
        let probe = probe_after_cool_down(&clock, &b);
        assert!(b.trip());
        assert_eq!(b.on_success(probe), Transition::None);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.trip());
    }

    #[test]
    fn concurrent_callers_never_see_two_probes_or_a_lost_close() {
        // Many threads hammer one breaker through open, probe and close cycles; at any moment at
        // most one probe may be out, and every cycle must end closed or open, never stuck
        // half-open.
        use std::sync::atomic::AtomicUsize;
        let clock = FakeClock::new();
        let b = Arc::new(Breaker::new(
            3,
            Duration::from_millis(1),
            Duration::from_millis(2),
            Arc::new(clock.clone()),
        ));
        let probes_out = Arc::new(AtomicUsize::new(0));
        let max_out = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (b, clock, probes_out, max_out) = (
                    b.clone(),
                    clock.clone(),
                    probes_out.clone(),
                    max_out.clone(),
                );
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let admit = b.admit();
                        let probing = matches!(admit, Admit::Probe(_));
                        if probing {
                            let now = probes_out.fetch_add(1, Ordering::SeqCst) + 1;
                            max_out.fetch_max(now, Ordering::SeqCst);
                            std::thread::yield_now();
                            // Leaves before its outcome is applied: after that a new probe
                            // may legitimately start.
                            probes_out.fetch_sub(1, Ordering::SeqCst);
                        }
                        if admit != Admit::Skip {
                            if (i + t) % 3 != 0 {
                                b.on_failure(admit);
                            } else {
                                b.on_success(admit);
                            }
                        }
                        if i % 64 == 0 {
                            clock.advance(Duration::from_millis(1));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(max_out.load(Ordering::SeqCst), 1);
        // Settle: with time moving and successes, the breaker must be able to close.
        for _ in 0..10 {
            clock.advance(Duration::from_millis(5));
            let admit = b.admit();
            if admit != Admit::Skip {
                b.on_success(admit);
            }
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn with_a_hold_the_first_probe_only_begins_it_and_a_later_one_closes() {
        let clock = FakeClock::new();
        let b = held(&clock);
        let probe = probe_after_cool_down(&clock, &b);
        assert!(matches!(probe, Admit::Probe(_)));
        assert!(!b.closes(probe), "the first probe only checks the backend");
        assert_eq!(b.on_success(probe), Transition::Recovering);
        assert_eq!(b.state(), BreakerState::Recovering);
        clock.advance(Duration::from_millis(499));
        assert_eq!(
            b.admit(),
            Admit::Skip,
            "calls skip the backend during the hold"
        );
        // Work that found the backend answering (queued invalidations) begins the hold again.
        let replay = b.probe_now();
        assert!(matches!(replay, Admit::Probe(_)) && !b.closes(replay));
        assert_eq!(b.on_success(replay), Transition::Recovering);
        clock.advance(Duration::from_millis(499));
        assert_eq!(b.admit(), Admit::Skip);
        clock.advance(Duration::from_millis(1));
        let closing = b.admit();
        assert!(b.closes(closing));
        assert_eq!(b.on_success(closing), Transition::Closed);
        assert_eq!(b.admit(), Admit::Call);
    }

    #[test]
    fn a_failure_during_the_hold_reopens_for_a_cool_down() {
        let clock = FakeClock::new();
        let b = held(&clock);
        assert!(b.trip());
        clock.advance(Duration::from_secs(1));
        let probe = b.admit();
        assert_eq!(b.on_success(probe), Transition::Recovering);
        assert!(
            b.trip(),
            "a lost connection during the hold opens the breaker"
        );
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_millis(600));
        assert_eq!(b.admit(), Admit::Skip);
        clock.advance(Duration::from_millis(400));
        let probe = b.admit();
        assert!(!b.closes(probe));
        b.on_failure(probe);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn removals_skip_an_open_breaker_and_go_through_a_recovering_or_probing_one() {
        let clock = FakeClock::new();
        let b = held(&clock);
        assert_eq!(b.admit_removal(), Admit::Call);
        assert!(b.trip());
        clock.advance(Duration::from_secs(2));
        assert_eq!(b.admit_removal(), Admit::Skip, "never the probe");
        assert_eq!(b.state(), BreakerState::Open);
        let probe = b.admit();
        assert_eq!(b.admit_removal(), Admit::Call, "the opening probe is out");
        assert_eq!(b.on_success(probe), Transition::Recovering);
        assert_eq!(b.admit_removal(), Admit::Call);
        // A removal admitted as a call changes nothing when it succeeds.
        assert_eq!(b.on_success(Admit::Call), Transition::None);
        assert_eq!(b.state(), BreakerState::Recovering);
    }

    #[test]
    fn a_lost_connection_opens_a_held_breaker_at_once() {
        let clock = FakeClock::new();
        let b = held(&clock);
        assert_eq!(b.on_connection_lost(Admit::Call), Transition::Opened);
        assert_eq!(b.state(), BreakerState::Open);
        let plain = breaker(&clock);
        assert_eq!(plain.on_connection_lost(Admit::Call), Transition::None);
        assert_eq!(
            plain.state(),
            BreakerState::Closed,
            "without a hold, one failure of three"
        );
    }
}
