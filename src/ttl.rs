//! Time-to-live values and jitter.
//!
//! Every write in speedlayer takes a [`Ttl`]; there is no write without one. A `Ttl` is at least
//! one millisecond (Redis `PX` resolution) and at most [`Ttl::MAX`], 30 days: the speed layer
//! stores convenience, and anything meant to outlive a month belongs in the database.
//!
//! A [`TtlPolicy`] adds jitter, so that entries written together (after a deploy, a cold start, a
//! bulk invalidation) do not all expire in the same second. Jitter only ever *shortens* a TTL:
//! the declared TTL stays an upper bound on how long an entry lives.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

/// Why a TTL or jitter could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TtlError {
    /// The duration rounds to zero milliseconds.
    #[error("a TTL must be at least 1 ms")]
    Zero,
    /// The duration is longer than [`Ttl::MAX`].
    #[error(
        "a TTL of {requested:?} is longer than the maximum of 30 days; data that must live \
         longer belongs in the database"
    )]
    TooLong {
        /// The requested duration.
        requested: Duration,
    },
    /// A jitter fraction outside `(0, 1)`, or not a number.
    #[error("a jitter fraction must be a number greater than 0 and less than 1")]
    InvalidFraction,
    /// A jitter that could shorten the TTL to nothing: it must be shorter than the TTL.
    #[error(
        "a jitter of up to {jitter:?} is as wide as the TTL of {ttl:?} it shortens; use \
         TtlPolicy::between(shortest, longest) to spread TTLs over a range"
    )]
    JitterTooWide {
        /// The jitter.
        jitter: Duration,
        /// The TTL.
        ttl: Duration,
    },
    /// A range whose shortest TTL is longer than its longest.
    #[error("a TTL range must go from the shorter to the longer TTL, not {min:?} to {max:?}")]
    InvertedRange {
        /// The shortest TTL given.
        min: Duration,
        /// The longest TTL given.
        max: Duration,
    },
}

/// How long an entry lives: 1 ms to 30 days.
///
/// ```
/// use std::time::Duration;
/// use speedlayer::ttl::Ttl;
///
/// const DASHBOARD: Ttl = Ttl::seconds(300);
/// assert_eq!(DASHBOARD.as_duration(), Duration::from_secs(300));
/// assert!(Ttl::new(Duration::ZERO).is_err());
/// assert!(Ttl::from_secs(31 * 24 * 3600).is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ttl {
    millis: u64,
}

const MAX_MILLIS: u64 = 30 * 24 * 3600 * 1000;

impl Ttl {
    /// The longest TTL: 30 days.
    pub const MAX: Ttl = Ttl { millis: MAX_MILLIS };
    /// The shortest TTL: 1 ms.
    pub const MIN: Ttl = Ttl { millis: 1 };

    /// A TTL of `duration`, rounded up to whole milliseconds.
    pub fn new(duration: Duration) -> Result<Ttl, TtlError> {
        if duration > Ttl::MAX.as_duration() {
            return Err(TtlError::TooLong {
                requested: duration,
            });
        }
        let mut millis = duration.as_millis() as u64;
        if !duration.subsec_nanos().is_multiple_of(1_000_000) {
            millis += 1;
        }
        if millis == 0 {
            return Err(TtlError::Zero);
        }
        Ok(Ttl { millis })
    }

    /// A TTL of `secs` seconds.
    pub fn from_secs(secs: u64) -> Result<Ttl, TtlError> {
        Ttl::new(Duration::from_secs(secs))
    }

    /// A TTL of `millis` milliseconds.
    pub fn from_millis(millis: u64) -> Result<Ttl, TtlError> {
        Ttl::new(Duration::from_millis(millis))
    }

    /// A TTL of `mins` minutes.
    pub fn from_mins(mins: u64) -> Result<Ttl, TtlError> {
        Ttl::new(Duration::from_secs(mins.saturating_mul(60)))
    }

    /// A TTL of `hours` hours.
    pub fn from_hours(hours: u64) -> Result<Ttl, TtlError> {
        Ttl::new(Duration::from_secs(hours.saturating_mul(3600)))
    }

