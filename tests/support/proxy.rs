//! A TCP proxy on loopback that can pass, delay, freeze or cut traffic, or swallow the traffic
//! of the connections open at one moment (a peer that vanished without closing them), for
//! network faults without netem. Runs on the test's tokio runtime and stops when dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes as they come.
    Pass,
    /// Hold every chunk this long before forwarding it.
    Delay(Duration),
    /// Hold everything until the mode changes.
    Freeze,
    /// Close every connection and refuse new ones.
    Cut,
}

pub struct Proxy {
    port: u16,
    mode: watch::Sender<Mode>,
    tasks: Arc<std::sync::Mutex<JoinSet<()>>>,
    /// Connections numbered below this one have their traffic swallowed.
    blackhole_below: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    slow: Arc<Slow>,
}

/// One connection whose every chunk is held, whatever the mode: (its number + 1, or 0 for
/// none; the delay in microseconds).
#[derive(Default)]
struct Slow {
    number: AtomicU64,
    micros: AtomicU64,
}

impl Proxy {
    /// A proxy forwarding to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (mode, rx) = watch::channel(Mode::Pass);
        let tasks = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let conn_tasks = tasks.clone();
        let blackhole_below = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (below, count) = (blackhole_below.clone(), accepted.clone());
        let slow = Arc::new(Slow::default());
        let slowed = slow.clone();
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() == Mode::Cut {
                    drop(client);
                    continue;
                }
                let rx = rx.clone();
                let number = count.fetch_add(1, Ordering::SeqCst);
                let below = below.clone();
                let slow = slowed.clone();
                conn_tasks.lock().unwrap().spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Either direction ending (or a cut) ends both.
                    let alive = Alive {
                        number,
                        below,
                        slow,
                    };
                    tokio::select! {
                        _ = pump(cr, sw, rx.clone(), alive.clone()) => {}
                        _ = pump(sr, cw, rx, alive) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            mode,
            tasks,
            blackhole_below,
            accepted,
            slow,
        }
    }

    /// From now on, every chunk of connection `number` (counted from 0 in accepting order) is
    /// held `delay` in both directions, whatever the mode; the other connections are not.
    pub fn slow_down_connection(&self, number: u64, delay: Duration) {
        self.slow
            .micros
            .store(delay.as_micros() as u64, Ordering::SeqCst);
        self.slow.number.store(number + 1, Ordering::SeqCst);
    }

    /// From now on, every connection open now has its traffic swallowed in both directions:
    /// nothing arrives, nothing is closed (as when the peer's host vanished). Connections made
    /// afterwards pass.
    pub fn blackhole_open_connections(&self) {
        self.blackhole_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Mode::Cut);
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.abort_all();
        }
    }
}

/// Which connection a pump belongs to, and the blackhole threshold it checks.
#[derive(Clone)]
struct Alive {
    number: u64,
    below: Arc<AtomicU64>,
    slow: Arc<Slow>,
}

impl Alive {
    fn swallowed(&self) -> bool {
        self.number < self.below.load(Ordering::SeqCst)
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    alive: Alive,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut cut = mode.clone();
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = cut.wait_for(|m| *m == Mode::Cut) => return,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Pass => break,
                Mode::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Freeze => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                Mode::Cut => return,
            }
        }
        if alive.swallowed() {
            continue;
        }
        if alive.slow.number.load(Ordering::SeqCst) == alive.number + 1 {
            let micros = alive.slow.micros.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
