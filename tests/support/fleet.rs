//! A fleet of app servers in separate OS processes: each a `speedlayer-fleet-node`
//! (tests/fleet/node.rs) on the same Redis, driven over stdin/stdout. Nodes are killed on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// How long a node may take to answer one request before the test fails.
const REPLY_LIMIT: Duration = Duration::from_secs(60);

/// Settings of a node (milliseconds).
#[derive(Clone, Copy, Debug)]
pub struct NodeSettings {
    pub op_timeout_ms: u64,
    pub cool_down_ms: u64,
    pub lease_wait_ms: u64,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            op_timeout_ms: 2_000,
            cool_down_ms: 1_000,
            lease_wait_ms: 50,
        }
    }
}

pub struct Node {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    early: HashMap<u64, String>,
    next: u64,
}

fn binary() -> &'static str {
    option_env!("CARGO_BIN_EXE_speedlayer-fleet-node").unwrap_or_else(|| {
        panic!(
            "the fleet tests need the speedlayer-fleet-node helper: run them with \
             `cargo test --all-features` (or `--features fleet-node`)"
        )
    })
}

impl Node {
    /// Starts a node on the Redis at `url` and waits until it is connected.
    pub fn spawn(name: &str, url: &str, settings: NodeSettings) -> Node {
        Node::spawn_with(name, url, settings, None)
    }

    /// [`Node::spawn`] with an in-process tier over the `fleet:item` keys (`"on"`, or
    /// `"fail-safe"` for one that answers stale for up to 5 s while Redis does not answer).
    pub fn spawn_tiered(name: &str, url: &str, settings: NodeSettings, tier: &str) -> Node {
        Node::spawn_with(name, url, settings, Some(tier))
    }

    fn spawn_with(name: &str, url: &str, settings: NodeSettings, tier: Option<&str>) -> Node {
        let mut command = Command::new(binary());
        if let Some(tier) = tier {
            command.env("SPEEDLAYER_FLEET_TIER", tier);
        }
        let mut child = command
            .arg(url)
            .arg(settings.op_timeout_ms.to_string())
            .arg(settings.cool_down_ms.to_string())
            .arg(settings.lease_wait_ms.to_string())
            .env("RUST_LOG", "speedlayer=warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut node = Node {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            early: HashMap::new(),
            next: 1,
        };
        assert_eq!(node.wait(0), "ready", "{name} did not start");
        node
    }

    /// Sends a request without waiting; returns its number for [`Node::wait`].
    pub fn send(&mut self, request: &str) -> u64 {
        let n = self.next;
        self.next += 1;
        writeln!(self.stdin, "{n} {request}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("{} is gone: {e}", self.name));
        n
    }

    /// Waits for the reply to request `n`.
    pub fn wait(&mut self, n: u64) -> String {
        if let Some(reply) = self.early.remove(&n) {
            return reply;
        }
        let deadline = Instant::now() + REPLY_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let (number, reply) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                    let number: u64 = number
                        .parse()
                        .unwrap_or_else(|_| panic!("{}: bad reply {line:?}", self.name));
                    if number == n {
                        assert!(
                            !reply.starts_with("error"),
                            "{}: request {n} failed: {reply}",
                            self.name
                        );
                        return reply.to_owned();
                    }
                    self.early.insert(number, reply.to_owned());
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{} did not answer request {n} within {REPLY_LIMIT:?}",
                        self.name
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{} exited before answering request {n}", self.name)
                }
            }
        }
    }

    /// Sends a request and waits for its reply.
    pub fn request(&mut self, request: &str) -> String {
        let n = self.send(request);
        self.wait(n)
    }

    /// Waits for the reply to request `n` or for the node to exit (up to the reply limit):
    /// `None` when it exited without replying.
    pub fn wait_for_exit(&mut self, n: u64) -> Option<String> {
        let deadline = Instant::now() + REPLY_LIMIT;
        loop {
            if let Some(reply) = self.early.remove(&n) {
                return Some(reply);
            }
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some((number, rest)) = line.split_once(' ')
                        && let Ok(number) = number.parse::<u64>()
                    {
                        self.early.insert(number, rest.to_owned());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        return self.early.remove(&n);
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{}: no reply, no exit",
                        self.name
                    );
                }
            }
        }
    }

    /// The OS process id (to show that nodes are separate processes).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "0 quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number after `word` in a reply (`loads 1 values 7` → `loads` → 1).
pub fn number_after(reply: &str, word: &str) -> u64 {
    let mut words = reply.split_whitespace();
    while let Some(w) = words.next() {
        if w == word
            && let Some(n) = words.next().and_then(|n| n.parse().ok())
        {
            return n;
        }
    }
    panic!("no number after {word:?} in {reply:?}")
}

/// Wall-clock microseconds since the Unix epoch: comparable between the test and its nodes.
pub fn wall_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
