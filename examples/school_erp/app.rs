//! The service: axum routes over the database, with speedlayer in front of every read that can
//! be cached, invalidation after every write, and a rate-limited login.
//!
//! Authentication is the demo's: a request names its user in `X-User-Id` (what a real service
//! takes from a verified session or token). Authorization runs on the user's role, read through
//! the cache (`auth:role:{userId}`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use speedlayer::Cache;
use speedlayer::counter::Counters;
use speedlayer::idempotency::Idempotency;
use speedlayer::idempotency::layer::{IdempotencyLayer, IdempotentRoute};
use speedlayer::invalidation::{Invalidates, InvalidationRegistry, Targets};
use speedlayer::key::{Ident, Key, KeyError, Namespace, Tag};
use speedlayer::lock::{Acquire, Locks};
use speedlayer::ratelimit::layer::AuthenticatedUser;
use speedlayer::ratelimit::{Identity, Limit, Outage, RateLimiter, Route};
use speedlayer::revocation::Revocations;
use speedlayer::scratch::{FlushBatch, FlushError, Presence, Scratch, Sink};
use speedlayer::session::{SessionLookup, SessionRecord, Sessions};
use speedlayer::switch::Capability;
use speedlayer::ttl::{Jitter, Ttl, TtlPolicy};

use crate::db::{
    Attendance, ClassOverview, Db, DbResult, FeeSummary, ProfileUpdate, RoleRecord, RosterEntry,
    SchoolTotals, StudentProfile,
};

pub const DASHBOARD: Ident = Ident::from_static("dashboard");
pub const FEES: Ident = Ident::from_static("fees");
pub const SUMMARY: Ident = Ident::from_static("summary");
pub const AUTH: Ident = Ident::from_static("auth");
pub const ROLE: Ident = Ident::from_static("role");
/// Tag of every entry that shows a student's data (their dashboard, their parent's).
pub const SHOWS_STUDENT: Ident = Ident::from_static("shows-student");
/// Tag of every entry that lists a class (its teacher's dashboard).
pub const SHOWS_CLASS: Ident = Ident::from_static("shows-class");
/// Tag the registry gives every dashboard of a user, whatever the role.
pub const USER: Ident = Ident::from_static("user");
pub const AUTH_LOGIN: Ident = Ident::from_static("auth-login");
pub const PAYMENTS: Ident = Ident::from_static("payments");
pub const REQUEST: Ident = Ident::from_static("request");
pub const NOTIFICATIONS: Ident = Ident::from_static("notifications");
pub const COUNT: Ident = Ident::from_static("count");
pub const SCHOOL: Ident = Ident::from_static("school");
pub const ATTENDANCE: Ident = Ident::from_static("attendance");
pub const CLASS: Ident = Ident::from_static("class");
/// The day the workload marks: one roll call per class.
pub const TODAY: &str = "2026-11-30";
/// How long a login session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
pub const STUDENT: Ident = Ident::from_static("student");

/// How long an unread-notifications counter lives without an update.
const BADGE_TTL: Ttl = Ttl::hours(24);
/// How long an approval holds its request's lock.
const APPROVAL_LEASE: Ttl = Ttl::seconds(5);

/// Login attempts allowed per client address per minute.
pub const LOGIN_LIMIT: u32 = 10;

/// A counter of the service: a series of the `metrics` facade, which `/metrics` renders (with
/// speedlayer's own series) through the Prometheus exporter.
pub struct Counter(&'static str, AtomicU64);

impl Counter {
    /// Adds `n`; returns this service's previous count (the series is the process's).
    pub fn fetch_add(&self, n: u64, order: Ordering) -> u64 {
        metrics::counter!(self.0).increment(n);
        self.1.fetch_add(n, order)
    }
}

/// Counters the report and `/metrics` show.
pub struct Metrics {
    pub requests: Counter,
    /// Reads that could be answered from the cache (role checks, dashboards, fee summaries).
    pub cacheable_reads: Counter,
    /// Those of them that went to the database.
    pub cache_loads: Counter,
    /// Of the cacheable reads, the role checks.
    pub role_checks: Counter,
    /// Role checks that went to the database.
    pub role_loads: Counter,
    pub writes: Counter,
    pub rate_limited: Counter,
    pub server_errors: Counter,
    pub invalidation_failures: Counter,
    /// Writes whose invalidation Redis could not take at once: they waited for it to be applied.
    pub invalidations_waited: Counter,
    /// Of those, the writes that answered before it was applied (after the 3 s bound).
    pub invalidations_unsettled: Counter,
    /// Approvals that found the request's lock held by another admin (answered 409).
    pub lock_contention: Counter,
    /// Approvals refused because the lock could not be taken (Redis unusable: 503).
    pub lock_unavailable: Counter,
    /// Notifications written (each one counted in its user's badge).
    pub notifications: Counter,
    /// Student profiles asked for through `get_or_set_many` (rosters, dashboards).
    pub batch_rows_read: Counter,
    /// Of those, the rows the database was asked for.
    pub batch_rows_loaded: Counter,
    /// Database queries made by those batches (one per batch that missed).
    pub batch_loads: Counter,
    /// Sessions created by a login, and ended by a logout.
    pub sessions_created: Counter,
    pub sessions_ended: Counter,
    /// Requests refused for a revoked (logged-out) token.
    pub revoked_tokens_refused: Counter,
    /// Roll-call marks written to the day's scratch hash.
    pub roll_marks: Counter,
    /// Calls of the roll-call sink, those that failed on purpose, and batches applied.
    pub roll_sink_calls: Counter,
    pub roll_sink_failures: Counter,
    pub roll_batches_applied: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Counter("school_erp_http_requests_total", AtomicU64::new(0)),
            cacheable_reads: Counter("school_erp_cacheable_reads_total", AtomicU64::new(0)),
            cache_loads: Counter("school_erp_cache_loads_total", AtomicU64::new(0)),
            role_checks: Counter("school_erp_role_checks_total", AtomicU64::new(0)),
            role_loads: Counter("school_erp_role_loads_total", AtomicU64::new(0)),
            writes: Counter("school_erp_writes_total", AtomicU64::new(0)),
            rate_limited: Counter("school_erp_rate_limited_total", AtomicU64::new(0)),
            server_errors: Counter("school_erp_server_errors_total", AtomicU64::new(0)),
            invalidation_failures: Counter(
                "school_erp_invalidation_failures_total",
                AtomicU64::new(0),
            ),
            invalidations_waited: Counter(
                "school_erp_invalidations_waited_total",
                AtomicU64::new(0),
            ),
            invalidations_unsettled: Counter(
                "school_erp_invalidations_unsettled_total",
                AtomicU64::new(0),
            ),
            lock_contention: Counter("school_erp_lock_contention_total", AtomicU64::new(0)),
            lock_unavailable: Counter("school_erp_lock_unavailable_total", AtomicU64::new(0)),
            notifications: Counter("school_erp_notifications_total", AtomicU64::new(0)),
            batch_rows_read: Counter("school_erp_batch_rows_read_total", AtomicU64::new(0)),
            batch_rows_loaded: Counter("school_erp_batch_rows_loaded_total", AtomicU64::new(0)),
            batch_loads: Counter("school_erp_batch_loads_total", AtomicU64::new(0)),
            sessions_created: Counter("school_erp_sessions_created_total", AtomicU64::new(0)),
            sessions_ended: Counter("school_erp_sessions_ended_total", AtomicU64::new(0)),
            revoked_tokens_refused: Counter(
                "school_erp_revoked_tokens_refused_total",
                AtomicU64::new(0),
            ),
            roll_marks: Counter("school_erp_roll_marks_total", AtomicU64::new(0)),
            roll_sink_calls: Counter("school_erp_roll_sink_calls_total", AtomicU64::new(0)),
            roll_sink_failures: Counter("school_erp_roll_sink_failures_total", AtomicU64::new(0)),
            roll_batches_applied: Counter(
                "school_erp_roll_batches_applied_total",
                AtomicU64::new(0),
            ),
        }
    }
}

