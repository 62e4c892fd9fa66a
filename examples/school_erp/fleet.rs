//! `--instances N`: the extra instances of the service (this program again, as separate
//! processes attached to the same database and Redis), and a Redis for them when none is given.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` this program started on a free loopback port, stopped when dropped. It keeps
/// an append-only file in a directory of its own (removed when dropped), so that a restart
/// ([`OwnedRedis::restart`]) gives back what it held, as a production Redis with AOF does.
pub struct OwnedRedis {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnedRedis {
    pub fn start() -> Result<OwnedRedis, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free loopback port: {e}"))?
            .port();
        let dir =
            std::env::temp_dir().join(format!("school_erp-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let child = OwnedRedis::spawn(port, &dir)?;
        Ok(OwnedRedis { child, port, dir })
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Result<Child, String> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("--instances needs Redis: set REDIS_URL, or install redis-server ({e})")
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("redis-server did not listen on port {port}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server as an operator would (SIGTERM: it writes its append-only file out and
    /// exits), leaves it down for `down`, and starts it again on the same port and file. Returns
    /// how long the port refused connections.
    pub fn restart(&mut self, down: Duration) -> Result<Duration, String> {
        let stopped = Instant::now();
        if !terminate(&mut self.child, Duration::from_secs(20)) {
            return Err("redis-server did not stop within 20 s of SIGTERM".into());
        }
        std::thread::sleep(down);
        self.child = OwnedRedis::spawn(self.port, &self.dir)?;
        Ok(stopped.elapsed())
    }
}

impl Drop for OwnedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Another instance of the service: this program with `--serve --port 0 --attach-db`, stopped
/// when dropped.
pub struct Instance {
    child: Child,
    pub addr: SocketAddr,
}

impl Instance {
    /// Starts instance `n` on the database `db_target` and the Redis at `redis_url`, and waits
    /// until it serves.
    pub fn start(
        n: usize,
        db_target: &str,
        redis_url: &str,
        no_tier: bool,
    ) -> Result<Instance, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let mut command = Command::new(exe);
        if no_tier {
            command.arg("--no-tier");
        }
        let mut child = command
            .args(["--serve", "--port", "0", "--attach-db", db_target])
            .env("REDIS_URL", redis_url)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start instance {n}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the instance's output: its address, then (drained) the rest.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some(rest) = line.strip_prefix("serving on http://") {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let mut instance = Instance {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| format!("instance {n} did not start serving"))?;
        instance.addr = addr
            .parse()
            .map_err(|_| format!("instance {n} printed an address that does not parse: {addr}"))?;
        Ok(instance)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SIGTERM: it finishes the requests in flight and stops.
        if !terminate(&mut self.child, Duration::from_secs(10)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends SIGTERM to `child` and waits for it to exit, up to `within`; false when it has not.
fn terminate(child: &mut Child, within: Duration) -> bool {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
