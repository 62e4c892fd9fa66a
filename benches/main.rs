//! speedlayer's benches, one binary grouping per-area modules (as governor does).
//!
//! Every figure is a ratio against the raw thing measured in the same run: raw moka, raw
//! redis-rs over the same kind of connection. A real `redis-server` is started on a loopback port
//! for the Redis groups (set `SPEEDLAYER_REDIS_SERVER` to use another binary).
//!
//! `cargo bench --all-features --bench main` runs everything and ends with a table of ratios; a
//! filter is criterion's regular expression over `group/name` (`-- '^hit/'`, `-- hit`,
//! `-- --warm-up-time 1 ratelimit/redis`), and a group's set-up and paired rounds run only when
//! it selects one of the group's benches.

use criterion::Criterion;

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod batch;
mod cluster;
mod common;
mod coordination;
mod hit;
mod invalidate;
mod ratelimit;
mod report;
mod stampede;
mod throughput;
mod tiered;

/// Criterion's options that take a value: their value is not the filter.
const VALUE_OPTIONS: &[&str] = &[
    "--color",
    "--save-baseline",
    "--baseline",
    "--baseline-lenient",
    "--format",
    "--profile-time",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--plotting-backend",
    "--output-format",
];

/// The bench filter, read as criterion reads it: the first free argument, a regular expression
/// matched against `group/name` (or the exact id with `--exact`).
enum Filter {
    All,
    Regex(regex::Regex),
    Exact(String),
}

fn filter() -> &'static Filter {
    static FILTER: std::sync::OnceLock<Filter> = std::sync::OnceLock::new();
    FILTER.get_or_init(|| {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let exact = args.iter().any(|a| a == "--exact");
        let mut free = None;
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            if arg.starts_with('-') {
                if !arg.contains('=') && VALUE_OPTIONS.contains(&arg.as_str()) {
                    i += 1;
                }
            } else if free.is_none() {
                free = Some(arg.clone());
            }
            i += 1;
        }
        match free {
            None => Filter::All,
            Some(f) if exact => Filter::Exact(f),
            // An invalid expression is criterion's to report; select everything here.
            Some(f) => regex::Regex::new(&f).map_or(Filter::All, Filter::Regex),
        }
    })
}

/// True when the filter selects the bench `id` (`group/name`).
pub fn selected(id: &str) -> bool {
    match filter() {
        Filter::All => true,
        Filter::Regex(r) => r.is_match(id),
        Filter::Exact(e) => e == id,
    }
}

/// True when the filter selects any of `ids`: a group's set-up and paired rounds run only then.
pub fn any_selected(ids: &[&str]) -> bool {
    ids.iter().any(|id| selected(id))
}

fn main() {
    // Failures the cache absorbs (timeouts, reconnects) are logged, not hidden.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "speedlayer=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut c = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .configure_from_args();
    let server = support::RedisServer::start();
    if any_selected(hit::IDS) {
        hit::benches(&mut c, &server);
    }
    if any_selected(throughput::IDS) {
        throughput::benches(&mut c, &server);
    }
    if any_selected(stampede::IDS) {
        stampede::benches(&mut c, &server);
    }
    if any_selected(invalidate::IDS) {
        invalidate::benches(&mut c, &server);
    }
    if any_selected(ratelimit::IDS) {
        ratelimit::benches(&mut c, &server);
    }
    if any_selected(batch::IDS) {
        batch::benches(&mut c, &server);
    }
    if any_selected(coordination::IDS) {
        coordination::benches(&mut c, &server);
    }
    if any_selected(tiered::IDS) {
        tiered::benches(&mut c, &server);
    }
    if any_selected(cluster::IDS) {
        cluster::benches(&mut c, &server);
    }
    c.final_summary();
    report::print_ratios();
}
