//! The algorithms as pure state machines, shared by the memory backend and its insurance
//! limiter. Time is in nanoseconds from a [`Clock`](crate::clock::Clock). The Redis scripts
//! implement the same rules in Lua, on Redis server time in microseconds.
//!
//! Each check is two steps: [`evaluate`] computes the decision and the state an admission would
//! leave, without changing anything; the caller commits the new states only when every layer of
//! a multi-layer check admits, so a denied request consumes no layer's quota.

use std::collections::VecDeque;
use std::time::Duration;

use super::limit::{Algorithm, Decision, Limit};

/// What a key remembers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum State {
    /// Nothing yet.
    #[default]
    Empty,
    /// Fixed window: the window index and its count.
    Fixed { window: u64, count: u32 },
    /// Sliding log: admission times, oldest first.
    Log(VecDeque<u64>),
    /// Sliding window: the current window index, the previous window's count and the current
    /// one's.
    Sliding {
        window: u64,
        previous: u32,
        current: u32,
    },
    /// GCRA: the theoretical arrival time.
    Gcra { tat: u64 },
}

fn ns(duration_ns: u64) -> Duration {
    Duration::from_nanos(duration_ns)
}

/// The decision for a request at `now` and, when it is admitted, the state to commit.
pub(crate) fn evaluate(limit: &Limit, state: &State, now: u64) -> (Decision, Option<State>) {
    let w = limit.window_us().saturating_mul(1_000);
    let l = u64::from(limit.limit());
    match limit.algorithm() {
        Algorithm::FixedWindow => {
            let index = now / w;
            let count = match state {
                State::Fixed { window, count } if *window == index => u64::from(*count),
                _ => 0,
            };
            let reset = (index + 1) * w - now;
            if count < l {
                let decision = admitted(limit, (l - count - 1) as u32, reset);
                let next = State::Fixed {
                    window: index,
                    count: (count + 1) as u32,
                };
                (decision, Some(next))
            } else {
                (denied(limit, reset, reset), None)
            }
        }
        Algorithm::SlidingLog => {
            let empty = VecDeque::new();
            let log = match state {
                State::Log(log) => log,
                _ => &empty,
            };
            // An admission at t stays counted while now < t + w. The log is copied only when
            // the request is admitted (a denial, the common case under attack, changes nothing).
            let expired = log.iter().take_while(|t| *t + w <= now).count();
            let n = (log.len() - expired) as u64;
            if n < l {
                let next: VecDeque<u64> = log.range(expired..).copied().chain([now]).collect();
                let decision = admitted(limit, (l - n - 1) as u32, w);
                (decision, Some(State::Log(next)))
            } else {
                let oldest = log.get(expired).copied().unwrap_or(now);
                let newest = log.back().copied().unwrap_or(now);
                (denied(limit, oldest + w - now, newest + w - now), None)
            }
        }
        Algorithm::SlidingWindow => {
            let index = now / w;
            let (previous, current) = match state {
                State::Sliding {
                    window,
                    previous,
                    current,
                } if *window == index => (u64::from(*previous), u64::from(*current)),
                State::Sliding {
                    window, current, ..
                } if *window + 1 == index => (u64::from(*current), 0),
                _ => (0, 0),
            };
            let elapsed = now - index * w;
            // estimate × w, after this request: previous weighted by the part of the previous
            // window still inside the sliding window, plus the current count.
            let weighted = u128::from(previous) * u128::from(w - elapsed)
                + u128::from(current + 1) * u128::from(w);
            let capacity = u128::from(l) * u128::from(w);
            if weighted <= capacity {
                let decision = admitted(
                    limit,
                    ((capacity - weighted) / u128::from(w)) as u32,
                    (index + 2) * w - now,
                );
                let next = State::Sliding {
                    window: index,
                    previous: previous as u32,
                    current: (current + 1) as u32,
                };
                (decision, Some(next))
            } else {
                let retry = sliding_retry(previous, current, l, w, elapsed);
                let reset = if current > 0 {
                    (index + 2) * w - now
                } else {
                    (index + 1) * w - now
                };
                (denied(limit, retry, reset.max(retry)), None)
            }
        }
        Algorithm::Gcra { burst } => {
            // A large burst on a long window (1 per day, burst 10^6) puts tau beyond u64
            // nanoseconds: saturate, which only means the burst is never used up within any
            // time that fits (centuries).
            let t = (w / l).max(1);
            let tau = t.saturating_mul(u64::from(burst.get()) - 1);
            let tat = match state {
                State::Gcra { tat } => (*tat).max(now),
                _ => now,
            };
            if tat - now > tau {
                (denied(limit, tat - tau - now, tat - now), None)
            } else {
                let next = tat.saturating_add(t);
                let horizon = now.saturating_add(tau);
                let remaining = if horizon >= next {
                    (horizon - next) / t + 1
                } else {
                    0
                };
                let decision =
                    admitted(limit, remaining.min(u64::from(u32::MAX)) as u32, next - now);
                (decision, Some(State::Gcra { tat: next }))
            }
        }
    }
}