/// The process's Prometheus recorder, installed as the `metrics` facade's global recorder the
/// first time it is asked for (every service of the process shares it).
pub fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics shows nothing");
        }
        handle
    })
}

/// The in-process tier of the service's hot single-key reads (role checks, fee summaries,
/// dashboards), used when the cache is on Redis: each instance answers them from memory, and
/// Redis's invalidation messages keep the copies coherent across instances.
pub fn local_tier(ns: &speedlayer::Namespace) -> speedlayer::tier::LocalTier {
    let scope = ns.global();
    let mut tier = speedlayer::tier::LocalTier::new()
        .keyspace(&scope.keyspace(&AUTH, &ROLE))
        .keyspace(&scope.keyspace(&FEES, &SUMMARY));
    for role in ["student", "parent", "teacher", "admin"] {
        tier = tier.keyspace(&scope.keyspace(&DASHBOARD, &Ident::from_static(role)));
    }
    tier
}

/// Shared state of the handlers.
pub struct AppState {
    pub db: Db,
    pub cache: Cache,
    pub idempotency: Idempotency,
    locks: Locks,
    counters: Counters,
    limiter: RateLimiter,
    login: Route,
    pub metrics: Metrics,
    dashboard_ttl: TtlPolicy,
    fees_ttl: TtlPolicy,
    role_ttl: TtlPolicy,
    sessions: Sessions,
    revocations: Revocations,
    scratch: Scratch,
    presence: Presence,
    /// Every n-th roll-call sink call fails on purpose (0: never).
    roll_sink_fail_every: AtomicU64,
    /// Classes with marks today: the end-of-day flush goes through them.
    marked_classes: std::sync::Mutex<std::collections::BTreeSet<i64>>,
}

impl AppState {
    /// The state over `db` and `cache` (whose registry is replaced with the school's).
    pub fn new(db: Db, cache: Cache) -> AppState {
        prometheus();
        let registry = registry(cache.namespace());
        let cache = cache.with_registry(registry);
        let login = Route::new(AUTH_LOGIN)
            .per_ip(
                Limit::sliding_log(
                    NonZeroU32::new(LOGIN_LIMIT).unwrap(),
                    Duration::from_secs(60),
                )
                .expect("a valid limit"),
            )
            // With Redis unusable, the in-memory insurance limiter applies the same quota.
            .on_outage(Outage::Insurance);
        // A flusher's claim outlives its process or its connection by this much: the sink
        // writes one small transaction, so a few seconds are plenty, and a flush cut off by a
        // Redis restart is taken over soon after.
        let scratch = Scratch::new(&cache).claim_ttl(Ttl::seconds(3));
        AppState {
            db,
            sessions: Sessions::new(&cache, Ttl::minutes(15)),
            revocations: Revocations::new(&cache),
            presence: Presence::new(&scratch),
            scratch,
            roll_sink_fail_every: AtomicU64::new(0),
            marked_classes: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            // A payment takes milliseconds: an in-progress record whose run was cut off (its
            // reply lost to a Redis restart) is retried after 5 s rather than a minute.
            idempotency: Idempotency::new(&cache).lease(Ttl::seconds(5)),
            locks: Locks::new(&cache),
            counters: Counters::new(&cache),
            limiter: RateLimiter::new(&cache),
            cache,
            login,
            metrics: Metrics::default(),
            dashboard_ttl: TtlPolicy::new(Ttl::seconds(300))
                .with_jitter(Jitter::fraction(0.1).expect("valid jitter"))
                .expect("10 % of 300 s leaves a TTL"),
            fees_ttl: TtlPolicy::new(Ttl::seconds(300))
                .with_jitter(Jitter::fraction(0.1).expect("valid jitter"))
                .expect("10 % of 300 s leaves a TTL"),
            // 1 to 6 h, spread so that roles do not all expire together.
            role_ttl: TtlPolicy::between(Ttl::hours(1), Ttl::hours(6)).expect("1 h <= 6 h"),
        }
    }
}

