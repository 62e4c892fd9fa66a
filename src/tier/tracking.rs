//! The invalidation channel of the in-process tier: one RESP3 connection per tiered cache with
//! `CLIENT TRACKING ON BCAST PREFIX ...`, a heartbeat on it, and reconnection.
//!
//! Invalidation messages are applied inside the connection's push handler, as they are read off
//! the socket: by the time the reply to a later command on the same connection (a heartbeat's
//! `PING`) arrives, every message Redis sent before that reply has been applied. Redis queues a
//! write's invalidation messages before the write's own reply, so once a write has returned to
//! anyone, a `PING` sent afterwards on the channel is answered only after its messages.
//!
//! A message (or the close) that has reached the socket but not been applied yet is seen by a
//! read through [`Channel::peek`] (see [`super::socket`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};

use super::socket::{Peek, Socket};

use super::Tier;

/// A socket found quiet is not peeked at again for this long (microseconds): a peek is a system
/// call, several times the cost of an L1 hit, and reads can come every microsecond. A message
/// or close is seen by every read that begins this long after it reached the socket.
pub(crate) const PEEK_EVERY_MICROS: u64 = 10;

/// Without any answer for this long, the connection is replaced.
const DEAD_AFTER: Duration = Duration::from_secs(10);
/// The name the channel's connections carry in `CLIENT LIST`.
pub(crate) const CLIENT_NAME: &str = "speedlayer-tier";

/// The current connection of the channel, for barriers, and its socket, for peeks.
#[derive(Default)]
pub(crate) struct Channel {
    conn: Mutex<Option<MultiplexedConnection>>,
    socket: RwLock<Option<Arc<Socket>>>,
    /// When (the tier's microseconds) the socket was last found quiet; 0 when never.
    quiet_at: AtomicU64,
    /// The id of the connection whose tracking is on; 0 when none.
    current: AtomicU64,
}

impl Channel {
    pub(super) fn set(
        &self,
        id: u64,
        conn: Option<MultiplexedConnection>,
        socket: Option<Arc<Socket>>,
    ) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
        let old = std::mem::replace(
            &mut *self.socket.write().unwrap_or_else(|e| e.into_inner()),
            socket,
        );
        self.quiet_at.store(0, Ordering::Release);
        self.current.store(id, Ordering::Release);
        // The connection it belonged to is given up.
        if let Some(old) = old {
            old.shut();
        }
    }

    /// What waits on the current connection's socket at `now` (the tier's microseconds) that
    /// may concern `key`, unless the socket was found quiet less than [`PEEK_EVERY_MICROS`] ago.
    /// [`Peek::Quiet`] when it cannot be seen (TLS, a Unix socket, not Linux) or there is no
    /// connection (L1 is not trusted then anyway).
    pub(crate) fn peek(&self, now: u64, key: &[u8]) -> Peek {
        if now.saturating_sub(self.quiet_at.load(Ordering::Acquire)) < PEEK_EVERY_MICROS {
            return Peek::Quiet;
        }
        let peek = match &*self.socket.read().unwrap_or_else(|e| e.into_inner()) {
            Some(socket) => socket.peek(key),
            None => return Peek::Quiet,
        };
        if peek == Peek::Quiet {
            self.quiet_at.fetch_max(now, Ordering::AcqRel);
        }
        peek
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One round trip on the channel: true when it was answered within the liveness window,
    /// and so every message sent before it was applied.
    /// A failure is reported only for the connection that is still current: a barrier that
    /// ran on a connection since replaced says nothing about the new one.
    pub(crate) async fn barrier(&self, tier: &Tier) -> bool {
        let id = self.current.load(Ordering::Acquire);
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let sent = Instant::now();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(tier.settings.liveness, ping.query_async::<()>(&mut conn)).await
        {
            Ok(Ok(())) => {
                tier.confirm(sent);
                true
            }
            _ => self.current.load(Ordering::Acquire) != id,
        }
    }
}

/// Applies one push message of connection `id`; `dead` is set once that connection is closed.
fn on_push(tier: &Tier, id: u64, dead: &AtomicBool, info: PushInfo) {
    match info.kind {
        PushKind::Invalidate => match info.data.first() {
            Some(Value::Array(keys)) => {
                let keys: Vec<&[u8]> = keys
                    .iter()
                    .filter_map(|k| match k {
                        Value::BulkString(b) => Some(b.as_slice()),
                        _ => None,
                    })
                    .collect();
                tier.on_message(Some(&keys));
            }
            // FLUSHALL / FLUSHDB: every key.
            _ => tier.on_message(None),
        },
        PushKind::Disconnection => {
            dead.store(true, Ordering::Release);
            if tier.channel.current.load(Ordering::Acquire) == id {
                // Lost first: a read that then finds no socket to look at also finds L1
                // untrusted.
                tier.lost();
                tier.channel.set(0, None, None);
            }
        }
        _ => {}
    }
}

