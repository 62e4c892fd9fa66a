//! Fleet behaviour across OS processes: several `speedlayer-fleet-node` processes (each an app
//! server with its own connections, flights and memory) on one real Redis. What one instance
//! does must hold for the others.

#[path = "../support/mod.rs"]
mod support;

#[cfg(feature = "cluster")]
mod cluster;
mod outbox;
mod recovery;
#[cfg(feature = "sentinel")]
mod sentinel;
mod tier;

use std::time::{Duration, Instant};

use support::fleet::{Node, NodeSettings, number_after};
use support::{Mode, Proxy, RedisServer};

/// The Redis a test's processes share (one server, a local cluster, a Sentinel set), made on a
/// runtime of its own: only its servers, URL and raw connections are used.
fn shared(backend: impl std::future::Future<Output = support::Backend>) -> support::Backend {
    tokio::runtime::Runtime::new().unwrap().block_on(backend)
}

/// A load cancelled in one process (its request timed out, its client went away) gives its
/// lease up: 2 other processes × 25 concurrent callers then share one loader call, instead of
/// every process loading uncached until the lease expires.
#[test]
fn a_cancelled_load_in_one_process_does_not_stall_the_others() {
    let server = RedisServer::start();
    let settings = NodeSettings {
        // Long enough that a caller finding the live lease always waits for its value.
        lease_wait_ms: 3_000,
        ..NodeSettings::default()
    };
    let mut a = Node::spawn("a", &server.url(), settings);
    let mut b = Node::spawn("b", &server.url(), settings);
    let mut c = Node::spawn("c", &server.url(), settings);
    assert!(a.pid() != b.pid() && b.pid() != c.pid());
    assert_eq!(a.request("cancel 1"), "cancelled");
    let (nb, nc) = (b.send("burst 1 25 5 7"), c.send("burst 1 25 5 7"));
    let (rb, rc) = (b.wait(nb), c.wait(nc));
    let loads = number_after(&rb, "loads") + number_after(&rc, "loads");
    eprintln!("after a cancelled load in a: b {rb:?}, c {rc:?}");
    assert!(rb.ends_with("values 7") && rc.ends_with("values 7"));
    assert_eq!(loads, 1, "50 callers in 2 processes share one load");
    assert_eq!(
        a.request("get 1"),
        "value 7",
        "and it is cached for everyone"
    );
}

/// An invalidation made in one process stops a load running in another: the load began before
/// the write, so its value is returned to its caller and never stored.
#[test]
fn an_invalidation_in_one_process_stops_a_load_in_another() {
    let server = RedisServer::start();
    an_invalidation_in_one_process_stops_a_load_in_another_on(&server.url());
}

/// [`an_invalidation_in_one_process_stops_a_load_in_another`] on the Redis at `url` (one server, or a cluster).
fn an_invalidation_in_one_process_stops_a_load_in_another_on(url: &str) {
    let mut a = Node::spawn("a", url, NodeSettings::default());
    let mut b = Node::spawn("b", url, NodeSettings::default());
    let mut c = Node::spawn("c", url, NodeSettings::default());
    assert_eq!(a.request("hold 5 100"), "holding");
    assert_eq!(b.request("invalidate 5"), "deferred false");
    assert_eq!(a.request("release 5"), "returned 100 refused 1");
    assert_eq!(c.request("get 5"), "none", "the older value was not stored");
    // The next load, after the write, is cached.
    assert_eq!(c.request("burst 5 3 1 101"), "loads 1 values 101");
    assert_eq!(a.request("get 5"), "value 101");
}

