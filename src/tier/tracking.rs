//! The invalidation channel of the in-process tier: per tiered cache, one RESP3 connection to
//! each server that takes writes (one server, the primary Sentinel names, or every primary of a
//! cluster: see [`Targets`]) with `CLIENT TRACKING ON BCAST PREFIX ...`, a heartbeat on them,
//! and reconnection. The connections are one channel: the loss of any loses the channel, and a
//! heartbeat confirms it only when every connection answered (and, on Cluster and Sentinel,
//! every server still said it is a primary).
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
use crate::store::redis::tracking::{TOPOLOGY_EVERY, Target, Targets, probe};

use super::Tier;

/// A socket found quiet is not peeked at again for this long (microseconds): a peek is a system
/// call, several times the cost of an L1 hit, and reads can come every microsecond. A message
/// or close is seen by every read that begins this long after it reached the socket.
pub(crate) const PEEK_EVERY_MICROS: u64 = 10;

/// Without any answer for this long, the connection is replaced.
const DEAD_AFTER: Duration = Duration::from_secs(10);
/// The name the channel's connections carry in `CLIENT LIST`.
pub(crate) const CLIENT_NAME: &str = "speedlayer-tier";

/// The current connections of the channel, for barriers, and their sockets, for peeks.
#[derive(Default)]
pub(crate) struct Channel {
    conns: Mutex<Vec<MultiplexedConnection>>,
    sockets: RwLock<Vec<Arc<Socket>>>,
    /// Whether a round trip asks each server its `ROLE` (Cluster, Sentinel).
    roles: AtomicBool,
    /// When (the tier's microseconds) the socket was last found quiet; 0 when never.
    quiet_at: AtomicU64,
    /// The id of the connections whose tracking is on; 0 when none.
    current: AtomicU64,
}

impl Channel {
    pub(super) fn set(
        &self,
        id: u64,
        conns: Vec<MultiplexedConnection>,
        sockets: Vec<Arc<Socket>>,
    ) {
        *self.conns.lock().unwrap_or_else(|e| e.into_inner()) = conns;
        let old = std::mem::replace(
            &mut *self.sockets.write().unwrap_or_else(|e| e.into_inner()),
            sockets,
        );
        self.quiet_at.store(0, Ordering::Release);
        self.current.store(id, Ordering::Release);
        // The connections they belonged to are given up.
        for old in old {
            old.shut();
        }
    }

    /// Empties the channel (no connection).
    pub(super) fn clear(&self) {
        self.set(0, Vec::new(), Vec::new());
    }

    /// What waits on the current connections' sockets at `now` (the tier's microseconds) that
    /// may concern `key`, unless they were found quiet less than [`PEEK_EVERY_MICROS`] ago.
    /// [`Peek::Quiet`] for a socket that cannot be seen (TLS, a Unix socket, not Linux) or when
    /// there is no connection (L1 is not trusted then anyway).
    pub(crate) fn peek(&self, now: u64, key: &[u8]) -> Peek {
        if now.saturating_sub(self.quiet_at.load(Ordering::Acquire)) < PEEK_EVERY_MICROS {
            return Peek::Quiet;
        }
        let mut peek = Peek::Quiet;
        for socket in &*self.sockets.read().unwrap_or_else(|e| e.into_inner()) {
            match socket.peek(key) {
                found @ (Peek::Unread | Peek::Closed) => return found,
                Peek::Elsewhere => peek = Peek::Elsewhere,
                Peek::Quiet => {}
            }
        }
        if peek == Peek::Quiet {
            self.quiet_at.fetch_max(now, Ordering::AcqRel);
        }
        peek
    }

    fn connections(&self) -> Vec<MultiplexedConnection> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One round trip on each connection of the channel: true when all were answered within
    /// the liveness window (every server still a primary, where that is asked), and so every
    /// message sent before them was applied.
    /// A failure is reported only for connections that are still current: a barrier that
    /// ran on connections since replaced says nothing about the new ones.
    pub(crate) async fn barrier(&self, tier: &Tier) -> bool {
        let id = self.current.load(Ordering::Acquire);
        let mut conns = self.connections();
        if conns.is_empty() {
            return false;
        }
        let sent = Instant::now();
        let roles = self.roles.load(Ordering::Acquire);
        match tokio::time::timeout(tier.settings.liveness, probe_all(&mut conns, roles)).await {
            Ok(Ok(true)) => {
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
                tier.channel.clear();
            }
        }
        _ => {}
    }
}

