//! The built-in workload: virtual users with sessions over HTTP, and the report.
//!
//! Each virtual user repeatedly picks a family (a student and their parent) by a Zipf law (a few
//! families are very active, most rarely), then plays a session of that family's student, parent,
//! the class teacher, or the bursar: mostly reads, a share of writes. Every write's result is
//! recorded, and every later read is checked against it: a read issued after a write returned
//! that still shows pre-write data is a stale read. A burst of login attempts from one address
//! runs alongside and is rate limited.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Geometric, Zipf};
use serde::Serialize;

use crate::app::{
    Approval, Audit, AuditRequest, Badge, Dashboard, LOGIN_LIMIT, Login, NewPayment, Online,
    PaymentReceipt, ProfileReceipt, RollMark, SwitchRequest,
};
use crate::db::{FeeSummary, ProfileUpdate};

/// How much load, and its shape.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Requests to send (the login burst included).
    pub requests: u64,
    /// Stop earlier when this much time has passed.
    pub duration: Duration,
    /// Virtual users sending at once.
    pub concurrency: usize,
    /// Students (and families) in the database.
    pub students: i64,
    /// Teachers (one class each).
    pub teachers: i64,
    /// Zipf exponent of family activity.
    pub zipf_exponent: f64,
    /// Mean requests per session.
    pub session_length: f64,
    /// Login attempts from one address.
    pub login_burst: u32,
    pub seed: u64,
    /// How long after a write an old value may still be read: [`TIER_LAG`] when in-process
    /// tiers serve reads, zero otherwise (every old value read after a write returned is stale).
    pub tier_lag: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            requests: 100_000,
            duration: Duration::from_secs(120),
            concurrency: 32,
            students: 10_000,
            teachers: 400,
            zipf_exponent: 1.1,
            session_length: 25.0,
            login_burst: 3 * LOGIN_LIMIT,
            tier_lag: Duration::ZERO,
            seed: 7,
        }
    }
}

/// What the workload saw, and what the service's `/metrics` counted meanwhile.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub requests: u64,
    pub failed_requests: u64,
    pub db_queries: u64,
    pub db_hits_saved_pct: f64,
    pub stale_reads: u64,
    /// Old values read within the in-process tier's stated lag after the write returned.
    pub read_within_lag: u64,
    pub rate_limited: u64,
    /// Payments recorded twice under one Idempotency-Key (must be 0).
    pub duplicate_payments: i64,
    /// Unread-notification badges that differed from the database at the end (must be 0).
    pub drifted_counters: u64,
    /// Roll-call marks sent (answered 200) that are not in the database after the end-of-day
    /// flush, and students whose mark is in it more than once (both must be 0).
    pub attendance_lost: u64,
    pub attendance_doubled: u64,
    /// Requests with a logged-out token that were answered (must be 0).
    pub logged_out_accepted: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    #[serde(skip)]
    pub detail: Detail,
}

#[derive(Clone, Debug, Default)]
pub struct Detail {
    pub elapsed: Duration,
    pub reads: u64,
    pub writes: u64,
    pub logins_admitted: u64,
    pub cacheable_reads: u64,
    pub cache_loads: u64,
    pub role_checks: u64,
    pub role_loads: u64,
    pub cache_hits: u64,
    /// Of the hits, those answered by the in-process tier.
    pub local_hits: u64,
    /// Reads that found a copy in L1 but went to Redis: a message about the key (or the
    /// channel's close) waited unhandled by the channel's task.
    pub unsettled_reads: u64,
    /// The tier channels' heartbeat round trip (the longest an invalidation message is on its
    /// way while the channel is healthy), p50 and p99 in microseconds, the worst instance's.
    pub channel_rtt_us: (u64, u64),
    pub cache_coalesced: u64,
    pub cache_misses: u64,
    pub stale_sets_refused: u64,
    pub cache_errors: u64,
    pub cache_timeouts: u64,
    pub leases_denied: u64,
    pub max_ms: f64,
    pub first_failures: Vec<String>,
    /// The first stale reads: what was read, what it showed, when.
    pub first_stale: Vec<String>,
    /// The in-process tier's stated lag the run allowed (zero without tiers), and the first
    /// reads within it.
    pub tier_lag: Duration,
    pub first_within_lag: Vec<String>,
    pub payments: u64,
    pub payment_retries: u64,
    pub replays: u64,
    pub conflicts: u64,
    pub mismatches: u64,
    pub approvals: u64,
    pub already_approved: u64,
    pub lock_contention: u64,
    pub approved_requests: i64,
    pub badge_reads: u64,
    pub counters_checked: u64,
    pub notifications: u64,
    pub batch_rows_read: u64,
    pub batch_rows_loaded: u64,
    pub batch_loads: u64,
    pub logouts: u64,
    pub logged_out_refused: u64,
    pub roll_marks_sent: u64,
    pub roll_marks_applied: i64,
    pub roll_submits: u64,
    pub roll_submits_deferred: u64,
    pub roll_sink_failures: u64,
    pub roll_classes_unflushed: u64,
    pub presence_polls: u64,
    pub presence_seen: u64,
    /// Requests answered `503` with `Retry-After` (a service failing closed while Redis was
    /// unusable), or `409` with `Retry-After` while a payment's first response waited to be
    /// stored, and sent again after the pause they asked for.
    pub retried_after_503: u64,
    /// Writes whose invalidation Redis could not take, and that waited for it to be applied
    /// before answering; and those that answered first (after 3 s).
    pub invalidations_waited: u64,
    pub invalidations_unsettled: u64,
    /// When the cache was switched off and on again, in seconds from the start (if it was).
    pub cache_switched: Option<(f64, f64)>,
}

impl Report {
    /// The report's last line: one JSON object.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }

