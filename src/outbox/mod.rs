//! A transactional outbox for invalidations: the write path "commit, then invalidate" without
//! its gap.
//!
//! A process that dies between the commit and the invalidation, or cannot reach Redis then,
//! leaves stale entries for a whole TTL. [`Outbox::invalidate_in`] writes the event's targets
//! (keys and tags) into an outbox table *inside the caller's database transaction*: they are
//! committed with the write or not at all. A relay in every instance ([`Outbox::relay`], or
//! [`Outbox::relay_once`] from your own scheduler) claims rows, applies them through the cache's
//! [`Store::invalidate`](crate::store::Store::invalidate), and deletes them once Redis has them.
//!
//! - **Several relays** (one per instance) share the table: a claim marks rows with a random
//!   token and a deadline (PostgreSQL claims with `FOR UPDATE SKIP LOCKED`); a relay deletes only
//!   rows it still holds. A relay that dies mid-batch leaves rows whose claim expires, and another
//!   relay applies them again: invalidations are idempotent.
//! - **Redis down**: a row whose invalidation could not reach Redis is released, not deleted, and
//!   applied on a later pass.
//! - The calling process still invalidates at once after its commit (`Cache::invalidate`), so
//!   the relay only closes the gap; it is not on the request path.
//!
//! Rows are `(id, targets, created_ms, claim, claimed_until_ms)`; `targets` is JSON. Create the
//! table with [`Outbox::create_table`] (or your migrations: the statement is
//! [`OutboxDb::CREATE`]). PostgreSQL behind the `outbox-postgres` feature, SQLite behind
//! `outbox-sqlite`.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Cache;
use crate::error::{Error, ErrorKind, Result};
use crate::invalidation::{Invalidates, Targets};
use crate::key::{Key, Tag};

/// The statements of one database's outbox table.
pub(crate) struct Statements {
    pub(crate) insert: &'static str,
    pub(crate) claim: &'static str,
    pub(crate) delete: &'static str,
    pub(crate) release: &'static str,
}

/// Implements [`OutboxDb`] for a sqlx pool type from its table definition and statements
/// (they differ between databases only in their placeholders and types).
macro_rules! outbox_db {
    ($pool:ty, $conn:ty, $create:expr, $sql:expr) => {
        impl $crate::outbox::OutboxDb for $pool {
            type Connection = $conn;
            const CREATE: &'static str = $create;

            async fn insert(
                conn: &mut $conn,
                scope: &str,
                targets: &str,
                now_ms: i64,
            ) -> $crate::error::Result<()> {
                sqlx::query($sql.insert)
                    .bind(scope)
                    .bind(targets)
                    .bind(now_ms)
                    .execute(conn)
                    .await
                    .map(|_| ())
                    .map_err($crate::outbox::db_error)
            }

            async fn claim(
                &self,
                scope: &str,
                claim: i64,
                now_ms: i64,
                until_ms: i64,
                limit: i64,
            ) -> $crate::error::Result<Vec<(i64, String)>> {
                sqlx::query_as($sql.claim)
                    .bind(claim)
                    .bind(until_ms)
                    .bind(scope)
                    .bind(now_ms)
                    .bind(limit)
                    .fetch_all(self)
                    .await
                    .map_err($crate::outbox::db_error)
            }

            async fn delete(&self, id: i64, claim: i64) -> $crate::error::Result<()> {
                $crate::outbox::run_by_claim(self, $sql.delete, id, claim).await
            }

            async fn release(&self, id: i64, claim: i64) -> $crate::error::Result<()> {
                $crate::outbox::run_by_claim(self, $sql.release, id, claim).await
            }

            async fn depth(&self) -> $crate::error::Result<i64> {
                sqlx::query_scalar("SELECT COUNT(*) FROM speedlayer_outbox")
                    .fetch_one(self)
                    .await
                    .map_err($crate::outbox::db_error)
            }

            async fn create(&self) -> $crate::error::Result<()> {
                sqlx::query(Self::CREATE)
                    .execute(self)
                    .await
                    .map(|_| ())
                    .map_err($crate::outbox::db_error)
            }
        }
    };
}

