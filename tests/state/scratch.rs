//! Scratch state: hashes flushed to a sink exactly once (or left for the next flush), drafts,
//! presence.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use speedlayer::key::{Ident, Key, Namespace};
use speedlayer::scratch::{Drafts, FlushBatch, FlushError, Presence, Scratch, Sink};
use speedlayer::store::{Remaining, Store};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Config};
use tokio::sync::Notify;

use crate::support::Backend;

const ATTENDANCE: Ident = Ident::from_static("attendance");
const CLASS: Ident = Ident::from_static("class");

fn day_key(class: u32) -> Key {
    Namespace::root()
        .global()
        .key(&ATTENDANCE, &CLASS, class)
        .unwrap()
        .with_context("2026-11-30")
        .unwrap()
}

/// A stand-in attendance table: applies a batch id at most once, as a unique constraint on the
/// flushed-batches table would; can fail every n-th call, or hang after applying one call (a
/// flush that dies after the database committed).
#[derive(Default)]
struct Db {
    applied: Mutex<HashSet<String>>,
    marks: Mutex<HashMap<String, usize>>,
    calls: AtomicUsize,
    redelivered: AtomicUsize,
    fail_every: usize,
    hang_on_call: Option<usize>,
    hanging: Notify,
}

impl Sink for Db {
    type Error = std::io::Error;