    /// The readable report.
    pub fn print(&self, backend: &str, database: &str) {
        let d = &self.detail;
        let rps = self.requests as f64 / d.elapsed.as_secs_f64().max(1e-9);
        println!("== school ERP workload: {database} + {backend} ==");
        println!(
            "requests        {:>8} in {:.1} s ({rps:.0}/s): {} reads, {} writes, {} logins",
            self.requests,
            d.elapsed.as_secs_f64(),
            d.reads,
            d.writes,
            d.logins_admitted + self.rate_limited
        );
        println!(
            "latency         p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            self.p50_ms, self.p99_ms, d.max_ms
        );
        println!(
            "cacheable reads {:>8} (role checks, dashboards, fee summaries); {} went to the database",
            d.cacheable_reads, d.cache_loads
        );
        println!(
            "db hits saved   {:>7.1} %   (target >= 95; the seeds ask for >= 60)",
            self.db_hits_saved_pct
        );
        let data_reads = d.cacheable_reads.saturating_sub(d.role_checks);
        let data_loads = d.cache_loads.saturating_sub(d.role_loads);
        if data_reads > 0 && d.role_checks > 0 {
            println!(
                "                dashboards and fee summaries alone {:.1} %, role checks alone {:.1} %",
                100.0 * (1.0 - data_loads as f64 / data_reads as f64),
                100.0 * (1.0 - d.role_loads as f64 / d.role_checks as f64)
            );
        }
        println!(
            "db queries      {:>8} in all (reads, writes and logins)",
            self.db_queries
        );
        println!(
            "cache           {} hits, {} coalesced, {} misses; {} loads refused a stale store after a write",
            d.cache_hits, d.cache_coalesced, d.cache_misses, d.stale_sets_refused
        );
        if d.local_hits > 0 {
            println!(
                "in-process tier {} of the {} hits answered from process memory ({:.1} %)",
                d.local_hits,
                d.cache_hits,
                100.0 * d.local_hits as f64 / d.cache_hits.max(1) as f64
            );
            println!(
                "tier channel    heartbeat round trip p50 {} us, p99 {} us: how long an invalidation \
                 message from another instance is on its way",
                d.channel_rtt_us.0, d.channel_rtt_us.1
            );
            println!(
                "                {} reads found a copy but went to Redis: a message about their key \
                 waited unread or unhandled by the channel's task",
                d.unsettled_reads
            );
        }
        println!(
            "batches         {} profile rows read with get_or_set_many (rosters, dashboards); {} loaded in {} queries",
            d.batch_rows_read, d.batch_rows_loaded, d.batch_loads
        );
        println!(
            "cache backend   {} errors ({} timeouts); {} loads not cached behind another's lease",
            d.cache_errors, d.cache_timeouts, d.leases_denied
        );
        if d.tier_lag.is_zero() {
            println!(
                "stale reads     {:>8}   (reads issued after a write returned that showed older data)",
                self.stale_reads
            );
        } else {
            println!(
                "stale reads     {:>8}   (reads issued more than {} ms after a write returned that showed older data)",
                self.stale_reads,
                d.tier_lag.as_millis()
            );
            println!(
                "within the lag  {:>8}   (reads issued sooner, on another instance, while the invalidation message was on its way)",
                self.read_within_lag
            );
            for seen in &d.first_within_lag {
                println!("  {seen}");
            }
        }
        println!(
            "logins          {} admitted, {} answered 429 (limit {LOGIN_LIMIT} per minute per address)",
            d.logins_admitted, self.rate_limited
        );
        println!(
            "payments        {} recorded; {} retries: {} replayed, {} answered 409, {} answered 422",
            d.payments, d.payment_retries, d.replays, d.conflicts, d.mismatches
        );
        println!(
            "duplicates      {:>8}   (payments recorded twice under one Idempotency-Key)",
            self.duplicate_payments
        );
        println!(
            "approvals       {} approved under a fenced lock ({} in the database), {} already done, {} contended (409)",
            d.approvals, d.approved_requests, d.already_approved, d.lock_contention
        );
        println!(
            "badges          {} reads, {} notifications; {} counters checked, {} differed from the database",
            d.badge_reads, d.notifications, d.counters_checked, self.drifted_counters
        );
        println!(
            "sessions        {} logged out; their tokens then refused {} times, accepted {} times",
            d.logouts, d.logged_out_refused, self.logged_out_accepted
        );
        println!(
            "roll call       {} marks sent into the day's scratch hashes, {} in the database after the end-of-day flush; {} submits ({} deferred by a failed database write), {} sink failures on purpose",
            d.roll_marks_sent,
            d.roll_marks_applied,
            d.roll_submits,
            d.roll_submits_deferred,
            d.roll_sink_failures
        );
        println!(
            "attendance lost {:>8}   (marks sent but not in the database; {} classes left unflushed)",
            self.attendance_lost, d.roll_classes_unflushed
        );
        println!(
            "attendance doubled {:>5}   (students marked more than once in the database)",
            self.attendance_doubled
        );
        println!(
            "presence        {} long polls, the teacher seen online in {}",
            d.presence_polls, d.presence_seen
        );
        println!(
            "retries         {} requests answered 503 (Redis unusable) or 409 (response not stored yet) with Retry-After, and sent again, as a client should",
            d.retried_after_503
        );
        println!(
            "outage writes   {} writes waited for an invalidation Redis could not take at once; {} answered before it was applied",
            d.invalidations_waited, d.invalidations_unsettled
        );
        match d.cache_switched {
            Some((off, on)) => println!(
                "switch          cache switched off at {off:.2} s and on at {on:.2} s under load (every read went to the database meanwhile)"
            ),
            None => println!("switch          cache not switched (the run ended first)"),
        }
        println!("failed requests {:>8}", self.failed_requests);
        for failure in &d.first_failures {
            println!("  {failure}");
        }
        for stale in &d.first_stale {
            println!("  stale: {stale}");
        }
    }
}

/// The latest write results the workload has seen returned, per student.
struct Confirmed {
    paid: Vec<AtomicI64>,
    version: Vec<AtomicI64>,
    /// When a write of each student last returned (µs from the start).
    changed_us: Vec<AtomicU64>,
    /// Payments whose receipt has been returned, and when the last one was (µs from the start).
    payments: AtomicI64,
    payment_us: AtomicU64,
    /// Payments the admin dashboard showed before the run.
    baseline_payments: i64,
}

impl Confirmed {
    fn new(students: i64, baseline_payments: i64) -> Confirmed {
        let n = students as usize + 1;
        Confirmed {
            paid: (0..n).map(|_| AtomicI64::new(0)).collect(),
            version: (0..n).map(|_| AtomicI64::new(1)).collect(),
            changed_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
            payments: AtomicI64::new(0),
            payment_us: AtomicU64::new(0),
            baseline_payments,
        }
    }

