//! A read-through session index: the database stays the authority on sessions; Redis keeps a
//! compact copy of each for a while, so that most requests authenticate without a query.
//!
//! - [`Sessions::get`] answers [`SessionLookup::Present`], [`SessionLookup::Absent`] or
//!   [`SessionLookup::Unknown`] (Redis unusable, and nothing in the fallback): unknown is never
//!   folded into absent, so the caller decides (query the database itself, or refuse).
//! - **Read-through.** On a miss the caller's loader reads the database. The copy lives for
//!   `min(session expiry - now, cap)`; a hit still checks the stored expiry, so a copy never
//!   outlives its session. A token the database does not know is remembered as absent for a
//!   few seconds (`negative_ttl`), so the same bad token repeated does not reach the database
//!   each time (distinct random tokens still do: rate-limit them). A copy that does not decode
//!   (another deploy's format, another client's value) is a miss.
//! - **Revocation.** [`Sessions::revoke`] drops one session's copy, [`Sessions::revoke_user`]
//!   every copy of a user's sessions (a tag per user: an index that cannot drift), for every
//!   instance at once. Revoke in the database first, then here. A load that read the database
//!   before a revocation never stores its copy after it: the copy is stored under a lease that
//!   any revocation of it breaks, its user's tag is recorded before it is stored, and a user
//!   revoked while it loaded is seen (a marker that lives as long as a copy can) and the copy is
//!   not stored.
//! - **Keys.** A token never appears in a key, a log or an error: the index is keyed by the
//!   first 128 bits of the token's SHA-256 (`session:token:<hex>`).
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use speedlayer::session::{SessionLookup, SessionRecord, Sessions};
//! use speedlayer::ttl::Ttl;
//! use speedlayer::Cache;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cache = Cache::memory();
//! let sessions = Sessions::new(&cache, Ttl::minutes(15));
//! let found = sessions
//!     .get("token-from-cookie", || async {
//!         // SELECT user_id, expires_at, role FROM sessions WHERE token_hash = $1
//!         Ok::<_, std::io::Error>(Some(SessionRecord {
//!             user_id: "t17".to_owned(),
//!             expires_at: SystemTime::now() + Duration::from_secs(3600),
//!             data: "teacher".to_owned(),
//!         }))
//!     })
//!     .await?;
//! assert!(matches!(found, SessionLookup::Present(s) if s.user_id == "t17"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Cache;
use crate::error::{ErrorKind, Result};
use crate::key::{Ident, Key, KeySpace, Scope, Tag};
use crate::store::{CacheLayer, IndexWindow, LeaseHold, Leased, Source, Store};
use crate::ttl::Ttl;

const SESSION: Ident = Ident::from_static("session");
const TOKEN: Ident = Ident::from_static("token");
const REVOKED_USER: Ident = Ident::from_static("revoked-user");
const SESSION_USER: Ident = Ident::from_static("session-user");

/// A session as the database knows it: whose it is, when it ends, and the compact data the
/// service needs on every request (a role, a school id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord<S> {
    /// The user the session belongs to.
    pub user_id: String,
    /// When the session ends.
    pub expires_at: SystemTime,
    /// What the service keeps of it.
    pub data: S,
}

/// What [`Sessions::get`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionLookup<S> {
    /// A live session.
    Present(SessionRecord<S>),
    /// No such session, or it has ended.
    Absent,
    /// The index cannot be read (Redis unusable, and nothing in the fallback): the caller
    /// decides, for example by asking the database itself.
    Unknown,
}

/// The copy kept in Redis: plain JSON (`{"user":…,"exp":<unix ms>,"data":…}`), or `null` for
/// a token the database does not know.
#[derive(Serialize, Deserialize)]
struct Copy<S> {
    user: String,
    exp: u64,
    data: S,
}

