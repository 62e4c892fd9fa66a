//! The in-process tier across processes: three tiered nodes on one Redis, each with its own L1
//! and invalidation channel.

use redis::AsyncCommands;

use crate::support::fleet::{Node, NodeSettings, number_after};
use crate::support::{self, Backend};

/// How a trial changes the key, and what the watchers must read afterwards instead of the
/// old value.
#[derive(Clone, Copy, Debug)]
enum Write {
    /// `Cache::set` on one node.
    Set,
    /// `Cache::delete` on one node.
    Delete,
    /// `Cache::invalidate` of an event naming the key, on one node.
    Invalidate,
    /// `Cache::invalidate_tag` of a tag the key carries, on one node.
    Tag,
    /// Another client (a Node service) `SET`s the key.
    ExternalSet,
    /// `redis-cli DEL` (the real binary).
    ExternalDel,
}

fn three_tiered(url: &str) -> Vec<Node> {
    ["a", "b", "c"]
        .iter()
        .map(|name| Node::spawn_tiered(name, url, NodeSettings::default(), "on"))
        .collect()
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// After a write returns on one instance (or another client's write returns), the other
/// instances' L1 copies are evicted: each watcher reads the old value until a bound, measured
/// here per watcher as the last old read after the write returned, and never again after
/// reading the new state. 60 trials over six kinds of write, each node writing in turn.
#[test]
fn after_a_write_returns_the_other_instances_stop_reading_the_old_value() {
    after_a_write_returns_the_other_instances_stop_reading_the_old_value_on(&super::shared(
        support::Backend::redis(),
    ));
}

pub(crate) fn after_a_write_returns_the_other_instances_stop_reading_the_old_value_on(
    backend: &Backend,
) {
    let mut nodes = three_tiered(&backend.url().expect("a Redis backend"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut raw = rt.block_on(backend.raw()).expect("a Redis backend");
    let kinds = [
        Write::Set,
        Write::Delete,
        Write::Invalidate,
        Write::Tag,
        Write::ExternalSet,
        Write::ExternalDel,
    ];
    let mut lags = Vec::new();
    let mut relapses = 0;
    for trial in 0..60u64 {
        let id = 1_000 + trial;
        let kind = kinds[trial as usize % kinds.len()];
        let writer = trial as usize % 3;
        let old = trial * 10;
        assert!(
            nodes[writer]
                .request(&format!("tier-write set {id} {old}"))
                .starts_with("at "),
            "setup of {id}"
        );
        for node in nodes.iter_mut() {
            assert_eq!(
                node.request(&format!("tier-warm {id}")),
                format!("warm {old}"),
                "every instance holds the key in L1 before the write"
            );
        }
        let external = matches!(kind, Write::ExternalSet | Write::ExternalDel);
        let watchers: Vec<usize> = (0..3).filter(|&i| external || i != writer).collect();
        let pending: Vec<(usize, u64)> = watchers
            .iter()
            .map(|&i| (i, nodes[i].send(&format!("tier-watch {id} {old} 3000"))))
            .collect();
        // The watchers are reading before the write.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let key = format!("fleet:item:{id}");
        let returned_at = match kind {
            Write::ExternalSet => {
                let _: () = rt
                    .block_on(raw.set_ex(&key, (old + 1).to_string(), 60))
                    .unwrap();
                now_micros()
            }
            Write::ExternalDel => {
                let out = std::process::Command::new("redis-cli")
                    .args(backend.cli_args().expect("a Redis backend"))
                    .args(["DEL", &key])
                    .output()
                    .expect("redis-cli is installed with redis-server");
                assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");
                now_micros()
            }
            _ => {
                let op = match kind {
                    Write::Set => "set",
                    Write::Delete => "delete",
                    Write::Invalidate => "invalidate",
                    _ => "tag",
                };
                let reply = nodes[writer].request(&format!("tier-write {op} {id} {}", old + 1));
                number_after(&reply, "at")
            }
        };
        for (i, n) in pending {
            let reply = nodes[i].wait(n);
            let (last_old, first_new) = (
                number_after(&reply, "last_old"),
                number_after(&reply, "first_new"),
            );
            assert!(
                first_new > 0,
                "{kind:?}: node {i} never saw the write: {reply}"
            );
            relapses += number_after(&reply, "relapses");
            lags.push(last_old.saturating_sub(returned_at));
        }
    }
    lags.sort_unstable();
    eprintln!(
        "tier invalidation lag over {} watcher reads (write returned -> last old read): \
         p50 {} us, p99 {} us, max {} us; reads of the old value after the new one: {relapses}",
        lags.len(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1],
    );
    assert_eq!(
        relapses, 0,
        "an old value came back after the new state was read"
    );
    for node in nodes.iter_mut() {
        let stats = node.request("tier-stats");
        assert!(number_after(&stats, "local_hits") > 0, "{stats}");
        assert_eq!(number_after(&stats, "losses"), 0, "{stats}");
    }
}

/// Every tier channel killed (`CLIENT KILL`), then the key rewritten by another client, which
/// no channel can report. The very next read on every instance goes to Redis, whether or not
/// its process has handled the close yet (the close is on the socket, which a read from L1
/// peeks at); no read is served from L1 until tracking is back on a new connection, and the old
/// value is never read again.
#[test]
fn a_killed_channel_makes_every_instance_stop_serving_l1() {
    a_killed_channel_makes_every_instance_stop_serving_l1_on(&super::shared(
        support::Backend::redis(),
    ));
}

/// The same on `backend`: on a cluster, the channels to the key's primary are killed (each
/// instance's channel has one connection per primary, and losing any loses the channel).
pub(crate) fn a_killed_channel_makes_every_instance_stop_serving_l1_on(backend: &Backend) {
    let mut nodes = three_tiered(&backend.url().expect("a Redis backend"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut raw = rt.block_on(backend.raw()).expect("a Redis backend");
    for round in 0..10u64 {
        let id = 2_000 + round;
        assert!(
            nodes[0]
                .request(&format!("tier-write set {id} 1"))
                .starts_with("at ")
        );
        for node in nodes.iter_mut() {
            assert_eq!(node.request(&format!("tier-warm {id}")), "warm 1");
        }
        // One channel per instance.
        backend.kill_tier_channels_of(&format!("fleet:item:{id}"), 3);
        let _: () = rt
            .block_on(raw.set_ex(format!("fleet:item:{id}"), "2", 60))
            .unwrap();
        for (i, node) in nodes.iter_mut().enumerate() {
            let read = node.request(&format!("tier-read {id}"));
            assert_eq!(
                read, "value 2 served Store",
                "round {round}: node {i}'s first read after the kill"
            );
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while number_after(&node.request("tier-stats"), "losses") < round + 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: node {i} never saw its channel close"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let read = node.request(&format!("tier-read {id}"));
            assert!(
                read.starts_with("value 2 served"),
                "round {round}: node {i} read {read:?} after its channel was lost"
            );
            assert_eq!(node.request(&format!("tier-warm {id}")), "warm 2");
        }
    }
}
