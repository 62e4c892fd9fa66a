//! Locks with fencing tokens: mutual exclusion across a fleet, for sensitive mutations
//! (approving a login-link request, reserving a slot).
//!
//! - [`Locks::acquire`] is one round trip: on Redis one script takes the lock (`SET NX PX`) and
//!   issues a [`FencingToken`] from the lock's fence key, both in one hash slot. The answer is
//!   [`Acquire::Acquired`] (a [`LockGuard`]), [`Acquire::Contended`] (with the holder's remaining
//!   lease) or [`Acquire::Unavailable`] (Redis unusable).
//! - **Locks fail closed.** While Redis is unusable no lock is granted: the store's memory
//!   fallback (which the cache keeps using meanwhile) is never asked, since a lock granted by one
//!   process's memory is no lock for the others. On the memory backend (no Redis configured) the
//!   memory twin is the lock, for the one process there is.
//! - Release and extension compare the holder's token (compare-and-delete,
//!   compare-and-`PEXPIRE`): a holder whose lease ran out cannot release or extend the lock a
//!   later holder took. Dropping the guard releases the lock. [`LockGuard::with_watchdog`]
//!   extends the lease every third of its length while the guard lives, and
//!   [`LockGuard::lost`] / [`LockGuard::is_lost`] tell the holder the moment it no longer holds it.
//! - [`Locks::acquire_timeout`] waits for a contended lock with jittered retries, for at most the
//!   time given.
//!
//! # Why the token, and how the protected resource checks it
//!
//! A lease ends by the clock, whatever the holder is doing: a holder paused longer than its lease
//! (a stop-the-world pause, a stalled VM, `SIGSTOP`, a slow network) wakes up believing it still
//! holds the lock while another process has taken it. A lock alone is therefore only an
//! optimisation (it makes conflicts rare); what makes them harmless is the token. Tokens strictly
//! increase per lock name, so the resource refuses a write that carries an older token than one
//! it has seen:
//!
//! ```sql
//! UPDATE login_link_requests
//!    SET status = 'approved', fence = $1
//!  WHERE id = $2 AND fence < $1
//! -- 0 rows updated: a later holder wrote first; this holder lost the lock and must stop.
//! ```
//!
//! A token is `max(last token + 1, Redis server time in microseconds)`: it keeps increasing
//! while the fence key lives (30 days after the lock's last use), and when Redis lost the fence
//! key (a restart without persistence, a failover to a replica that had not received it) it
//! starts again from the server's clock, above every token issued before. A token can only go
//! backwards if a failover lands on a server whose clock is behind the old one by more than the
//! time the failover took; then the database check refuses the new holder's writes (safe, not
//! live) until the clock catches up.
//!
//! ```
//! use std::time::Duration;
//! use speedlayer::key::Ident;
//! use speedlayer::lock::{Acquire, Locks};
//! use speedlayer::ttl::Ttl;
//! use speedlayer::Cache;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cache = Cache::memory();
//! let locks = Locks::new(&cache);
//! let name = locks.name(&Ident::from_static("login-link"), 42)?;
//! match locks.acquire(&name, Ttl::seconds(10)).await {
//!     Acquire::Acquired(guard) => {
//!         let token = guard.token();
//!         // UPDATE ... SET fence = $token WHERE id = 42 AND fence < $token
//!         assert!(locks.acquire(&name, Ttl::seconds(10)).await.is_contended());
//!         guard.release().await?;
//!     }
//!     Acquire::Contended { remaining } => println!("held by another for {remaining:?}"),
//!     Acquire::Unavailable => println!("Redis is unusable: try again later (503)"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Cache;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{Ident, Key, KeyError, KeySpace, Scope};
use crate::store::{Answered, OutageRule, Store, spawn_detached};
use crate::ttl::Ttl;

pub mod script;

use script::{Taken, fence_key};

const LOCK: Ident = Ident::from_static("lock");

/// A fencing token: strictly increasing per lock name. Hand it to the protected resource with
/// every write (`WHERE fence < $token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// The token as a number (store it in a `BIGINT` column; it fits in an `i64`).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A lock's name: `[<prefix>:][@<tenant>:]lock:<resource>:<id>`. Built by [`Locks::name`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockName {
    key: Key,
}

impl LockName {
    /// The lock key, as stored.
    pub fn as_str(&self) -> &str {
        self.key.as_str()
    }

    /// The fence key beside it (same Redis Cluster slot).
    pub fn fence_key(&self) -> String {
        fence_key(&self.key)
    }
}

/// The answer to an acquisition.
#[derive(Debug)]
#[must_use]
pub enum Acquire {
    /// The lock is this caller's until the guard is released or dropped, or its lease ends.
    Acquired(LockGuard),
    /// Another holder has it, for this long still (unless it releases it sooner).
    Contended {
        /// The holder's remaining lease.
        remaining: Duration,
    },
    /// The backend is unusable: no lock can be granted (locks fail closed).
    Unavailable,
}