fn admitted(limit: &Limit, remaining: u32, reset_ns: u64) -> Decision {
    Decision {
        allowed: true,
        limit: limit.quota(),
        remaining,
        reset_after: ns(reset_ns),
        retry_after: None,
    }
}

fn denied(limit: &Limit, retry_ns: u64, reset_ns: u64) -> Decision {
    Decision {
        allowed: false,
        limit: limit.quota(),
        remaining: 0,
        reset_after: ns(reset_ns.max(retry_ns)),
        retry_after: Some(ns(retry_ns.max(1))),
    }
}

/// Earliest wait after which a sliding-window request would be admitted, with no further
/// arrivals.
fn sliding_retry(previous: u64, current: u64, l: u64, w: u64, elapsed: u64) -> u64 {
    let (previous, current, l, w, elapsed) = (
        u128::from(previous),
        u128::from(current),
        u128::from(l),
        u128::from(w),
        u128::from(elapsed),
    );
    if current < l && previous > 0 {
        // Within this window: previous × (w − e) + (current + 1) × w ≤ l × w.
        let need = (current + 1) * w;
        let room = l * w - need; // ≥ 0 since current + 1 ≤ l
        // (w − e) ≤ room / previous  ⇔  e ≥ w − room / previous
        let e_min = w - (room / previous).min(w);
        if e_min < w {
            return (e_min.max(elapsed + 1) - elapsed) as u64;
        }
    }
    // In the next window the current count becomes the previous one.
    let to_next = w - elapsed;
    if current == 0 {
        return to_next as u64;
    }
    let room = (l - 1) * w;
    let e_min = w - (room / current).min(w);
    (to_next + e_min) as u64
}

/// How long a key's state matters after its last change: it can be dropped after that.
pub(crate) fn idle_ttl(limit: &Limit) -> Duration {
    let w = limit.window();
    match limit.algorithm() {
        Algorithm::SlidingWindow => w * 2,
        Algorithm::Gcra { burst } => {
            (w.saturating_mul(burst.get()) / limit.limit()).saturating_add(w)
        }
        _ => w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    const S: u64 = 1_000_000_000;

    fn run(limit: &Limit, times: &[u64]) -> Vec<bool> {
        let mut state = State::Empty;
        times
            .iter()
            .map(|&t| {
                let (d, next) = evaluate(limit, &state, t);
                if let Some(next) = next {
                    state = next;
                }
                d.allowed
            })
            .collect()
    }

    #[test]
    fn fixed_window_counts_per_aligned_window() {
        let limit = Limit::fixed_window(nz(2), Duration::from_secs(1)).unwrap();
        assert_eq!(
            run(&limit, &[0, 1, 2, S - 1, S, S + 1, S + 2]),
            [true, true, false, false, true, true, false]
        );
    }

    #[test]
    fn sliding_log_is_exact() {
        let limit = Limit::sliding_log(nz(2), Duration::from_secs(1)).unwrap();
        assert_eq!(
            run(&limit, &[0, 10, S - 1, S, S + 9, S + 10]),
            [true, true, false, true, false, true]
        );
    }

    #[test]
    fn gcra_allows_a_burst_then_the_rate() {
        // 10 per second (one per 100 ms), bursts of 3.
        let limit = Limit::gcra(nz(10), Duration::from_secs(1), nz(3)).unwrap();
        let ms = S / 1_000;
        assert_eq!(
            run(&limit, &[0, 0, 0, 0, 100 * ms, 150 * ms, 200 * ms]),
            [true, true, true, false, true, false, true]
        );
    }

    #[test]
    fn a_denial_says_when_to_retry() {
        let limit = Limit::sliding_log(nz(1), Duration::from_secs(10)).unwrap();
        let (first, state) = evaluate(&limit, &State::Empty, 0);
        assert!(first.allowed);
        let (second, none) = evaluate(&limit, &state.unwrap(), 4 * S);
        assert!(!second.allowed && none.is_none());
        assert_eq!(second.retry_after, Some(Duration::from_secs(6)));
        let (third, _) = evaluate(&limit, &State::Log([0].into()), 10 * S);
        assert!(third.allowed);
    }
}
