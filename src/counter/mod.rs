//! Live counters that reconcile with the database: unread notifications, pending-approval
//! badges, anything that mirrors a `COUNT(*)`.
//!
//! The database holds the facts (the rows); the counter is a convenience that must never drift
//! from them for long:
//!
//! - [`Counters::add`] (and [`increment`](Counters::increment),
//!   [`decrement`](Counters::decrement)) updates a live counter and refreshes its TTL, in one round
//!   trip. It never creates a counter: a missing counter is recounted from the database on its
//!   next read, so an update made while the counter is missing is in that recount, never added on
//!   top of it.
//! - [`Counters::get`] reads the counter; when it is missing it recounts with the caller's loader
//!   (the database's `COUNT(*)`) under a lease. An update that arrives while the recount runs
//!   deletes the lease instead of counting, so the recount (which may or may not have seen that
//!   update's row) is returned but not stored, and the next read recounts: an update racing a
//!   recount is neither lost nor counted twice.
//! - [`Counters::reconcile`] resets a counter to the database's figure with the same guarantee
//!   (for a periodic or sampled drift check).
//! - **Redis unusable:** reads fall through to the loader (nothing is stored), and an update that
//!   could not reach Redis invalidates the counter when Redis answers again (the invalidation is
//!   queued like any other), so that the next read recounts. A counter is never served from the
//!   store's memory fallback, whose view of the updates is partial.
//!
//! The write path is: write the row to the database, then update the counter.
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
//! // INSERT INTO notifications ...; then:
//! assert_eq!(counters.increment(&key, day).await.value(), Some(4));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::future::Future;

use crate::Cache;
use crate::config::DEFAULT_LEASE_TTL;
use crate::key::Key;
use crate::store::{Answered, OutageRule, Store};
use crate::ttl::Ttl;

pub mod script;

use script::{AddOp, FillOp, Read, ReadOp, ReleaseOp};

/// A recount's lease, given up (in the background) if the recount ends without storing: its
/// loader failed, or its caller's future was dropped.
struct Recounting {
    store: Store,
    key: Key,
    token: u64,
    held: bool,
}

impl Drop for Recounting {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, key, token) = (self.store.clone(), self.key.clone(), self.token);
        runtime.spawn(async move {
            let op = ReleaseOp { key: &key, token };
            let _ = store.run(&op, OutageRule::FailClosed).await;
        });
    }
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Counted {
    /// The counter was live; this is its new value.
    Updated(i64),
    /// The counter was missing (or a recount was in flight, or another client's value was
    /// there): nothing was counted, and the next read recounts from the database.
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
        }
    }

    /// How long a recount holds its lease (default 10 s): a recount that takes longer is
    /// returned but not stored.
    #[must_use]
    pub fn recount_lease(mut self, lease: Ttl) -> Counters {
        self.lease = lease;
        self
    }

    /// Adds `delta` to the counter `key` if it is live, and refreshes its TTL to `ttl`.
    pub async fn add(&self, key: &Key, delta: i64, ttl: Ttl) -> Counted {
        let op = AddOp { key, delta, ttl };
        match self.store.run(&op, OutageRule::FailClosed).await {
            Ok(Answered::Backend(Some(n))) => Counted::Updated(n),
            Ok(Answered::Backend(None)) => Counted::Absent,
            Ok(_) => {
                // The update did not reach Redis: the counter there may miss it, so it goes
                // (queued until Redis answers, and applied before any read reaches it).
                if let Err(e) = self.store.invalidate(std::slice::from_ref(key), &[]).await {
                    tracing::warn!(key = %key, error = %e, "counter not invalidated");
                }
                Counted::Unavailable
            }
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "counter update refused; recounted on the next read");
                let _ = self.store.invalidate(std::slice::from_ref(key), &[]).await;
                Counted::Absent
            }
        }
    }

    /// Adds 1.
    pub async fn increment(&self, key: &Key, ttl: Ttl) -> Counted {
        self.add(key, 1, ttl).await
    }

    /// Subtracts 1.
    pub async fn decrement(&self, key: &Key, ttl: Ttl) -> Counted {
        self.add(key, -1, ttl).await
    }

    /// The counter `key`; when it is missing, `loader`'s count (the database's), which is then
    /// stored for `ttl` unless an update raced it. The loader's error is returned and nothing is
    /// stored. While the backend is unusable the loader answers every read.
    pub async fn get<E, F, Fut>(&self, key: &Key, ttl: Ttl, loader: F) -> Result<i64, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<i64, E>>,
    {
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
        let token = rand::random::<u64>() | 1;
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
        let mut lease = Recounting {
            store: self.store.clone(),
            key: key.clone(),
            token,
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
            .finish()
    }
}