/// Keeps the channel of `tier` up until the tier is dropped.
pub(crate) async fn run(tier: Weak<Tier>, client: redis::Client) {
    let mut next_id = 0u64;
    let mut backoff = Duration::from_millis(20);
    let mut warned = false;
    loop {
        next_id += 1;
        let id = next_id;
        match connect(&tier, &client, id).await {
            Some(Ok((conn, dead))) => {
                backoff = Duration::from_millis(20);
                warned = false;
                heartbeat(&tier, id, conn, &dead).await;
            }
            Some(Err(e)) => {
                if !warned {
                    tracing::warn!(
                        error = %e,
                        "the in-process tier cannot switch on tracking; L1 is bypassed until it can"
                    );
                    warned = true;
                } else {
                    tracing::debug!(error = %e, "tracking not on yet");
                }
            }
            None => return,
        }
        match tier.upgrade() {
            Some(t) => {
                t.lost();
                if t.channel.current.load(Ordering::Acquire) == id {
                    t.channel.set(0, None, None);
                }
            }
            None => return,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Connects and switches tracking on; `None` when the tier is gone.
async fn connect(
    tier: &Weak<Tier>,
    client: &redis::Client,
    id: u64,
) -> Option<redis::RedisResult<(MultiplexedConnection, Arc<AtomicBool>)>> {
    let (prefixes, timeout) = {
        let t = tier.upgrade()?;
        (
            t.prefixes.clone(),
            t.settings.liveness.max(Duration::from_secs(1)),
        )
    };
    let weak = tier.clone();
    let dead = Arc::new(AtomicBool::new(false));
    let closed = dead.clone();
    let sender = move |info: PushInfo| -> Result<(), ()> {
        if let Some(t) = weak.upgrade() {
            on_push(&t, id, &closed, info);
        }
        Ok(())
    };
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(None)
        .set_push_sender(sender);
    let attempt = async {
        let (mut conn, socket) = open(client, &config).await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(CLIENT_NAME)
            .query_async::<()>(&mut conn)
            .await?;
        let mut tracking = redis::cmd("CLIENT");
        tracking.arg("TRACKING").arg("ON").arg("BCAST");
        for prefix in prefixes.iter().filter(|p| !p.is_empty()) {
            tracking.arg("PREFIX").arg(prefix);
        }
        let sent = Instant::now();
        tracking.query_async::<()>(&mut conn).await?;
        Ok((conn, socket, sent))
    };
    let result = match tokio::time::timeout(timeout.saturating_mul(2), attempt).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "switching tracking on timed out",
        ))),
    };
    let t = tier.upgrade()?;
    let closed_early = || {
        redis::RedisError::from((
            redis::ErrorKind::Io,
            "the connection closed while tracking was switched on",
        ))
    };
    Some(result.and_then(|(conn, socket, sent)| {
        t.channel.set(id, Some(conn.clone()), socket);
        if dead.load(Ordering::Acquire) {
            return Err(closed_early());
        }
        t.restored(sent);
        // A close that came while restoring: its handler may have run before `restored`.
        if dead.load(Ordering::Acquire) {
            t.lost();
            return Err(closed_early());
        }
        tracing::debug!(prefixes = ?t.prefixes, "in-process tier: tracking on");
        Ok((conn, dead))
    }))
}

/// Opens the channel's connection. On Linux over plain TCP the socket is made here and watched
/// (see [`super::socket`]); TLS, Unix sockets and other systems go through redis-rs alone.
async fn open(
    client: &redis::Client,
    config: &redis::AsyncConnectionConfig,
) -> redis::RedisResult<(MultiplexedConnection, Option<Arc<Socket>>)> {
    let info = client.get_connection_info();
    let plain_tcp = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) if cfg!(target_os = "linux") => Some((host, *port)),
        _ => None,
    };
    let Some((host, port)) = plain_tcp else {
        let conn = client
            .get_multiplexed_async_connection_with_config(config)
            .await?;
        return Ok((conn, None));
    };
    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    stream.set_nodelay(true)?;
    let (watched, socket) = super::socket::watch(stream)?;
    let (conn, driver) =
        MultiplexedConnection::new_with_config(info.redis_settings(), watched, config.clone())
            .await?;
    // The task ends when the connection closes or every handle to it is dropped; the
    // connection ends with it, also when the runtime drops the task (the second descriptor
    // would otherwise keep it open, tracking on, with nobody reading).
    let on_end = ShutOnDrop(socket.clone());
    tokio::spawn(async move {
        let _on_end = on_end;
        driver.await;
    });
    Ok((conn, Some(socket)))
}

struct ShutOnDrop(Arc<Socket>);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        self.0.shut();
    }
}

/// Confirms the channel every heartbeat until it fails or the tier is gone.
async fn heartbeat(tier: &Weak<Tier>, id: u64, mut conn: MultiplexedConnection, dead: &AtomicBool) {
    let (every, liveness, dead_after) = match tier.upgrade() {
        // A connection that answers nothing for this long is replaced (emptying L1): never
        // sooner than the fail-safe bound lets L1 answer.
        Some(t) => (
            t.settings.heartbeat,
            t.settings.liveness,
            DEAD_AFTER.max(t.settings.fail_safe.unwrap_or_default()),
        ),
        None => return,
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answered = Instant::now();
    loop {
        ticker.tick().await;
        {
            let Some(t) = tier.upgrade() else { return };
            if t.channel.current.load(Ordering::Acquire) != id
                || !t.alive.load(Ordering::Acquire)
                || dead.load(Ordering::Acquire)
            {
                return;
            }
        }
        let sent = Instant::now();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(liveness, ping.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {
                answered = sent;
                let Some(t) = tier.upgrade() else { return };
                t.confirm(sent);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "in-process tier: the channel failed");
                return;
            }
            Err(_) if sent.duration_since(answered) > dead_after => {
                tracing::debug!("in-process tier: no answer on the channel; reconnecting");
                return;
            }
            Err(_) => {}
        }
    }
}
