//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: install any recorder (the
//! demo uses `metrics-exporter-prometheus`) and these series appear; without one they cost an
//! atomic load each. Every series is process-wide (the sum over the process's caches); the
//! same figures per cache are in [`Cache::stats`](crate::Cache::stats) and
//! [`Cache::tier_stats`](crate::Cache::tier_stats).
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `speedlayer_cache_hits_total` | counter | | reads answered by the cache (any tier) |
//! | `speedlayer_cache_misses_total` | counter | | reads that found nothing usable |
//! | `speedlayer_cache_coalesced_total` | counter | | callers served by another caller's load |
//! | `speedlayer_cache_loads_total` | counter | | loader calls |
//! | `speedlayer_cache_load_errors_total` | counter | | loader calls that failed |
//! | `speedlayer_cache_load_seconds` | histogram | | time of each loader call |
//! | `speedlayer_cache_decode_failures_total` | counter | | cached values that did not decode (deleted) |
//! | `speedlayer_cache_stale_sets_refused_total` | counter | | loads not stored because an invalidation came during them |
//! | `speedlayer_cache_invalidations_total` | counter | | `Cache::invalidate` calls |
//! | `speedlayer_cache_uncacheable_total` | counter | | loaded values not cached (too large, or not encodable) |
//! | `speedlayer_cache_leases_denied_total` | counter | | loads not cached behind another load's lease |
//! | `speedlayer_cache_stale_served_total` | counter | | `Cache::fetch` answers past their TTL, within the grace |
//! | `speedlayer_cache_early_refreshes_total` | counter | | refreshes `Cache::fetch` started before a TTL ended |
//! | `speedlayer_tier_hits_total` | counter | `state` = `fresh` / `stale` | reads answered by the in-process tier; `stale` under its fail-safe bound |
//! | `speedlayer_tier_fills_total` | counter | | copies installed in L1 |
//! | `speedlayer_tier_fills_refused_total` | counter | | copies refused: an invalidation overtook their read |
//! | `speedlayer_tier_evictions_total` | counter | `cause` = `message` | L1 copies dropped by Redis's invalidation messages |
//! | `speedlayer_tier_unsettled_reads_total` | counter | | reads that found a copy in L1 but went to Redis: a message that may name the key waited unhandled (on the channel's socket or in its task), or the channel was closed |
//! | `speedlayer_tier_channel_losses_total` | counter | | invalidation channels lost (L1 emptied) |
//! | `speedlayer_tier_channel_starts_total` | counter | | tracking switched on (first connection and each reconnection) |
//! | `speedlayer_tier_channel_rtt_seconds` | histogram | | heartbeat round trip on the channel: how long an invalidation message can be on its way |
//! | `speedlayer_store_errors_total` | counter | | backend calls that failed |
//! | `speedlayer_store_timeouts_total` | counter | | backend calls that timed out |
//! | `speedlayer_store_fallbacks_total` | counter | | calls answered by the fallback (or as a miss) instead of the backend |
//! | `speedlayer_store_short_circuited_total` | counter | | calls skipped by an open breaker |
//! | `speedlayer_store_lost_invalidations_total` | counter | | invalidations dropped because the queue for the backend was full |
//! | `speedlayer_store_data_errors_total` | counter | | data errors the backend answered (another client's type at a key) |
//! | `speedlayer_breaker_open` | gauge | | 1 while the breaker is open, else 0 |
//! | `speedlayer_invalidations_pending` | gauge | | invalidations queued while the backend is unusable |
//! | `speedlayer_ratelimit_denied_total` | counter | `route` | requests denied by a rate limit |
//! | `speedlayer_lock_contended_total` | counter | | lock acquisitions that found the lock held |
//! | `speedlayer_outbox_depth` | gauge | | rows waiting in the outbox table, after each relay pass |
//!
//! Loads run inside a `speedlayer.load` tracing span (with the key) at debug level.

use std::sync::atomic::{AtomicU64, Ordering};

/// A counter kept both as a plain atomic (for the `stats()` structs) and as a series of the
/// `metrics` facade.
pub(crate) struct Tally {
    value: AtomicU64,
    name: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

impl Tally {
    /// A tally of the series `name` with `labels`.
    pub(crate) const fn labelled(
        name: &'static str,
        labels: &'static [(&'static str, &'static str)],
    ) -> Tally {
        Tally {
            value: AtomicU64::new(0),
            name,
            labels,
        }
    }

    /// A tally of the series `name`, without labels.
    pub(crate) const fn new(name: &'static str) -> Tally {
        Tally::labelled(name, &[])
    }

    /// Adds `n`; returns the previous value (as `AtomicU64::fetch_add`).
    pub(crate) fn fetch_add(&self, n: u64, order: Ordering) -> u64 {
        metrics::counter!(self.name, self.labels).increment(n);
        self.value.fetch_add(n, order)
    }

    /// The value.
    pub(crate) fn load(&self, order: Ordering) -> u64 {
        self.value.load(order)
    }
}

/// Sets the breaker gauge.
pub(crate) fn breaker_open(open: bool) {
    metrics::gauge!("speedlayer_breaker_open").set(if open { 1.0 } else { 0.0 });
}

/// Sets the gauge of queued invalidations.
pub(crate) fn pending_invalidations(n: usize) {
    metrics::gauge!("speedlayer_invalidations_pending").set(n as f64);
}

/// Records one loader call's time.
pub(crate) fn load_time(seconds: f64) {
    metrics::histogram!("speedlayer_cache_load_seconds").record(seconds);
}

/// Records one heartbeat round trip of a tier's channel.
pub(crate) fn channel_rtt(seconds: f64) {
    metrics::histogram!("speedlayer_tier_channel_rtt_seconds").record(seconds);
}

/// Counts a request denied on `route`.
pub(crate) fn rate_limited(route: &str) {
    metrics::counter!("speedlayer_ratelimit_denied_total", "route" => route.to_owned())
        .increment(1);
}

/// Counts a contended lock acquisition.
pub(crate) fn lock_contended() {
    metrics::counter!("speedlayer_lock_contended_total").increment(1);
}
