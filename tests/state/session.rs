//! The session index: read-through from the database, never the authority, revocable per
//! session and per user for every instance at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use speedlayer::Cache;
use speedlayer::session::{SessionLookup, SessionRecord, Sessions};
use speedlayer::store::{CacheLayer, Remaining, Store};
use speedlayer::ttl::Ttl;

use crate::support::Backend;

type Db = Arc<std::sync::Mutex<std::collections::HashMap<String, SessionRecord<String>>>>;

/// A stand-in sessions table, counting its queries.
#[derive(Clone, Default)]
struct Table {
    rows: Db,
    queries: Arc<AtomicUsize>,
}

impl Table {
    fn insert(&self, token: &str, user: &str, lives: Duration) {
        self.rows.lock().unwrap().insert(
            token.to_owned(),
            SessionRecord {
                user_id: user.to_owned(),
                expires_at: SystemTime::now() + lives,
                data: format!("role of {user}"),
            },
        );
    }

    fn delete_user(&self, user: &str) {
        self.rows.lock().unwrap().retain(|_, r| r.user_id != user);
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    async fn lookup(&self, sessions: &Sessions, token: &str) -> SessionLookup<String> {
        sessions
            .get(token, || async {
                self.queries.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(self.rows.lock().unwrap().get(token).cloned())
            })
            .await
            .unwrap()
    }
}

fn user_of(found: &SessionLookup<String>) -> Option<&str> {
    match found {
        SessionLookup::Present(s) => Some(&s.user_id),
        _ => None,
    }
}

async fn sessions_are_read_through_and_never_outlive_their_expiry(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let sessions = Sessions::new(&cache, Ttl::minutes(15));
    let db = Table::default();
    db.insert("tok-long", "t1", Duration::from_secs(3 * 3600));
    db.insert("tok-short", "t2", Duration::from_millis(1_500));

    assert_eq!(user_of(&db.lookup(&sessions, "tok-long").await), Some("t1"));
    assert_eq!(user_of(&db.lookup(&sessions, "tok-long").await), Some("t1"));
    assert_eq!(db.queries(), 1, "the second read is a hit");
    // The copy lives min(expiry - now, cap).
    let long = sessions.key_of("tok-long").unwrap();
    match cache.store().remaining_ttl(&long).await.unwrap() {
        Remaining::Expires(left) => assert!(left <= Duration::from_secs(900)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        user_of(&db.lookup(&sessions, "tok-short").await),
        Some("t2")
    );
    match cache
        .store()
        .remaining_ttl(&sessions.key_of("tok-short").unwrap())
        .await
        .unwrap()
    {
        Remaining::Expires(left) => assert!(left <= Duration::from_millis(1_500)),
        other => panic!("unexpected {other:?}"),
    }
    // A token the database does not know: absent, remembered for a few seconds.
    assert_eq!(
        db.lookup(&sessions, "tok-none").await,
        SessionLookup::Absent
    );
    assert_eq!(
        db.lookup(&sessions, "tok-none").await,
        SessionLookup::Absent
    );
    assert_eq!(db.queries(), 3);
    // The token never appears in the key.
    assert!(!long.as_str().contains("tok-long"));

    // A hit honours the stored expiry even when the copy outlives it (written by hand here).
    let stale = sessions.key_of("tok-ended").unwrap();
    let ended_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        - 1_000;
    let copy = format!(r#"{{"user":"t3","exp":{ended_ms},"data":"x"}}"#);
    cache
        .store()
        .set(&stale, copy.into(), Ttl::minutes(5))
        .await
        .unwrap();
    assert_eq!(
        db.lookup(&sessions, "tok-ended").await,
        SessionLookup::Absent
    );
    // A copy that does not decode is a miss: the database answers and the copy is replaced.
    db.insert("tok-bad", "t4", Duration::from_secs(600));
    let bad = sessions.key_of("tok-bad").unwrap();
    cache
        .store()
        .set(&bad, "{garbage".into(), Ttl::minutes(5))
        .await
        .unwrap();
    let before = db.queries();
    assert_eq!(user_of(&db.lookup(&sessions, "tok-bad").await), Some("t4"));
    assert_eq!(db.queries(), before + 1);
    assert_eq!(user_of(&db.lookup(&sessions, "tok-bad").await), Some("t4"));
    assert_eq!(db.queries(), before + 1, "replaced by a good copy");
}

async fn revocations_reach_every_instance_at_once(backend: Backend) {
    let config = backend.config();
    let store = Store::connect(&config).await.unwrap();
    let api = Sessions::new(&Cache::from_store(store.clone(), &config), Ttl::minutes(15));
    let websocket = Sessions::new(&Cache::from_store(store.clone(), &config), Ttl::minutes(15));
    let db = Table::default();
    for (token, user) in [("a1", "u1"), ("a2", "u1"), ("a3", "u1"), ("b1", "u2")] {
        db.insert(token, user, Duration::from_secs(3600));
        assert!(user_of(&db.lookup(&api, token).await).is_some());
    }
    assert_eq!(db.queries(), 4);

    // One session: deleted in the database, then revoked.
    db.rows.lock().unwrap().remove("a1");
    assert!(api.revoke("a1").await.unwrap());
    assert_eq!(db.lookup(&websocket, "a1").await, SessionLookup::Absent);
    assert_eq!(db.queries(), 5, "the other instance asked the database");

    // Every session of a user.
    db.delete_user("u1");
    // Three copies: a2, a3, and a1's "absent" copy, kept under the key its session had.
    assert_eq!(websocket.revoke_user("u1").await.unwrap(), 3);
    assert_eq!(db.lookup(&api, "a2").await, SessionLookup::Absent);
    assert_eq!(db.lookup(&api, "a3").await, SessionLookup::Absent);
    assert_eq!(user_of(&db.lookup(&api, "b1").await), Some("u2"));
    assert_eq!(db.queries(), 7, "u2's copy was not touched");
}

/// A load that read the database before the user's sessions were revoked never keeps its copy.
async fn a_user_revoked_during_a_load_is_not_kept(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let sessions = Sessions::new(&cache, Ttl::minutes(15));
    let db = Table::default();
    db.insert("c1", "u9", Duration::from_secs(3600));
    let found = sessions
        .get("c1", || async {
            let row = db.rows.lock().unwrap().get("c1").cloned();
            // Meanwhile an administrator locks the account.
            db.delete_user("u9");
            sessions.revoke_user("u9").await.unwrap();
            Ok::<_, std::io::Error>(row)
        })
        .await
        .unwrap();
    assert_eq!(
        user_of(&found),
        Some("u9"),
        "the request that raced it still sees the row"
    );
    assert_eq!(
        db.lookup(&sessions, "c1").await,
        SessionLookup::Absent,
        "no copy was kept"
    );
    // Likewise for a single session revoked during its load.
    db.insert("c2", "u10", Duration::from_secs(3600));
    let found = sessions
        .get("c2", || async {
            let row = db.rows.lock().unwrap().get("c2").cloned();
            db.rows.lock().unwrap().remove("c2");
            sessions.revoke("c2").await.unwrap();
            Ok::<_, std::io::Error>(row)
        })
        .await
        .unwrap();
    assert_eq!(user_of(&found), Some("u10"));
    assert_eq!(db.lookup(&sessions, "c2").await, SessionLookup::Absent);
}

both_backends!(
    sessions_are_read_through_and_never_outlive_their_expiry,
    revocations_reach_every_instance_at_once,
    a_user_revoked_during_a_load_is_not_kept,
);

/// Other clients' data under our keys, on every Redis backend.
mod other_clients {
    use super::*;

    /// Another client's data where a session copy lives (a hash, a string without TTL that is not
    /// a copy): a miss, replaced by the database's answer with a TTL, and never a breaker trip.
    async fn another_clients_data_at_a_session_key_is_a_miss(backend: Backend) {
        use ::redis::AsyncCommands;
        let cache = Cache::new(backend.config()).await.unwrap();
        let sessions = Sessions::new(&cache, Ttl::minutes(15));
        let db = Table::default();
        db.insert("f1", "u1", Duration::from_secs(3600));
        db.insert("f2", "u2", Duration::from_secs(3600));
        let mut raw = backend.raw().await.expect("a Redis backend");
        let hash_key = sessions.key_of("f1").unwrap();
        let _: () = raw.hset(hash_key.as_str(), "user", "x").await.unwrap();
        let text_key = sessions.key_of("f2").unwrap();
        let _: () = raw.set(text_key.as_str(), "not a session").await.unwrap();
        assert_eq!(user_of(&db.lookup(&sessions, "f1").await), Some("u1"));
        assert_eq!(user_of(&db.lookup(&sessions, "f2").await), Some("u2"));
        assert_eq!(db.queries(), 2);
        for key in [&hash_key, &text_key] {
            let ttl: i64 = raw.pttl(key.as_str()).await.unwrap();
            assert!(ttl > 0, "replaced by a copy with a TTL");
        }
        assert_eq!(user_of(&db.lookup(&sessions, "f1").await), Some("u1"));
        assert_eq!(db.queries(), 2, "now a hit");
        crate::support::assert_healthy(&cache).await;
    }

    redis_backends!(another_clients_data_at_a_session_key_is_a_miss,);
}