/// While one process loads a key (holding its lease), another process does not store over it:
/// it loads and returns its own value, and stores nothing; the first load's value is stored.
#[test]
fn a_load_in_one_process_is_not_overwritten_by_another() {
    let server = RedisServer::start();
    let mut a = Node::spawn("a", &server.url(), NodeSettings::default());
    let mut b = Node::spawn("b", &server.url(), NodeSettings::default());
    let mut c = Node::spawn("c", &server.url(), NodeSettings::default());
    assert_eq!(a.request("hold 6 100"), "holding");
    assert_eq!(b.request("burst 6 1 1 200"), "loads 1 values 200");
    assert_eq!(
        c.request("get 6"),
        "none",
        "b stored nothing over a's lease"
    );
    assert_eq!(a.request("release 6"), "returned 100 refused 0");
    assert_eq!(c.request("get 6"), "value 100", "a's load was stored");
}

/// An invalidation that could not reach Redis (the connection was cut, so the command never
/// got there) is applied by its process in the background as soon as Redis answers again, with
/// no traffic on that process and a breaker cool-down of a minute: the other processes stop
/// reading the old value within a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_invalidation_reaches_the_other_processes_without_traffic() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port()).await;
    let quick = NodeSettings {
        op_timeout_ms: 100,
        cool_down_ms: 60_000,
        ..NodeSettings::default()
    };
    let through_proxy = format!("redis://127.0.0.1:{}/0", proxy.port());
    let (gone, pending) = tokio::task::spawn_blocking(move || {
        let mut a = Node::spawn("a", &through_proxy, quick);
        let mut b = Node::spawn("b", &server.url(), NodeSettings::default());
        assert_eq!(a.request("set 9 1"), "ok");
        assert_eq!(b.request("get 9"), "value 1");
        (a, b, server)
    })
    .await
    .map(|(mut a, mut b, server)| {
        proxy.set(Mode::Cut);
        assert_eq!(a.request("invalidate 9"), "deferred true");
        assert_eq!(b.request("get 9"), "value 1", "Redis never got it");
        proxy.set(Mode::Pass);
        let restored = Instant::now();
        let gone = loop {
            if b.request("get 9") == "none" {
                break restored.elapsed();
            }
            assert!(
                restored.elapsed() < Duration::from_secs(10),
                "the queued invalidation never reached Redis"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(a.request("flush 5000"), "flushed true");
        let pending = number_after(&a.request("stats"), "pending");
        drop(server);
        (gone, pending)
    })
    .unwrap();
    eprintln!("a's deferred invalidation seen by b {gone:?} after the connection was restored");
    assert_eq!(pending, 0);
    assert!(gone < Duration::from_secs(5), "{gone:?}");
}

/// 2 OS processes × 25 tasks contend for one lock, 4 times each: at any instant at most one
/// holder (checked by a shared record on the same Redis, `INCR` on entering must answer 1), and
/// the tokens, in the order the holders entered, strictly increase.
#[test]
fn two_processes_contending_for_a_lock_never_overlap() {
    two_processes_contending_for_a_lock_never_overlap_on(&RedisServer::start().url());
}

/// The same, the lock on the Redis at `url`; the shared record on a server of its own (a
/// stand-in for the database the lock protects).
fn two_processes_contending_for_a_lock_never_overlap_on(url: &str) {
    let record = RedisServer::start();
    let mut a = Node::spawn("a", url, NodeSettings::default());
    let mut b = Node::spawn("b", url, NodeSettings::default());
    let started = Instant::now();
    let contend = format!("lock-contend 1 25 4 2000 {}", record.url());
    let (na, nb) = (a.send(&contend), b.send(&contend));
    let (ra, rb) = (a.wait(na), b.wait(nb));
    eprintln!(
        "lock contention: a {ra:?}, b {rb:?} in {:?}",
        started.elapsed()
    );
    assert_eq!(
        number_after(&ra, "acquired") + number_after(&rb, "acquired"),
        200
    );
    assert_eq!(
        number_after(&ra, "overlaps") + number_after(&rb, "overlaps"),
        0
    );
    let mut raw = record.client().get_connection().unwrap();
    let tokens: Vec<u64> = redis::cmd("LRANGE")
        .arg("fleet:tokens:1")
        .arg(0)
        .arg(-1)
        .query(&mut raw)
        .unwrap();
    assert_eq!(tokens.len(), 200);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens in the order of entry strictly increase"
    );
}

