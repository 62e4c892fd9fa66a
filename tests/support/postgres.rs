//! A real PostgreSQL server for a test: `initdb` into a temporary directory, `postgres` on a
//! free loopback port (trust authentication, no fsync), stopped and removed on drop.
//!
//! The binaries are found through `SPEEDLAYER_PG_BINDIR`, `pg_config --bindir`, or
//! `/usr/lib/postgresql/<version>/bin` (Debian's layout). PostgreSQL refuses to run as root, so
//! as root the server runs as the `postgres` user (created by Debian's package) through
//! `setpriv`. Missing binaries fail the test loudly; `scripts/test.sh` installs them.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct PostgresServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("SPEEDLAYER_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin, none from \
             pg_config); install it (apt-get install -y postgresql) or run scripts/test.sh, \
             which does"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command that runs `program` as the `postgres` user when this process is root.
fn command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    /// Starts a server; panics (never skips) when it cannot.
    pub fn start() -> PostgresServer {
        let bin = bindir();
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "speedlayer-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown runs");
            assert!(
                status.success(),
                "cannot give {} to the postgres user",
                dir.display()
            );
        }
        let data = dir.join("data");
        let init = command(&bin.join("initdb"), as_postgres)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("initdb runs");
        if !init.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            panic!("initdb failed: {}", String::from_utf8_lossy(&init.stderr));
        }
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = super::server::free_port();
            let log = std::fs::File::create(dir.join("postgres.log")).expect("log file");
            if as_postgres {
                let _ = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.join("postgres.log"))
                    .status();
            }
            let child = command(&bin.join("postgres"), as_postgres)
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", dir.display()))
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=50"])
                .args(["-c", "lc_messages=C"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("postgres starts");
            let mut server = PostgresServer {
                child,
                port,
                dir: dir.clone(),
            };
            if server.wait_ready(Duration::from_secs(20)) {
                return server;
            }
            last_error = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            server.stop_process();
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("PostgreSQL did not start: {last_error}");
    }

    /// Waits until the server accepts connections and has finished starting.
    fn wait_ready(&mut self, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let log =
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                if log.contains("ready to accept connections") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn stop_process(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop_process();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
