//! A Redis that comes back with its data (restarted with persistence) still holds entries that
//! an instance invalidated while it was down. The writer applies its queued invalidation as soon
//! as Redis answers; the recovery hold keeps every other instance off Redis until then.

use std::time::Duration;

use crate::support::RedisServer;
use crate::support::fleet::{Node, NodeSettings, number_after};

/// Three processes: `a` writes while Redis is down (its invalidation is queued), `b` reads all
/// through the outage, `c` makes no call until Redis is back (it learns of the lost connection
/// from its first call). After the restart, neither `b` nor `c` ever reads the value `a`
/// invalidated, over several rounds.
#[test]
fn after_a_restart_no_instance_reads_what_another_invalidated_meanwhile() {
    let mut server = RedisServer::start_persistent();
    let settings = NodeSettings {
        op_timeout_ms: 200,
        cool_down_ms: 200,
        ..NodeSettings::default()
    };
    let mut a = Node::spawn("a", &server.url(), settings);
    let mut b = Node::spawn("b", &server.url(), settings);
    let mut c = Node::spawn("c", &server.url(), settings);
    let (mut reads, mut old) = (0, 0);
    for round in 0..4 {
        let k = 100 + round;
        assert_eq!(a.request(&format!("set {k} 1")), "ok");
        assert_eq!(b.request(&format!("get {k}")), "value 1");
        assert_eq!(c.request(&format!("get {k}")), "value 1");
        server.kill();
        assert_eq!(
            a.request(&format!("invalidate {k}")),
            "deferred true",
            "Redis is down: the invalidation is queued"
        );
        let nb = b.send(&format!("watch {k} 1 2000"));
        std::thread::sleep(Duration::from_millis(150));
        server.restart();
        let nc = c.send(&format!("watch {k} 1 1500"));
        let (rb, rc) = (b.wait(nb), c.wait(nc));
        eprintln!("round {round}: b (read through the outage) {rb}; c (quiet) {rc}");
        for (name, reply) in [("b", &rb), ("c", &rc)] {
            assert_eq!(
                number_after(reply, "old"),
                0,
                "{name} read the value a invalidated during the outage: {reply}"
            );
            assert!(number_after(reply, "reads") > 100, "{name}: {reply}");
        }
        reads += number_after(&rb, "reads") + number_after(&rc, "reads");
        old += number_after(&rb, "old") + number_after(&rc, "old");
        for node in [&mut a, &mut b, &mut c] {
            assert_eq!(node.request(&format!("get {k}")), "none");
        }
    }
    eprintln!("4 restarts: {reads} reads on the other instances, {old} of the invalidated value");
}