/// A holder frozen past its lease (SIGSTOP of its process) loses the lock to another process;
/// when it wakes up its late write is refused by the database's token check, and it can
/// neither release nor extend the new holder's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_loses_the_lock_and_its_late_write_is_refused() {
    use sqlx::Connection;
    let server = RedisServer::start();
    let url = server.url();
    let mut db = sqlx::SqliteConnection::connect("sqlite::memory:")
        .await
        .unwrap();
    sqlx::query("CREATE TABLE slots (id INTEGER PRIMARY KEY, holder TEXT, fence INTEGER NOT NULL)")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO slots VALUES (1, NULL, 0)")
        .execute(&mut db)
        .await
        .unwrap();
    // The protected write: only a token above every one seen before is accepted.
    async fn write(db: &mut sqlx::SqliteConnection, holder: &str, token: u64) -> u64 {
        sqlx::query("UPDATE slots SET holder = ?, fence = ? WHERE id = 1 AND fence < ?")
            .bind(holder)
            .bind(token as i64)
            .bind(token as i64)
            .execute(db)
            .await
            .unwrap()
            .rows_affected()
    }
    let (mut a, mut b) = tokio::task::spawn_blocking(move || {
        (
            Node::spawn("a", &url, NodeSettings::default()),
            Node::spawn("b", &url, NodeSettings::default()),
        )
    })
    .await
    .unwrap();
    let reply = a.request("lock-hold 2 300");
    let token_a = number_after(&reply, "token");
    // A freezes while it holds the lock, for longer than its lease.
    let pid = a.pid().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reply = b.request("lock-hold 2 10000");
    let token_b = number_after(&reply, "token");
    assert!(token_b > token_a);
    assert_eq!(
        write(&mut db, "b", token_b).await,
        1,
        "the new holder's write lands"
    );
    assert!(
        std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    // A wakes up and writes with the token it holds: refused.
    assert_eq!(
        write(&mut db, "a", token_a).await,
        0,
        "the late write is refused"
    );
    assert_eq!(a.request("lock-release 2"), "released false");
    let (holder, fence): (String, i64) =
        sqlx::query_as("SELECT holder, fence FROM slots WHERE id = 1")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!((holder.as_str(), fence as u64), ("b", token_b));
    assert_eq!(b.request("lock-release 2"), "released true");
}

/// 1,000 updates from 2 OS processes (each: the update marked, a row written to the database,
/// then the counter incremented), racing the processes' own recounts and reconciliations: the counter ends equal
/// to the database's count.
#[test]
fn counters_updated_from_two_processes_end_equal_to_the_database() {
    counters_updated_from_two_processes_end_equal_to_the_database_on(&RedisServer::start().url());
}

fn counters_updated_from_two_processes_end_equal_to_the_database_on(url: &str) {
    let database = RedisServer::start();
    let mut a = Node::spawn("a", url, NodeSettings::default());
    let mut b = Node::spawn("b", url, NodeSettings::default());
    let db = database.url();
    let (na, nb) = (
        a.send(&format!("count-run 1 500 {db}")),
        b.send(&format!("count-run 1 500 {db}")),
    );
    let (ra, rb) = (a.wait(na), b.wait(nb));
    eprintln!("counter updates: a {ra:?}, b {rb:?}");
    let rows: i64 = redis::cmd("GET")
        .arg("rows:1")
        .query(&mut database.client().get_connection().unwrap())
        .unwrap();
    assert_eq!(rows, 1_000);
    assert_eq!(a.request(&format!("count-get 1 {db}")), "count 1000");
    assert_eq!(b.request(&format!("count-get 1 {db}")), "count 1000");
}