    /// A TTL of `secs` seconds, for constants.
    ///
    /// # Panics
    ///
    /// If `secs` is 0 or more than 30 days. In a `const` this is a compile-time error; use
    /// [`Ttl::from_secs`] for values that are not literals.
    pub const fn seconds(secs: u64) -> Ttl {
        assert!(
            secs > 0 && secs <= MAX_MILLIS / 1000,
            "a TTL must be between 1 s and 30 days"
        );
        Ttl {
            millis: secs * 1000,
        }
    }

    /// A TTL of `mins` minutes, for constants. Panics like [`Ttl::seconds`].
    pub const fn minutes(mins: u64) -> Ttl {
        assert!(
            mins > 0 && mins <= MAX_MILLIS / 60_000,
            "a TTL must be between 1 min and 30 days"
        );
        Ttl {
            millis: mins * 60_000,
        }
    }

    /// A TTL of `hours` hours, for constants. Panics like [`Ttl::seconds`].
    pub const fn hours(hours: u64) -> Ttl {
        assert!(
            hours > 0 && hours <= MAX_MILLIS / 3_600_000,
            "a TTL must be between 1 h and 30 days"
        );
        Ttl {
            millis: hours * 3_600_000,
        }
    }

    /// The TTL as a duration.
    pub const fn as_duration(self) -> Duration {
        Duration::from_millis(self.millis)
    }

    /// The TTL in milliseconds (always at least 1).
    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    /// The smaller of `self` and `other`.
    pub fn min(self, other: Ttl) -> Ttl {
        if self.millis <= other.millis {
            self
        } else {
            other
        }
    }
}

impl fmt::Debug for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ttl({:?})", self.as_duration())
    }
}

impl TryFrom<Duration> for Ttl {
    type Error = TtlError;
    fn try_from(value: Duration) -> Result<Self, Self::Error> {
        Ttl::new(value)
    }
}

/// How much a [`TtlPolicy`] may shorten its TTL.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter(JitterKind);

#[derive(Clone, Copy, Debug, PartialEq)]
enum JitterKind {
    None,
    Fraction(f64),
    UpTo(Duration),
}

impl Jitter {
    /// No jitter: every write uses the TTL as declared.
    pub const NONE: Jitter = Jitter(JitterKind::None);

    /// Shorten by a random amount up to `fraction` of the TTL; `fraction` in `(0, 1)`.
    /// `Jitter::fraction(0.1)` turns 300 s into 270 to 300 s.
    pub fn fraction(fraction: f64) -> Result<Jitter, TtlError> {
        if fraction.is_nan() || fraction <= 0.0 || fraction >= 1.0 {
            return Err(TtlError::InvalidFraction);
        }
        Ok(Jitter(JitterKind::Fraction(fraction)))
    }

    /// Shorten by a random amount up to `max`, which must be shorter than the TTL it is used
    /// with ([`TtlPolicy::with_jitter`] says so).
    pub fn up_to(max: Duration) -> Jitter {
        if max.is_zero() {
            Jitter::NONE
        } else {
            Jitter(JitterKind::UpTo(max))
        }
    }

    fn spread_millis(&self, ttl: Ttl) -> u64 {
        let spread = match self.0 {
            JitterKind::None => 0,
            JitterKind::Fraction(f) => (ttl.millis as f64 * f) as u64,
            JitterKind::UpTo(d) => d.as_millis().min(u128::from(u64::MAX)) as u64,
        };
        // Validated by `with_jitter`; kept as a guard so a TTL is never shortened to zero.
        spread.min(ttl.millis - 1)
    }

    /// Checks that this jitter leaves at least 1 ms of `ttl`.
    fn check(&self, ttl: Ttl) -> Result<(), TtlError> {
        match self.0 {
            JitterKind::UpTo(d) if d >= ttl.as_duration() => Err(TtlError::JitterTooWide {
                jitter: d,
                ttl: ttl.as_duration(),
            }),
            _ => Ok(()),
        }
    }
}

