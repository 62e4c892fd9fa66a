//! Idempotency keys: exactly-once effects for retried requests (payments, admin POSTs), with the
//! semantics of the IETF HTTPAPI `Idempotency-Key` draft and Stripe's practice where the draft is
//! silent.
//!
//! - A key (1 to 255 visible ASCII characters) is scoped by tenant ([`Idempotency::in_scope`]),
//!   route and client, and bound to a [`Fingerprint`] of the request (method, path with its
//!   query, body digest).
//! - The first request with a key writes an in-progress record with a lease (one round trip),
//!   runs, and then stores its response (status, chosen headers, body up to a size) for the
//!   retention time (24 h by default).
//! - A retry after completion gets the stored response, errors included, marked
//!   `Idempotent-Replayed: true`. A retry while the first is in progress gets `409 Conflict`. The
//!   same key with another fingerprint gets `422 Unprocessable Content`. A route that requires a
//!   key answers `400 Bad Request` without one.
//! - A run that crashes or is cancelled mid-way leaves its in-progress record, which expires with
//!   its lease (60 s by default); a retry after that runs. (Releasing it earlier could run the
//!   effect twice when the first run had committed it before it stopped.)
//! - A response body larger than the configured maximum is not stored: the record keeps the
//!   status and headers, and a retry gets them with an empty body and
//!   `Idempotent-Body-Omitted: true` (the effect happened once; the client fetches the resource
//!   if it needs the body).
//! - Redis unusable: each route chooses ([`OnOutage`]) between running without the guarantee
//!   (logged and counted) and refusing with `503` and `Retry-After`. The memory fallback never
//!   answers: a record only one process can see guards nothing.
//! - Redis unusable when a run completes: the response is kept in memory and stored as soon as
//!   Redis takes it, within the lease ([`Pending::complete`]); retries get `409` until then, and
//!   the replay after.
//!
//! [`Idempotency`] is the framework-free API; [`layer`] (feature `axum`) is a tower layer.
//!
//! ```
//! use speedlayer::idempotency::{Begin, Fingerprint, Idempotency, IdempotencyKey, StoredResponse};
//! use speedlayer::key::Ident;
//! use speedlayer::Cache;
//!
//! const PAYMENTS: Ident = Ident::from_static("payments");
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let idempotency = Idempotency::new(&Cache::memory());
//! let key = IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
//! let body = br#"{"student":7,"amount_cents":12500}"#;
//! let fingerprint = Fingerprint::of("POST", "/api/payments", body);
//! match idempotency.begin(&PAYMENTS, "parent-31", &key, &fingerprint).await? {
//!     Begin::Run(pending) => {
//!         // INSERT INTO payments ...
//!         let response = StoredResponse::new(201, br#"{"payment":991}"#.to_vec());
//!         pending.complete(&response).await?;
//!     }
//!     Begin::Replay(stored) => assert_eq!(stored.status, 201),
//!     Begin::InProgress => { /* 409 */ }
//!     Begin::Mismatch => { /* 422 */ }
//!     Begin::Unavailable => { /* the route's outage rule */ }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Cache;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Ident, Key, Scope};
use crate::store::{Answered, OutageRule, Store};
use crate::ttl::Ttl;

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod layer;
pub mod script;

use script::{Began, BeginOp, CompleteOp};

const IDEM: Ident = Ident::from_static("idem");

/// The request header that carries the key.
pub const KEY_HEADER: &str = "Idempotency-Key";
/// The response header that marks a replayed response.
pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";
/// The response header that marks a replay whose body was too large to be stored.
pub const BODY_OMITTED_HEADER: &str = "Idempotent-Body-Omitted";
/// The longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// Default lease of an in-progress record: a run that crashed is retried after it.
pub const DEFAULT_LEASE: Ttl = Ttl::seconds(60);
/// Default retention of a completed record: retries within it get the stored response.
pub const DEFAULT_RETENTION: Ttl = Ttl::hours(24);
/// Default largest response body stored: 64 KiB.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// Why an idempotency key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyRefused {
    /// Empty, longer than [`MAX_KEY_LEN`], or with characters other than visible ASCII.
    #[error("an Idempotency-Key is 1 to 255 visible ASCII characters (a UUID is the usual choice)")]
    Invalid,
}

/// A validated idempotency key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Validates a key as a client sent it (the draft's structured-field string: surrounding
    /// double quotes are removed).
    pub fn parse(text: &str) -> Result<IdempotencyKey, KeyRefused> {
        let text = text.trim();
        let text = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text);
        if text.is_empty()
            || text.len() > MAX_KEY_LEN
            || !text.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(KeyRefused::Invalid);
        }
        Ok(IdempotencyKey(text.to_owned()))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.0)
    }
}