/// The routes. Serve with `into_make_service_with_connect_info::<SocketAddr>()`: the login limit
/// is keyed by the peer address.
pub fn router(state: Arc<AppState>) -> Router {
    // Payments need an Idempotency-Key; retries replay the first response. The layer sits
    // inside authentication, so keys are scoped by the authenticated user.
    let idempotent = IdempotencyLayer::new(state.idempotency.clone())
        .route("POST", "/api/payments", IdempotentRoute::new(PAYMENTS))
        .expect("a valid route");
    let authenticated = Router::new()
        .route("/api/dashboard/{role}/{user_id}", get(dashboard))
        .route("/api/fees/summary/{student_id}", get(fee_summary))
        .route("/api/payments", post(record_payment).layer(idempotent))
        .route("/api/students/{id}", put(update_student))
        .route("/api/requests/{id}/approve", post(approve_request))
        .route("/api/notifications/count", get(unread_count))
        .route("/api/notifications/read", post(read_notifications))
        .route("/api/admin/audit", post(audit))
        .route("/api/auth/logout", post(logout))
        .route("/api/attendance/{class_id}/mark", post(mark_attendance))
        .route("/api/attendance/{class_id}/submit", post(submit_attendance))
        .route("/api/classes/{class_id}/heartbeat", post(heartbeat))
        .route("/api/classes/{class_id}/online", get(online))
        .route("/api/admin/switch", post(switch))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(authenticated)
        .route("/api/auth/login", post(login))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

impl AppState {
    /// Makes every `n`-th call of the roll-call sink fail (0: never), to show that a failed
    /// database write loses no mark.
    pub fn fail_roll_sink_every(&self, n: u64) {
        self.roll_sink_fail_every.store(n, Ordering::Relaxed);
    }

    /// Drops every cached copy of school data (dashboards, fee summaries, roles): the database
    /// was just created and seeded, so anything a shared Redis still holds from an earlier run
    /// is not a copy of it. Maintenance, run once at start; returns the entries removed.
    pub async fn forget_cached_copies(&self) -> speedlayer::Result<u64> {
        let scope = self.cache.namespace().global();
        let mut removed = 0;
        for domain in [&DASHBOARD, &FEES, &AUTH] {
            let pattern = scope.pattern(domain).any_entity().any_id().build()?;
            removed += self.cache.sweep(&pattern, u64::MAX).await?;
        }
        Ok(removed)
    }
}

// ---- keys, tags, events ------------------------------------------------------------------

fn role_key(ns: &Namespace, user_id: &str) -> Result<Key, KeyError> {
    ns.global().key(&AUTH, &ROLE, user_id)
}

fn fees_key(ns: &Namespace, student_id: i64) -> Result<Key, KeyError> {
    ns.global().key(&FEES, &SUMMARY, student_id)
}

fn shows_student(ns: &Namespace, student_id: i64) -> Result<Tag, KeyError> {
    ns.global().tag(&SHOWS_STUDENT, student_id)
}

/// The registry: every `dashboard:<role>:<userId>` carries the tag `user:<userId>`, so that
/// whatever changes a user's access drops all of their dashboards without listing roles.
pub fn registry(ns: &Namespace) -> InvalidationRegistry {
    let rule_ns = ns.clone();
    InvalidationRegistry::builder()
        .tag_rule(
            ns.global()
                .pattern(&DASHBOARD)
                .any_entity()
                .any_id()
                .build()
                .expect("a valid pattern"),
            move |key| rule_ns.global().tag(&USER, key.id()),
        )
        .build()
}

/// `POST /api/payments`: the fee summary, and the dashboards that show the student's fees.
pub struct PaymentRecorded {
    pub student_id: i64,
}

impl Invalidates for PaymentRecorded {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        t.key(fees_key(ns, self.student_id)?)
            .key(
                ns.global()
                    .key(&DASHBOARD, &Ident::from_static("admin"), "a1")?,
            )
            .tag(shows_student(ns, self.student_id)?);
        Ok(())
    }
}

/// `PUT /api/students/{id}`: the student's role (an inactive student loses access), every
/// dashboard of the student (the registry's user tag), the parent's dashboard, the teacher's
/// class roster, and the fee summary (it shows the name).
pub struct StudentProfileUpdated {
    pub student_id: i64,
    pub class_id: i64,
}

impl Invalidates for StudentProfileUpdated {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        let user = format!("s{}", self.student_id);
        t.key(role_key(ns, &user)?)
            .key(fees_key(ns, self.student_id)?)
            .tag(ns.global().tag(&USER, &user)?)
            .tag(shows_student(ns, self.student_id)?)
            .tag(ns.global().tag(&SHOWS_CLASS, self.class_id)?);
        Ok(())
    }
}

// ---- errors ------------------------------------------------------------------------------