    fn changed(&self, student: i64, at: Duration) {
        self.changed_us[student as usize].fetch_max(at.as_micros() as u64, Ordering::SeqCst);
    }

    /// How long before `now` a write of `student` last returned, in ms.
    fn since_change_ms(&self, student: i64, now: Duration) -> f64 {
        let at = self.changed_us[student as usize].load(Ordering::SeqCst);
        (now.as_micros() as u64).saturating_sub(at) as f64 / 1000.0
    }

    fn snapshot(&self, student: i64) -> (i64, i64) {
        (
            self.paid[student as usize].load(Ordering::SeqCst),
            self.version[student as usize].load(Ordering::SeqCst),
        )
    }
}

#[derive(Default)]
struct Tally {
    requests: u64,
    failed: u64,
    stale: u64,
    /// Old values read within the in-process tier's stated lag after the write returned.
    within_lag: u64,
    within_lag_seen: Vec<String>,
    reads: u64,
    writes: u64,
    logins_admitted: u64,
    rate_limited: u64,
    payments: u64,
    payment_retries: u64,
    replays: u64,
    conflicts: u64,
    mismatches: u64,
    approvals: u64,
    already_approved: u64,
    lock_contention: u64,
    badge_reads: u64,
    logouts: u64,
    logged_out_refused: u64,
    logged_out_accepted: u64,
    roll_marks_sent: u64,
    roll_submits: u64,
    roll_submits_deferred: u64,
    presence_polls: u64,
    presence_seen: u64,
    retried_after_503: u64,
    latencies_us: Vec<u32>,
    failures: Vec<String>,
    stale_seen: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.failed += other.failed;
        self.stale += other.stale;
        self.within_lag += other.within_lag;
        for w in other.within_lag_seen {
            if self.within_lag_seen.len() < 5 {
                self.within_lag_seen.push(w);
            }
        }
        self.reads += other.reads;
        self.writes += other.writes;
        self.logins_admitted += other.logins_admitted;
        self.rate_limited += other.rate_limited;
        self.payments += other.payments;
        self.payment_retries += other.payment_retries;
        self.replays += other.replays;
        self.conflicts += other.conflicts;
        self.mismatches += other.mismatches;
        self.approvals += other.approvals;
        self.already_approved += other.already_approved;
        self.lock_contention += other.lock_contention;
        self.badge_reads += other.badge_reads;
        self.logouts += other.logouts;
        self.logged_out_refused += other.logged_out_refused;
        self.logged_out_accepted += other.logged_out_accepted;
        self.roll_marks_sent += other.roll_marks_sent;
        self.roll_submits += other.roll_submits;
        self.roll_submits_deferred += other.roll_submits_deferred;
        self.presence_polls += other.presence_polls;
        self.presence_seen += other.presence_seen;
        self.retried_after_503 += other.retried_after_503;
        self.latencies_us.extend(other.latencies_us);
        for f in other.failures {
            if self.failures.len() < 5 {
                self.failures.push(f);
            }
        }
        for f in other.stale_seen {
            if self.stale_seen.len() < 10 {
                self.stale_seen.push(f);
            }
        }
    }

    fn stale(&mut self, what: String) {
        self.stale += 1;
        if self.stale_seen.len() < 10 {
            self.stale_seen.push(what);
        }
    }

    /// An old value read `since_ms` after the write returned: within `lag` (the in-process
    /// tier's stated lag, [`TIER_LAG`], when tiers serve; zero otherwise) it is counted apart;
    /// after it, it is a stale read.
    fn stale_after(&mut self, lag: Duration, since_ms: f64, what: String) {
        if since_ms < lag.as_secs_f64() * 1000.0 {
            self.within_lag += 1;
            if self.within_lag_seen.len() < 5 {
                self.within_lag_seen.push(what);
            }
        } else {
            self.stale(what);
        }
    }

    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 5 {
            self.failures.push(what);
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How long after a write returned another instance's in-process tier may still show the old
/// value: the bound the tier states (its invalidation message is on its way; measured p99 0.3 ms
/// alone and 1.6-4 ms on two busy cores, `tests/fleet` tier).
pub const TIER_LAG: Duration = Duration::from_millis(5);

/// A request not answered within this counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A request's Idempotency-Key, and whether it repeats a request whose response may not be
/// stored yet: then a 409 with Retry-After is waited out from the first answer.
#[derive(Clone, Copy)]
struct Idempotent<'a> {
    key: &'a str,
    awaiting_stored: bool,
}

/// How long a request answered `503` with `Retry-After` is sent again before it counts as
/// failed.
const RETRY_BUDGET: Duration = Duration::from_secs(15);

struct Shared {
    client: HttpClient,
    /// The instances' base URLs: requests go to each in turn, so that a read often reaches
    /// another instance than the write before it.
    bases: Vec<String>,
    next_base: std::sync::atomic::AtomicUsize,
    budget: AtomicU64,
    started: Instant,
    deadline: Instant,
    confirmed: Confirmed,
    workload: Workload,
    /// Users whose badges may have changed: audited at the end.
    badge_users: Mutex<HashSet<String>>,
}

impl Shared {
    /// Takes one request from the budget; false when the run is over.
    fn take(&self) -> bool {
        Instant::now() < self.deadline
            && self
                .budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }

