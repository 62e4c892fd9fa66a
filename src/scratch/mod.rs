//! Temporary data that reaches its sink: hashes flushed to the database, drafts, presence.
//!
//! The database stores facts; these are the things teams keep in Redis for a while before they
//! become facts (today's attendance before it is submitted), or that never become facts (a
//! half-filled form, who is online).
//!
//! # Hashes flushed to a sink
//!
//! A [`ScratchHash`] is a Redis hash (one field per student, say) written field by field by
//! several teachers and servers at once ([`ScratchHash::mark`]), read whole
//! ([`ScratchHash::read`]), and flushed to a [`Sink`] (a database write the application
//! implements) on submission or by a scheduled end-of-day flush ([`ScratchHash::flush`]).
//!
//! Flushing is crash-safe, and a mark reaches the database exactly once:
//!
//! 1. The hash is moved aside in one atomic step (`RENAME` to `{<key>}:~flushing`, same hash
//!    slot) and becomes a **batch** with an id, kept inside it (field `~batch`: fields starting
//!    with `~` are reserved), so that the batch and its id cannot be separated. Marks written
//!    from then on go to a new hash: nothing written during a flush is lost.
//! 2. The batch is handed to the sink with its id.
//! 3. Only after the sink succeeded is the batch removed. A sink that fails, or a flush that
//!    crashes or is cancelled at any point, leaves the batch, with the same id, to the next
//!    flush, which delivers it again before the newer marks.
//!
//! Delivery is therefore at least once, and a batch id may reach the sink twice (a flush that
//! died after the sink committed but before the batch was removed). **The sink must apply a
//! batch id at most once**: record the id in the same database transaction as the marks (a
//! table with the id as primary key, `ON CONFLICT DO NOTHING`), and skip a batch whose id is
//! already recorded. Together: every mark is applied exactly once, or is still in Redis for
//! the next flush.
//!
//! One flusher works on a hash at a time (a claim with a TTL, [`Scratch::claim_ttl`]; others get
//! [`Flushed::busy`]). Make the claim longer than the sink's longest write: a flusher that
//! outlives its claim may deliver a batch another flusher delivers too, which the sink's
//! batch-id check then absorbs.
//!
//! The hash carries a TTL as a safety net ([`Scratch::safety_ttl`], 48 h by default, set by its
//! first mark): data nobody flushed does not stay forever. A batch gets the same TTL again each
//! time a flush picks it up, so one that a sink keeps refusing lives as long as flushes keep
//! trying. Field names and values are text; bytes that are not UTF-8 (another client's) reach
//! the sink with U+FFFD in their place. Marks, reads and flushes log a
//! warning when the hash has less than [`Scratch::warn_below`] left unflushed.
//!
//! **Outage rule**: fail closed. With Redis unusable a mark is an error (write it to the
//! database directly, or tell the user), a read is an error, and a flush moves nothing.
//!
//! ```
//! use std::collections::HashSet;
//! use std::sync::Mutex;
//! use speedlayer::key::{Ident, Namespace};
//! use speedlayer::scratch::{FlushBatch, Scratch, Sink};
//! use speedlayer::Cache;
//!
//! /// A stand-in database: marks, and the batch ids already applied.
//! #[derive(Default)]
//! struct Attendance { marks: Mutex<Vec<(String, String)>>, applied: Mutex<HashSet<String>> }
//!
//! impl Sink for Attendance {
//!     type Error = std::io::Error;
//!     async fn write(&self, batch: &FlushBatch) -> Result<(), std::io::Error> {
//!         // BEGIN; INSERT INTO flushed_batches (id) ... ON CONFLICT DO NOTHING; if inserted,
//!         // INSERT INTO attendance ... ON CONFLICT (student, day) DO UPDATE; COMMIT
//!         if self.applied.lock().unwrap().insert(batch.id.clone()) {
//!             self.marks.lock().unwrap().extend(batch.fields.iter().cloned());
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cache = Cache::memory();
//! let scratch = Scratch::new(&cache);
//! let key = Namespace::root().global()
//!     .key(&Ident::from_static("attendance"), &Ident::from_static("class"), 7)?
//!     .with_context("2026-11-30")?;
//! let today = scratch.hash(key);
//! today.mark("s1", "present").await?;
//! today.mark("s2", "absent").await?;
//! assert_eq!(today.read().await?.len(), 2);
//!
//! let db = Attendance::default();
//! let flushed = today.flush(&db).await?;
//! assert_eq!(flushed.fields, 2);
//! assert_eq!(db.marks.lock().unwrap().len(), 2);
//! assert!(today.read().await?.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::Cache;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Key, Scope};
use crate::store::{Answered, Operation, OutageRule, Store};
use crate::ttl::Ttl;