/// A handler's failure, as a status and a short message (never a database error's text).
pub struct ApiError(StatusCode, &'static str);

/// The roll-call sink failed: the marks stay for the next submit, which is the retry.
const ROLL_DEFERRED: &str = "the database write failed; the marks are kept for the next submit";

impl IntoResponse for ApiError {
    /// A 503 says when to come back (`Retry-After: 1`): what answers 503 here is a service
    /// that fails closed while Redis is unusable (locks, scratch, revocations), and the breaker
    /// probes Redis again within its one-second cool-down. A deferred roll call is the
    /// exception: its next submit is the retry.
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE && self.1 != ROLL_DEFERRED {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

impl From<KeyError> for ApiError {
    fn from(_: KeyError) -> Self {
        ApiError(StatusCode::BAD_REQUEST, "invalid id")
    }
}

fn db_error(e: &sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "database error");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "database error")
}

// ---- middleware --------------------------------------------------------------------------

async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let response = next.run(request).await;
    match response.status() {
        StatusCode::TOO_MANY_REQUESTS => {
            state.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        s if s.is_server_error() => {
            state.metrics.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    response
}

/// A user id worth looking up: 1 to 64 bytes, no control characters.
fn plausible_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && !id.chars().any(char::is_control)
}

/// The caller, once authenticated.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user_id: String,
    pub role: RoleRecord,
}

impl AppState {
    /// A user's role, cache-first (`auth:role:{userId}`, 1-6 h; an unknown user for 60 s).
    async fn role_of(&self, user_id: &str) -> Result<Option<RoleRecord>, ApiError> {
        let key = role_key(self.cache.namespace(), user_id)?;
        self.metrics.cacheable_reads.fetch_add(1, Ordering::Relaxed);
        self.metrics.role_checks.fetch_add(1, Ordering::Relaxed);
        self.cache
            .get_or_set_optional(&key, self.role_ttl.clone(), Ttl::seconds(60), || async {
                self.metrics.cache_loads.fetch_add(1, Ordering::Relaxed);
                self.metrics.role_loads.fetch_add(1, Ordering::Relaxed);
                self.db.role(user_id).await
            })
            .await
            .map_err(|e| db_error(&e))
    }
}

async fn authenticate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let user_id = match &bearer {
        Some(token) => state.user_of_token(token).await?,
        None => headers
            .get("x-user-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| plausible_user_id(v))
            .ok_or(ApiError(StatusCode::UNAUTHORIZED, "missing X-User-Id"))?
            .to_owned(),
    };
    if let Some(token) = bearer {
        request.extensions_mut().insert(Bearer(token));
    }
    let role = state
        .role_of(&user_id)
        .await?
        .filter(|r| r.role != "suspended")
        .ok_or(ApiError(
            StatusCode::UNAUTHORIZED,
            "unknown or suspended user",
        ))?;
    request
        .extensions_mut()
        .insert(AuthenticatedUser(user_id.clone()));
    request.extensions_mut().insert(Caller { user_id, role });
    Ok(next.run(request).await)
}

// ---- reads -------------------------------------------------------------------------------

/// The dashboard of each role.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Dashboard {
    Student {
        profile: StudentProfile,
        attendance: Attendance,
        fees: FeeSummary,
    },
    Parent {
        child: StudentProfile,
        attendance: Attendance,
        fees: FeeSummary,
    },
    Teacher {
        class: ClassOverview,
    },
    Admin {
        totals: SchoolTotals,
    },
}

impl AppState {
    /// Students' profiles, `school:student:{id}`, read through the cache as one batch: one read
    /// for all of them and one database query for those not cached (a teacher's roster of 30, a
    /// parent's children). Each entry carries its student's tag, so a profile update drops it.
    async fn profiles(&self, ids: &[i64]) -> DbResult<HashMap<i64, StudentProfile>> {
        let ns = self.cache.namespace();
        let keys = ns
            .global()
            .keyspace(&SCHOOL, &STUDENT)
            .keys(ids.iter().copied())
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        let batch = self
            .cache
            .get_or_set_many_tagged(
                &keys,
                self.dashboard_ttl.clone(),
                Ttl::seconds(30),
                |id: &i64| shows_student(ns, *id).into_iter().collect(),
                |missing: Vec<i64>| async move {
                    self.metrics.batch_loads.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .batch_rows_loaded
                        .fetch_add(missing.len() as u64, Ordering::Relaxed);
                    self.db.students(&missing).await
                },
            )
            .await;
        self.metrics
            .batch_rows_read
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        batch
            .into_map()
            .map_err(|e| sqlx::Error::Protocol(format!("loading profiles failed: {e}")))
    }

    async fn student_view(
        &self,
        student_id: i64,
    ) -> DbResult<Option<(StudentProfile, Attendance, FeeSummary)>> {
        let Some(profile) = self.profiles(&[student_id]).await?.remove(&student_id) else {
            return Ok(None);
        };
        let attendance = self.db.attendance(student_id).await?;
        let Some(fees) = self.db.fee_summary(student_id).await? else {
            return Ok(None);
        };
        Ok(Some((profile, attendance, fees)))
    }

    async fn load_dashboard(&self, role: &RoleRecord) -> DbResult<Option<Dashboard>> {
        Ok(match role.role.as_str() {
            "student" => {
                self.student_view(role.ref_id)
                    .await?
                    .map(|(profile, attendance, fees)| Dashboard::Student {
                        profile,
                        attendance,
                        fees,
                    })
            }
            "parent" => self
                .student_view(role.ref_id)
                .await?
                .map(|(child, attendance, fees)| Dashboard::Parent {
                    child,
                    attendance,
                    fees,
                }),
            "teacher" => match self.db.class_of_teacher(role.ref_id).await? {
                Some(class) => {
                    let profiles = self.profiles(&class.student_ids).await?;
                    let roster = class
                        .student_ids
                        .iter()
                        .filter_map(|id| profiles.get(id))
                        .map(|p| RosterEntry {
                            student_id: p.id,
                            name: p.name.clone(),
                            version: p.version,
                        })
                        .collect();
                    Some(Dashboard::Teacher {
                        class: ClassOverview {
                            class_id: class.class_id,
                            class_name: class.class_name,
                            teacher_name: class.teacher_name,
                            roster,
                        },
                    })
                }
                None => None,
            },
            "admin" => Some(Dashboard::Admin {
                totals: self.db.totals().await?,
            }),
            _ => None,
        })
    }
}

/// `GET /api/dashboard/{role}/{userId}`: cache-first, `dashboard:{role}:{userId}`, 300 s.
async fn dashboard(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((role, user_id)): Path<(String, String)>,
) -> Result<Json<Dashboard>, ApiError> {
    // Users see their own dashboard; the admin sees anyone's.
    let target = if caller.user_id == user_id {
        caller.role.clone()
    } else if caller.role.role == "admin" {
        state
            .role_of(&user_id)
            .await?
            .ok_or(ApiError(StatusCode::NOT_FOUND, "no such user"))?
    } else {
        return Err(ApiError(StatusCode::FORBIDDEN, "not your dashboard"));
    };
    if target.role != role {
        return Err(ApiError(StatusCode::NOT_FOUND, "no such dashboard"));
    }
    let ns = state.cache.namespace();
    let role_ident = Ident::new(&role)?;
    let key = ns.global().key(&DASHBOARD, &role_ident, &user_id)?;
    let tags = match role.as_str() {
        "student" | "parent" => vec![shows_student(ns, target.ref_id)?],
        // A teacher's ref_id is the class they teach.
        "teacher" => vec![ns.global().tag(&SHOWS_CLASS, target.ref_id)?],
        _ => Vec::new(),
    };
    state
        .metrics
        .cacheable_reads
        .fetch_add(1, Ordering::Relaxed);
    let dashboard = state
        .cache
        .get_or_set_tagged(&key, state.dashboard_ttl.clone(), &tags, || async {
            state.metrics.cache_loads.fetch_add(1, Ordering::Relaxed);
            state.load_dashboard(&target).await
        })
        .await
        .map_err(|e| db_error(&e))?;
    dashboard
        .map(Json)
        .ok_or(ApiError(StatusCode::NOT_FOUND, "no such dashboard"))
}