    async fn send(
        &self,
        tally: &mut Tally,
        method: Method,
        path: &str,
        user: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Option<(StatusCode, Bytes)> {
        self.send_with(tally, method, path, user, body, None)
            .await
            .map(|(status, _, body)| (status, body))
    }

    /// [`Shared::send`] with an Idempotency-Key, answering the response headers too.
    async fn send_with(
        &self,
        tally: &mut Tally,
        method: Method,
        path: &str,
        user: Option<&str>,
        body: Option<Vec<u8>>,
        idempotent: Option<Idempotent<'_>>,
    ) -> Option<(StatusCode, HeaderMap, Bytes)> {
        let started = Instant::now();
        tally.requests += 1;
        let body = Bytes::from(body.unwrap_or_default());
        let idempotency_key = idempotent.map(|i| i.key);
        let mut retrying = idempotent.is_some_and(|i| i.awaiting_stored);
        let result = loop {
            let base =
                &self.bases[self.next_base.fetch_add(1, Ordering::Relaxed) % self.bases.len()];
            let result = exchange(
                &self.client,
                base,
                method.clone(),
                path,
                user,
                body.clone(),
                idempotency_key,
            )
            .await;
            // A service failing closed while Redis is unusable asks to be called again later:
            // a client does so (with the same Idempotency-Key), within a budget. Once retrying,
            // a 409 with Retry-After is the same request's earlier attempt, still on record as
            // in progress (its reply was lost to the outage, or its response is not stored
            // yet): it too is retried.
            let again = match &result {
                Ok((StatusCode::SERVICE_UNAVAILABLE, headers, _)) => Some(headers),
                Ok((StatusCode::CONFLICT, headers, _)) if retrying => Some(headers),
                _ => None,
            };
            if let Some(headers) = again
                && let Some(pause) = headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                && started.elapsed() < RETRY_BUDGET
            {
                tally.retried_after_503 += 1;
                retrying = true;
                tokio::time::sleep(Duration::from_secs(pause.clamp(1, 5))).await;
                continue;
            }
            break result;
        };
        let micros = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        tally.latencies_us.push(micros);
        match result {
            Ok(answer) => Some(answer),
            Err(e) => {
                tally.fail(format!("{method} {path}: {e}"));
                None
            }
        }
    }

    fn touch_badge(&self, user: String) {
        self.badge_users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user);
    }

