//! speedlayer's benches, one binary grouping per-area modules (as governor does).
//!
//! Every figure is a ratio against the raw thing measured in the same run: raw moka, raw
//! redis-rs over the same kind of connection. A real `redis-server` is started on a loopback port
//! for the Redis groups (set `SPEEDLAYER_REDIS_SERVER` to use another binary).
//!
//! `cargo bench --features bb8 --bench main` runs everything and ends with a table of ratios; a filter
//! (`cargo bench --features bb8 --bench main -- hit`) runs one group.

use criterion::Criterion;

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod common;
mod hit;
mod invalidate;
mod ratelimit;
mod report;
mod stampede;
mod throughput;

/// True unless a criterion filter is given that cannot match `group`: the groups' paired rounds
/// and set-up (a million keys for `invalidate`) run only when the group does.
pub fn group_selected(group: &str) -> bool {
    criterion_filter().is_none_or(|f| group.contains(&f) || f.contains(group))
}

/// Criterion's filter: the first free argument after the bench binary's flags.
pub fn criterion_filter() -> Option<String> {
    std::env::args().skip(1).find(|a| !a.starts_with('-'))
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
    if group_selected("hit") {
        hit::benches(&mut c, &server);
    }
    if group_selected("throughput") {
        throughput::benches(&mut c, &server);
    }
    if group_selected("stampede") {
        stampede::benches(&mut c, &server);
    }
    if group_selected("invalidate") {
        invalidate::benches(&mut c, &server);
    }
    if group_selected("ratelimit") {
        ratelimit::benches(&mut c, &server);
    }
    c.final_summary();
    report::print_ratios(group_selected);
}