/// `GET /api/fees/summary/{studentId}`: cache-first, `fees:summary:{studentId}`, 300 s. The
/// student, their parent and the admin may read it.
async fn fee_summary(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(student_id): Path<i64>,
) -> Result<Json<FeeSummary>, ApiError> {
    let allowed = match caller.role.role.as_str() {
        "admin" => true,
        "student" | "parent" => caller.role.ref_id == student_id,
        _ => false,
    };
    if !allowed {
        return Err(ApiError(StatusCode::FORBIDDEN, "not your student"));
    }
    let key = fees_key(state.cache.namespace(), student_id)?;
    state
        .metrics
        .cacheable_reads
        .fetch_add(1, Ordering::Relaxed);
    let summary = state
        .cache
        .get_or_set_optional(&key, state.fees_ttl.clone(), Ttl::seconds(30), || async {
            state.metrics.cache_loads.fetch_add(1, Ordering::Relaxed);
            state.db.fee_summary(student_id).await
        })
        .await
        .map_err(|e| db_error(&e))?;
    summary
        .map(Json)
        .ok_or(ApiError(StatusCode::NOT_FOUND, "no such student"))
}

// ---- writes ------------------------------------------------------------------------------

#[derive(Debug, Deserialize, Serialize)]
pub struct NewPayment {
    pub student_id: i64,
    pub amount_cents: i64,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct PaymentReceipt {
    pub student_id: i64,
    pub paid_cents: i64,
}

/// `POST /api/payments` (admin): the database first, then the invalidation.
async fn record_payment(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Json(payment): Json<NewPayment>,
) -> Result<Json<PaymentReceipt>, ApiError> {
    require_admin(&caller, "only the bursar records payments")?;
    if !(1..=100_000_000).contains(&payment.amount_cents) {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount out of range",
        ));
    }
    state.metrics.writes.fetch_add(1, Ordering::Relaxed);
    // The idempotency layer admitted this request only with a valid key.
    let request_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let paid = state
        .db
        .record_payment(payment.student_id, payment.amount_cents, request_key)
        .await
        .map_err(|e| db_error(&e))?
        .ok_or(ApiError(StatusCode::NOT_FOUND, "no such student"))?;
    invalidate(
        &state,
        &PaymentRecorded {
            student_id: payment.student_id,
        },
    )
    .await;
    state
        .notify(
            &format!("p{}", payment.student_id),
            &format!("payment of {} cents received", payment.amount_cents),
        )
        .await?;
    Ok(Json(PaymentReceipt {
        student_id: payment.student_id,
        paid_cents: paid,
    }))
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ProfileReceipt {
    pub student_id: i64,
    pub version: i64,
}

/// `PUT /api/students/{id}` (the student or the admin): the database first, then the
/// invalidation.
async fn update_student(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(student_id): Path<i64>,
    Json(update): Json<ProfileUpdate>,
) -> Result<Json<ProfileReceipt>, ApiError> {
    let allowed = caller.role.role == "admin"
        || (caller.role.role == "student" && caller.role.ref_id == student_id);
    if !allowed {
        return Err(ApiError(StatusCode::FORBIDDEN, "not your profile"));
    }
    if !update.active && caller.role.role != "admin" {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "only the admin suspends a student",
        ));
    }
    let printable = |text: &str| !text.chars().any(char::is_control);
    if update.name.trim().is_empty()
        || update.name.len() > 200
        || update.phone.len() > 40
        || !printable(&update.name)
        || !printable(&update.phone)
    {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid name or phone",
        ));
    }
    state.metrics.writes.fetch_add(1, Ordering::Relaxed);
    let updated = state
        .db
        .update_student(student_id, &update)
        .await
        .map_err(|e| db_error(&e))?
        .ok_or(ApiError(StatusCode::NOT_FOUND, "no such student"))?;
    invalidate(
        &state,
        &StudentProfileUpdated {
            student_id,
            class_id: updated.class_id,
        },
    )
    .await;
    Ok(Json(ProfileReceipt {
        student_id,
        version: updated.version,
    }))
}

/// Runs an invalidation after a committed write. The write stands either way, so the request
/// succeeds either way: an invalidation the backend cannot take now is queued by speedlayer and
/// applied before it serves reads again, and one that fails outright (a malformed event, a tag
/// index another client overwrote) is logged for the operators rather than turned into an error
/// a client would retry, writing twice.
async fn invalidate<E: Invalidates>(state: &AppState, event: &E) {
    match state.cache.invalidate(event).await {
        Ok(report) if report.deferred => settle(state).await,
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "invalidation after a committed write failed");
            state
                .metrics
                .invalidation_failures
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A write whose invalidation Redis could not take answers once it is applied (up to 3 s): this
/// process never serves the old value meanwhile, but another instance could until it notices the
/// outage (its invalidation channel closing, at once when Redis stops), so the client is told
/// the write is done only when every instance would see it.
async fn settle(state: &AppState) {
    state
        .metrics
        .invalidations_waited
        .fetch_add(1, Ordering::Relaxed);
    if !state
        .cache
        .flush_invalidations(Duration::from_secs(3))
        .await
    {
        tracing::warn!(
            "a write answers before its invalidation was applied (Redis still unusable)"
        );
        state
            .metrics
            .invalidations_unsettled
            .fetch_add(1, Ordering::Relaxed);
    }
}

// ---- login -------------------------------------------------------------------------------

#[derive(Debug, Deserialize, Serialize)]
pub struct Login {
    pub user_id: String,
    pub password: String,
}

/// `POST /api/auth/login`: limited per client address (`rate:ip:<address>:{auth-login}`,
/// 10 per minute, sliding log), checked against the database, never cached.
async fn login(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(login): Json<Login>,
) -> Response {
    let verdict = state
        .limiter
        .check(&state.login, &Identity::ip(peer.ip().to_string()))
        .await;
    let mut headers = HeaderMap::new();
    for (name, value) in verdict.headers("login") {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(name, value);
        }
    }
    if !verdict.allowed {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            headers,
            Json(serde_json::json!({ "error": "too many login attempts" })),
        )
            .into_response();
    }
    let refused = |headers| {
        (
            StatusCode::UNAUTHORIZED,
            headers,
            Json(serde_json::json!({ "error": "wrong user or password" })),
        )
            .into_response()
    };
    if !plausible_user_id(&login.user_id) {
        return refused(headers);
    }
    match state
        .db
        .check_password(&login.user_id, &login.password)
        .await
    {
        Ok(true) => {
            let token = format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            );
            let expires_ms = unix_ms(std::time::SystemTime::now() + SESSION_LIFETIME);
            if let Err(e) = state
                .db
                .create_session(&token_hash(&token), &login.user_id, expires_ms)
                .await
            {
                return db_error(&e).into_response();
            }
            state
                .metrics
                .sessions_created
                .fetch_add(1, Ordering::Relaxed);
            (
                headers,
                Json(serde_json::json!({ "token": token, "user_id": login.user_id })),
            )
                .into_response()
        }
        Ok(false) => refused(headers),
        Err(e) => db_error(&e).into_response(),
    }
}

