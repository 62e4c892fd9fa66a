//! The outbox across processes: a node killed between its commit and its invalidation, and a
//! relay in another node applying what it left; Redis frozen meanwhile.

use crate::support::RedisServer;
use crate::support::fleet::{Node, NodeSettings, number_after};

fn db_path(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "speedlayer-outbox-{}-{name}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("db.sqlite").to_string_lossy().into_owned()
}

/// Node a commits a write with its outbox row and is killed before invalidating: the cached
/// value is stale in every process until node b's relay runs; after it, no process reads it.
#[test]
fn a_process_killed_between_commit_and_invalidation_leaves_it_to_any_relay() {
    let server = RedisServer::start();
    let db = db_path("killed");
    let mut a = Node::spawn("a", &server.url(), NodeSettings::default());
    let mut b = Node::spawn("b", &server.url(), NodeSettings::default());
    let mut c = Node::spawn("c", &server.url(), NodeSettings::default());
    assert_eq!(c.request("set 7 1"), "ok");
    assert_eq!(b.request("get 7"), "value 1");
    let n = a.send(&format!("outbox-write 7 {db} 1"));
    let reply = a.wait_for_exit(n);
    assert!(
        reply.is_none(),
        "node a was to die after its commit: {reply:?}"
    );
    assert_eq!(b.request("get 7"), "value 1", "nobody invalidated it");
    let relayed = b.request(&format!("outbox-relay {db}"));
    assert_eq!(relayed, "applied 1 released 0 depth 0");
    assert_eq!(b.request("get 7"), "none");
    assert_eq!(c.request("get 7"), "none");
    let _ = std::fs::remove_dir_all(std::path::Path::new(&db).parent().unwrap());
}

/// Redis frozen (SIGSTOP) for 5 s while a committed write waits in the outbox: the relay's pass
/// during the freeze cannot apply it and releases it; the first pass after applies it, and no
/// process reads the old value afterwards.
#[test]
fn rows_waiting_while_redis_is_frozen_are_applied_once_it_is_back() {
    let mut server = RedisServer::start();
    let db = db_path("frozen");
    let settings = NodeSettings {
        op_timeout_ms: 200,
        cool_down_ms: 500,
        ..NodeSettings::default()
    };
    let mut a = Node::spawn("a", &server.url(), settings);
    let mut b = Node::spawn("b", &server.url(), settings);
    let mut c = Node::spawn("c", &server.url(), settings);
    assert_eq!(c.request("set 8 1"), "ok");
    let n = a.send(&format!("outbox-write 8 {db} 1"));
    assert!(a.wait_for_exit(n).is_none());
    server.freeze();
    let started = std::time::Instant::now();
    let during = b.request(&format!("outbox-relay {db}"));
    assert_eq!(
        (
            number_after(&during, "applied"),
            number_after(&during, "released")
        ),
        (0, 1),
        "{during}"
    );
    std::thread::sleep(std::time::Duration::from_secs(5).saturating_sub(started.elapsed()));
    server.thaw();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let after = b.request(&format!("outbox-relay {db}"));
        if number_after(&after, "depth") == 0 && !after.contains("released 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never applied: {after}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for node in [&mut b, &mut c] {
        assert_eq!(node.request("get 8"), "none");
    }
    let _ = std::fs::remove_dir_all(std::path::Path::new(&db).parent().unwrap());
}