/// Runs `sql` (a delete or release of one claimed row) with `id` and `claim`.
async fn run_by_claim<'e, E>(executor: E, sql: &'static str, id: i64, claim: i64) -> Result<()>
where
    E: sqlx::Executor<'e>,
    i64: sqlx::Encode<'e, E::Database> + sqlx::Type<E::Database>,
    for<'q> <E::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, E::Database>,
{
    sqlx::query(sql)
        .bind(id)
        .bind(claim)
        .execute(executor)
        .await
        .map(|_| ())
        .map_err(db_error)
}

#[cfg(feature = "outbox-postgres")]
mod postgres;
#[cfg(feature = "outbox-sqlite")]
mod sqlite;

/// How long a relay holds the rows it claimed before another relay may take them.
pub const CLAIM: Duration = Duration::from_secs(30);
/// Rows claimed per pass.
pub const BATCH: i64 = 100;

/// The targets of one event, as a row stores them.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Row {
    /// Keys as `(text, leading segments, context segments)`.
    keys: Vec<(String, u8, u8)>,
    /// Tag index keys.
    tags: Vec<String>,
}

impl Row {
    fn of(targets: &Targets) -> Row {
        Row {
            keys: targets
                .keys()
                .iter()
                .map(|k| {
                    let (full, leading, contexts) = k.stored_parts();
                    (full.to_owned(), leading, contexts)
                })
                .collect(),
            tags: targets
                .tags()
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect(),
        }
    }

    /// The keys and tags; what does not read back as one is dropped (and logged).
    fn targets(&self) -> (Vec<Key>, Vec<Tag>) {
        let keys: Vec<Key> = self
            .keys
            .iter()
            .filter_map(|(full, leading, contexts)| Key::from_stored(full, *leading, *contexts))
            .collect();
        let tags: Vec<Tag> = self
            .tags
            .iter()
            .filter_map(|t| Tag::from_stored(t))
            .collect();
        if keys.len() != self.keys.len() || tags.len() != self.tags.len() {
            tracing::warn!(
                "an outbox row held targets that are not speedlayer keys; they were dropped"
            );
        }
        (keys, tags)
    }
}

/// What one relay pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Relayed {
    /// Rows applied to Redis and deleted.
    pub applied: u64,
    /// Rows claimed but not applied (Redis unusable): released for a later pass.
    pub released: u64,
}

/// The database side of the outbox: one implementation per database (PostgreSQL, SQLite).
pub trait OutboxDb {
    /// The connection a transaction derefs to (`PgConnection`, `SqliteConnection`).
    type Connection: Send;
    /// The `CREATE TABLE IF NOT EXISTS` statement for the table `speedlayer_outbox`.
    const CREATE: &'static str;