/// A TTL with optional jitter: what [`get_or_set`](crate::Cache::get_or_set) takes.
///
/// A plain [`Ttl`] converts into a policy without jitter, and so does a `&TtlPolicy`: build a
/// policy once and pass `&policy` to every call (cloning one is an `Arc` increment).
///
/// ```
/// use std::time::Duration;
/// use speedlayer::ttl::{Jitter, Ttl, TtlPolicy};
///
/// let policy = TtlPolicy::new(Ttl::seconds(300)).with_jitter(Jitter::fraction(0.1)?)?;
/// let ttl = policy.pick();
/// assert!(ttl.as_duration() >= Duration::from_secs(270));
/// assert!(ttl.as_duration() <= Duration::from_secs(300));
///
/// // Deterministic: the same seed gives the same TTLs.
/// let a = policy.clone().seeded(7);
/// let b = policy.seeded(7);
/// assert_eq!((a.pick(), a.pick()), (b.pick(), b.pick()));
/// # Ok::<(), speedlayer::ttl::TtlError>(())
/// ```
#[derive(Clone)]
pub struct TtlPolicy {
    ttl: Ttl,
    jitter: Jitter,
    rng: Option<Arc<Mutex<SmallRng>>>,
}

impl TtlPolicy {
    /// A policy writing `ttl` without jitter.
    pub fn new(ttl: Ttl) -> TtlPolicy {
        TtlPolicy {
            ttl,
            jitter: Jitter::NONE,
            rng: None,
        }
    }

    /// A TTL spread uniformly over a range, as teams write them ("roles: 1-6 hours"):
    /// every write picks a TTL from `shortest` to `longest`, both included.
    ///
    /// ```
    /// use speedlayer::ttl::{Ttl, TtlPolicy};
    ///
    /// let roles = TtlPolicy::between(Ttl::hours(1), Ttl::hours(6))?;
    /// let ttl = roles.pick();
    /// assert!(ttl >= Ttl::hours(1) && ttl <= Ttl::hours(6));
    /// assert!(TtlPolicy::between(Ttl::hours(6), Ttl::hours(1)).is_err());
    /// # Ok::<(), speedlayer::ttl::TtlError>(())
    /// ```
    pub fn between(shortest: Ttl, longest: Ttl) -> Result<TtlPolicy, TtlError> {
        if shortest > longest {
            return Err(TtlError::InvertedRange {
                min: shortest.as_duration(),
                max: longest.as_duration(),
            });
        }
        let spread = longest.as_duration() - shortest.as_duration();
        Ok(TtlPolicy::new(longest).with_spread(spread))
    }

    fn with_spread(mut self, spread: Duration) -> TtlPolicy {
        self.jitter = Jitter::up_to(spread);
        self
    }

    /// Sets the jitter. Fails when the jitter is as wide as the TTL (it could shorten it to
    /// nothing); a range of TTLs is [`TtlPolicy::between`].
    pub fn with_jitter(mut self, jitter: Jitter) -> Result<TtlPolicy, TtlError> {
        jitter.check(self.ttl)?;
        self.jitter = jitter;
        Ok(self)
    }

    /// The shortest TTL this policy can pick.
    pub fn shortest(&self) -> Ttl {
        Ttl {
            millis: self.ttl.millis - self.jitter.spread_millis(self.ttl),
        }
    }

    /// Makes the jitter a reproducible sequence from `seed` (for tests). Clones of the returned
    /// policy share one sequence.
    #[must_use]
    pub fn seeded(mut self, seed: u64) -> TtlPolicy {
        self.rng = Some(Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))));
        self
    }

    /// The declared (longest) TTL.
    pub fn ttl(&self) -> Ttl {
        self.ttl
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The TTL for one write: the declared TTL minus a random part of the jitter.
    pub fn pick(&self) -> Ttl {
        let spread = self.jitter.spread_millis(self.ttl);
        if spread == 0 {
            return self.ttl;
        }
        let cut = match &self.rng {
            Some(rng) => {
                // A poisoned lock only means another thread panicked mid-draw; the RNG state is
                // still a valid RNG state.
                let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
                rng.random_range(0..=spread)
            }
            None => rand::rng().random_range(0..=spread),
        };
        Ttl {
            millis: self.ttl.millis - cut,
        }
    }
}

impl fmt::Debug for TtlPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TtlPolicy")
            .field("ttl", &self.ttl)
            .field("jitter", &self.jitter)
            .field("seeded", &self.rng.is_some())
            .finish()
    }
}

impl From<Ttl> for TtlPolicy {
    fn from(ttl: Ttl) -> Self {
        TtlPolicy::new(ttl)
    }
}