/// The same with a Redis restart in the middle of the run (nothing persisted): updates that
/// could not reach Redis invalidate the counter, and one read after the run counts it right.
#[test]
fn a_counter_is_right_after_one_read_when_redis_restarted_mid_run() {
    let mut server = RedisServer::start();
    let database = RedisServer::start();
    let settings = NodeSettings {
        op_timeout_ms: 200,
        cool_down_ms: 100,
        ..NodeSettings::default()
    };
    let mut a = Node::spawn("a", &server.url(), settings);
    let mut b = Node::spawn("b", &server.url(), settings);
    let db = database.url();
    let (na, nb) = (
        a.send(&format!("count-run 2 1500 {db}")),
        b.send(&format!("count-run 2 1500 {db}")),
    );
    // Restart once the run is well under way, and check it was still under way.
    let mut rows_db = database.client().get_connection().unwrap();
    let rows_now = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("GET")
            .arg("rows:2")
            .query::<Option<i64>>(conn)
            .unwrap()
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    while rows_now(&mut rows_db) < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the run did not start"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    server.restart();
    let at_restart = rows_now(&mut rows_db);
    let (ra, rb) = (a.wait(na), b.wait(nb));
    eprintln!("counter updates across a restart (at row {at_restart}): a {ra:?}, b {rb:?}");
    assert!(
        at_restart < 3_000,
        "the restart came after the run: {at_restart}"
    );
    let rows = rows_now(&mut rows_db);
    assert_eq!(rows, 3_000);
    assert_eq!(a.request(&format!("count-get 2 {db}")), "count 3000");
    assert_eq!(b.request(&format!("count-get 2 {db}")), "count 3000");
}

/// 50 concurrent duplicates of one payment POST over 2 OS processes (25 each): the payment is
/// recorded once; every other duplicate gets the replay or 409. The same key with another body
/// gets 422 (mismatch) in both processes.
#[test]
fn duplicate_payments_over_two_processes_run_once() {
    let server = RedisServer::start();
    duplicate_payments_over_two_processes_run_once_on(&server.url());
}

/// [`duplicate_payments_over_two_processes_run_once`] on the Redis at `url` (one server, or a cluster).
fn duplicate_payments_over_two_processes_run_once_on(url: &str) {
    let database = RedisServer::start();
    let mut a = Node::spawn("a", url, NodeSettings::default());
    let mut b = Node::spawn("b", url, NodeSettings::default());
    let db = database.url();
    let body = r#"{"student":7,"amount_cents":12500}"#;
    let request = format!("idem-burst pay-7f3a 25 {body} {db}");
    let (na, nb) = (a.send(&request), b.send(&request));
    let (ra, rb) = (a.wait(na), b.wait(nb));
    eprintln!("duplicate payments: a {ra:?}, b {rb:?}");
    assert_eq!(number_after(&ra, "ran") + number_after(&rb, "ran"), 1);
    let answered: u64 = ["ran", "replayed", "conflicts"]
        .iter()
        .map(|w| number_after(&ra, w) + number_after(&rb, w))
        .sum();
    assert_eq!(answered, 50);
    let recorded: i64 = redis::cmd("GET")
        .arg("payments:pay-7f3a")
        .query(&mut database.client().get_connection().unwrap())
        .unwrap();
    assert_eq!(recorded, 1, "one payment recorded");
    // After completion, retries from either process are replays; another body is a mismatch.
    let retry = format!("idem-burst pay-7f3a 5 {body} {db}");
    assert_eq!(number_after(&a.request(&retry), "replayed"), 5);
    assert_eq!(number_after(&b.request(&retry), "replayed"), 5);
    let other = format!("idem-burst pay-7f3a 3 {{\"student\":7,\"amount_cents\":1}} {db}");
    assert_eq!(number_after(&a.request(&other), "mismatches"), 3);
}

/// Three processes read overlapping pages with `get_or_set_many`, four callers each, at once:
/// every row of the 50 is loaded once across the fleet (the leases of one process's batch hold
/// the others off until its values are stored), and every answer is right.
#[test]
fn overlapping_batches_across_processes_load_each_row_once() {
    let server = RedisServer::start();
    overlapping_batches_across_processes_load_each_row_once_on(&server.url());
}