    /// Sends and expects 200 with a JSON body of type `T`.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        tally: &mut Tally,
        method: Method,
        path: &str,
        user: &str,
        body: Option<Vec<u8>>,
    ) -> Option<T> {
        let (status, bytes) = self
            .send(tally, method.clone(), path, Some(user), body)
            .await?;
        if status != StatusCode::OK {
            tally.fail(format!(
                "{method} {path} as {user}: {status} {}",
                String::from_utf8_lossy(&bytes)
            ));
            return None;
        }
        match serde_json::from_slice(&bytes) {
            Ok(value) => Some(value),
            Err(e) => {
                tally.fail(format!("{method} {path}: undecodable body: {e}"));
                None
            }
        }
    }

    async fn fees(&self, tally: &mut Tally, user: &str, student: i64) {
        tally.reads += 1;
        let (paid, version) = self.confirmed.snapshot(student);
        let sent = self.started.elapsed();
        let path = format!("/api/fees/summary/{student}");
        if let Some(summary) = self
            .call::<FeeSummary>(tally, Method::GET, &path, user, None)
            .await
            && (summary.paid_cents < paid || summary.profile_version < version)
        {
            let since = self.confirmed.since_change_ms(student, sent);
            tally.stale_after(
                self.workload.tier_lag,
                since,
                format!(
                    "GET {path} at {:.3} s: paid {} version {}, while {paid} and version {version} were confirmed (the write returned {since:.1} ms before the read was sent)",
                    sent.as_secs_f64(),
                    summary.paid_cents,
                    summary.profile_version,
                ),
            );
        }
    }

    async fn dashboard(&self, tally: &mut Tally, role: &str, user: &str, family: i64) {
        tally.reads += 1;
        let (paid, version) = self.confirmed.snapshot(family);
        let sent = self.started.elapsed();
        let payments = self.confirmed.payments.load(Ordering::SeqCst);
        let class = (family - 1) % self.workload.teachers + 1;
        let roster_versions: Vec<(i64, i64)> = if role == "teacher" {
            (0..)
                .map(|i| class + i * self.workload.teachers)
                .take_while(|s| *s <= self.workload.students)
                .map(|s| (s, self.confirmed.snapshot(s).1))
                .collect()
        } else {
            Vec::new()
        };
        let path = format!("/api/dashboard/{role}/{user}");
        let Some(dashboard) = self
            .call::<Dashboard>(tally, Method::GET, &path, user, None)
            .await
        else {
            return;
        };
        let stale = match &dashboard {
            Dashboard::Student { profile, fees, .. }
            | Dashboard::Parent {
                child: profile,
                fees,
                ..
            } => (fees.paid_cents < paid || profile.version < version).then(|| {
                let since = self.confirmed.since_change_ms(family, sent);
                (
                    since,
                    format!(
                        "paid {} version {}, while {paid} and version {version} were confirmed (the write returned {since:.1} ms before the read was sent)",
                        fees.paid_cents, profile.version,
                    ),
                )
            }),
            Dashboard::Teacher { class } => roster_versions.iter().find_map(|(s, v)| {
                match class.roster.iter().find(|e| e.student_id == *s) {
                    None => Some((f64::INFINITY, format!("student {s} missing from the roster"))),
                    Some(e) if e.version < *v => {
                        let since = self.confirmed.since_change_ms(*s, sent);
                        Some((
                            since,
                            format!(
                                "student {s} at version {}, while version {v} was confirmed (the write returned {since:.1} ms before the read was sent)",
                                e.version
                            ),
                        ))
                    }
                    Some(_) => None,
                }
            }),
            Dashboard::Admin { totals } => {
                let confirmed = self.confirmed.baseline_payments + payments;
                (totals.payments < confirmed).then(|| {
                    let at = self.confirmed.payment_us.load(Ordering::SeqCst);
                    let since = (sent.as_micros() as u64).saturating_sub(at) as f64 / 1000.0;
                    (
                        since,
                        format!(
                            "{} payments, while {confirmed} were confirmed (the last payment returned {since:.1} ms before the read was sent)",
                            totals.payments
                        ),
                    )
                })
            }
        };
        if let Some((since, what)) = stale {
            tally.stale_after(
                self.workload.tier_lag,
                since,
                format!("GET {path} at {:.3} s: {what}", sent.as_secs_f64()),
            );
        }
    }

    /// `POST /api/payments` as the bursar, under Idempotency-Key `key`; `awaiting_stored` as
    /// for [`Idempotent`].
    async fn post_payment(
        &self,
        tally: &mut Tally,
        student: i64,
        amount: i64,
        key: &str,
        awaiting_stored: bool,
    ) -> Option<(StatusCode, HeaderMap, Bytes)> {
        let body = serde_json::to_vec(&NewPayment {
            student_id: student,
            amount_cents: amount,
        })
        .expect("serializes");
        self.send_with(
            tally,
            Method::POST,
            "/api/payments",
            Some("a1"),
            Some(body),
            Some(Idempotent {
                key,
                awaiting_stored,
            }),
        )
        .await
    }

    /// A payment under a fresh Idempotency-Key; now and then the client retries it: after the
    /// receipt (a replay), at the same time (one of the two runs, the other is a replay or a
    /// 409), or with another amount under the same key (422).
    async fn pay(&self, tally: &mut Tally, student: i64, amount: i64, key: &str, retry: f64) {
        tally.writes += 1;
        let path = "/api/payments";
        // Every extra request the retries send is taken from the budget.
        let concurrent = (0.10..0.20).contains(&retry) && self.take();
        let first = if concurrent {
            let mut other = Tally::default();
            let (a, b) = tokio::join!(
                self.post_payment(tally, student, amount, key, false),
                self.post_payment(&mut other, student, amount, key, false),
            );
            tally.payment_retries += 1;
            tally.merge(other);
            // One ran; the other was replayed, or answered 409 while the first ran.
            let mut ran = None;
            for answer in [a, b].into_iter().flatten() {
                match answer {
                    (StatusCode::OK, headers, body) => {
                        if headers.contains_key("idempotent-replayed") {
                            tally.replays += 1;
                        } else {
                            ran = Some(body);
                        }
                    }
                    (StatusCode::CONFLICT, _, _) => tally.conflicts += 1,
                    (status, _, body) => tally.fail(format!(
                        "POST {path} (duplicate): {status} {}",
                        String::from_utf8_lossy(&body)
                    )),
                }
            }
            ran
        } else {
            match self.post_payment(tally, student, amount, key, false).await {
                Some((StatusCode::OK, _, body)) => Some(body),
                Some((status, _, body)) => {
                    tally.fail(format!(
                        "POST {path}: {status} {}",
                        String::from_utf8_lossy(&body)
                    ));
                    None
                }
                None => None,
            }
        };
        let Some(receipt) = first.and_then(|b| serde_json::from_slice::<PaymentReceipt>(&b).ok())
        else {
            return;
        };
        tally.payments += 1;
        self.confirmed.paid[student as usize].fetch_max(receipt.paid_cents, Ordering::SeqCst);
        self.confirmed.changed(student, self.started.elapsed());
        self.confirmed.payments.fetch_add(1, Ordering::SeqCst);
        self.confirmed
            .payment_us
            .fetch_max(self.started.elapsed().as_micros() as u64, Ordering::SeqCst);
        self.touch_badge(format!("p{student}"));
        if retry < 0.10 && self.take() {
            // The client did not see the receipt and retries: the same receipt, replayed. A 409
            // with Retry-After says the first run's response is not stored yet (Redis was
            // unusable when it completed): the client comes back as told.
            tally.payment_retries += 1;
            match self.post_payment(tally, student, amount, key, true).await {
                Some((StatusCode::OK, headers, body))
                    if headers.contains_key("idempotent-replayed")
                        && serde_json::from_slice::<PaymentReceipt>(&body)
                            .is_ok_and(|r| r.paid_cents == receipt.paid_cents) =>
                {
                    tally.replays += 1;
                }
                Some((status, _, body)) => tally.fail(format!(
                    "POST {path} (retry): {status} {}",
                    String::from_utf8_lossy(&body)
                )),
                None => {}
            }
        } else if (0.20..0.23).contains(&retry) && self.take() {
            // A client bug: the same key with another amount.
            tally.payment_retries += 1;
            match self
                .post_payment(tally, student, amount + 1, key, false)
                .await
            {
                Some((StatusCode::UNPROCESSABLE_ENTITY, _, _)) => tally.mismatches += 1,
                Some((status, _, body)) => tally.fail(format!(
                    "POST {path} (other body): {status} {}",
                    String::from_utf8_lossy(&body)
                )),
                None => {}
            }
        }
    }

    /// The admin approves a pending request; now and then two admins click at once.
    async fn approve(&self, tally: &mut Tally, request: i64, twice: bool) {
        tally.writes += 1;
        let path = format!("/api/requests/{request}/approve");
        let answers = if twice && self.take() {
            let mut other = Tally::default();
            let (a, b) = tokio::join!(
                self.send(tally, Method::POST, &path, Some("a1"), None),
                self.send(&mut other, Method::POST, &path, Some("a1"), None),
            );
            tally.merge(other);
            vec![a, b]
        } else {
            vec![
                self.send(tally, Method::POST, &path, Some("a1"), None)
                    .await,
            ]
        };
        for answer in answers.into_iter().flatten() {
            match answer {
                (StatusCode::OK, body) => match serde_json::from_slice::<Approval>(&body) {
                    Ok(approval) if approval.approved => {
                        tally.approvals += 1;
                        self.touch_badge(format!("s{}", request * 10));
                    }
                    Ok(_) => tally.already_approved += 1,
                    Err(e) => tally.fail(format!("POST {path}: undecodable body: {e}")),
                },
                (StatusCode::CONFLICT, _) => tally.lock_contention += 1,
                (status, body) => tally.fail(format!(
                    "POST {path}: {status} {}",
                    String::from_utf8_lossy(&body)
                )),
            }
        }
    }

    /// A user looks at their unread-notifications badge, and now and then reads them all.
    async fn badge(&self, tally: &mut Tally, user: &str, read_all: bool) {
        tally.reads += 1;
        tally.badge_reads += 1;
        self.touch_badge(user.to_owned());
        self.call::<Badge>(tally, Method::GET, "/api/notifications/count", user, None)
            .await;
        if read_all && self.take() {
            tally.writes += 1;
            self.call::<Badge>(tally, Method::POST, "/api/notifications/read", user, None)
                .await;
        }
    }

    async fn edit_profile(&self, tally: &mut Tally, student: i64, edit: u64) {
        tally.writes += 1;
        let body = serde_json::to_vec(&ProfileUpdate {
            name: format!("Student {student} (edit {edit})"),
            phone: format!("+1-555-{:07}", (student * 31 + edit as i64) % 10_000_000),
            active: true,
        })
        .expect("serializes");
        let path = format!("/api/students/{student}");
        let user = format!("s{student}");
        if let Some(receipt) = self
            .call::<ProfileReceipt>(tally, Method::PUT, &path, &user, Some(body))
            .await
        {
            self.confirmed.version[student as usize].fetch_max(receipt.version, Ordering::SeqCst);
            self.confirmed.changed(student, self.started.elapsed());
        }
    }

    async fn login_burst(&self, tally: &mut Tally) {
        for _ in 0..self.workload.login_burst {
            if !self.take() {
                return;
            }
            let body = serde_json::to_vec(&Login {
                user_id: "s1".into(),
                password: "demo-s1".into(),
            })
            .expect("serializes");
            match self
                .send(tally, Method::POST, "/api/auth/login", None, Some(body))
                .await
            {
                Some((StatusCode::OK, body)) => {
                    tally.logins_admitted += 1;
                    let token = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["token"].as_str().map(str::to_owned));
                    match token {
                        Some(token) => self.session_round(tally, &token).await,
                        None => tally.fail("POST /api/auth/login: no token".into()),
                    }
                }
                Some((StatusCode::TOO_MANY_REQUESTS, _)) => tally.rate_limited += 1,
                Some((status, body)) => tally.fail(format!(
                    "POST /api/auth/login: {status} {}",
                    String::from_utf8_lossy(&body)
                )),
                None => {}
            }
        }
    }

    /// A session's life: a request with its token, the logout, and the same token again, which
    /// every instance must refuse at once.
    async fn session_round(&self, tally: &mut Tally, token: &str) {
        let user = format!("bearer:{token}");
        if !self.take() {
            return;
        }
        tally.reads += 1;
        self.call::<Dashboard>(tally, Method::GET, "/api/dashboard/student/s1", &user, None)
            .await;
        if !self.take() {
            return;
        }
        tally.writes += 1;
        if self
            .call::<serde_json::Value>(tally, Method::POST, "/api/auth/logout", &user, None)
            .await
            .is_none()
        {
            return;
        }
        tally.logouts += 1;
        if !self.take() {
            return;
        }
        match self
            .send(
                tally,
                Method::GET,
                "/api/dashboard/student/s1",
                Some(&user),
                None,
            )
            .await
        {
            Some((StatusCode::UNAUTHORIZED, _)) => tally.logged_out_refused += 1,
            Some((status, _)) => {
                tally.logged_out_accepted += 1;
                tally.fail(format!("a logged-out token was answered {status}"));
            }
            None => {}
        }
    }

    /// Teachers take the roll call of the first classes: every student marked once, into the
    /// day's scratch hash; a heartbeat in the class room, a long poll of who is online; some
    /// classes submitted (the database write fails on purpose now and then: the marks stay for
    /// the next submit or the end-of-day flush), the rest left to the end-of-day flush.
    async fn roll_call(&self, tally: &mut Tally) {
        let w = &self.workload;
        let classes = w.teachers.min(40);
        for class in 1..=classes {
            let teacher = format!("t{class}");
            if !self.take() {
                return;
            }
            let path = format!("/api/classes/{class}/heartbeat");
            tally.writes += 1;
            self.call::<serde_json::Value>(tally, Method::POST, &path, &teacher, None)
                .await;
            if !self.take() {
                return;
            }
            tally.reads += 1;
            tally.presence_polls += 1;
            let path = format!("/api/classes/{class}/online?wait_ms=200");
            if let Some(online) = self
                .call::<Online>(tally, Method::GET, &path, &teacher, None)
                .await
                && online.online.contains(&teacher)
            {
                tally.presence_seen += 1;
            }
            let students: Vec<i64> = (0..)
                .map(|i| class + i * w.teachers)
                .take_while(|s| *s <= w.students)
                .collect();
            for (n, student) in students.iter().enumerate() {
                if !self.take() {
                    return;
                }
                let status = if (student + n as i64) % 9 == 0 {
                    "absent"
                } else {
                    "present"
                };
                let body = serde_json::to_vec(&RollMark {
                    student_id: *student,
                    status: status.into(),
                })
                .expect("serializes");
                let path = format!("/api/attendance/{class}/mark");
                tally.writes += 1;
                if self
                    .call::<serde_json::Value>(tally, Method::POST, &path, &teacher, Some(body))
                    .await
                    .is_some()
                {
                    tally.roll_marks_sent += 1;
                }
                // Two thirds of the classes submit halfway, and again at the end.
                if class % 3 != 0 && (n + 1 == students.len() / 2 || n + 1 == students.len()) {
                    if !self.take() {
                        return;
                    }
                    let path = format!("/api/attendance/{class}/submit");
                    tally.writes += 1;
                    tally.roll_submits += 1;
                    match self
                        .send(tally, Method::POST, &path, Some(&teacher), None)
                        .await
                    {
                        Some((StatusCode::OK, _)) => {}
                        Some((StatusCode::SERVICE_UNAVAILABLE, _)) => {
                            tally.roll_submits_deferred += 1
                        }
                        Some((status, body)) => tally.fail(format!(
                            "POST {path}: {status} {}",
                            String::from_utf8_lossy(&body)
                        )),
                        None => {}
                    }
                }
            }
        }
    }

    async fn virtual_user(self: Arc<Self>, index: usize) -> Tally {
        let w = &self.workload;
        let mut tally = Tally::default();
        if index == 0 {
            self.login_burst(&mut tally).await;
        }
        if index == 1 || (index == 0 && w.concurrency < 2) {
            self.roll_call(&mut tally).await;
        }
        let mut rng =
            StdRng::seed_from_u64(w.seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
        let zipf = Zipf::new(w.students as f64, w.zipf_exponent).expect("valid Zipf law");
        let length = Geometric::new(1.0 / w.session_length.max(1.0)).expect("valid session length");
        let mut edits = 0u64;
        let mut payments = 0u64;
        loop {
            // Rank r of the Zipf law is family ((r * 7919) mod N) + 1: the busy families are
            // spread over all classes.
            let rank = zipf.sample(&mut rng) as i64 - 1;
            let family = (rank * 7_919) % w.students + 1;
            let class = (family - 1) % w.teachers + 1;
            let kind: f64 = rng.random();
            let session = 1 + length.sample(&mut rng);
            for _ in 0..session {
                if !self.take() {
                    return tally;
                }
                let x: f64 = rng.random();
                if kind < 0.55 {
                    let user = format!("s{family}");
                    if x < 0.50 {
                        self.dashboard(&mut tally, "student", &user, family).await;
                    } else if x < 0.97 {
                        self.fees(&mut tally, &user, family).await;
                    } else if x < 0.99 {
                        self.badge(&mut tally, &user, x > 0.985).await;
                    } else {
                        edits += 1;
                        self.edit_profile(&mut tally, family, edits).await;
                    }
                } else if kind < 0.80 {
                    let user = format!("p{family}");
                    if x < 0.5 {
                        self.dashboard(&mut tally, "parent", &user, family).await;
                    } else if x < 0.97 {
                        self.fees(&mut tally, &user, family).await;
                    } else {
                        self.badge(&mut tally, &user, x > 0.995).await;
                    }
                } else if kind < 0.92 {
                    self.dashboard(&mut tally, "teacher", &format!("t{class}"), family)
                        .await;
                } else {
                    // The bursar works through the families that come in, glancing at the
                    // school's totals now and then.
                    if x < 0.05 {
                        self.dashboard(&mut tally, "admin", "a1", family).await;
                    } else if x < 0.85 {
                        self.fees(&mut tally, "a1", family).await;
                    } else if x < 0.95 {
                        let amount = rng.random_range(5..50) * 100;
                        payments += 1;
                        let key = format!("pay-{}-{index}-{payments}", w.seed);
                        let retry: f64 = rng.random();
                        self.pay(&mut tally, family, amount, &key, retry).await;
                    } else {
                        // Requests come from every tenth student: ids 1..=students/10.
                        let requests = (w.students / 10).max(1);
                        let request = (family * 13) % requests + 1;
                        self.approve(&mut tally, request, x > 0.98).await;
                    }
                }
            }
        }
    }
}

