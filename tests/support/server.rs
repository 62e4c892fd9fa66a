//! A real `redis-server` on a free loopback port, in a temporary directory, killed on drop.
//!
//! When the test fails (the thread is panicking as the server is dropped), the server's log is
//! printed to the test's output.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use speedlayer::config::RedisConfig;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct RedisServer {
    port: u16,
    password: Option<String>,
    tls_port: Option<u16>,
    dir: PathBuf,
    child: Option<Child>,
    stopped: bool,
    /// Keeps an append-only file written on every command: a restart gives back what it held.
    persistent: bool,
    /// More arguments for `redis-server` (a cluster node's, a sentinel's).
    extra: Vec<String>,
}

fn binary() -> String {
    std::env::var("SPEEDLAYER_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A free loopback port whose cluster bus port (+10000) is free too: at most 55535.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisServer {
    /// Starts a server; panics (never skips) when it cannot.
    pub fn start() -> RedisServer {
        RedisServer::start_with(None)
    }

    /// Starts a server that requires `password`.
    pub fn start_with_password(password: &str) -> RedisServer {
        RedisServer::start_with(Some(password.to_owned()))
    }

    /// Starts a server that also listens with TLS, on [`tls_port`](Self::tls_port), with a
    /// certificate for `127.0.0.1` signed by a fresh CA ([`ca_file`](Self::ca_file)).
    pub fn start_tls() -> RedisServer {
        RedisServer::start_inner(None, true, false)
    }

    fn start_with(password: Option<String>) -> RedisServer {
        RedisServer::start_inner(password, false, false)
    }

    /// Starts a server that writes every command to its append-only file before answering
    /// (`appendfsync always`): killed and [restarted](Self::restart), it comes back with every
    /// key it acknowledged, as a production Redis with persistence does.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_inner(None, false, true)
    }

    /// Starts a server with more `redis-server` arguments; `$DIR` in them names the server's
    /// own directory.
    pub fn start_with_args(args: &[String]) -> RedisServer {
        RedisServer::start_full(None, false, false, args.to_vec())
    }

    fn start_inner(password: Option<String>, tls: bool, persistent: bool) -> RedisServer {
        RedisServer::start_full(password, tls, persistent, Vec::new())
    }

    fn start_full(
        password: Option<String>,
        tls: bool,
        persistent: bool,
        extra: Vec<String>,
    ) -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "speedlayer-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        if tls {
            make_certificates(&dir);
        }
        let mut last_log = String::new();
        // A port found free can be taken before the server binds it; try a few.
        for _ in 0..5 {
            // A cluster node also listens on its port + 10000 (the cluster bus).
            let cluster = extra.iter().any(|a| a == "--cluster-enabled");
            let mut server = RedisServer {
                port: if cluster {
                    free_cluster_port()
                } else {
                    free_port()
                },
                password: password.clone(),
                tls_port: tls.then(free_port),
                dir: dir.clone(),
                child: None,
                stopped: false,
                persistent,
                extra: extra.clone(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(log) => {
                    last_log = log;
                    server.child = None;
                    std::mem::forget(server);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("redis-server did not start after 5 attempts; last log:\n{last_log}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("redis.log");
        let mut cmd = Command::new(binary());
        let dir = self.dir.to_string_lossy().into_owned();
        let expand = |arg: &String| {
            arg.replace("$DIR", &dir)
                .replace("$PORT", &self.port.to_string())
        };
        // A configuration file (a sentinel's) must be the first argument.
        let (file, extra) = match self.extra.split_first() {
            Some((first, rest)) if !first.starts_with("--") => (Some(expand(first)), rest),
            _ => (None, self.extra.as_slice()),
        };
        if let Some(file) = file {
            if !std::path::Path::new(&file).exists() {
                std::fs::write(&file, "").expect("write the configuration file");
            }
            cmd.arg(file);
        }
        let aof: &[&str] = if self.persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(aof)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.arg("--requirepass").arg(p);
        }
        for arg in extra {
            cmd.arg(expand(arg));
        }
        if let Some(tls_port) = self.tls_port {
            cmd.arg("--tls-port")
                .arg(tls_port.to_string())
                .arg("--tls-cert-file")
                .arg(self.dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(self.dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(self.ca_file())
                .args(["--tls-auth-clients", "no"]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {:?}: {e}. Install it (apt-get install -y redis-server, as \
                 scripts/test.sh does) or point SPEEDLAYER_REDIS_SERVER at a redis-server binary",
                binary()
            )
        });
        self.child = Some(child);
        self.stopped = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("redis-server exited with {status}\n{}", self.log()));
            }
            if self.answers() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Err(format!(
            "redis-server did not answer within 10 s\n{}",
            self.log()
        ))
    }

    /// True when the server answers a PING (or asks for authentication).
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        // A node that listens with TLS only (`--port 0 --tls-port <port>`) is up once it accepts.
        if self
            .extra
            .windows(2)
            .any(|w| w[0] == "--port" && w[1] == "0")
        {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => buf.starts_with(b"+PONG") || buf.starts_with(b"-NOAUTH"),
            _ => false,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn tls_port(&self) -> u16 {
        self.tls_port.expect("started with start_tls")
    }

    /// The CA that signed the TLS server certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// False after [`kill`](Self::kill) (until a restart).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("server running")
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn redis_config(&self) -> RedisConfig {
        RedisConfig::from_url(&self.url()).expect("valid url")
    }

    /// A plain redis-rs client, for assertions made beside the library.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("valid url")
    }

    /// A raw multiplexed connection.
    pub async fn raw(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("raw connection: {e}\n{}", self.log()))
    }

    /// The server's directory (its configuration, log and data).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1) is available");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Closes every in-process tier channel connected to this server (found in `CLIENT LIST`
    /// by their name `speedlayer-tier`) with `CLIENT KILL ID`, over a blocking connection: on a
    /// one-thread runtime no task runs meanwhile. Fails unless there were `expected` of them.
    pub fn kill_tier_channels(&self, expected: usize) {
        let mut conn = self
            .client()
            .get_connection()
            .expect("a blocking connection");
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut conn)
            .expect("CLIENT LIST");
        let ids: Vec<&str> = list
            .lines()
            .filter(|l| l.contains("name=speedlayer-tier"))
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
            .collect();
        assert_eq!(ids.len(), expected, "tier channels: {ids:?}");
        for id in ids {
            let _: () = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query(&mut conn)
                .expect("CLIENT KILL");
        }
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing.
    pub fn freeze(&mut self) {
        self.signal("-STOP");
        self.stopped = true;
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&mut self) {
        self.signal("-CONT");
        self.stopped = false;
    }

    /// SIGKILL and wait: connections drop, the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.stopped {
                let _ = Command::new("kill")
                    .arg("-CONT")
                    .arg(child.id().to_string())
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped = false;
    }

    /// Starts the server again on the same port: empty, or, for a
    /// [persistent](Self::start_persistent) server, with what it held.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger briefly after the kill.
                Err(log) if Instant::now() < deadline => {
                    let _ = log;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(log) => panic!("redis-server did not restart on port {}:\n{log}", self.port),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server log (port {}) ----\n{}\n---- end of log ----",
                self.port,
                self.log()
            );
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A blocking connection to the server at `port` on loopback.
pub fn blocking(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("valid url")
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("a connection to 127.0.0.1:{port}: {e}"))
}