/// What a request is, for telling a retry from another request under the same key: SHA-256 of
/// the method, the path (with its query) and the body.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of a request; `path` with its query (`/api/export?format=csv`).
    pub fn of(method: &str, path: &str, body: &[u8]) -> Fingerprint {
        let mut hash = Sha256::new();
        hash.update(method.to_ascii_uppercase().as_bytes());
        hash.update([0]);
        hash.update(path.as_bytes());
        hash.update([0]);
        hash.update(body);
        Fingerprint(format!("{:x}", hash.finalize()))
    }

    /// The fingerprint as lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A response as stored for replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The HTTP status.
    pub status: u16,
    /// The header fields kept (by default `content-type` and `location`).
    pub headers: Vec<(String, String)>,
    /// The body (empty when it was too large to store).
    pub body: Bytes,
    /// The body was larger than the maximum and was not stored.
    pub body_omitted: bool,
}

impl StoredResponse {
    /// A response of `status` with `body` and no header fields.
    pub fn new(status: u16, body: impl Into<Bytes>) -> StoredResponse {
        StoredResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
            body_omitted: false,
        }
    }

    /// Adds a header field to keep.
    #[must_use]
    pub fn with_header(mut self, name: &str, value: &str) -> StoredResponse {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }
}

/// The record in Redis: JSON, readable by any client. Written from borrowed parts (the response
/// body is not copied to be serialized), read into owned ones.
#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Record<'a> {
    InProgress {
        key: Cow<'a, str>,
        fingerprint: Cow<'a, Fingerprint>,
        token: String,
    },
    Completed {
        key: Cow<'a, str>,
        fingerprint: Cow<'a, Fingerprint>,
        status: u16,
        headers: Cow<'a, [(String, String)]>,
        /// UTF-8 text as it is; other bytes in base64 (`body_base64`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<Cow<'a, str>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body_base64: Option<String>,
        #[serde(default)]
        body_omitted: bool,
    },
}

/// The answer of [`Idempotency::begin`].
#[derive(Debug)]
#[must_use]
pub enum Begin {
    /// First run under this key: run the request, then [`Pending::complete`] with its response.
    Run(Pending),
    /// Already completed: answer with this response, marked [`REPLAYED_HEADER`].
    Replay(StoredResponse),
    /// Another run under this key is in progress: `409 Conflict`.
    InProgress,
    /// The key was used with another request (another fingerprint): `422 Unprocessable Content`.
    Mismatch,
    /// The backend is unusable: the route's [`OnOutage`] rule decides.
    Unavailable,
}

/// What a route does while the backend is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOutage {
    /// Refuse with `503 Service Unavailable` and `Retry-After` (the safe default for payments).
    #[default]
    Refuse,
    /// Run the request without the guarantee (a retry may run it again), logged and counted.
    Proceed,
}

/// Counters of an [`Idempotency`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyStats {
    /// First runs.
    pub runs: u64,
    /// Completed responses replayed.
    pub replays: u64,
    /// Retries refused while the first run was in progress (409).
    pub in_progress: u64,
    /// Keys reused with another request (422).
    pub mismatches: u64,
    /// Requests that found the backend unusable.
    pub unavailable: u64,
    /// Runs whose response could not be stored (the backend was unusable, or the run outlived
    /// its lease and another run had started): a retry may run again.
    pub incomplete: u64,
}

#[derive(Default)]
struct Counters {
    runs: AtomicU64,
    replays: AtomicU64,
    in_progress: AtomicU64,
    mismatches: AtomicU64,
    unavailable: AtomicU64,
    incomplete: AtomicU64,
}

/// Idempotency records on the cache's store. Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    store: Store,
    scope: Scope,
    lease: Ttl,
    retention: Ttl,
    max_body: usize,
    counters: Arc<Counters>,
}

impl Idempotency {
    /// Records on the cache's store, in its namespace (no tenant), with the default lease (60 s),
    /// retention (24 h) and largest stored body (64 KiB).
    pub fn new(cache: &Cache) -> Idempotency {
        Idempotency::from_store(cache.store(), &cache.namespace().global())
    }

    /// Records on `store`, scoped by `scope`.
    pub fn from_store(store: &Store, scope: &Scope) -> Idempotency {
        Idempotency {
            store: store.clone(),
            scope: scope.clone(),
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
            max_body: DEFAULT_MAX_BODY,
            counters: Arc::new(Counters::default()),
        }
    }

    /// Records scoped by `scope` (a tenant's scope keeps one tenant's keys apart from another's).
    #[must_use]
    pub fn in_scope(mut self, scope: &Scope) -> Idempotency {
        self.scope = scope.clone();
        self
    }