/// The session index. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Sessions {
    cache: Cache,
    tokens: KeySpace,
    revoked_users: KeySpace,
    scope: Scope,
    cap: Ttl,
    negative_ttl: Ttl,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Sessions {
    /// The index of `cache`'s store, in its namespace's global scope; a copy lives at most `cap`.
    pub fn new(cache: &Cache, cap: Ttl) -> Sessions {
        let scope = cache.namespace().global();
        Sessions {
            cache: cache.clone(),
            tokens: scope.keyspace(&SESSION, &TOKEN),
            revoked_users: scope.keyspace(&SESSION, &REVOKED_USER),
            scope,
            cap,
            negative_ttl: Ttl::seconds(5),
        }
    }

    /// How long a token the database does not know is remembered as absent (5 s by default).
    pub fn negative_ttl(mut self, ttl: Ttl) -> Sessions {
        self.negative_ttl = ttl;
        self
    }

    fn store(&self) -> &Store {
        self.cache.store()
    }

    /// The index key of `token`: never the token itself.
    pub fn key_of(&self, token: &str) -> Result<Key> {
        Ok(self
            .tokens
            .key_str(&crate::key::sha256_hex(token.as_bytes(), 16))?)
    }

    /// The tag every copy of `user_id`'s sessions carries.
    pub fn user_tag(&self, user_id: &str) -> Result<Tag> {
        Ok(self.scope.tag(&SESSION_USER, user_id)?)
    }

    /// The session of `token`: the copy in Redis, or the loader's answer (the database), then
    /// kept. See the [module](self) for what each answer means. Errors only with the loader's
    /// error, or when the loader's user id cannot make a tag (empty, or longer than keys allow).
    pub async fn get<S, E, F, Fut>(
        &self,
        token: &str,
        loader: F,
    ) -> std::result::Result<SessionLookup<S>, SessionError<E>>
    where
        S: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<SessionRecord<S>>, E>>,
    {
        let key = self.key_of(token).map_err(SessionError::Index)?;
        let store = self.store();
        if !store.is_on(crate::switch::Capability::Sessions) {
            // Switched off: the database answers every lookup.
            let loaded = loader().await.map_err(SessionError::Loader)?;
            return Ok(match loaded {
                Some(record) if record.expires_at > SystemTime::now() => {
                    SessionLookup::Present(record)
                }
                _ => SessionLookup::Absent,
            });
        }
        let (found, source) = match store.get_with_source(&key).await {
            Ok(found) => found,
            // Another client's type at the key: a miss, replaced by the lease.
            Err(e) if e.kind() == ErrorKind::WrongType => (None, Source::Primary),
            Err(e) => {
                tracing::debug!(error = %e, "session index unreadable");
                return Ok(SessionLookup::Unknown);
            }
        };
        let mut replace = None;
        if let Some(bytes) = found {
            match read_copy::<S>(&bytes) {
                Some(answer) => return Ok(answer),
                None => replace = Some(bytes),
            }
        }
        if source != Source::Primary {
            // Redis is unusable and the fallback does not know this token.
            return Ok(SessionLookup::Unknown);
        }
        self.load(&key, replace, loader).await
    }

    async fn load<S, E, F, Fut>(
        &self,
        key: &Key,
        replace: Option<Bytes>,
        loader: F,
    ) -> std::result::Result<SessionLookup<S>, SessionError<E>>
    where
        S: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<SessionRecord<S>>, E>>,
    {
        let store = self.store();
        let lease_ttl = self.cache.lease_ttl();
        let token = crate::store::new_token();
        let mut lease = match store
            .get_or_lease_with_source(key, token, lease_ttl, replace.as_deref(), false)
            .await
        {
            Ok((Leased::Value(bytes), _)) => {
                if let Some(answer) = read_copy::<S>(&bytes) {
                    return Ok(answer);
                }
                None
            }
            Ok((Leased::Granted, source)) => Some(LeaseHold {
                store,
                key,
                token,
                source,
                held: true,
            }),
            // Another instance is loading it, or no lease can be taken: load without keeping.
            Ok((Leased::Denied, _)) => None,
            Err(e) => {
                tracing::debug!(error = %e, "no lease on the session copy; it will not be kept");
                None
            }
        };
        let loaded = loader().await.map_err(SessionError::Loader)?;
        let Some(record) = loaded else {
            if let Some(mut hold) = lease.take() {
                let stored = store
                    .set_leased_at(
                        key,
                        token,
                        Bytes::from_static(b"null"),
                        self.negative_ttl,
                        hold.source,
                    )
                    .await;
                hold.held = false;
                if let Err(e) = stored {
                    tracing::debug!(error = %e, "absent session not remembered");
                }
            }
            return Ok(SessionLookup::Absent);
        };
        let left = record
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let Ok(left) = Ttl::new(left.min(self.cap.as_duration())) else {
            // Ended (or about to): nothing to keep, and nothing to serve.
            if let Some(hold) = lease {
                hold.release().await;
            }
            return Ok(SessionLookup::Absent);
        };
        let tag = self
            .user_tag(&record.user_id)
            .map_err(SessionError::Index)?;
        if let Some(hold) = lease {
            self.keep(key, token, hold, &record, tag, left).await;
        }
        Ok(SessionLookup::Present(record))
    }

    /// Stores the copy under the lease: the user's tag first, then a look for a revocation of
    /// the user made while the loader ran, then the copy (refused if the lease was broken).
    async fn keep<S: Serialize>(
        &self,
        key: &Key,
        token: u64,
        mut hold: LeaseHold<'_>,
        record: &SessionRecord<S>,
        tag: Tag,
        ttl: Ttl,
    ) {
        let store = self.store();
        if hold.source != Source::Primary {
            // Granted by this process's fallback during an outage: a revocation made on another
            // instance could not reach it, so no copy is kept there.
            hold.release().await;
            return;
        }
        let copy = Copy {
            user: record.user_id.clone(),
            exp: unix_ms(record.expires_at),
            data: &record.data,
        };
        let Ok(bytes) = serde_json::to_vec(&copy) else {
            hold.release().await;
            return;
        };
        let window = IndexWindow::starting_now(self.cap, self.cache.lease_ttl().as_duration());
        if let Err(e) = store
            .tag_add_at(std::slice::from_ref(&tag), key, window.ttl, hold.source)
            .await
        {
            tracing::debug!(error = %e, "session tag not recorded; the copy is not kept");
            hold.release().await;
            return;
        }
        match self.user_revoked(&record.user_id).await {
            Ok(false) => {}
            Ok(true) => {
                tracing::debug!("the user's sessions were revoked during the load; copy not kept");
                hold.release().await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "revocation marker unreadable; the copy is not kept");
                hold.release().await;
                return;
            }
        }
        let Some(ttl) = window.cut(ttl) else {
            hold.release().await;
            return;
        };
        let stored = store
            .set_leased_at(key, token, Bytes::from(bytes), ttl, hold.source)
            .await;
        hold.held = false;
        match stored {
            Ok(true) => {}
            Ok(false) => tracing::debug!("the session was revoked during the load; copy not kept"),
            Err(e) => tracing::debug!(error = %e, "session copy not kept"),
        }
    }

    async fn user_revoked(&self, user_id: &str) -> Result<bool> {
        let marker = self.revoked_users.key_str(user_id)?;
        Ok(self.store().get(&marker).await?.is_some())
    }

    /// Drops the copy of `token`'s session on every instance (after the session was deleted in
    /// the database). While Redis is unusable the drop is queued and applied before Redis serves
    /// a read again; true when it was applied now.
    pub async fn revoke(&self, token: &str) -> Result<bool> {
        let key = self.key_of(token)?;
        let done = self
            .store()
            .invalidate(std::slice::from_ref(&key), &[])
            .await?;
        Ok(!done.deferred)
    }

    /// Drops the copies of every session of `user_id` on every instance (after they were deleted
    /// in the database), and keeps loads that read the database before that from storing theirs:
    /// for as long as a copy can live, copies of this user's sessions are read from the database
    /// and not kept. Returns how many copies were dropped. While Redis is unusable the drop is
    /// queued (as for [`revoke`](Sessions::revoke)) and this returns
    /// [`crate::ErrorKind::Unavailable`]: call it again once Redis
    /// answers.
    pub async fn revoke_user(&self, user_id: &str) -> Result<u64> {
        let marker = self.revoked_users.key_str(user_id)?;
        let lasts = Ttl::new(self.cap.as_duration() + self.cache.lease_ttl().as_duration())
            .unwrap_or(Ttl::MAX);
        let tag = self.user_tag(user_id)?;
        // The marker goes to Redis or nowhere (never to this process's fallback alone, where
        // the other instances' loads could not see it).
        let op = crate::revocation::MarkOp {
            key: &marker,
            ttl: lasts,
        };
        let marked = matches!(
            self.store()
                .run(&op, crate::store::OutageRule::FailClosed)
                .await,
            Ok(crate::store::Answered::Backend(()))
        );
        // The copies are dropped (or the drop queued for Redis) either way.
        let done = self
            .store()
            .invalidate(&[], std::slice::from_ref(&tag))
            .await?;
        if !marked {
            return Err(crate::Error::new(
                crate::ErrorKind::Unavailable,
                "the user's session copies were dropped (or the drop queued until Redis answers), \
                 but loads in flight on other instances cannot be told: call revoke_user again \
                 once Redis answers",
            ));
        }
        Ok(done.tag_entries_removed)
    }
}

/// Reads a stored copy: `Some` answer when it decodes, `None` for a copy to replace.
fn read_copy<S: DeserializeOwned>(bytes: &[u8]) -> Option<SessionLookup<S>> {
    match serde_json::from_slice::<Option<Copy<S>>>(bytes) {
        Ok(None) => Some(SessionLookup::Absent),
        Ok(Some(copy)) => {
            // An expiry no clock can hold (another client's JSON) is a copy to replace.
            let expires_at = UNIX_EPOCH.checked_add(Duration::from_millis(copy.exp))?;
            if expires_at <= SystemTime::now() {
                Some(SessionLookup::Absent)
            } else {
                Some(SessionLookup::Present(SessionRecord {
                    user_id: copy.user,
                    expires_at,
                    data: copy.data,
                }))
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "session copy does not decode; replacing it");
            None
        }
    }
}

/// Why [`Sessions::get`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError<E> {
    /// The loader failed.
    #[error("session loader failed")]
    Loader(#[source] E),
    /// The index key or the user's tag cannot be built (an empty or over-long user id).
    #[error("session index: {0}")]
    Index(#[source] crate::Error),
}
