//! Each algorithm against a reference model over random arrival sequences, on the memory
//! limiter with a fake clock. The references keep the full history of admissions and decide
//! from it directly; the limiter keeps only its compact state.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::FileFailurePersistence;
use speedlayer::clock::FakeClock;
use speedlayer::ratelimit::{Layer, Limit, MemoryLimiter};

use crate::support::nz;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/ratelimit/proptests.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// Gaps between arrivals, in nanoseconds: many bursts (0), some spread over a window or two.
fn gaps(window_ns: u64) -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(
        prop_oneof![
            3 => Just(0u64),
            3 => 0..window_ns / 4 + 1,
            1 => 0..window_ns * 2 + 1,
        ],
        1..120,
    )
}

fn run(limit: Limit, gaps: &[u64]) -> (Vec<u64>, Vec<bool>, Vec<u32>) {
    let clock = FakeClock::new();
    let limiter = MemoryLimiter::with_clock(1_000, Arc::new(clock.clone()));
    let mut times = Vec::new();
    let mut allowed = Vec::new();
    let mut remaining = Vec::new();
    let mut now = 0u64;
    for gap in gaps {
        clock.advance(Duration::from_nanos(*gap));
        now += gap;
        let d = limiter.check(&[Layer {
            key: "k",
            limit: &limit,
        }])[0];
        times.push(now);
        allowed.push(d.allowed);
        remaining.push(d.remaining);
    }
    (times, allowed, remaining)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fixed_window_matches_its_reference(l in 1u32..8, w_ms in 1u64..500, seed in any::<u64>()) {
        let w = w_ms * 1_000_000;
        let gaps = sample(gaps(w), seed);
        let limit = Limit::fixed_window(nz(l), Duration::from_millis(w_ms)).unwrap();
        let (times, allowed, _) = run(limit, &gaps);
        let mut admitted: Vec<u64> = Vec::new();
        for (t, got) in times.iter().zip(&allowed) {
            let same = admitted.iter().filter(|a| *a / w == t / w).count() as u32;
            let expected = same < l;
            prop_assert_eq!(*got, expected, "at {}", t);
            if expected { admitted.push(*t); }
        }
    }

    #[test]
    fn sliding_log_matches_its_reference_and_is_exact(
        l in 1u32..8,
        w_ms in 1u64..500,
        seed in any::<u64>(),
    ) {
        let w = w_ms * 1_000_000;
        let gaps = sample(gaps(w), seed);
        let limit = Limit::sliding_log(nz(l), Duration::from_millis(w_ms)).unwrap();
        let (times, allowed, remaining) = run(limit, &gaps);
        let mut admitted: Vec<u64> = Vec::new();
        for ((t, got), left) in times.iter().zip(&allowed).zip(&remaining) {
            let live = admitted.iter().filter(|a| *a + w > *t).count() as u32;
            let expected = live < l;
            prop_assert_eq!(*got, expected, "at {}", t);
            if expected {
                admitted.push(*t);
                prop_assert_eq!(*left, l - live - 1);
            }
        }
        // Exactness: no window of length w holds more than l admissions.
        for (i, start) in admitted.iter().enumerate() {
            let within = admitted[i..].iter().take_while(|a| **a < start + w).count() as u32;
            prop_assert!(within <= l, "{} admissions in a window starting at {}", within, start);
        }
    }

    #[test]
    fn sliding_window_matches_its_reference_and_bound(
        l in 1u32..8,
        w_ms in 1u64..500,
        seed in any::<u64>(),
    ) {
        let w = w_ms * 1_000_000;
        let gaps = sample(gaps(w), seed);
        let limit = Limit::sliding_window(nz(l), Duration::from_millis(w_ms)).unwrap();
        let (times, allowed, _) = run(limit, &gaps);
        let mut admitted: Vec<u64> = Vec::new();
        for (t, got) in times.iter().zip(&allowed) {
            let index = t / w;
            let current = admitted.iter().filter(|a| *a / w == index).count() as u128;
            let previous = admitted.iter().filter(|a| index > 0 && *a / w == index - 1).count() as u128;
            let elapsed = u128::from(t - index * w);
            let w128 = u128::from(w);
            let expected = previous * (w128 - elapsed) + (current + 1) * w128 <= u128::from(l) * w128;
            prop_assert_eq!(*got, expected, "at {}", t);
            if expected { admitted.push(*t); }
        }
        // The documented bound: at most l per fixed window, 2l per sliding window.
        for (i, start) in admitted.iter().enumerate() {
            let within = admitted[i..].iter().take_while(|a| **a < start + w).count() as u32;
            prop_assert!(within <= 2 * l);
            let same = admitted.iter().filter(|a| *a / w == start / w).count() as u32;
            prop_assert!(same <= l);
        }
    }

    #[test]
    fn gcra_matches_a_leaky_bucket(
        l in 1u32..20,
        w_ms in 1u64..500,
        burst in 1u32..6,
        seed in any::<u64>(),
    ) {
        let w = w_ms * 1_000_000;
        let gaps = sample(gaps(w), seed);
        let limit = Limit::gcra(nz(l), Duration::from_millis(w_ms), nz(burst)).unwrap();
        let (times, allowed, _) = run(limit, &gaps);
        // The leaky bucket as a meter: content drains 1 ns per ns, each admission adds one
        // emission interval, and the bucket holds the burst tolerance plus one interval.
        let t_cell = (w / u64::from(l)).max(1);
        let tau = t_cell * u64::from(burst - 1);
        let (mut content, mut last) = (0u64, 0u64);
        for (t, got) in times.iter().zip(&allowed) {
            let drained = content.saturating_sub(t - last);
            let expected = drained <= tau;
            prop_assert_eq!(*got, expected, "at {}", t);
            if expected {
                content = drained + t_cell;
                last = *t;
            } else {
                content = drained;
                last = *t;
            }
        }
    }

    #[test]
    fn a_denial_is_honest_about_when_to_retry(
        algorithm in 0usize..4,
        l in 1u32..5,
        w_ms in 1u64..200,
        seed in any::<u64>(),
    ) {
        let window = Duration::from_millis(w_ms);
        let limit = match algorithm {
            0 => Limit::fixed_window(nz(l), window),
            1 => Limit::sliding_log(nz(l), window),
            2 => Limit::sliding_window(nz(l), window),
            _ => Limit::gcra(nz(l), window, nz(2)),
        }.unwrap();
        let clock = FakeClock::new();
        let limiter = MemoryLimiter::with_clock(100, Arc::new(clock.clone()));
        for gap in sample(gaps(w_ms * 1_000_000), seed) {
            clock.advance(Duration::from_nanos(gap));
            let d = limiter.check(&[Layer { key: "k", limit: &limit }])[0];
            if !d.allowed {
                let retry = d.retry_after.expect("a denial says when to retry");
                prop_assert!(retry <= d.reset_after.max(retry));
                // After waiting that long, with no other arrival, the request is admitted.
                clock.advance(retry);
                let again = limiter.check(&[Layer { key: "k", limit: &limit }])[0];
                prop_assert!(again.allowed, "{:?}: still denied after retry_after {:?}", limit, retry);
            }
        }
    }
}

fn seed_bytes(seed: u64) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes
}

/// One value of `strategy`, determined by `seed` (so that the window size drawn by proptest can
/// shape the gaps).
fn sample<S: Strategy>(strategy: S, seed: u64) -> S::Value {
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        ProptestConfig::default(),
        proptest::test_runner::TestRng::from_seed(
            proptest::test_runner::RngAlgorithm::ChaCha,
            &seed_bytes(seed),
        ),
    );
    strategy.new_tree(&mut runner).unwrap().current()
}
