//! Live counters that reconcile with the database: unread notifications, pending-approval
//! badges, anything that mirrors a `COUNT(*)`.
//!
//! The database holds the facts (the rows); the counter is a convenience that must never drift
//! from them for long:
//!
//! - An update has two steps around the database write: [`Counters::begin`] marks it in flight
//!   (one round trip, before the write), then [`CounterUpdate::add`] (or
//!   [`increment`](CounterUpdate::increment), [`decrement`](CounterUpdate::decrement)) adds its
//!   delta to a live counter and refreshes its TTL (one round trip, after the write).
//!   [`Counters::update`] does both around a write future. An update never creates a counter: a
//!   missing counter is recounted from the database on its next read.
//! - [`Counters::get`] reads the counter; when it is missing it recounts with the caller's loader
//!   (the database's `COUNT(*)`) under a lease, and stores the recount only if no update was in
//!   flight while it ran. An update in flight may or may not be in the database's count, so the
//!   recount is then returned but not stored, and the next read recounts: an update racing a
//!   recount is neither lost nor counted twice.
//! - [`Counters::reconcile`] resets a counter to the database's figure with the same guarantee
//!   (for a periodic or sampled drift check).
//! - **Redis unusable:** reads fall through to the loader (nothing is stored), and an update that
//!   could not reach Redis invalidates the counter when Redis answers again (the invalidation is
//!   queued like any other), so that the next read recounts. A counter is never served from the
//!   store's memory fallback, whose view of the updates is partial. An update whose mark Redis
//!   lost (a restart without persistence) deletes the counter instead of counting.
//!
//! Why two round trips: an update sent only after the write cannot tell a recount that read the
//! database before its row (the update must count) from one that read it after (the update must
//! not), and an update sent only before the write cannot tell whether the write will happen. The
//! mark taken before the write is what lets a recount know. The first round trip can overlap the
//! database's own work (`tokio::join!` of [`Counters::begin`] and the statement, before the
//! commit); it must have answered before the write commits.
//!
//! The write path is: begin the update, write the row to the database, then add.
//!
//! ```
//! use speedlayer::counter::Counters;
//! use speedlayer::key::{Ident, Namespace};
//! use speedlayer::ttl::Ttl;
//! use speedlayer::Cache;
//!
//! const NOTIFICATIONS: Ident = Ident::from_static("notifications");
//! const COUNT: Ident = Ident::from_static("count");
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cache = Cache::memory();
//! let counters = Counters::new(&cache);
//! let key = cache.namespace().global().key(&NOTIFICATIONS, &COUNT, 42)?;
//! let day = Ttl::hours(24);
//! // SELECT COUNT(*) FROM notifications WHERE user_id = 42 AND read_at IS NULL
//! let unread = counters.get(&key, day, || async { Ok::<_, std::io::Error>(3) }).await?;
//! assert_eq!(unread, 3);
//! let update = counters.begin(&key).await;
//! // INSERT INTO notifications ...; then:
//! assert_eq!(update.increment(day).await.value(), Some(4));
//! // Or both steps around the write:
//! let (_, counted) = counters
//!     .update(&key, 1, day, || async { Ok::<_, std::io::Error>(()) })
//!     .await?;
//! assert_eq!(counted.value(), Some(5));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::future::Future;

use crate::Cache;
use crate::config::DEFAULT_LEASE_TTL;
use crate::key::Key;
use crate::store::{Answered, LeaseHold, OutageRule, Source, Store, new_token, spawn_detached};
use crate::switch::Capability;
use crate::ttl::Ttl;

pub mod script;

use script::{AbortOp, AddOp, BeginOp, FillOp, Read, ReadOp};

/// How long an update may take between its mark and its add, unless
/// [`Counters::write_window`] says otherwise.
pub const DEFAULT_WRITE_WINDOW: Ttl = Ttl::seconds(30);

/// An update of a counter in flight: [`Counters::begin`] marked it before the database write;
/// [`add`](CounterUpdate::add) counts it after the write, or [`cancel`](CounterUpdate::cancel)
/// says the write did not happen. Dropped without either (the caller's future was cancelled, or
/// it returned early), it deletes the counter in the background, since the write may have
/// happened: the next read recounts.
#[must_use = "an update dropped without add() or cancel() deletes the counter"]
pub struct CounterUpdate {
    store: Store,
    key: Key,
    token: u64,
    /// The mark reached the backend.
    begun: bool,
    done: bool,
}

impl CounterUpdate {
    /// Adds `delta` to the counter if it is live, and refreshes its TTL to `ttl`. One round
    /// trip.
    pub async fn add(mut self, delta: i64, ttl: Ttl) -> Counted {
        let counted = self.count(delta, ttl).await;
        // Only now: an add cancelled before its answer leaves the update to `Drop`, which
        // deletes the counter (the write happened; whether the delta was counted is unknown).
        self.done = true;
        counted
    }