/// [`overlapping_batches_across_processes_load_each_row_once`] on the Redis at `url` (one server, or a cluster).
fn overlapping_batches_across_processes_load_each_row_once_on(url: &str) {
    let settings = NodeSettings {
        lease_wait_ms: 5_000,
        ..NodeSettings::default()
    };
    let mut a = Node::spawn("a", url, settings);
    let mut b = Node::spawn("b", url, settings);
    let mut c = Node::spawn("c", url, settings);
    let (na, nb, nc) = (
        a.send("batch 1000 1030 4 30"),
        b.send("batch 1015 1045 4 30"),
        c.send("batch 1025 1050 4 30"),
    );
    let (ra, rb, rc) = (a.wait(na), b.wait(nb), c.wait(nc));
    for reply in [&ra, &rb, &rc] {
        assert!(reply.ends_with("right true"), "{reply}");
    }
    let rows: u64 = [&ra, &rb, &rc]
        .iter()
        .map(|r| number_after(r, "rows"))
        .sum();
    assert_eq!(
        rows, 50,
        "each row loaded once across the fleet: {ra} / {rb} / {rc}"
    );
    assert_eq!(a.request("get 1049"), "value 10490");
    assert_eq!(c.request("get 1000"), "value 10000");
}

/// A token revoked through one process is refused by the two others at once (their next check,
/// no waiting, no message between them).
#[test]
fn a_revoked_token_is_refused_by_every_process_at_once() {
    let server = RedisServer::start();
    a_revoked_token_is_refused_by_every_process_at_once_on(&server.url());
}

/// [`a_revoked_token_is_refused_by_every_process_at_once`] on the Redis at `url` (one server, or a cluster).
fn a_revoked_token_is_refused_by_every_process_at_once_on(url: &str) {
    let mut api = Node::spawn("api", url, NodeSettings::default());
    let mut websocket = Node::spawn("websocket", url, NodeSettings::default());
    let mut worker = Node::spawn("worker", url, NodeSettings::default());
    assert_eq!(websocket.request("revoked 7"), "NotRevoked");
    assert_eq!(api.request("revoke 7 900"), "revoked true");
    assert_eq!(websocket.request("revoked 7"), "Revoked");
    assert_eq!(worker.request("revoked 7"), "Revoked");
    assert_eq!(worker.request("revoked 8"), "NotRevoked");
}

/// Presence shared by the servers of a fleet: the API and the websocket server each record a
/// heartbeat, a third process lists both; a member whose heartbeats stopped drops out for all.
#[test]
fn presence_is_shared_by_every_process() {
    presence_is_shared_by_every_process_on(&RedisServer::start().url());
}

fn presence_is_shared_by_every_process_on(url: &str) {
    let mut api = Node::spawn("api", url, NodeSettings::default());
    let mut websocket = Node::spawn("websocket", url, NodeSettings::default());
    let mut reader = Node::spawn("reader", url, NodeSettings::default());
    assert_eq!(api.request("presence-beat 7 1 30000"), "ok");
    assert_eq!(websocket.request("presence-beat 7 2 1000"), "ok");
    assert_eq!(reader.request("presence-list 7"), "online m1,m2");
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    assert_eq!(reader.request("presence-list 7"), "online m1");
    assert_eq!(api.request("presence-list 7"), "online m1");
}

/// The session index across processes: a copy loaded by one is a hit in another; revoking the
/// user's sessions in a third (after deleting them in the database) reaches both at once.
#[test]
fn a_users_sessions_revoked_in_one_process_are_gone_in_the_others() {
    a_users_sessions_revoked_in_one_process_are_gone_in_the_others_on(&RedisServer::start().url());
}