mod draft;
mod presence;
mod script;

pub use draft::Drafts;
pub use presence::Presence;

use script::{Abort, Begin, Begun, Commit, Mark, Read};

/// Where a flush delivers a batch: the application's database write.
///
/// It must apply a batch id at most once (see the [module](self)): a batch can be delivered
/// again after a flush died between the sink's commit and the batch's removal.
pub trait Sink: Send + Sync {
    /// The sink's error; a failed write leaves the batch for the next flush.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Writes `batch`, or nothing if its id was applied before.
    fn write(
        &self,
        batch: &FlushBatch,
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;
}

/// One batch of a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushBatch {
    /// The scratch hash it comes from.
    pub key: Key,
    /// Its id: the same each time this batch is delivered.
    pub id: String,
    /// Its fields and values.
    pub fields: Vec<(String, String)>,
}

/// What a flush did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Flushed {
    /// Batches delivered and removed.
    pub batches: u32,
    /// Fields in them.
    pub fields: usize,
    /// Another flusher was working on the hash: nothing was done by this one.
    pub busy: bool,
}

/// Why a flush failed. The data is in Redis still, for the next flush.
#[derive(Debug, thiserror::Error)]
pub enum FlushError<E> {
    /// The sink failed.
    #[error("the sink failed; the batch stays for the next flush")]
    Sink(#[source] E),
    /// Redis (or the data at the key) did not let the flush go on.
    #[error(transparent)]
    Store(#[from] Error),
}

/// The scratch capability of a store: makes [`ScratchHash`]es. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Scratch {
    store: Store,
    scope: Scope,
    safety: Ttl,
    warn_below: Duration,
    claim: Ttl,
}

impl Scratch {
    /// Scratch state on `cache`'s store.
    pub fn new(cache: &Cache) -> Scratch {
        Scratch {
            store: cache.store().clone(),
            scope: cache.namespace().global(),
            safety: Ttl::hours(48),
            warn_below: Duration::from_secs(6 * 3600),
            claim: Ttl::seconds(30),
        }
    }

    /// How long a hash lives after its first mark if nobody flushes it (48 h by default).
    pub fn safety_ttl(mut self, ttl: Ttl) -> Scratch {
        self.safety = ttl;
        self
    }

    /// Below how much time left an unflushed hash is logged (6 h by default).
    pub fn warn_below(mut self, left: Duration) -> Scratch {
        self.warn_below = left;
        self
    }

    /// How long a flusher's claim lasts (30 s by default): longer than the sink's longest write.
    pub fn claim_ttl(mut self, ttl: Ttl) -> Scratch {
        self.claim = ttl;
        self
    }

    /// The scope drafts and presence keys are built in.
    pub(crate) fn scope(&self) -> &Scope {
        &self.scope
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The scratch hash at `key` (build it like any key: `attendance:class:7:2026-11-30`).
    pub fn hash(&self, key: Key) -> ScratchHash {
        ScratchHash {
            scratch: self.clone(),
            key,
        }
    }
}

/// One scratch hash. See the [module](self).
#[derive(Clone, Debug)]
pub struct ScratchHash {
    scratch: Scratch,
    key: Key,
}

fn switched_off(store: &Store) -> Result<()> {
    if store.is_on(crate::switch::Capability::Scratch) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unavailable,
            "scratch state is switched off: write to the database directly",
        ))
    }
}

/// Runs a scratch operation, failing closed: an error when the backend is unusable.
pub(super) async fn run<O: Operation>(store: &Store, op: &O, what: &str) -> Result<O::Output> {
    store
        .run(op, OutageRule::FailClosed)
        .await?
        .value()
        .ok_or_else(|| unavailable(what))
}

fn unavailable(what: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("{what}: the backend is unusable; nothing was written or moved"),
    )
}

impl ScratchHash {
    /// Its key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Writes one field.
    pub async fn mark(&self, field: &str, value: &str) -> Result<()> {
        self.mark_many(&[(field.to_owned(), value.to_owned())])
            .await
    }