    async fn count(&self, delta: i64, ttl: Ttl) -> Counted {
        if !self.begun {
            // Unmarked: a recount may have stored a count with or without this write's row.
            self.invalidate().await;
            return Counted::Unavailable;
        }
        let op = AddOp {
            key: &self.key,
            delta,
            ttl,
            token: self.token,
        };
        match self.store.run(&op, OutageRule::FailClosed).await {
            Ok(Answered::Backend(Some(n))) => Counted::Updated(n),
            Ok(Answered::Backend(None)) => Counted::Absent,
            Ok(_) => {
                // The update did not reach Redis: the counter there misses it, so it goes
                // (queued until Redis answers, and applied before any read reaches it).
                self.invalidate().await;
                Counted::Unavailable
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "counter update refused; recounted on the next read");
                self.invalidate().await;
                Counted::Absent
            }
        }
    }

    /// Adds 1.
    pub async fn increment(self, ttl: Ttl) -> Counted {
        self.add(1, ttl).await
    }

    /// Subtracts 1.
    pub async fn decrement(self, ttl: Ttl) -> Counted {
        self.add(-1, ttl).await
    }

    /// The database write did not happen (it failed or was rolled back): the mark goes and the
    /// counter stays.
    pub async fn cancel(mut self) {
        if self.begun {
            let op = AbortOp {
                key: &self.key,
                token: self.token,
                invalidate: false,
            };
            let _ = self.store.run(&op, OutageRule::FailClosed).await;
        }
        self.done = true;
    }

    async fn invalidate(&self) {
        if let Err(e) = self
            .store
            .invalidate(std::slice::from_ref(&self.key), &[])
            .await
        {
            tracing::warn!(key = %self.key, error = %e, "counter not invalidated");
        }
    }
}

impl Drop for CounterUpdate {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (store, key, token, begun) =
            (self.store.clone(), self.key.clone(), self.token, self.begun);
        let spawned = spawn_detached(async move {
            let op = AbortOp {
                key: &key,
                token,
                invalidate: true,
            };
            let reached = begun
                && matches!(
                    store.run(&op, OutageRule::FailClosed).await,
                    Ok(Answered::Backend(()))
                );
            if !reached {
                let _ = store.invalidate(std::slice::from_ref(&key), &[]).await;
            }
        });
        if !spawned {
            tracing::warn!(key = %self.key, "counter update dropped outside a runtime; its mark expires with the write window");
        }
    }
}

impl fmt::Debug for CounterUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CounterUpdate")
            .field("key", &self.key)
            .field("marked", &self.begun)
            .finish_non_exhaustive()
    }
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Counted {
    /// The counter was live; this is its new value.
    Updated(i64),
    /// The counter was missing (or a recount was in flight, another client's value was there,
    /// or the update's mark was gone): nothing was counted, the counter is missing, and the next
    /// read recounts from the database.
    Absent,
    /// The backend was unusable: the counter is invalidated as soon as it answers again, and the
    /// next read recounts.
    Unavailable,
}

impl Counted {
    /// The new value, when the counter was live.
    pub fn value(self) -> Option<i64> {
        match self {
            Counted::Updated(n) => Some(n),
            _ => None,
        }
    }
}

/// What [`Counters::reconcile`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// The database's figure.
    pub count: i64,
    /// What the counter held before, if it was a count.
    pub previous: Option<i64>,
    /// The figure was stored (false when an update raced the recount, or the backend was
    /// unusable: the counter is then missing and the next read recounts).
    pub stored: bool,
}

impl Reconciled {
    /// True when the counter held another figure than the database's.
    pub fn drifted(&self) -> bool {
        self.previous.is_some_and(|p| p != self.count)
    }
}

/// Counters on the cache's store. Cheap to clone.
#[derive(Clone)]
pub struct Counters {
    store: Store,
    lease: Ttl,
    window: Ttl,
}

impl Counters {
    /// Counters on the cache's store (Redis, or memory when no Redis is configured). Keys are
    /// built by the caller, like any cache key (`notifications:count:<user>`).
    pub fn new(cache: &Cache) -> Counters {
        Counters::from_store(cache.store())
    }

    /// Counters on `store`.
    pub fn from_store(store: &Store) -> Counters {
        Counters {
            store: store.clone(),
            lease: DEFAULT_LEASE_TTL,
            window: DEFAULT_WRITE_WINDOW,
        }
    }