/// One round trip on every connection at once (see [`probe`]): `Ok(false)` when a server no
/// longer takes writes.
async fn probe_all(conns: &mut [MultiplexedConnection], roles: bool) -> redis::RedisResult<bool> {
    let answers =
        futures_util::future::join_all(conns.iter_mut().map(|conn| probe(conn, roles))).await;
    let mut all = true;
    for answer in answers {
        all &= answer?;
    }
    Ok(all)
}

/// Keeps the channel of `tier` up until the tier is dropped.
pub(crate) async fn run(tier: Weak<Tier>, targets: Targets) {
    let mut next_id = 0u64;
    let mut backoff = Duration::from_millis(20);
    let mut warned = false;
    match tier.upgrade() {
        Some(t) => t
            .channel
            .roles
            .store(targets.fails_over(), Ordering::Release),
        None => return,
    }
    loop {
        next_id += 1;
        let id = next_id;
        match connect(&tier, &targets, id).await {
            Some(Ok((conns, addrs, dead))) => {
                backoff = Duration::from_millis(20);
                warned = false;
                heartbeat(&tier, id, conns, &addrs, &targets, &dead).await;
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
                    t.channel.clear();
                }
            }
            None => return,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// What a connected channel is: its connections, the servers' addresses (sorted; Cluster only)
/// and the flag set once any of them closed.
type Connected = (
    Vec<MultiplexedConnection>,
    Vec<(String, u16)>,
    Arc<AtomicBool>,
);

/// Finds the servers, connects to each and switches tracking on; `None` when the tier is gone.
async fn connect(
    tier: &Weak<Tier>,
    targets: &Targets,
    id: u64,
) -> Option<redis::RedisResult<Connected>> {
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
    let roles = targets.fails_over();
    let one = |target: Target| {
        let (config, prefixes) = (&config, &prefixes);
        async move {
            let (mut conn, socket) = open(&target.client, config).await?;
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
            // A server named a primary a moment ago may have been demoted since: tracking it
            // would miss the writes of the one that took over.
            if !probe(&mut conn, roles).await? {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "a server to track is no longer a primary",
                )));
            }
            redis::RedisResult::Ok((conn, socket, target.addr, sent))
        }
    };
    let attempt = async {
        let found = targets.resolve(timeout).await?;
        let opened = futures_util::future::join_all(found.into_iter().map(one)).await;
        let (mut conns, mut sockets, mut addrs) = (Vec::new(), Vec::new(), Vec::new());
        let mut earliest: Option<Instant> = None;
        for result in opened {
            let (conn, socket, addr, sent) = result?;
            conns.push(conn);
            sockets.extend(socket);
            addrs.extend(addr);
            earliest = Some(earliest.map_or(sent, |e| e.min(sent)));
        }
        addrs.sort();
        let sent = earliest
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no server to track")))?;
        redis::RedisResult::Ok((conns, sockets, addrs, sent))
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
    Some(result.and_then(|(conns, sockets, addrs, sent)| {
        t.channel.set(id, conns.clone(), sockets);
        if dead.load(Ordering::Acquire) {
            return Err(closed_early());
        }
        t.restored(sent);
        // A close that came while restoring: its handler may have run before `restored`.
        if dead.load(Ordering::Acquire) {
            t.lost();
            return Err(closed_early());
        }
        tracing::debug!(prefixes = ?t.prefixes, servers = conns.len(), "in-process tier: tracking on");
        Ok((conns, addrs, dead))
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

/// Confirms the channel every heartbeat until it fails, a server is no longer a primary, the
/// cluster's primaries are no longer `addrs`, or the tier is gone.
async fn heartbeat(
    tier: &Weak<Tier>,
    id: u64,
    mut conns: Vec<MultiplexedConnection>,
    addrs: &[(String, u16)],
    targets: &Targets,
    dead: &AtomicBool,
) {
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
    let roles = targets.fails_over();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answered = Instant::now();
    let mut listed = Instant::now();
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
        if listed.elapsed() >= TOPOLOGY_EVERY
            && let Some(first) = conns.first_mut()
            && let Some(now) = targets
                .listed(first, liveness.max(Duration::from_secs(1)))
                .await
        {
            listed = Instant::now();
            match now {
                Ok(now) if now != addrs => {
                    tracing::debug!(
                        "in-process tier: the servers taking writes changed; tracking them anew"
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "in-process tier: cannot list the servers"),
            }
        }
        let sent = Instant::now();
        match tokio::time::timeout(liveness, probe_all(&mut conns, roles)).await {
            Ok(Ok(true)) => {
                answered = sent;
                let Some(t) = tier.upgrade() else { return };
                t.confirm(sent);
            }
            Ok(Ok(false)) => {
                tracing::debug!("in-process tier: a tracked server is no longer a primary");
                return;
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