    /// How long an in-progress record guards its key (default 60 s): longer than the slowest
    /// request, shorter than a client's patience.
    #[must_use]
    pub fn lease(mut self, lease: Ttl) -> Idempotency {
        self.lease = lease;
        self
    }

    /// How long a completed response is replayed (default 24 h): the expiry to publish to
    /// clients.
    #[must_use]
    pub fn retention(mut self, retention: Ttl) -> Idempotency {
        self.retention = retention;
        self
    }

    /// The largest response body stored (default 64 KiB).
    #[must_use]
    pub fn max_body_bytes(mut self, bytes: usize) -> Idempotency {
        self.max_body = bytes;
        self
    }

    /// The configured retention.
    pub fn get_retention(&self) -> Ttl {
        self.retention
    }

    /// The largest response body stored.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// The store's breaker cool-down, for `Retry-After` on a refusal.
    pub fn retry_after(&self) -> std::time::Duration {
        self.store.cool_down()
    }

    /// Counters.
    pub fn stats(&self) -> IdempotencyStats {
        let c = &self.counters;
        IdempotencyStats {
            runs: c.runs.load(Ordering::Relaxed),
            replays: c.replays.load(Ordering::Relaxed),
            in_progress: c.in_progress.load(Ordering::Relaxed),
            mismatches: c.mismatches.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            incomplete: c.incomplete.load(Ordering::Relaxed),
        }
    }

    /// The record key: `idem:<route>:<client>:<SHA-256 of the key>` in this scope (the key is
    /// hashed so that any key fits; the record keeps it as sent).
    fn record_key(&self, route: &Ident, client: &str, key: &IdempotencyKey) -> Result<Key> {
        let client = if client.is_empty() {
            "anonymous"
        } else {
            client
        };
        let digest = crate::key::sha256_hex(key.as_str().as_bytes(), 32);
        Ok(self
            .scope
            .keyspace(&IDEM, route)
            .key_str(client)
            .and_then(|k| k.with_context(digest))?)
    }