impl From<&TtlPolicy> for TtlPolicy {
    fn from(policy: &TtlPolicy) -> Self {
        policy.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert_eq!(Ttl::new(Duration::ZERO), Err(TtlError::Zero));
        assert_eq!(Ttl::new(Duration::from_nanos(1)).unwrap().as_millis(), 1);
        assert_eq!(
            Ttl::new(Duration::from_micros(1500)).unwrap().as_millis(),
            2
        );
        assert_eq!(
            Ttl::new(Duration::from_secs(30 * 86_400)).unwrap(),
            Ttl::MAX
        );
        assert!(Ttl::new(Duration::from_secs(30 * 86_400) + Duration::from_millis(1)).is_err());
        assert!(Ttl::new(Duration::MAX).is_err());
        assert!(Ttl::from_hours(u64::MAX).is_err());
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let ttl = Ttl::seconds(300);
        for jitter in [
            Jitter::fraction(0.1).unwrap(),
            Jitter::fraction(0.99).unwrap(),
            Jitter::up_to(Duration::from_secs(10)),
            Jitter::up_to(Duration::from_secs(299)),
        ] {
            let policy = TtlPolicy::new(ttl).with_jitter(jitter).unwrap().seeded(1);
            for _ in 0..1_000 {
                let t = policy.pick();
                assert!(t <= ttl && t.as_millis() >= 1, "{jitter:?} gave {t:?}");
            }
        }
        let p = TtlPolicy::new(ttl)
            .with_jitter(Jitter::fraction(0.1).unwrap())
            .unwrap();
        let picks: std::collections::HashSet<_> = (0..100).map(|_| p.pick()).collect();
        assert!(picks.len() > 1, "jitter must spread TTLs");
        assert!(picks.iter().all(|t| t.as_millis() >= 270_000));
    }

    #[test]
    fn fractions_are_validated() {
        for bad in [0.0, -0.1, 1.0, 1.1, f64::NAN, f64::INFINITY] {
            assert!(Jitter::fraction(bad).is_err());
        }
    }

    #[test]
    fn a_jitter_as_wide_as_its_ttl_is_an_error() {
        let hour = Ttl::hours(1);
        let err = TtlPolicy::new(hour)
            .with_jitter(Jitter::up_to(Duration::from_secs(5 * 3600)))
            .unwrap_err();
        assert!(matches!(err, TtlError::JitterTooWide { .. }));
        assert!(err.to_string().contains("TtlPolicy::between"), "{err}");
        assert!(
            TtlPolicy::new(hour)
                .with_jitter(Jitter::up_to(Duration::from_secs(3600)))
                .is_err()
        );
        assert!(
            TtlPolicy::new(hour)
                .with_jitter(Jitter::up_to(Duration::from_secs(3599)))
                .is_ok()
        );
    }

    #[test]
    fn a_range_covers_both_ends_and_nothing_else() {
        let roles = TtlPolicy::between(Ttl::hours(1), Ttl::hours(6))
            .unwrap()
            .seeded(3);
        assert_eq!(roles.shortest(), Ttl::hours(1));
        assert_eq!(roles.ttl(), Ttl::hours(6));
        let picks: Vec<Ttl> = (0..10_000).map(|_| roles.pick()).collect();
        assert!(
            picks
                .iter()
                .all(|t| *t >= Ttl::hours(1) && *t <= Ttl::hours(6))
        );
        // Spread over the whole range, not clustered at one end.
        let below_2h = picks.iter().filter(|t| **t < Ttl::hours(2)).count();
        let above_5h = picks.iter().filter(|t| **t > Ttl::hours(5)).count();
        assert!(
            below_2h > 1_500 && above_5h > 1_500,
            "{below_2h} {above_5h}"
        );
        let fixed = TtlPolicy::between(Ttl::seconds(30), Ttl::seconds(30)).unwrap();
        assert_eq!(fixed.pick(), Ttl::seconds(30));
        assert!(matches!(
            TtlPolicy::between(Ttl::hours(2), Ttl::hours(1)),
            Err(TtlError::InvertedRange { .. })
        ));
    }

    #[test]
    fn a_policy_is_reused_by_reference() {
        fn takes(policy: impl Into<TtlPolicy>) -> Ttl {
            policy.into().pick()
        }
        let policy = TtlPolicy::between(Ttl::seconds(60), Ttl::seconds(120)).unwrap();
        for _ in 0..3 {
            let ttl = takes(&policy);
            assert!(ttl >= Ttl::seconds(60));
        }
    }
}