// ---- coordination: approvals under a fenced lock, unread-notification badges --------------

fn badge_key(ns: &Namespace, user_id: &str) -> Result<Key, KeyError> {
    ns.global().key(&NOTIFICATIONS, &COUNT, user_id)
}

impl AppState {
    /// Writes a notification (the fact) and counts it in the user's badge (the convenience):
    /// the update is marked before the write and added after it, so that a badge recount racing
    /// the write neither misses nor doubles it. A missing badge is recounted on its next read.
    async fn notify(&self, user_id: &str, body: &str) -> Result<(), ApiError> {
        let key = badge_key(self.cache.namespace(), user_id)?;
        let ((), _counted) = self
            .counters
            .update(&key, 1, BADGE_TTL, || self.db.notify(user_id, body))
            .await
            .map_err(|e| db_error(&e))?;
        self.metrics.notifications.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// `403 Forbidden` (saying `why`) unless the caller is the admin.
fn require_admin(caller: &Caller, why: &'static str) -> Result<(), ApiError> {
    if caller.role.role != "admin" {
        return Err(ApiError(StatusCode::FORBIDDEN, why));
    }
    Ok(())
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Approval {
    pub request_id: i64,
    /// This call approved it (false: it was approved already).
    pub approved: bool,
    /// The fencing token the approval was written with.
    pub fence: u64,
}

/// `POST /api/requests/{id}/approve` (admin): under the request's lock, with its fencing token
/// checked by the database; the student is notified.
async fn approve_request(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
) -> Result<Json<Approval>, ApiError> {
    require_admin(&caller, "only the admin approves")?;
    let name = state.locks.name(&REQUEST, id)?;
    // A second admin clicking meanwhile is told at once, not queued behind the first.
    let guard = match state.locks.acquire(&name, APPROVAL_LEASE).await {
        Acquire::Acquired(guard) => guard,
        Acquire::Contended { .. } => {
            state
                .metrics
                .lock_contention
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError(
                StatusCode::CONFLICT,
                "another admin is approving this request",
            ));
        }
        Acquire::Unavailable => {
            state
                .metrics
                .lock_unavailable
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "approvals are paused: the lock service is unusable",
            ));
        }
    };
    let fence = guard.token().get();
    state.metrics.writes.fetch_add(1, Ordering::Relaxed);
    let student = state
        .db
        .approve_request(id, &caller.user_id, fence)
        .await
        .map_err(|e| db_error(&e))?;
    if let Some(student) = student {
        state
            .notify(&format!("s{student}"), &format!("request {id} approved"))
            .await?;
    }
    let _ = guard.release().await;
    Ok(Json(Approval {
        request_id: id,
        approved: student.is_some(),
        fence,
    }))
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Badge {
    pub unread: i64,
}

/// `GET /api/notifications/count`: the caller's unread notifications, from the counter
/// (recounted from the database when it is missing).
async fn unread_count(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Badge>, ApiError> {
    let key = badge_key(state.cache.namespace(), &caller.user_id)?;
    let unread = state
        .counters
        .get(&key, BADGE_TTL, || {
            state.db.unread_notifications(&caller.user_id)
        })
        .await
        .map_err(|e| db_error(&e))?;
    Ok(Json(Badge { unread }))
}

/// `POST /api/notifications/read`: marks the caller's notifications read (the database first),
/// then drops the badge (recounted on its next read).
async fn read_notifications(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Badge>, ApiError> {
    state.metrics.writes.fetch_add(1, Ordering::Relaxed);
    state
        .db
        .read_notifications(&caller.user_id)
        .await
        .map_err(|e| db_error(&e))?;
    let key = badge_key(state.cache.namespace(), &caller.user_id)?;
    match state.cache.store().invalidate(&[key], &[]).await {
        Ok(done) if done.deferred => settle(&state).await,
        Ok(_) => {}
        Err(_) => {
            state
                .metrics
                .invalidation_failures
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(Json(Badge { unread: 0 }))
}

#[derive(Debug, Deserialize, Serialize)]
pub struct AuditRequest {
    /// Users whose badges to check against the database.
    pub users: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Audit {
    /// Payments recorded more than once under one Idempotency-Key.
    pub duplicate_payments: i64,
    /// Requests approved.
    pub approved_requests: i64,
    /// Badges checked.
    pub counters_checked: u64,
    /// Badges that held another figure than the database's (each is repaired).
    pub counters_drifted: u64,
    /// Roll call, after the end-of-day flush: marks applied, students marked, students marked
    /// more than once, and classes whose marks could not be flushed.
    pub roll_marks_applied: i64,
    pub roll_students_marked: i64,
    pub roll_students_doubled: i64,
    pub roll_classes_unflushed: u64,
}

/// `POST /api/admin/audit` (admin): the facts the workload checks at the end. Reconciles the
/// listed users' badges with the database and says how many had drifted.
async fn audit(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<AuditRequest>,
) -> Result<Json<Audit>, ApiError> {
    require_admin(&caller, "only the admin audits")?;
    let mut audit = Audit {
        duplicate_payments: state
            .db
            .duplicate_payments()
            .await
            .map_err(|e| db_error(&e))?,
        approved_requests: state
            .db
            .approved_requests()
            .await
            .map_err(|e| db_error(&e))?,
        ..Audit::default()
    };
    // The scheduled end-of-day flush, then what the database holds.
    audit.roll_classes_unflushed = state.end_of_day_flush().await as u64;
    let (applied, marked, doubled) = state.db.roll_audit().await.map_err(|e| db_error(&e))?;
    audit.roll_marks_applied = applied;
    audit.roll_students_marked = marked;
    audit.roll_students_doubled = doubled;
    for user in request
        .users
        .iter()
        .filter(|u| plausible_user_id(u))
        .take(10_000)
    {
        let key = badge_key(state.cache.namespace(), user)?;
        let reconciled = state
            .counters
            .reconcile(&key, BADGE_TTL, || state.db.unread_notifications(user))
            .await
            .map_err(|e| db_error(&e))?;
        audit.counters_checked += 1;
        if reconciled.drifted() {
            audit.counters_drifted += 1;
        }
    }
    Ok(Json(audit))
}

// ---- sessions, roll call, presence, switches ---------------------------------------------

/// The bearer token of an authenticated request, when it came with one.
#[derive(Clone)]
struct Bearer(String);

fn token_hash(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl AppState {
    /// The user of a bearer token: refused when the token was revoked (logged out), else read
    /// through the session index; the database answers when the index is unknown (Redis
    /// unusable).
    async fn user_of_token(&self, token: &str) -> Result<String, ApiError> {
        let hash = token_hash(token);
        if !self.revocations.allows(&hash).await {
            self.metrics
                .revoked_tokens_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError(StatusCode::UNAUTHORIZED, "token revoked"));
        }
        let from_db = || async {
            Ok::<_, sqlx::Error>(self.db.session(&hash).await?.map(|(user_id, expires_ms)| {
                SessionRecord {
                    user_id,
                    expires_at: std::time::UNIX_EPOCH
                        + Duration::from_millis(expires_ms.max(0) as u64),
                    data: (),
                }
            }))
        };
        let found = self
            .sessions
            .get(token, from_db)
            .await
            .map_err(|_| ApiError(StatusCode::SERVICE_UNAVAILABLE, "sessions unavailable"))?;
        let record = match found {
            SessionLookup::Present(record) => Some(record),
            SessionLookup::Absent => None,
            // The index cannot be read: the database is the authority.
            SessionLookup::Unknown => from_db()
                .await
                .map_err(|e| db_error(&e))?
                .filter(|r| r.expires_at > std::time::SystemTime::now()),
        };
        record
            .map(|r| r.user_id)
            .ok_or(ApiError(StatusCode::UNAUTHORIZED, "no such session"))
    }
}

/// `POST /api/auth/logout` (bearer): ends the session in the database, drops its copy in the
/// session index, and revokes the token on every instance until it would have expired.
async fn logout(
    State(state): State<Arc<AppState>>,
    bearer: Option<Extension<Bearer>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(Extension(Bearer(token))) = bearer else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "log out with the bearer token",
        ));
    };
    let hash = token_hash(&token);
    let expires = state
        .db
        .session(&hash)
        .await
        .map_err(|e| db_error(&e))?
        .map_or(
            std::time::SystemTime::now() + SESSION_LIFETIME,
            |(_, ms)| std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
        );
    state
        .db
        .delete_session(&hash)
        .await
        .map_err(|e| db_error(&e))?;
    let _ = state.sessions.revoke(&token).await;
    state
        .revocations
        .revoke(&hash, expires)
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "logout not recorded; retry",
            )
        })?;
    state.metrics.sessions_ended.fetch_add(1, Ordering::Relaxed);
    Ok(Json(serde_json::json!({ "logged_out": true })))
}