    /// How long a recount holds its lease (default 10 s): a recount that takes longer is
    /// returned but not stored.
    #[must_use]
    pub fn recount_lease(mut self, lease: Ttl) -> Counters {
        self.lease = lease;
        self
    }

    /// How long an update may take between [`begin`](Counters::begin) and its add (default
    /// 30 s): a recount is not stored while an update is in flight, and an update that adds
    /// after this deletes the counter instead of counting (a recount may have counted its row).
    #[must_use]
    pub fn write_window(mut self, window: Ttl) -> Counters {
        self.window = window;
        self
    }

    /// Marks an update of counter `key` in flight; call it before the database write, and add
    /// the delta through the returned [`CounterUpdate`] after the write. One round trip.
    pub async fn begin(&self, key: &Key) -> CounterUpdate {
        let token = new_token();
        if !self.store.is_on(Capability::Counters) {
            // Switched off: nothing is marked; the add then deletes the counter, so that it is
            // recounted once counters are back on.
            return CounterUpdate {
                store: self.store.clone(),
                key: key.clone(),
                token,
                begun: false,
                done: false,
            };
        }
        let op = BeginOp {
            key,
            token,
            window: self.window,
        };
        let begun = match self.store.run(&op, OutageRule::FailClosed).await {
            Ok(Answered::Backend(())) => true,
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "counter update not marked; the counter is invalidated after the write");
                false
            }
        };
        CounterUpdate {
            store: self.store.clone(),
            key: key.clone(),
            token,
            begun,
            done: false,
        }
    }

    /// Runs the database `write` between the two steps of an update of counter `key` by
    /// `delta`: [`begin`](Counters::begin), the write, then [`add`](CounterUpdate::add) when it
    /// succeeded or [`cancel`](CounterUpdate::cancel) when it failed (its error is returned).
    pub async fn update<T, E, F, Fut>(
        &self,
        key: &Key,
        delta: i64,
        ttl: Ttl,
        write: F,
    ) -> Result<(T, Counted), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let update = self.begin(key).await;
        match write().await {
            Ok(value) => Ok((value, update.add(delta, ttl).await)),
            Err(e) => {
                update.cancel().await;
                Err(e)
            }
        }
    }

    /// The counter `key`; when it is missing, `loader`'s count (the database's), which is then
    /// stored for `ttl` unless an update raced it. The loader's error is returned and nothing is
    /// stored. While the backend is unusable the loader answers every read.
    pub async fn get<E, F, Fut>(&self, key: &Key, ttl: Ttl, loader: F) -> Result<i64, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<i64, E>>,
    {
        if !self.store.is_on(Capability::Counters) {
            return loader().await;
        }
        self.recount(key, ttl, loader, false)
            .await
            .map(|reconciled| reconciled.count)
    }

    /// Resets the counter `key` to `loader`'s count (the database's), whatever it holds: a drift
    /// repair, safe against concurrent updates (an update racing it leaves the counter missing,
    /// recounted on the next read, rather than wrong).
    pub async fn reconcile<E, F, Fut>(
        &self,
        key: &Key,
        ttl: Ttl,
        loader: F,
    ) -> Result<Reconciled, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<i64, E>>,
    {
        self.recount(key, ttl, loader, true).await
    }

    async fn recount<E, F, Fut>(
        &self,
        key: &Key,
        ttl: Ttl,
        loader: F,
        force: bool,
    ) -> Result<Reconciled, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<i64, E>>,
    {
        let token = new_token();
        let op = ReadOp {
            key,
            token,
            lease: self.lease,
            force,
        };
        let (leased, previous) = match self.store.run(&op, OutageRule::FailClosed).await {
            Ok(Answered::Backend((Read::Count(n), _))) => {
                return Ok(Reconciled {
                    count: n,
                    previous: Some(n),
                    stored: true,
                });
            }
            Ok(Answered::Backend((Read::Recount, previous))) => (true, previous),
            Ok(_) => (false, None),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "counter read refused; counting from the loader");
                (false, None)
            }
        };
        // Given up (in the background) if the recount ends without storing: its loader
        // failed, or its caller's future was dropped.
        let mut lease = LeaseHold {
            store: &self.store,
            key,
            token,
            source: Source::Primary,
            held: leased,
        };
        let count = loader().await?;
        let mut stored = false;
        if leased {
            let fill = FillOp {
                key,
                token,
                count,
                ttl,
            };
            stored = matches!(
                self.store.run(&fill, OutageRule::FailClosed).await,
                Ok(Answered::Backend(true))
            );
            lease.held = false;
        }
        Ok(Reconciled {
            count,
            previous,
            stored,
        })
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counters")
            .field("store", &self.store)
            .field("recount_lease", &self.lease)
            .field("write_window", &self.window)
            .finish()
    }
}