    /// Inserts one row of `targets` (JSON) for `scope` on `conn` (inside the caller's
    /// transaction).
    fn insert(
        conn: &mut Self::Connection,
        scope: &str,
        targets: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Claims up to `limit` unclaimed (or expired) rows of `scope` for `claim` until
    /// `until_ms`.
    fn claim(
        &self,
        scope: &str,
        claim: i64,
        now_ms: i64,
        until_ms: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<(i64, String)>>> + Send;
    /// Deletes row `id` if `claim` still holds it.
    fn delete(&self, id: i64, claim: i64) -> impl Future<Output = Result<()>> + Send;
    /// Releases row `id` if `claim` still holds it.
    fn release(&self, id: i64, claim: i64) -> impl Future<Output = Result<()>> + Send;
    /// Rows in the table.
    fn depth(&self) -> impl Future<Output = Result<i64>> + Send;
    /// Creates the table if it does not exist.
    fn create(&self) -> impl Future<Output = Result<()>> + Send;
}

fn db_error(e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("the outbox table could not be used: {e}"),
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The outbox of one cache over one database pool `D` (a `PgPool` or a `SqlitePool`).
#[derive(Clone)]
pub struct Outbox<D> {
    cache: Cache,
    db: D,
    /// The deployment's namespace prefix: relays of other deployments sharing the table leave
    /// these rows alone.
    scope: String,
}

impl<D> std::fmt::Debug for Outbox<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl<D: OutboxDb + Clone + Send + Sync + 'static> Outbox<D> {
    /// The outbox of `cache`, whose table lives in `db`.
    pub fn new(cache: &Cache, db: D) -> Outbox<D> {
        Outbox {
            scope: cache
                .namespace()
                .prefix()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            cache: cache.clone(),
            db,
        }
    }

    /// Creates the table `speedlayer_outbox` if it does not exist.
    pub async fn create_table(&self) -> Result<()> {
        self.db.create().await
    }

    /// Records what `event` invalidates in the outbox, on `conn`: pass the transaction of the
    /// write (`&mut *tx`), so that the row commits with it. Then, after the commit, invalidate
    /// as usual; the relay applies the row if that does not happen.
    pub async fn invalidate_in<E: Invalidates>(
        &self,
        conn: &mut D::Connection,
        event: &E,
    ) -> Result<()> {
        let mut targets = Targets::new();
        event.targets(self.cache.namespace(), &mut targets)?;
        let row = serde_json::to_string(&Row::of(&targets)).map_err(|e| {
            Error::new(
                ErrorKind::Serialize,
                format!("an outbox row cannot be encoded: {e}"),
            )
        })?;
        D::insert(conn, &self.scope, &row, now_ms()).await
    }

    /// Claims a batch of rows, applies them, deletes the applied ones and releases the others.
    pub async fn relay_once(&self) -> Result<Relayed> {
        let claim: i64 = rand::random::<i64>() & i64::MAX;
        let now = now_ms();
        let rows = self
            .db
            .claim(
                &self.scope,
                claim,
                now,
                now + CLAIM.as_millis() as i64,
                BATCH,
            )
            .await?;
        let mut done = Relayed::default();
        let mut unusable = false;
        for (id, text) in rows {
            // Once Redis could not take a row, the rest of the batch waits for a later pass.
            if unusable {
                self.db.release(id, claim).await?;
                done.released += 1;
                continue;
            }
            let store = self.cache.store();
            let applied = match serde_json::from_str::<Row>(&text) {
                Ok(row) => {
                    let (keys, tags) = row.targets();
                    match store.invalidate(&keys, &tags).await {
                        Ok(report) => !report.deferred,
                        // A data error (another client's value where a tag index lives; the
                        // index is repaired) is done, unless part of the row was deferred.
                        Err(e) => {
                            tracing::warn!(error = %e, "an outbox invalidation was refused");
                            !store.has_pending()
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "an outbox row does not decode; it is dropped");
                    true
                }
            };
            if applied {
                self.db.delete(id, claim).await?;
                done.applied += 1;
            } else {
                self.db.release(id, claim).await?;
                done.released += 1;
                unusable = true;
            }
        }
        if let Ok(depth) = self.db.depth().await {
            metrics::gauge!("speedlayer_outbox_depth").set(depth as f64);
        }
        Ok(done)
    }

    /// Rows waiting in the table.
    pub async fn depth(&self) -> Result<i64> {
        self.db.depth().await
    }

    /// Runs [`relay_once`](Outbox::relay_once) every `every` (and again at once while a pass
    /// applied a full batch) until the returned handle is dropped.
    pub fn relay(&self, every: Duration) -> RelayHandle {
        let outbox = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match outbox.relay_once().await {
                    Ok(r) if r.applied as i64 >= BATCH => continue,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "outbox relay pass failed"),
                }
                tokio::time::sleep(every).await;
            }
        });
        RelayHandle(task)
    }
}

/// A running relay; dropping it stops the relay.
#[derive(Debug)]
pub struct RelayHandle(tokio::task::JoinHandle<()>);

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}