impl Acquire {
    /// The guard, when the lock was acquired.
    pub fn guard(self) -> Option<LockGuard> {
        match self {
            Acquire::Acquired(guard) => Some(guard),
            _ => None,
        }
    }

    /// True when another holder has the lock.
    pub fn is_contended(&self) -> bool {
        matches!(self, Acquire::Contended { .. })
    }

    /// True when the backend was unusable.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Acquire::Unavailable)
    }
}

/// Locks on the cache's store (Redis, or memory when no Redis is configured). Cheap to clone.
#[derive(Clone)]
pub struct Locks {
    store: Store,
    scope: Scope,
}

impl Locks {
    /// Locks on the cache's store, named in its namespace (no tenant).
    pub fn new(cache: &Cache) -> Locks {
        Locks::from_store(cache.store(), &cache.namespace().global())
    }

    /// Locks on `store`, named in `scope` (a tenant's scope names that tenant's locks).
    pub fn from_store(store: &Store, scope: &Scope) -> Locks {
        Locks {
            store: store.clone(),
            scope: scope.clone(),
        }
    }

    /// The lock of one resource: `lock:<resource>:<id>` in this scope.
    pub fn name(&self, resource: &Ident, id: impl fmt::Display) -> Result<LockName, KeyError> {
        Ok(LockName {
            key: self.keyspace(resource).key(id)?,
        })
    }

    fn keyspace(&self, resource: &Ident) -> KeySpace {
        self.scope.keyspace(&LOCK, resource)
    }

    /// Tries once to take `name` for `lease`. One round trip.
    pub async fn acquire(&self, name: &LockName, lease: Ttl) -> Acquire {
        if !self.store.is_on(crate::switch::Capability::Locks) {
            // Switched off: a lock never fails open.
            return Acquire::Unavailable;
        }
        let op = script::Acquire {
            key: &name.key,
            lease,
        };
        let sent = tokio::time::Instant::now();
        match self.store.run(&op, OutageRule::FailClosed).await {
            Ok(Answered::Backend(Taken::Token(token))) => Acquire::Acquired(LockGuard::new(
                self.clone(),
                name.clone(),
                token,
                lease,
                sent,
            )),
            Ok(Answered::Backend(Taken::Held(remaining))) => {
                crate::telemetry::lock_contended();
                Acquire::Contended { remaining }
            }
            Ok(_) => Acquire::Unavailable,
            Err(e) => {
                tracing::warn!(lock = %name.as_str(), error = %e, "lock refused by the backend");
                Acquire::Unavailable
            }
        }
    }

    /// Takes `name` for `lease`, waiting up to `wait` while another holds it: retries after a
    /// random 10-100 % of the time the holder has left (at most 200 ms at a time), until the
    /// wait is over. An unusable backend answers at once.
    pub async fn acquire_timeout(&self, name: &LockName, lease: Ttl, wait: Duration) -> Acquire {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.acquire(name, lease).await {
                Acquire::Contended { remaining } => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Acquire::Contended { remaining };
                    }
                    let pause = remaining.min(Duration::from_millis(200));
                    let pause = pause.mul_f64(rand::rng().random_range(0.1..=1.0));
                    let pause = pause
                        .max(Duration::from_millis(1))
                        .min(deadline.saturating_duration_since(now));
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    async fn release_token(&self, name: &LockName, token: u64) -> Result<bool> {
        let op = script::Release {
            key: &name.key,
            token,
        };
        match self.store.run(&op, OutageRule::FailClosed).await? {
            Answered::Backend(released) => Ok(released),
            _ => Err(unavailable("release")),
        }
    }

    async fn extend_token(&self, name: &LockName, token: u64, lease: Ttl) -> Result<bool> {
        let op = script::Extend {
            key: &name.key,
            token,
            lease,
        };
        match self.store.run(&op, OutageRule::FailClosed).await? {
            Answered::Backend(extended) => Ok(extended),
            _ => Err(unavailable("extend")),
        }
    }
}

fn unavailable(what: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("lock {what}: the backend is unusable (locks are never answered from memory)"),
    )
}

impl fmt::Debug for Locks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locks")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Whether the holder still holds its lock, as far as it knows.
struct Held {
    /// True once lost.
    signal: watch::Sender<bool>,
}

impl Held {
    fn lose(&self) {
        self.signal.send_replace(true);
    }
}

/// A held lock. Dropping it releases the lock (in the background; [`LockGuard::release`] waits
/// for it and says whether it still held it).
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    locks: Locks,
    name: LockName,
    token: u64,
    lease: Ttl,
    held: Arc<Held>,
    watchdog: Option<JoinHandle<()>>,
    released: bool,
    /// When the acquisition was sent: the lease counts from there.
    granted: tokio::time::Instant,
}