#[derive(Debug, Deserialize, Serialize)]
pub struct RollMark {
    pub student_id: i64,
    pub status: String,
}

fn roll_key(ns: &Namespace, class_id: i64) -> Result<Key, KeyError> {
    ns.global()
        .key(&ATTENDANCE, &CLASS, class_id)?
        .with_context(TODAY)
}

fn require_teacher_of(caller: &Caller, class_id: i64) -> Result<(), ApiError> {
    // A teacher's ref_id is the class they teach.
    if caller.role.role == "teacher" && caller.role.ref_id == class_id {
        Ok(())
    } else {
        Err(ApiError(StatusCode::FORBIDDEN, "not your class"))
    }
}

/// `POST /api/attendance/{classId}/mark` (the class teacher): one mark into the day's scratch
/// hash, `attendance:class:{classId}:{day}`, written field by field by every teacher and server.
async fn mark_attendance(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(class_id): Path<i64>,
    Json(mark): Json<RollMark>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_teacher_of(&caller, class_id)?;
    if !matches!(mark.status.as_str(), "present" | "absent" | "late") {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "status: present, absent or late",
        ));
    }
    let key = roll_key(state.cache.namespace(), class_id)?;
    state
        .scratch
        .hash(key)
        .mark(&mark.student_id.to_string(), &mark.status)
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "marks cannot be kept now; retry",
            )
        })?;
    state
        .marked_classes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(class_id);
    state.metrics.roll_marks.fetch_add(1, Ordering::Relaxed);
    Ok(Json(serde_json::json!({ "marked": true })))
}

/// The roll call's sink: one database transaction per batch, applied at most once per batch id.
/// Every n-th call fails on purpose when the state says so.
struct RollSink<'a> {
    state: &'a AppState,
    class_id: i64,
}