    /// Writes several fields in one step.
    pub async fn mark_many(&self, fields: &[(String, String)]) -> Result<()> {
        switched_off(&self.scratch.store)?;
        if fields.is_empty() {
            return Ok(());
        }
        if let Some((field, _)) = fields
            .iter()
            .find(|(f, _)| f.starts_with(script::RESERVED_FIELD_PREFIX))
        {
            return Err(Error::new(
                ErrorKind::InvalidKey,
                format!(
                    "scratch field {:?}: fields starting with '~' are reserved",
                    field.chars().take(32).collect::<String>()
                ),
            ));
        }
        let op = Mark {
            key: &self.key,
            fields,
            safety: self.scratch.safety,
        };
        let left = run(&self.scratch.store, &op, "scratch mark").await?;
        self.warn_if_expiring(left);
        Ok(())
    }

    /// Every field written and not yet flushed (a batch being flushed included; a newer mark of
    /// the same field wins).
    pub async fn read(&self) -> Result<BTreeMap<String, String>> {
        switched_off(&self.scratch.store)?;
        let (left, fields) = run(
            &self.scratch.store,
            &Read { key: &self.key },
            "scratch read",
        )
        .await?;
        self.warn_if_expiring(left);
        Ok(fields)
    }

    /// How long the hash lives if nobody flushes it (`None` when it holds nothing).
    pub async fn remaining_ttl(&self) -> Result<Option<Duration>> {
        switched_off(&self.scratch.store)?;
        let (left, _) = run(
            &self.scratch.store,
            &Read { key: &self.key },
            "scratch read",
        )
        .await?;
        Ok(left)
    }

    /// Delivers what was written to `sink` (see the [module](self)): a batch a failed or crashed
    /// flush left first, then the hash as it is now. Returns what was delivered; an error leaves
    /// the batch it was about in Redis for the next flush.
    pub async fn flush<S: Sink>(
        &self,
        sink: &S,
    ) -> std::result::Result<Flushed, FlushError<S::Error>> {
        switched_off(&self.scratch.store)?;
        let mut done = Flushed::default();
        // A leftover batch, then the current hash: at most two rounds per call.
        for _ in 0..2 {
            let token = crate::store::new_token();
            let batch_id = format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            );
            let begin = Begin {
                key: &self.key,
                token,
                claim: self.scratch.claim,
                batch_id: &batch_id,
                batch_ttl: self.scratch.safety,
            };
            let begun = run(&self.scratch.store, &begin, "scratch flush").await?;
            let (id, leftover, fields) = match begun {
                Begun::Busy => {
                    done.busy = true;
                    return Ok(done);
                }
                Begun::Empty => return Ok(done),
                Begun::Batch {
                    id,
                    leftover,
                    fields,
                } => (id, leftover, fields),
            };
            if leftover {
                tracing::info!(key = %self.key, batch = %id, "delivering a batch a previous flush left");
            }
            let batch = FlushBatch {
                key: self.key.clone(),
                id,
                fields,
            };
            if let Err(e) = sink.write(&batch).await {
                let abort = Abort {
                    key: &self.key,
                    token,
                };
                if let Err(release) = self.scratch.store.run(&abort, OutageRule::FailClosed).await {
                    tracing::debug!(error = %release, "flush claim not released; it expires by its TTL");
                }
                tracing::warn!(key = %self.key, batch = %batch.id, "sink failed; the batch stays for the next flush");
                return Err(FlushError::Sink(e));
            }
            let commit = Commit {
                key: &self.key,
                token,
                batch_id: &batch.id,
            };
            match self
                .scratch
                .store
                .run(&commit, OutageRule::FailClosed)
                .await?
            {
                Answered::Backend(true) | Answered::Fallback(true) => {
                    done.batches += 1;
                    done.fields += batch.fields.len();
                }
                Answered::Backend(false) | Answered::Fallback(false) => {
                    // Another flusher took over after this one's claim expired, and removed it.
                    tracing::warn!(key = %self.key, batch = %batch.id, "the batch was delivered by another flusher too; the claim was too short");
                }
                Answered::Open | Answered::Closed => {
                    return Err(FlushError::Store(unavailable(
                        "scratch flush commit (the batch was delivered and will be delivered again)",
                    )));
                }
            }
            if !leftover {
                break;
            }
        }
        Ok(done)
    }

    fn warn_if_expiring(&self, left: Option<Duration>) {
        if let Some(left) = left
            && left < self.scratch.warn_below
        {
            tracing::warn!(
                key = %self.key,
                left_secs = left.as_secs(),
                "scratch data close to expiring unflushed; flush it"
            );
        }
    }
}