/// One request and its whole answer, within [`REQUEST_TIMEOUT`].
async fn exchange(
    client: &HttpClient,
    base: &str,
    method: Method,
    path: &str,
    user: Option<&str>,
    body: Bytes,
    idempotency_key: Option<&str>,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json");
    if let Some(user) = user {
        // "bearer:<token>" authenticates with a session token instead of a user id.
        request = match user.strip_prefix("bearer:") {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request.header("x-user-id", user),
        };
    }
    if let Some(key) = idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let request = request.body(Full::new(body)).expect("a valid request");
    let answer = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, headers, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
}

/// The payments the admin dashboard shows now.
async fn admin_payments(client: &HttpClient, base: &str) -> Result<i64, String> {
    let path = "/api/dashboard/admin/a1";
    let (status, _, body) = exchange(
        client,
        base,
        Method::GET,
        path,
        Some("a1"),
        Bytes::new(),
        None,
    )
    .await?;
    match serde_json::from_slice::<Dashboard>(&body) {
        Ok(Dashboard::Admin { totals }) if status == StatusCode::OK => Ok(totals.payments),
        _ => Err(format!(
            "the admin dashboard answered {status}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// Switches the cache off when a third of the request budget is spent, and on again 0.5 % of the
/// budget later (every read then goes to the database, so a longer window would only lower the
/// share of reads saved), through the admin endpoint: no request may fail meanwhile, and none may
/// read stale.
async fn flip_cache_switch(shared: Arc<Shared>, started: Instant) -> (Option<(f64, f64)>, Tally) {
    let mut tally = Tally::default();
    let total = shared.workload.requests;
    let spent = |s: &Shared| total.saturating_sub(s.budget.load(Ordering::SeqCst));
    let mut off_at = None;
    loop {
        let over = Instant::now() >= shared.deadline || spent(&shared) >= total;
        match off_at {
            None if over => return (None, tally),
            None if spent(&shared) >= total / 3 => {
                if !shared.take() {
                    return (None, tally);
                }
                switch_cache(&shared, &mut tally, false).await;
                off_at = Some(started.elapsed().as_secs_f64());
            }
            Some(off) if over || spent(&shared) >= total / 3 + (total / 200).max(1) => {
                // Switched back on even when the run is over (no budget taken then).
                let _ = shared.take();
                switch_cache(&shared, &mut tally, true).await;
                return (Some((off, started.elapsed().as_secs_f64())), tally);
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Flips the cache switch of every instance (a switch is each instance's own).
async fn switch_cache(shared: &Shared, tally: &mut Tally, on: bool) {
    let body = Bytes::from(
        serde_json::to_vec(&SwitchRequest {
            capability: "cache".into(),
            on,
        })
        .expect("serializes"),
    );
    for base in &shared.bases {
        tally.requests += 1;
        match exchange(
            &shared.client,
            base,
            Method::POST,
            "/api/admin/switch",
            Some("a1"),
            body.clone(),
            None,
        )
        .await
        {
            Ok((status, _, _)) if status == StatusCode::OK => {}
            Ok((status, _, _)) => tally.fail(format!("switch on {base} answered {status}")),
            Err(e) => tally.fail(format!("switch on {base}: {e}")),
        }
    }
}

/// Reads the service's counters from `/metrics`.
async fn scrape(client: &HttpClient, base: &str) -> Result<Vec<(String, f64)>, String> {
    let (_, _, body) = exchange(
        client,
        base,
        Method::GET,
        "/metrics",
        None,
        Bytes::new(),
        None,
    )
    .await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect())
}

/// The sum of the series `name` over the instances' scrapes.
fn metric(metrics: &[(String, f64)], name: &str) -> u64 {
    metrics
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| *v as u64)
        .sum()
}

/// The largest value of the series `name` (seconds) over the instances, in microseconds.
fn worst_micros(metrics: &[(String, f64)], name: &str) -> u64 {
    metrics
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| (v * 1e6) as u64)
        .max()
        .unwrap_or(0)
}

/// Every instance's counters, one list.
async fn scrape_all(client: &HttpClient, bases: &[String]) -> Result<Vec<(String, f64)>, String> {
    let mut all = Vec::new();
    for base in bases {
        all.extend(scrape(client, base).await?);
    }
    Ok(all)
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len());
    f64::from(sorted_us[rank - 1]) / 1_000.0
}

/// Runs `workload` against the instances of the service at `addrs` (one or more, sharing the
/// database and Redis) and reports.
pub async fn run(addrs: &[SocketAddr], workload: Workload) -> Result<Report, String> {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(workload.concurrency.max(1))
        .build_http();
    let bases: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let base = bases.first().cloned().ok_or("no instance to run against")?;
    let baseline_payments = admin_payments(&client, &base).await?;
    let before = scrape_all(&client, &bases).await?;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        client: client.clone(),
        bases: bases.clone(),
        next_base: std::sync::atomic::AtomicUsize::new(0),
        budget: AtomicU64::new(workload.requests),
        started,
        deadline: started + workload.duration,
        confirmed: Confirmed::new(workload.students, baseline_payments),
        workload: workload.clone(),
        badge_users: Mutex::new(HashSet::new()),
    });
    let flipper = tokio::spawn(flip_cache_switch(shared.clone(), started));
    let tasks: Vec<_> = (0..workload.concurrency.max(1))
        .map(|i| tokio::spawn(shared.clone().virtual_user(i)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(
            task.await
                .map_err(|e| format!("a virtual user panicked: {e}"))?,
        );
    }
    let elapsed = started.elapsed();
    let (cache_switched, flip_tally) = flipper
        .await
        .map_err(|e| format!("the switch flipper panicked: {e}"))?;
    tally.merge(flip_tally);
    let users: Vec<String> = shared
        .badge_users
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    // Each instance flushes the roll-call classes it marked; the first then audits the database.
    let mut unflushed = 0;
    for other in &bases[1..] {
        unflushed += audit(&client, other, Vec::new())
            .await?
            .roll_classes_unflushed;
    }
    let mut audit = audit(&client, &base, users).await?;
    audit.roll_classes_unflushed += unflushed;
    let after = scrape_all(&client, &bases).await?;
    let delta = |name: &str| metric(&after, name).saturating_sub(metric(&before, name));

    tally.latencies_us.sort_unstable();
    let cacheable_reads = delta("school_erp_cacheable_reads_total");
    let cache_loads = delta("school_erp_cache_loads_total");
    let saved = if cacheable_reads == 0 {
        0.0
    } else {
        100.0 * (1.0 - cache_loads as f64 / cacheable_reads as f64)
    };
    Ok(Report {
        requests: tally.requests,
        failed_requests: tally.failed,
        db_queries: delta("school_erp_db_queries_total"),
        db_hits_saved_pct: (saved * 10.0).round() / 10.0,
        stale_reads: tally.stale,
        read_within_lag: tally.within_lag,
        rate_limited: tally.rate_limited,
        duplicate_payments: audit.duplicate_payments,
        drifted_counters: audit.counters_drifted,
        attendance_lost: tally
            .roll_marks_sent
            .saturating_sub(audit.roll_students_marked.max(0) as u64),
        attendance_doubled: audit.roll_students_doubled.max(0) as u64,
        logged_out_accepted: tally.logged_out_accepted,
        p50_ms: percentile_ms(&tally.latencies_us, 0.50),
        p99_ms: percentile_ms(&tally.latencies_us, 0.99),
        detail: Detail {
            elapsed,
            reads: tally.reads,
            writes: tally.writes,
            logins_admitted: tally.logins_admitted,
            cacheable_reads,
            cache_loads,
            role_checks: delta("school_erp_role_checks_total"),
            role_loads: delta("school_erp_role_loads_total"),
            batch_rows_read: delta("school_erp_batch_rows_read_total"),
            batch_rows_loaded: delta("school_erp_batch_rows_loaded_total"),
            batch_loads: delta("school_erp_batch_loads_total"),
            logouts: tally.logouts,
            logged_out_refused: tally.logged_out_refused,
            roll_marks_sent: tally.roll_marks_sent,
            roll_marks_applied: audit.roll_marks_applied,
            roll_submits: tally.roll_submits,
            roll_submits_deferred: tally.roll_submits_deferred,
            retried_after_503: tally.retried_after_503,
            invalidations_waited: delta("school_erp_invalidations_waited_total"),
            invalidations_unsettled: delta("school_erp_invalidations_unsettled_total"),
            roll_sink_failures: delta("school_erp_roll_sink_failures_total"),
            roll_classes_unflushed: audit.roll_classes_unflushed,
            presence_polls: tally.presence_polls,
            presence_seen: tally.presence_seen,
            cache_switched,
            cache_hits: delta("speedlayer_cache_hits_total"),
            local_hits: delta("speedlayer_tier_hits_total{state=\"fresh\"}"),
            unsettled_reads: delta("speedlayer_tier_unsettled_reads_total"),
            channel_rtt_us: (
                worst_micros(
                    &after,
                    "speedlayer_tier_channel_rtt_seconds{quantile=\"0.5\"}",
                ),
                worst_micros(
                    &after,
                    "speedlayer_tier_channel_rtt_seconds{quantile=\"0.99\"}",
                ),
            ),
            cache_coalesced: delta("speedlayer_cache_coalesced_total"),
            cache_misses: delta("speedlayer_cache_misses_total"),
            stale_sets_refused: delta("speedlayer_cache_stale_sets_refused_total"),
            cache_errors: delta("speedlayer_store_errors_total"),
            cache_timeouts: delta("speedlayer_store_timeouts_total"),
            leases_denied: delta("speedlayer_cache_leases_denied_total"),
            max_ms: tally
                .latencies_us
                .last()
                .map_or(0.0, |m| f64::from(*m) / 1_000.0),
            first_failures: tally.failures,
            first_stale: tally.stale_seen,
            tier_lag: workload.tier_lag,
            first_within_lag: tally.within_lag_seen,
            payments: tally.payments,
            payment_retries: tally.payment_retries,
            replays: tally.replays,
            conflicts: tally.conflicts,
            mismatches: tally.mismatches,
            approvals: tally.approvals,
            already_approved: tally.already_approved,
            lock_contention: tally.lock_contention,
            approved_requests: audit.approved_requests,
            badge_reads: tally.badge_reads,
            counters_checked: audit.counters_checked,
            notifications: delta("school_erp_notifications_total"),
        },
    })
}

/// The end-of-run audit: duplicate payments, approvals, and the badges of `users` reconciled
/// with the database.
async fn audit(client: &HttpClient, base: &str, users: Vec<String>) -> Result<Audit, String> {
    let body = serde_json::to_vec(&AuditRequest { users }).expect("serializes");
    let (status, _, body) = exchange(
        client,
        base,
        Method::POST,
        "/api/admin/audit",
        Some("a1"),
        Bytes::from(body),
        None,
    )
    .await?;
    match serde_json::from_slice::<Audit>(&body) {
        Ok(audit) if status == StatusCode::OK => Ok(audit),
        _ => Err(format!(
            "the audit answered {status}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}
