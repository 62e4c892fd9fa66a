//! Quotas and decisions.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

/// Which algorithm a [`Limit`] counts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// Counts per aligned window (`floor(now / window)`). Cheap; admits up to twice the limit
    /// around a window boundary.
    FixedWindow,
    /// Keeps the time of every admitted request: exact, never more than `limit` in any window of
    /// length `window`. Memory grows with the limit (bounded to [`MAX_LOG_LIMIT`]).
    SlidingLog,
    /// Weighs the previous fixed window by how much of it still overlaps the sliding window.
    /// Approximate: never more than `limit` in a fixed window nor `2 × limit` in any window of
    /// length `window`; exact when traffic is spread evenly.
    SlidingWindow,
    /// Generic cell rate algorithm (a token bucket): one request per `window / limit`, with
    /// bursts of up to `burst` requests.
    Gcra {
        /// Requests admitted at once after a quiet period.
        burst: NonZeroU32,
    },
}

/// Largest limit of a [`Algorithm::SlidingLog`]: each admitted request is remembered for a whole
/// window, so the log of one key holds at most this many entries.
pub const MAX_LOG_LIMIT: u32 = 100_000;
/// Longest window of a limit: 1 day.
pub const MAX_WINDOW: Duration = Duration::from_secs(86_400);

/// Why a [`Limit`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// The window is shorter than 1 ms or longer than [`MAX_WINDOW`].
    #[error("a rate-limit window must be between 1 ms and 1 day, not {0:?}")]
    Window(Duration),
    /// A sliding log's limit is above [`MAX_LOG_LIMIT`].
    #[error(
        "a sliding log remembers every admitted request; its limit must be at most {max}, not \
         {limit} (use a sliding window or GCRA for larger limits)"
    )]
    LogTooLarge {
        /// The requested limit.
        limit: u32,
        /// The maximum.
        max: u32,
    },
}

/// A quota: `limit` requests per `window`, counted with an [`Algorithm`].
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use speedlayer::ratelimit::Limit;
///
/// let login = Limit::sliding_log(NonZeroU32::new(5).unwrap(), Duration::from_secs(60))?;
/// assert_eq!(login.limit(), 5);
/// # Ok::<(), speedlayer::ratelimit::LimitError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    algorithm: Algorithm,
    limit: NonZeroU32,
    window_us: u64,
}

impl Limit {
    fn new(algorithm: Algorithm, limit: NonZeroU32, window: Duration) -> Result<Limit, LimitError> {
        if window < Duration::from_millis(1) || window > MAX_WINDOW {
            return Err(LimitError::Window(window));
        }
        if algorithm == Algorithm::SlidingLog && limit.get() > MAX_LOG_LIMIT {
            return Err(LimitError::LogTooLarge {
                limit: limit.get(),
                max: MAX_LOG_LIMIT,
            });
        }
        Ok(Limit {
            algorithm,
            limit,
            window_us: window.as_micros() as u64,
        })
    }

    /// `limit` per aligned window.
    pub fn fixed_window(limit: NonZeroU32, window: Duration) -> Result<Limit, LimitError> {
        Limit::new(Algorithm::FixedWindow, limit, window)
    }

    /// Exactly `limit` in any window of length `window`.
    pub fn sliding_log(limit: NonZeroU32, window: Duration) -> Result<Limit, LimitError> {
        Limit::new(Algorithm::SlidingLog, limit, window)
    }

    /// About `limit` per sliding window (see [`Algorithm::SlidingWindow`] for the bound).
    pub fn sliding_window(limit: NonZeroU32, window: Duration) -> Result<Limit, LimitError> {
        Limit::new(Algorithm::SlidingWindow, limit, window)
    }

    /// `limit` per `window` on average, with bursts of up to `burst`.
    pub fn gcra(
        limit: NonZeroU32,
        window: Duration,
        burst: NonZeroU32,
    ) -> Result<Limit, LimitError> {
        Limit::new(Algorithm::Gcra { burst }, limit, window)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Requests per window.
    pub fn limit(&self) -> u32 {
        self.limit.get()
    }

    /// The window.
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.window_us)
    }

    pub(crate) fn window_us(&self) -> u64 {
        self.window_us
    }

    /// The number clients see as the quota (`RateLimit-Policy` `q=`): the limit, or the burst of
    /// a GCRA.
    pub fn quota(&self) -> u32 {
        match self.algorithm {
            Algorithm::Gcra { burst } => burst.get(),
            _ => self.limit.get(),
        }
    }

    /// The quota as a key segment: algorithm, limit, window, and a GCRA's burst
    /// (`log-5-60s`, `fixed-100-1500ms`, `gcra-10-1s-b3`). Each layer's counter key carries it,
    /// so layers with different quotas never share a counter, and a changed quota starts a
    /// fresh one.
    pub fn slug(&self) -> String {
        let w = self.window_us;
        let window = if w.is_multiple_of(1_000_000) {
            format!("{}s", w / 1_000_000)
        } else if w.is_multiple_of(1_000) {
            format!("{}ms", w / 1_000)
        } else {
            format!("{w}us")
        };
        match self.algorithm {
            Algorithm::Gcra { burst } => {
                format!("{}-{}-{window}-b{burst}", self.name(), self.limit)
            }
            _ => format!("{}-{}-{window}", self.name(), self.limit),
        }
    }

    /// Short name used in keys, headers and logs.
    pub fn name(&self) -> &'static str {
        match self.algorithm {
            Algorithm::FixedWindow => "fixed",
            Algorithm::SlidingLog => "log",
            Algorithm::SlidingWindow => "sliding",
            Algorithm::Gcra { .. } => "gcra",
        }
    }
}

impl fmt::Debug for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Limit({} {}/{:?}",
            self.name(),
            self.limit,
            self.window()
        )?;
        if let Algorithm::Gcra { burst } = self.algorithm {
            write!(f, " burst {burst}")?;
        }
        f.write_str(")")
    }
}

/// The answer of a limiter: a value, not an error. Being limited is a normal outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The request may proceed (and was counted).
    pub allowed: bool,
    /// The quota (see [`Limit::quota`]).
    pub limit: u32,
    /// Requests still admitted now, after this one.
    pub remaining: u32,
    /// Time until the quota is fully available again.
    pub reset_after: Duration,
    /// When denied: the earliest time a retry can succeed.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// A decision that admits without counting (fail-open while the backend is unusable).
    pub(crate) fn unlimited(limit: &Limit) -> Decision {
        Decision {
            allowed: true,
            limit: limit.quota(),
            remaining: limit.quota(),
            reset_after: Duration::ZERO,
            retry_after: None,
        }
    }

    /// A decision that refuses without counting (fail-closed).
    pub(crate) fn refused(limit: &Limit, retry_after: Duration) -> Decision {
        Decision {
            allowed: false,
            limit: limit.quota(),
            remaining: 0,
            reset_after: retry_after,
            retry_after: Some(retry_after),
        }
    }
}