fn a_users_sessions_revoked_in_one_process_are_gone_in_the_others_on(url: &str) {
    let database = RedisServer::start();
    let db = database.url();
    let client = database.client();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("MSET")
        .arg("session:1")
        .arg("u1")
        .arg("session:2")
        .arg("u1")
        .query(&mut conn)
        .unwrap();
    let mut api = Node::spawn("api", url, NodeSettings::default());
    let mut websocket = Node::spawn("websocket", url, NodeSettings::default());
    let mut admin = Node::spawn("admin", url, NodeSettings::default());
    assert_eq!(
        api.request(&format!("session-get 1 {db}")),
        "present u1 loads 1"
    );
    assert_eq!(
        websocket.request(&format!("session-get 1 {db}")),
        "present u1 loads 0"
    );
    assert_eq!(
        websocket.request(&format!("session-get 2 {db}")),
        "present u1 loads 1"
    );
    // The administrator locks the account: the database first, then the index.
    let _: () = redis::cmd("DEL")
        .arg("session:1")
        .arg("session:2")
        .query(&mut conn)
        .unwrap();
    assert_eq!(admin.request("session-revoke-user 1"), "dropped 2");
    assert_eq!(
        api.request(&format!("session-get 1 {db}")),
        "absent loads 2"
    );
    assert_eq!(
        websocket.request(&format!("session-get 2 {db}")),
        "absent loads 2"
    );
}

/// The roll call across a fleet: two processes mark 500 students each into one scratch hash
/// while a third flushes it again and again through a sink that fails every third call; every
/// mark reaches the (stand-in) database exactly once, and nothing is left in Redis.
#[test]
fn marks_from_two_processes_reach_the_database_once_through_a_failing_sink() {
    let server = RedisServer::start();
    let database = RedisServer::start();
    let db = database.url();
    let mut a = Node::spawn("a", &server.url(), NodeSettings::default());
    let mut b = Node::spawn("b", &server.url(), NodeSettings::default());
    let mut flusher = Node::spawn("flusher", &server.url(), NodeSettings::default());
    let (na, nb) = (a.send("roll-mark 1 0 500"), b.send("roll-mark 1 500 1000"));
    let mut failures = 0;
    for _ in 0..30 {
        if flusher.request(&format!("roll-flush 1 {db} 3")) == "sink failed" {
            failures += 1;
        }
    }
    assert_eq!(a.wait(na), "marked 500");
    assert_eq!(b.wait(nb), "marked 500");
    let mut last = String::new();
    for _ in 0..20 {
        last = flusher.request(&format!("roll-flush 1 {db} 0"));
        if last == "flushed 0 0" {
            break;
        }
    }
    assert_eq!(last, "flushed 0 0", "everything flushed");
    assert!(failures > 0, "the sink failed on the way");
    let mut conn = database.client().get_connection().unwrap();
    let applied: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg("applied")
        .query(&mut conn)
        .unwrap();
    assert_eq!(applied.len(), 1_000, "every mark reached the database");
    let doubled: Vec<_> = applied.iter().filter(|(_, n)| **n != 1).collect();
    assert!(doubled.is_empty(), "marks applied twice: {doubled:?}");
}

/// Three processes write rows of a shared database and read views built from cached rows (a
/// dashboard from cached profiles), all on one Redis: no process reads a view older than a write
/// whose invalidation returned, in any process, before the read began.
#[test]
fn views_built_from_cached_rows_are_never_older_than_a_returned_write_in_any_process() {
    let server = RedisServer::start();
    let database = RedisServer::start();
    let command = format!("views-race 4 400 8 {}", database.url());
    let mut nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|name| Node::spawn(name, &server.url(), NodeSettings::default()))
        .collect();
    let sent: Vec<u64> = nodes.iter_mut().map(|n| n.send(&command)).collect();
    let (mut reads, mut writes) = (0, 0);
    for (node, n) in nodes.iter_mut().zip(sent) {
        let answer = node.wait(n);
        eprintln!("{answer}");
        assert_eq!(number_after(&answer, "stale"), 0, "{answer}");
        reads += number_after(&answer, "reads");
        writes += number_after(&answer, "writes");
    }
    assert!(
        reads > 5_000 && writes > 500,
        "reads {reads} writes {writes}"
    );
}