    /// Starts the request `fingerprint` under `key` for `client` on `route`, or says what to
    /// answer instead. One round trip. Errors only when the client id cannot form a key (longer
    /// than keys allow).
    pub async fn begin(
        &self,
        route: &Ident,
        client: &str,
        key: &IdempotencyKey,
        fingerprint: &Fingerprint,
    ) -> Result<Begin> {
        let record_key = self.record_key(route, client, key)?;
        if !self.store.is_on(crate::switch::Capability::Idempotency) {
            // Switched off: the route's outage rule decides.
            return Ok(Begin::Unavailable);
        }
        let in_progress = Bytes::from(
            serde_json::to_vec(&Record::InProgress {
                key: Cow::Borrowed(key.as_str()),
                fingerprint: Cow::Borrowed(fingerprint),
                token: format!("{:016x}", rand::random::<u64>()),
            })
            .map_err(|e| Error::new(ErrorKind::Serialize, e.to_string()))?,
        );
        let op = BeginOp {
            key: &record_key,
            in_progress: &in_progress,
            lease: self.lease,
        };
        let c = &self.counters;
        let began = match self.store.run(&op, OutageRule::FailClosed).await {
            Ok(Answered::Backend(began)) => began,
            Ok(_) => {
                c.unavailable.fetch_add(1, Ordering::Relaxed);
                return Ok(Begin::Unavailable);
            }
            Err(e) => {
                tracing::warn!(key = %record_key, error = %e, "idempotency record refused by the backend");
                c.unavailable.fetch_add(1, Ordering::Relaxed);
                return Ok(Begin::Unavailable);
            }
        };
        let found = match began {
            Began::Started => {
                c.runs.fetch_add(1, Ordering::Relaxed);
                return Ok(Begin::Run(Pending {
                    idempotency: self.clone(),
                    record_key,
                    in_progress,
                    key: key.clone(),
                    fingerprint: fingerprint.clone(),
                    lease_ends: tokio::time::Instant::now() + self.lease.as_duration(),
                }));
            }
            Began::Found(found) => found,
        };
        let answer = match serde_json::from_slice::<Record>(&found) {
            Ok(Record::InProgress { fingerprint: f, .. }) if *f == *fingerprint => {
                Begin::InProgress
            }
            Ok(Record::Completed {
                fingerprint: f,
                status,
                headers,
                body,
                body_base64,
                body_omitted,
                ..
            }) if *f == *fingerprint => {
                let body = match (body, body_base64) {
                    (Some(text), _) => Bytes::from(text.into_owned()),
                    (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map(Bytes::from)
                        .unwrap_or_default(),
                    (None, None) => Bytes::new(),
                };
                Begin::Replay(StoredResponse {
                    status,
                    headers: headers.into_owned(),
                    body,
                    body_omitted,
                })
            }
            Ok(_) => Begin::Mismatch,
            // Another client's value under the record key: it guards nothing; refuse rather
            // than run twice.
            Err(_) => {
                tracing::warn!(key = %record_key, "an idempotency record did not decode");
                Begin::InProgress
            }
        };
        match &answer {
            Begin::Replay(_) => c.replays.fetch_add(1, Ordering::Relaxed),
            Begin::InProgress => c.in_progress.fetch_add(1, Ordering::Relaxed),
            _ => c.mismatches.fetch_add(1, Ordering::Relaxed),
        };
        Ok(answer)
    }
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("scope", &self.scope)
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

/// A first run under a key. Complete it with the response; dropped without completing, its
/// in-progress record expires with its lease.
#[must_use = "complete the run with its response, or retries are refused until the lease ends"]
pub struct Pending {
    idempotency: Idempotency,
    record_key: Key,
    in_progress: Bytes,
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    /// When the in-progress record's lease ends (at the latest).
    lease_ends: tokio::time::Instant,
}

/// First and longest pause between two attempts to store a response the backend could not take.
const STORE_LATER_BACKOFF: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(50),
    std::time::Duration::from_millis(500),
);

impl Pending {
    /// Stores `response` for replays (its body only up to the configured maximum). `Ok(true)`
    /// when stored. `Ok(false)` when it is not stored now:
    ///
    /// - another run had started after this one outlived its lease (logged, counted in
    ///   [`IdempotencyStats::incomplete`]);
    /// - the backend is unusable: the response is kept in memory and stored in the background
    ///   as soon as the backend takes it, until the lease ends (retries meanwhile get 409, then
    ///   the replay). Only if the lease ends first is it lost (logged, counted): a retry then
    ///   runs again, which is why a handler with side effects also keeps its own record of the
    ///   key (a unique constraint in its database).
    pub async fn complete(self, response: &StoredResponse) -> Result<bool> {
        let omit = response.body.len() > self.idempotency.max_body;
        let (body, body_base64) = if omit {
            (None, None)
        } else {
            match std::str::from_utf8(&response.body) {
                Ok(text) => (Some(Cow::Borrowed(text)), None),
                Err(_) => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(&response.body)),
                ),
            }
        };
        let completed = Bytes::from(
            serde_json::to_vec(&Record::Completed {
                key: Cow::Borrowed(self.key.as_str()),
                fingerprint: Cow::Borrowed(&self.fingerprint),
                status: response.status,
                headers: Cow::Borrowed(&response.headers),
                body,
                body_base64,
                body_omitted: omit || response.body_omitted,
            })
            .map_err(|e| Error::new(ErrorKind::Serialize, e.to_string()))?,
        );
        match self.store_completed(&completed).await? {
            Answered::Backend(true) => Ok(true),
            Answered::Backend(false) => {
                tracing::warn!(
                    key = %self.record_key,
                    "the run outlived its lease and another run under the key started: this \
                     response is not stored"
                );
                self.idempotency
                    .counters
                    .incomplete
                    .fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
            _ => {
                tracing::warn!(
                    key = %self.record_key,
                    "the response could not be stored now (the backend is unusable): it is \
                     stored when the backend takes it, within the lease; retries get 409 until then"
                );
                self.store_later(completed);
                Ok(false)
            }
        }
    }

    /// One attempt to replace this run's in-progress record with `completed`.
    async fn store_completed(&self, completed: &Bytes) -> Result<Answered<bool>> {
        let op = CompleteOp {
            key: &self.record_key,
            in_progress: &self.in_progress,
            completed,
            retention: self.idempotency.retention,
        };
        self.idempotency
            .store
            .run(&op, OutageRule::FailClosed)
            .await
    }

    /// Keeps trying to store `completed` in the background until the lease ends.
    fn store_later(self, completed: Bytes) {
        tokio::spawn(async move {
            let mut pause = STORE_LATER_BACKOFF.0;
            loop {
                if tokio::time::Instant::now() + pause >= self.lease_ends {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(STORE_LATER_BACKOFF.1);
                match self.store_completed(&completed).await {
                    Ok(Answered::Backend(true)) => {
                        tracing::info!(key = %self.record_key, "the response was stored late, for replays");
                        return;
                    }
                    // The lease ended and the record went, or another run started.
                    Ok(Answered::Backend(false)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            tracing::warn!(
                key = %self.record_key,
                "the response could not be stored within the lease: a retry runs again"
            );
            self.idempotency
                .counters
                .incomplete
                .fetch_add(1, Ordering::Relaxed);
        });
    }

    /// The record key (for logs).
    pub fn record_key(&self) -> &Key {
        &self.record_key
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("record_key", &self.record_key)
            .finish_non_exhaustive()
    }
}