impl Sink for RollSink<'_> {
    type Error = std::io::Error;

    async fn write(&self, batch: &FlushBatch) -> Result<(), std::io::Error> {
        let m = &self.state.metrics;
        let call = m.roll_sink_calls.fetch_add(1, Ordering::Relaxed) + 1;
        let every = self.state.roll_sink_fail_every.load(Ordering::Relaxed);
        if every > 0 && call.is_multiple_of(every) {
            m.roll_sink_failures.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::other(
                "the roll-call write failed (on purpose)",
            ));
        }
        let marks: Vec<(i64, String)> = batch
            .fields
            .iter()
            .filter_map(|(student, status)| Some((student.parse().ok()?, status.clone())))
            .collect();
        let applied = self
            .state
            .db
            .apply_roll_batch(&batch.id, self.class_id, &marks)
            .await
            .map_err(std::io::Error::other)?;
        if applied {
            m.roll_batches_applied.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl AppState {
    /// Flushes one class's roll call to the database.
    async fn flush_roll(&self, class_id: i64) -> Result<speedlayer::scratch::Flushed, ApiError> {
        let key = roll_key(self.cache.namespace(), class_id)?;
        let sink = RollSink {
            state: self,
            class_id,
        };
        match self.scratch.hash(key).flush(&sink).await {
            Ok(flushed) => Ok(flushed),
            Err(FlushError::Sink(_)) => {
                Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, ROLL_DEFERRED))
            }
            Err(FlushError::Store(_)) => Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the marks cannot be reached now; retry",
            )),
        }
    }

    /// The end-of-day flush: every class with marks, retried through failed database writes
    /// (bounded). Returns the classes that still hold marks.
    pub async fn end_of_day_flush(&self) -> usize {
        let classes: Vec<i64> = self
            .marked_classes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        let mut left = 0;
        for class_id in classes {
            let mut done = false;
            // Busy: another flusher's claim, possibly one a Redis restart cut off, which lasts
            // 3 s at most.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                match self.flush_roll(class_id).await {
                    Ok(flushed) if !flushed.busy => {
                        done = true;
                        break;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            if !done {
                left += 1;
            }
        }
        left
    }
}

/// `POST /api/attendance/{classId}/submit` (the class teacher): the day's marks to the database.
/// 503 when the database write failed: the marks stay in Redis for the next submit or the
/// end-of-day flush.
async fn submit_attendance(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(class_id): Path<i64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_teacher_of(&caller, class_id)?;
    let flushed = state.flush_roll(class_id).await?;
    Ok(Json(serde_json::json!({
        "batches": flushed.batches,
        "marks": flushed.fields,
        "busy": flushed.busy,
    })))
}

/// `POST /api/classes/{classId}/heartbeat`: the caller is in the class's room for 30 s.
async fn heartbeat(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(class_id): Path<i64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .presence
        .heartbeat(
            &format!("class-{class_id}"),
            &caller.user_id,
            Ttl::seconds(30),
        )
        .await
        .map_err(|_| ApiError(StatusCode::SERVICE_UNAVAILABLE, "presence unavailable"))?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

#[derive(Debug, Deserialize)]
pub struct OnlineQuery {
    /// The list the client already shows (comma-separated): wait until it changes.
    #[serde(default)]
    pub known: String,
    /// How long to wait for a change, at most 2000 ms.
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Online {
    pub online: Vec<String>,
}

/// `GET /api/classes/{classId}/online?known=..&wait_ms=..`: who is in the class's room, as a
/// long poll: answers once the list differs from `known`, or after `wait_ms`.
async fn online(
    State(state): State<Arc<AppState>>,
    Path(class_id): Path<i64>,
    axum::extract::Query(query): axum::extract::Query<OnlineQuery>,
) -> Result<Json<Online>, ApiError> {
    let room = format!("class-{class_id}");
    let until = tokio::time::Instant::now() + Duration::from_millis(query.wait_ms.min(2_000));
    loop {
        let mut online = state
            .presence
            .online(&room)
            .await
            .map_err(|_| ApiError(StatusCode::SERVICE_UNAVAILABLE, "presence unavailable"))?;
        online.sort();
        if online.join(",") != query.known || tokio::time::Instant::now() >= until {
            return Ok(Json(Online { online }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, Deserialize, Serialize)]
pub struct SwitchRequest {
    pub capability: String,
    pub on: bool,
}

/// `POST /api/admin/switch` (admin): flips a speedlayer capability on or off at run time.
async fn switch(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<SwitchRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_admin(&caller, "only the admin flips switches")?;
    let capability = Capability::parse(&request.capability)
        .map_err(|_| ApiError(StatusCode::UNPROCESSABLE_ENTITY, "unknown capability"))?;
    state.cache.switches().set(capability, request.on);
    Ok(Json(
        serde_json::json!({ "capability": capability.name(), "on": request.on }),
    ))
}

// ---- metrics -----------------------------------------------------------------------------

/// `GET /metrics`: Prometheus text format, rendered by the exporter from the `metrics` facade:
/// speedlayer's series (see `speedlayer::telemetry`) and the service's own.
async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let s = state.cache.stats();
    metrics::gauge!("speedlayer_cache_connected").set(if s.connected { 1.0 } else { 0.0 });
    metrics::counter!("school_erp_db_queries_total").absolute(state.db.queries());
    let idem = state.idempotency.stats();
    metrics::counter!("speedlayer_idempotency_replays_total").absolute(idem.replays);
    metrics::counter!("speedlayer_idempotency_in_progress_total").absolute(idem.in_progress);
    metrics::counter!("speedlayer_idempotency_mismatches_total").absolute(idem.mismatches);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        prometheus().render(),
    )
}

// ---- running it --------------------------------------------------------------------------

/// A running service.
pub struct Service {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves the routes over `state` on `addr` (port 0 picks a free port).
pub async fn start(state: Arc<AppState>, addr: SocketAddr) -> std::io::Result<Service> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop.await;
            })
            .await
    });
    Ok(Service {
        addr,
        state,
        shutdown,
        task,
    })
}

impl Service {
    /// Stops accepting, lets requests in flight finish, and closes the database.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(());
        let served = self
            .task
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        self.state.db.close().await;
        served
    }
}