    async fn write(&self, batch: &FlushBatch) -> Result<(), std::io::Error> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_every > 0 && n.is_multiple_of(self.fail_every) {
            return Err(std::io::Error::other("the database refused the write"));
        }
        let fresh = self.applied.lock().unwrap().insert(batch.id.clone());
        if fresh {
            let mut marks = self.marks.lock().unwrap();
            for (field, _) in &batch.fields {
                *marks.entry(field.clone()).or_insert(0) += 1;
            }
        } else {
            self.redelivered.fetch_add(1, Ordering::SeqCst);
        }
        if self.hang_on_call == Some(n) {
            self.hanging.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

async fn marks_are_read_whole_and_flushed_once(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let today = Scratch::new(&cache).hash(day_key(7));
    today.mark("s1", "present").await.unwrap();
    today
        .mark_many(&[("s2".into(), "absent".into()), ("s1".into(), "late".into())])
        .await
        .unwrap();
    let all = today.read().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all["s1"], "late", "a newer mark of a field wins");
    // The safety net: 48 h from the first mark.
    let left = today.remaining_ttl().await.unwrap().unwrap();
    assert!(left > Duration::from_secs(47 * 3600), "{left:?}");
    let db = Db::default();
    let flushed = today.flush(&db).await.unwrap();
    assert_eq!(
        (flushed.batches, flushed.fields, flushed.busy),
        (1, 2, false)
    );
    assert!(today.read().await.unwrap().is_empty());
    assert_eq!(today.flush(&db).await.unwrap().batches, 0, "nothing left");
    assert_eq!(db.marks.lock().unwrap().len(), 2);
}

async fn a_failed_sink_leaves_the_batch_and_marks_written_meanwhile(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let today = Scratch::new(&cache).hash(day_key(8));
    today.mark("s1", "present").await.unwrap();
    today.mark("s2", "present").await.unwrap();
    let failing = Db {
        fail_every: 1,
        ..Db::default()
    };
    assert!(matches!(
        today.flush(&failing).await,
        Err(FlushError::Sink(_))
    ));
    // Marks written after the failed flush go to the new hash; reads see both.
    today.mark("s3", "absent").await.unwrap();
    assert_eq!(today.read().await.unwrap().len(), 3);
    let db = Db::default();
    let flushed = today.flush(&db).await.unwrap();
    assert_eq!(
        (flushed.batches, flushed.fields),
        (2, 3),
        "the old batch, then the new marks"
    );
    assert!(today.read().await.unwrap().is_empty());
    let marks = db.marks.lock().unwrap();
    assert!(marks.values().all(|n| *n == 1) && marks.len() == 3);
}

/// 4 writers × 500 marks racing a flusher whose sink fails every third call, with one flush
/// aborted after the database committed: every mark is applied exactly once, and nothing is
/// left in Redis.
async fn racing_writers_a_failing_sink_and_an_aborted_flush_lose_and_double_nothing(
    backend: Backend,
) {
    let config: Config = backend.config();
    let store = Store::connect(&config).await.unwrap();
    let server = |_: usize| {
        Scratch::new(&Cache::from_store(store.clone(), &config))
            .claim_ttl(Ttl::from_millis(300).unwrap())
            .hash(day_key(9))
    };
    let db = Arc::new(Db {
        fail_every: 3,
        hang_on_call: Some(4),
        ..Db::default()
    });
    let mut writers = Vec::new();
    for w in 0..4 {
        let hash = server(w);
        writers.push(tokio::spawn(async move {
            for i in 0..500 {
                hash.mark(&format!("w{w}-{i:03}"), "present").await.unwrap();
                if i % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }));
    }
    let flusher = server(4);
    let mut failures = 0;
    let mut aborted = false;
    while writers.iter().any(|w| !w.is_finished()) {
        let next = db.calls.load(Ordering::SeqCst) + 1;
        if !aborted && db.hang_on_call == Some(next) {
            // This flush's sink commits, then the flush dies before it removes the batch.
            let (hash, db2) = (flusher.clone(), db.clone());
            let task = tokio::spawn(async move { hash.flush(&*db2).await });
            db.hanging.notified().await;
            task.abort();
            aborted = true;
            continue;
        }
        match flusher.flush(&*db).await {
            Ok(_) => {}
            Err(FlushError::Sink(_)) => failures += 1,
            Err(e) => panic!("unexpected {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    // The end-of-day flush: until nothing is left (the aborted flush's claim expires first).
    let healthy = Db::default();
    for _ in 0..200 {
        if flusher.read().await.unwrap().is_empty() {
            break;
        }
        // Same database: the batches it already applied are recognised.
        let _ = flusher.flush(&*db).await;
        let _ = flusher.flush(&healthy).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        flusher.read().await.unwrap().is_empty(),
        "marks left in Redis"
    );
    assert!(
        aborted && failures > 0,
        "the faults happened ({failures} failures)"
    );
    let mut applied = db.marks.lock().unwrap().clone();
    for (field, n) in healthy.marks.lock().unwrap().iter() {
        *applied.entry(field.clone()).or_insert(0) += n;
    }
    assert_eq!(applied.len(), 2_000, "every mark reached the database");
    let doubled: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "marks applied twice: {doubled:?}");
    eprintln!(
        "{} sink calls, {failures} failed, {} batches delivered again and skipped",
        db.calls.load(Ordering::SeqCst),
        db.redelivered.load(Ordering::SeqCst)
    );
}

async fn unflushed_data_expires_with_the_safety_net(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let scratch = Scratch::new(&cache).safety_ttl(Ttl::from_millis(1_000).unwrap());
    let hash = scratch.hash(day_key(10));
    hash.mark("s1", "present").await.unwrap();
    assert_eq!(hash.read().await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(hash.read().await.unwrap().is_empty());
}

async fn drafts_are_kept_a_day_from_their_last_save(backend: Backend) {
    let cache = Cache::new(backend.config()).await.unwrap();
    let drafts = Drafts::new(&cache);
    drafts
        .save("p42", "enrolment", &serde_json::json!({"step": 1}))
        .await
        .unwrap();
    drafts
        .save("p42", "enrolment", &serde_json::json!({"step": 2}))
        .await
        .unwrap();
    let back: Option<serde_json::Value> = drafts.load("p42", "enrolment").await.unwrap();
    assert_eq!(back.unwrap()["step"], 2);
    let key = drafts.key_of("p42", "enrolment").unwrap();
    assert_eq!(key.as_str(), "form:progress:p42:enrolment");
    assert!(
        matches!(cache.remaining_ttl(&key).await, Remaining::Expires(left) if left > Duration::from_secs(23 * 3600))
    );
    assert!(drafts.discard("p42", "enrolment").await.unwrap());
    let gone: Option<serde_json::Value> = drafts.load("p42", "enrolment").await.unwrap();
    assert_eq!(gone, None);
    // A draft of another shape (the form changed between deploys) loads as None, and goes.
    drafts
        .save("p43", "enrolment", &serde_json::json!({"step": 1}))
        .await
        .unwrap();
    let other: Option<Vec<u8>> = drafts.load("p43", "enrolment").await.unwrap();
    assert_eq!(other, None);
}

async fn presence_is_shared_and_expires_without_heartbeats(backend: Backend) {
    let config = backend.config();
    let store = Store::connect(&config).await.unwrap();
    let api = Presence::new(&Scratch::new(&Cache::from_store(store.clone(), &config)));
    let websocket = Presence::new(&Scratch::new(&Cache::from_store(store.clone(), &config)))
        .typing_ttl(Ttl::from_millis(1_000).unwrap());
    websocket
        .heartbeat("class-7", "t17", Ttl::seconds(30))
        .await
        .unwrap();
    api.heartbeat("class-7", "s1", Ttl::from_millis(1_000).unwrap())
        .await
        .unwrap();
    websocket.typing("class-7", "s1").await.unwrap();
    let mut online = api.online("class-7").await.unwrap();
    online.sort();
    assert_eq!(online, vec!["s1".to_owned(), "t17".to_owned()]);
    assert_eq!(api.typists("class-7").await.unwrap(), vec!["s1".to_owned()]);
    // s1's heartbeat stops: gone once its time passes; typing too.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(api.online("class-7").await.unwrap(), vec!["t17".to_owned()]);
    assert!(api.typists("class-7").await.unwrap().is_empty());
    websocket.leave("class-7", "t17").await.unwrap();
    assert!(api.online("class-7").await.unwrap().is_empty());
    assert!(api.online("class-8").await.unwrap().is_empty());
}

both_backends!(
    marks_are_read_whole_and_flushed_once,
    a_failed_sink_leaves_the_batch_and_marks_written_meanwhile,
    racing_writers_a_failing_sink_and_an_aborted_flush_lose_and_double_nothing,
    unflushed_data_expires_with_the_safety_net,
    drafts_are_kept_a_day_from_their_last_save,
    presence_is_shared_and_expires_without_heartbeats,
);

/// Other clients' data under our keys, on every Redis backend.
mod other_clients {
    use super::*;

    /// Another client's key of another type where a scratch hash lives: a clear error, the key left
    /// as it is, and the backend counted healthy.
    async fn another_clients_key_at_a_scratch_hash_is_a_clear_error(backend: Backend) {
        use ::redis::AsyncCommands;
        let cache = Cache::new(backend.config()).await.unwrap();
        let hash = Scratch::new(&cache).hash(day_key(11));
        let mut raw = backend.raw().await.expect("a Redis backend");
        let _: () = raw.set(hash.key().as_str(), "node's value").await.unwrap();
        let err = hash.mark("s1", "present").await.unwrap_err();
        assert_eq!(err.kind(), speedlayer::ErrorKind::WrongType);
        assert!(matches!(
            hash.flush(&Db::default()).await,
            Err(FlushError::Store(e)) if e.kind() == speedlayer::ErrorKind::WrongType
        ));
        let kept: String = raw.get(hash.key().as_str()).await.unwrap();
        assert_eq!(kept, "node's value");
        crate::support::assert_healthy(&cache).await;
    }

    /// A field with the reserved prefix is refused; another client's bytes that are not UTF-8 reach
    /// the sink replaced, and do not block the batch.
    async fn reserved_fields_are_refused_and_binary_values_do_not_block_a_flush(backend: Backend) {
        use ::redis::AsyncCommands;
        let cache = Cache::new(backend.config()).await.unwrap();
        let hash = Scratch::new(&cache).hash(day_key(12));
        assert_eq!(
            hash.mark("~batch", "x").await.unwrap_err().kind(),
            speedlayer::ErrorKind::InvalidKey
        );
        hash.mark("s1", "present").await.unwrap();
        let mut raw = backend.raw().await.expect("a Redis backend");
        let _: () = raw
            .hset(hash.key().as_str(), "s2", &[0xff_u8, 0xfe, b'x'][..])
            .await
            .unwrap();
        let db = Db::default();
        let flushed = hash.flush(&db).await.unwrap();
        assert_eq!((flushed.batches, flushed.fields), (1, 2));
        assert!(hash.read().await.unwrap().is_empty());
        crate::support::assert_healthy(&cache).await;
    }

    /// Another client's key of another type where a presence room lives: the room reads as empty,
    /// a heartbeat replaces it, and the backend stays healthy.
    async fn another_clients_key_at_a_presence_room_is_replaced(backend: Backend) {
        use ::redis::AsyncCommands;
        let cache = Cache::new(backend.config()).await.unwrap();
        let presence = Presence::new(&Scratch::new(&cache));
        let mut raw = backend.raw().await.expect("a Redis backend");
        let _: () = raw
            .set("presence:room:class-9", "node's value")
            .await
            .unwrap();
        assert!(presence.online("class-9").await.unwrap().is_empty());
        presence
            .heartbeat("class-9", "t9", Ttl::seconds(30))
            .await
            .unwrap();
        assert_eq!(
            presence.online("class-9").await.unwrap(),
            vec!["t9".to_owned()]
        );
        let ttl: i64 = raw.pttl("presence:room:class-9").await.unwrap();
        assert!(ttl > 0);
        crate::support::assert_healthy(&cache).await;
    }

    redis_backends!(
        another_clients_key_at_a_scratch_hash_is_a_clear_error,
        reserved_fields_are_refused_and_binary_values_do_not_block_a_flush,
        another_clients_key_at_a_presence_room_is_replaced,
    );
}