/// The text a command such as `INFO replication` or `CLUSTER INFO` answers on the server at
/// `port` (empty when it does not answer within 500 ms).
pub fn info(port: u16, cmd: &[&str]) -> String {
    info_as(port, None, false, cmd)
}

/// [`info`] on a server that requires `password`, over TLS when `tls`.
pub fn info_as(port: u16, password: Option<&str>, tls: bool, cmd: &[&str]) -> String {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let scheme = if tls { "rediss" } else { "redis" };
    let Ok(client) = redis::Client::open(format!("{scheme}://{auth}127.0.0.1:{port}/")) else {
        return String::new();
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
        return String::new();
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut c = redis::cmd(cmd[0]);
    for a in &cmd[1..] {
        c.arg(*a);
    }
    c.query::<String>(&mut conn).unwrap_or_default()
}

static NEXT_TLS_DIR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A fresh directory `speedlayer-<what>-tls-*` holding a CA and a server certificate for
/// 127.0.0.1 ([`make_certificates`]); the caller removes it.
pub fn certificate_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "speedlayer-{what}-tls-{}-{}",
        std::process::id(),
        NEXT_TLS_DIR.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("a directory for the certificates");
    make_certificates(&dir);
    dir
}

/// The arguments that make a node listen with TLS only (on the port `$PORT` stands for) with
/// the certificates of `dir`, and speak TLS to its primary (replication, or a sentinel's
/// connections to the nodes it watches); clients need no certificate.
pub fn tls_only_args(dir: &std::path::Path) -> Vec<String> {
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    vec![
        "--port".into(),
        "0".into(),
        "--tls-port".into(),
        "$PORT".into(),
        "--tls-replication".into(),
        "yes".into(),
        "--tls-cert-file".into(),
        file("server.pem"),
        "--tls-key-file".into(),
        file("server.key"),
        "--tls-ca-cert-file".into(),
        file("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
    ]
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 (`server.pem`, `server.key`) in
/// `dir`, made with the openssl command-line tool.
pub fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command-line tool is needed for TLS tests");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=speedlayer test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("write extension file");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}