impl LockGuard {
    fn new(
        locks: Locks,
        name: LockName,
        token: u64,
        lease: Ttl,
        granted: tokio::time::Instant,
    ) -> LockGuard {
        let (signal, _) = watch::channel(false);
        LockGuard {
            locks,
            name,
            token,
            lease,
            held: Arc::new(Held { signal }),
            watchdog: None,
            released: false,
            granted,
        }
    }

    /// The fencing token of this holding.
    pub fn token(&self) -> FencingToken {
        FencingToken(self.token)
    }

    /// The lock's name.
    pub fn name(&self) -> &LockName {
        &self.name
    }

    /// The lease this holding was granted (the watchdog renews it at this length).
    pub fn lease(&self) -> Ttl {
        self.lease
    }

    /// Extends the lease to `lease` from now, if this holder still holds the lock. `Ok(false)`
    /// when it does not (the lease ran out and, perhaps, another took the lock): the holder must
    /// stop. An error when the backend is unusable.
    pub async fn extend(&self, lease: Ttl) -> Result<bool> {
        let extended = self
            .locks
            .extend_token(&self.name, self.token, lease)
            .await?;
        if !extended {
            self.held.lose();
        }
        Ok(extended)
    }

    /// Releases the lock. `Ok(true)` when this holder still held it; `Ok(false)` when it had
    /// lost it already. An error when the backend is unusable (the lock then ends with its
    /// lease).
    pub async fn release(mut self) -> Result<bool> {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        // Marked released only once the call returned: if this future is dropped meanwhile,
        // the guard's drop releases in the background.
        let released = self.locks.release_token(&self.name, self.token).await;
        self.released = true;
        self.held.lose();
        released
    }

    /// Keeps the lock while the guard lives: a background task extends the lease every third
    /// of its length. If an extension finds the lock taken, or the backend stays unusable until
    /// the lease has run out, the guard is marked lost ([`LockGuard::lost`]).
    pub fn with_watchdog(mut self) -> LockGuard {
        if self.watchdog.is_none() {
            let (locks, name, token, lease, held) = (
                self.locks.clone(),
                self.name.clone(),
                self.token,
                self.lease,
                self.held.clone(),
            );
            let granted = self.granted;
            self.watchdog = Some(tokio::spawn(watch_over(
                locks, name, token, lease, held, granted,
            )));
        }
        self
    }

    /// True once this holder knows it lost the lock (an extension found it taken, or the
    /// watchdog could not extend it in time). A holder that is not watched only learns it when
    /// it extends or releases; the database's token check is what protects the resource.
    pub fn is_lost(&self) -> bool {
        *self.held.signal.borrow()
    }

    /// Resolves the moment this holder knows it lost the lock: race the protected work against
    /// it (`tokio::select!`) to stop as soon as the lock is gone.
    pub async fn lost(&self) {
        let mut signal = self.held.signal.subscribe();
        let _ = signal.wait_for(|lost| *lost).await;
    }
}

/// The watchdog: extends the lease every third of it; marks the holding lost when the lock is
/// taken, or the moment the lease may have run out without a successful extension. The lease
/// counts from when each extension was sent (the server may have applied it as early as that),
/// and from when the acquisition was sent for the first one.
async fn watch_over(
    locks: Locks,
    name: LockName,
    token: u64,
    lease: Ttl,
    held: Arc<Held>,
    granted: tokio::time::Instant,
) {
    let every = (lease.as_duration() / 3).max(Duration::from_millis(1));
    let mut good_until = granted + lease.as_duration();
    loop {
        let next = (tokio::time::Instant::now() + every).min(good_until);
        tokio::time::sleep_until(next).await;
        let sent = tokio::time::Instant::now();
        if sent >= good_until {
            tracing::warn!(lock = %name.as_str(), "the lock's lease ran out before it could be extended");
            held.lose();
            return;
        }
        match tokio::time::timeout_at(good_until, locks.extend_token(&name, token, lease)).await {
            Ok(Ok(true)) => good_until = sent + lease.as_duration(),
            Ok(Ok(false)) => {
                tracing::warn!(lock = %name.as_str(), "the lock was lost: another holder has it");
                held.lose();
                return;
            }
            // The backend is unusable: try again until the lease runs out.
            Ok(Err(_)) => {}
            Err(_) => {
                tracing::warn!(
                    lock = %name.as_str(),
                    "the lock's lease ran out while the backend did not answer"
                );
                held.lose();
                return;
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        if self.released {
            return;
        }
        self.held.lose();
        let (locks, name, token) = (self.locks.clone(), self.name.clone(), self.token);
        // Without a runtime (the process is shutting down) the lock ends with its lease.
        spawn_detached(async move {
            if let Err(e) = locks.release_token(&name, token).await {
                tracing::debug!(lock = %name.as_str(), error = %e, "lock not released; it ends with its lease");
            }
        });
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name.as_str())
            .field("token", &self.token)
            .field("lease", &self.lease)
            .field("watched", &self.watchdog.is_some())
            .field("lost", &self.is_lost())
            .finish()
    }
}
