//! The ratio table printed after the benches, read from criterion's own estimates.

use std::path::PathBuf;
use std::sync::Mutex;

static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps a line for the final report.
pub fn remember(line: String) {
    NOTES.lock().unwrap().push(line);
}

fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}

/// Criterion's `stat` estimate ("mean" or "median") of the time per iteration, in nanoseconds,
/// of `group/id` in the latest run.
fn estimate_ns(group: &str, id: &str, stat: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(id.replace('/', "_"))
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json[stat]["point_estimate"].as_f64()
}

pub fn print_ratios() {
    println!("\n== speedlayer bench ratios (this run; criterion's median estimates) ==");
    let rows = [
        ("hit", "memory/speedlayer", "memory/raw_moka", "time", 1.5),
        (
            "hit",
            "redis/speedlayer",
            "redis/raw_redis_json",
            "time",
            1.10,
        ),
        (
            "throughput",
            "redis64/speedlayer",
            "redis64/raw",
            "throughput",
            0.90,
        ),
        (
            "throughput",
            "redis64/pooled",
            "redis64/raw",
            "throughput",
            0.0,
        ),
        ("batch", "get_or_set_many_50", "raw_mget_50", "time", 1.2),
        (
            "batch",
            "get_or_set_many_50",
            "sequential_get_or_set_50",
            "time",
            0.0,
        ),
        (
            "invalidate",
            "tag100/keyspace_1m",
            "tag100/keyspace_10k",
            "time",
            1.2,
        ),
        (
            "ratelimit",
            "redis/gcra",
            "redis/raw_evalsha_gcra",
            "time",
            1.10,
        ),
        (
            "ratelimit",
            "redis/gcra",
            "redis/raw_evalsha_noop",
            "time",
            0.0,
        ),
        (
            "ratelimit",
            "redis/sliding_log",
            "redis/raw_evalsha_noop",
            "time",
            0.0,
        ),
        (
            "ratelimit",
            "memory/gcra",
            "memory/governor_keyed",
            "time",
            3.0,
        ),
        (
            "coordination",
            "lock/redis/acquire_release",
            "lock/redis/raw",
            "time",
            1.15,
        ),
        (
            "coordination",
            "counter/redis/incr",
            "counter/redis/raw_incr",
            "time",
            0.0,
        ),
        (
            "coordination",
            "counter/redis/incr",
            "counter/redis/raw_begin_incr",
            "time",
            1.10,
        ),
        (
            "coordination",
            "idempotency/redis/first_request",
            "idempotency/redis/raw_get",
            "time",
            0.0,
        ),
        (
            "coordination",
            "idempotency/redis/replay",
            "idempotency/redis/raw_get",
            "time",
            0.0,
        ),
    ];
    for (group, ours, raw, kind, target) in rows {
        // Only pairs measured in this run: estimates on disk may be from an earlier one.
        if !crate::selected(&format!("{group}/{ours}"))
            || !crate::selected(&format!("{group}/{raw}"))
        {
            continue;
        }
        let (Some(a), Some(b)) = (
            estimate_ns(group, ours, "median"),
            estimate_ns(group, raw, "median"),
        ) else {
            continue;
        };
        let mean_ratio = match (
            estimate_ns(group, ours, "mean"),
            estimate_ns(group, raw, "mean"),
        ) {
            (Some(x), Some(y)) if kind == "throughput" => y / x,
            (Some(x), Some(y)) => x / y,
            _ => f64::NAN,
        };
        let ratio = if kind == "throughput" { b / a } else { a / b };
        let (goal, met) = if target == 0.0 {
            ("reported".to_owned(), "")
        } else if kind == "throughput" {
            (
                format!(">= {target:.2}"),
                if ratio >= target { "met" } else { "NOT met" },
            )
        } else {
            (
                format!("<= {target:.2}"),
                if ratio <= target { "met" } else { "NOT met" },
            )
        };
        println!(
            "{group}/{ours} vs {raw}: {ratio:.3} ({kind} ratio of medians, target {goal}) {met}; \
             ratio of means {mean_ratio:.3}  [medians {a:.0} ns vs {b:.0} ns per iteration]"
        );
    }
    for line in NOTES.lock().unwrap().iter() {
        println!("{line}");
    }
}

/// Runs `ours` and `raw` alternately for `rounds` rounds (which goes first alternates too) and
/// returns the median of the per-round time ratios `ours / raw`, with its spread. Pairing each
/// round cancels the drift of a shared machine that separate criterion runs pick up.
pub fn paired<O, R>(rounds: usize, mut ours: O, mut raw: R) -> (f64, f64, f64)
where
    O: FnMut() -> std::time::Duration,
    R: FnMut() -> std::time::Duration,
{
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            let a = ours();
            (a, raw())
        } else {
            let b = raw();
            (ours(), b)
        };
        ratios.push(a.as_secs_f64() / b.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let at = |p: f64| ratios[((rounds - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.25), at(0.75))
}

/// Records a paired ratio line for the final report.
pub fn remember_paired(name: &str, kind: &str, target: &str, (median, q1, q3): (f64, f64, f64)) {
    let line = format!(
        "paired {name}: {kind} ratio {median:.3} (interquartile {q1:.3}..{q3:.3}; target {target})"
    );
    println!("{line}");
    remember(line);
}

/// [`paired`] and [`remember_paired`] for the pair `ours` and `raw` (bench ids), when the filter
/// selects either.
pub fn paired_if_selected<O, R>(
    (ours_id, raw_id): (&str, &str),
    kind: &str,
    target: &str,
    ours: O,
    raw: R,
) where
    O: FnMut() -> std::time::Duration,
    R: FnMut() -> std::time::Duration,
{
    if !crate::any_selected(&[ours_id, raw_id]) {
        return;
    }
    let ratio = paired(21, ours, raw);
    remember_paired(&format!("{ours_id} vs {raw_id}"), kind, target, ratio);
}
