//! `speedlayer-fleet-node`: one app server of a fleet, for the fleet tests. The tests spawn
//! several of these OS processes against one real Redis and drive them over stdin/stdout, so
//! that what is promised across instances (leases, invalidations) is tested across processes,
//! each with its own connections, flights and memory.
//!
//! Protocol: one request per line, `<n> <command> <args...>`; each reply is one line,
//! `<n> <result>`. Requests run concurrently. Keys are `fleet:item:<id>`.
//!
//! - `get <id>` → `value <n>` or `none`
//! - `watch <id> <old> <ms>`: reads every millisecond for `ms` → `reads <n> old <n> other <n>
//!   last_old_at <us>` (the reads that answered `old`, and when the last of them began, in
//!   microseconds of the system clock; 0: never)
//! - `set <id> <value>` → `ok`
//! - `burst <id> <callers> <loader ms> <value>` → `loads <loader calls> values <sorted values>`
//! - `cancel <id>`: starts a load that never finishes and drops it once its loader runs →
//!   `cancelled`
//! - `hold <id> <value>`: starts a load whose loader waits for `release <id>` → `holding`
//! - `release <id>` → `returned <value> refused <stale sets refused so far>`
//! - `invalidate <id>` → `deferred <true|false>`
//! - `flush <ms>` → `flushed <true|false>`
//! - `stats` → `loader_calls <n> stale_sets_refused <n> errors <n> pending <n>`
//! - `lock-hold <id> <lease ms>`: takes the lock `lock:fleet:<id>` and keeps the guard (no
//!   watchdog) → `token <n>` or `contended` / `unavailable`
//! - `lock-release <id>`: releases the guard kept by `lock-hold` → `released <true|false>`
//! - `lock-contend <id> <tasks> <rounds> <lease ms> [<record url>]`: `tasks` tasks each take the
//!   lock `rounds` times (waiting up to 10 s each), and while holding it check a shared record
//!   on the Redis at `record url` (by default the same single server: `INCR` of
//!   `fleet:occupancy:<id>` must answer 1) and append their token to `fleet:tokens:<id>` →
//!   `acquired <n> overlaps <n>`
//! - `count-run <id> <n> <database url>`: `n` times, inserts a row in the database (a second
//!   Redis standing for it: `INCR rows:<id>`) and then increments the counter
//!   `fleet:count:<id>`; every 7th time reads the counter (recounting from the database when it
//!   is missing) and every 50th reconciles it → `done <n> updated <n> absent <n> unavailable <n>`
//! - `count-get <id> <database url>` → `count <n>`
//! - `idem-burst <key> <requests> <body> <database url>`: `requests` concurrent duplicates of
//!   one payment under the idempotency key; the first run records the payment in the database
//!   (`INCR payments:<key>`) and takes 50 ms → `ran <n> replayed <n> conflicts <n> mismatches <n>`
//! - `idem-begin <key>`: begins a payment run under the key and keeps it → `run` (or what a
//!   retry gets: `replayed <body>`, `conflict`, `mismatch`, `unavailable`)
//! - `idem-complete <key> <body>`: completes the kept run → `stored <bool>`
//! - `idem-check <key>`: a retry under the key → `replayed <body>`, `conflict`, `unavailable`,
//!   or `ran` when it ran again
//!
//! - `views-race <rows> <ops> <tasks> <database url>`: writes and reads of views built from
//!   cached rows (see `views_race`) → `stale <n> reads <n> writes <n>`
//!
//! With `SPEEDLAYER_FLEET_TIER=on` (or `fail-safe`) the node's cache keeps an in-process tier
//! over the `fleet:item` keys (a 60 s L1 TTL; `fail-safe` answers stale for up to 5 s):
//!
//! - `tier-warm <id>`: reads until the tier answers (up to 2 s) → `warm <value>` or `cold`
//! - `tier-read <id>` → `value <n> served <Store|Local|Stale>` or `none`
//! - `tier-watch <id> <old|none> <ms>`: reads (yielding between reads) until something other
//!   than `old` is read, then 30 ms more, at most `ms` in all → `last_old <us> first_new <us>
//!   relapses <n> reads <n>`, times in microseconds of the system clock (0: never)
//! - `tier-write <set|delete|invalidate|tag> <id> <value>`: the write, then the system clock
//!   when it returned → `at <us>` (`tag` invalidates the tag `fleet:row:<id>` the `set` gives)
//! - `outbox-write <id> <sqlite path> <die>`: in one transaction of the SQLite database at the
//!   path (shared by the nodes), a row write and the outbox row of `ItemChanged(id)`; commit;
//!   then with `die` = 1 the process aborts before invalidating, else it invalidates →
//!   `committed`
//! - `outbox-relay <sqlite path>`: one relay pass → `applied <n> released <n> depth <n>`
//! - `tier-stats` → `local_hits <n> evicted <n> losses <n> starts <n> trusted <bool>`
//!
//! Run: `speedlayer-fleet-node <redis url> [op timeout ms] [cool-down ms] [lease wait ms]`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use speedlayer::config::RedisConfig;
use speedlayer::counter::{Counted, Counters};
use speedlayer::idempotency::{
    Begin, Fingerprint, Idempotency, IdempotencyKey, Pending, StoredResponse,
};
use speedlayer::key::{Ident, KeySpace, Namespace};
use speedlayer::lock::{Acquire, LockGuard, Locks};
use speedlayer::revocation::Revocations;
use speedlayer::scratch::{FlushBatch, FlushError, Presence, Scratch, ScratchHash, Sink};
use speedlayer::session::{SessionLookup, SessionRecord, Sessions};
use speedlayer::tier::LocalTier;
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Config, Served};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::JoinHandle;

const MINUTE: Ttl = Ttl::seconds(60);
const FLEET: Ident = Ident::from_static("fleet");
const DAY: Ttl = Ttl::hours(24);
const PAYMENTS: Ident = Ident::from_static("payments");

/// The shared SQLite database of the outbox commands.
async fn outbox_db(path: &str) -> Result<sqlx::SqlitePool, String> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(Duration::from_secs(10));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(|e| e.to_string())
}

/// A row of the `fleet:item` keys changed: its entry goes.
struct ItemChanged(u64);

impl speedlayer::invalidation::Invalidates for ItemChanged {
    fn targets(
        &self,
        ns: &Namespace,
        targets: &mut speedlayer::invalidation::Targets,
    ) -> Result<(), speedlayer::key::KeyError> {
        targets.key(
            ns.global()
                .key(&FLEET, &Ident::from_static("item"), self.0)?,
        );
        Ok(())
    }
}

/// The system clock in microseconds: the test compares times taken in several processes.
fn wall_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Held {
    release: Arc<Notify>,
    task: JoinHandle<u64>,
}

/// The stand-in database of the counter commands: a second Redis, shared by every node.
async fn database(url: &str) -> Result<redis::aio::ConnectionManager, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    redis::aio::ConnectionManager::new(client)
        .await
        .map_err(|e| e.to_string())
}

/// `SELECT COUNT(*)` of the stand-in database.
async fn count_rows(db: &redis::aio::ConnectionManager, rows: &str) -> Result<i64, String> {
    let n: Option<i64> = redis::cmd("GET")
        .arg(rows)
        .query_async(&mut db.clone())
        .await
        .map_err(|e| e.to_string())?;
    Ok(n.unwrap_or(0))
}

/// `views-race`: `tasks` tasks of this process each make `ops` operations over rows `0..rows`
/// of the stand-in database (`version:<id>`). One in 8 is a write: the version is incremented
/// (the commit), the row's tag invalidated, then the version recorded as confirmed
/// (`confirmed:<id>`, shared by every process). The others read a view of one or two rows,
/// cached and built from the rows read through the cache in one batch, both under the rows'
/// tags; a view older than what was confirmed before the read began is stale.
async fn views_race(
    cache: &Cache,
    db: &redis::aio::ConnectionManager,
    rows: u64,
    ops: u64,
    tasks: u64,
) -> Result<String, String> {
    let scope = Namespace::root().global();
    fn row_tag(id: u64) -> Result<speedlayer::Tag, speedlayer::key::KeyError> {
        Namespace::root()
            .global()
            .tag(&Ident::from_static("shows"), id)
    }
    let confirm = redis::Script::new(
        r"
if (tonumber(redis.call('GET', KEYS[1])) or 0) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
",
    );
    let versions = |prefix: &'static str, ids: Vec<u64>| {
        let mut db = db.clone();
        async move {
            let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}:{id}")).collect();
            let found: Vec<Option<u64>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut db)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok::<_, std::io::Error>(
                ids.into_iter()
                    .zip(found)
                    .map(|(id, v)| (id, v.unwrap_or(0)))
                    .collect::<HashMap<u64, u64>>(),
            )
        }
    };
    let run = |_| {
        let (cache, scope, confirm) = (cache.clone(), scope.clone(), confirm.clone());
        let mut db = db.clone();
        async move {
            let (mut stale, mut reads, mut writes) = (0u64, 0u64, 0u64);
            for _ in 0..ops {
                let pick = rand::random::<u64>();
                let id = (pick >> 8) % rows;
                if pick.is_multiple_of(8) {
                    let version: u64 = redis::cmd("INCR")
                        .arg(format!("version:{id}"))
                        .query_async(&mut db)
                        .await
                        .map_err(|e| e.to_string())?;
                    let tag = row_tag(id).map_err(|e| e.to_string())?;
                    cache
                        .invalidate_tag(&tag)
                        .await
                        .map_err(|e| e.to_string())?;
                    let _: i64 = confirm
                        .key(format!("confirmed:{id}"))
                        .arg(version)
                        .invoke_async(&mut db)
                        .await
                        .map_err(|e| e.to_string())?;
                    writes += 1;
                    continue;
                }
                let ids: Vec<u64> = if pick.is_multiple_of(3) {
                    vec![id, (id + 1) % rows]
                } else {
                    vec![id]
                };
                let before = versions("confirmed", ids.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                let name = ids.iter().map(u64::to_string).collect::<Vec<_>>().join("-");
                let view_key = scope
                    .key(&FLEET, &Ident::from_static("view"), &name)
                    .map_err(|e| e.to_string())?;
                let tags = ids
                    .iter()
                    .map(|&id| row_tag(id))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let row_keys = ids
                    .iter()
                    .map(|&id| {
                        scope
                            .key(&FLEET, &Ident::from_static("row"), id)
                            .map(|k| (id, k))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                // What the read did, told when it turns out stale.
                let trace = std::sync::Mutex::new(String::new());
                let started = std::time::Instant::now();
                let view: HashMap<u64, u64> = cache
                    .get_or_set_tagged(&view_key, MINUTE, &tags, || async {
                        trace.lock().unwrap().push_str(" view-loaded");
                        let rows = cache
                            .get_or_set_many_tagged(
                                &row_keys,
                                MINUTE,
                                MINUTE,
                                |id: &u64| row_tag(*id).into_iter().collect(),
                                |missing: Vec<u64>| {
                                    let loading = versions("version", missing);
                                    async {
                                        let loaded = loading.await;
                                        if let Ok(rows) = &loaded {
                                            trace
                                                .lock()
                                                .unwrap()
                                                .push_str(&format!(" rows-loaded {rows:?}"));
                                        }
                                        loaded
                                    }
                                },
                            )
                            .await
                            .into_map()
                            .map_err(|e| std::io::Error::other(e.to_string()));
                        trace.lock().unwrap().push_str(&format!(" rows {rows:?}"));
                        rows
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                reads += 1;
                if ids
                    .iter()
                    .any(|id| view.get(id).copied().unwrap_or(0) < before[id])
                {
                    stale += 1;
                    eprintln!(
                        "stale view {name}: confirmed before the read {before:?}, read {view:?} \
                         in {:?};{}",
                        started.elapsed(),
                        trace.lock().unwrap()
                    );
                }
            }
            Ok::<_, String>((stale, reads, writes))
        }
    };
    let results = futures_util::future::join_all((0..tasks).map(run)).await;
    let (mut stale, mut reads, mut writes) = (0, 0, 0);
    for r in results {
        let (s, r, w) = r?;
        stale += s;
        reads += r;
        writes += w;
    }
    let stats = cache.stats();
    Ok(format!(
        "stale {stale} reads {reads} writes {writes} timeouts {} errors {} refused {} pending {}",
        stats.timeouts, stats.errors, stats.stale_sets_refused, stats.pending_invalidations
    ))
}

struct Node {
    idempotency: Idempotency,
    cache: Cache,
    counters: Counters,
    counts: KeySpace,
    items: KeySpace,
    held: Mutex<HashMap<u64, Held>>,
    locks: Locks,
    guards: Mutex<HashMap<u64, LockGuard>>,
    /// Idempotent runs begun and not completed yet, by key.
    runs: Mutex<HashMap<String, Pending>>,
    raw: Option<redis::aio::ConnectionManager>,
    revocations: Revocations,
    presence: Presence,
    sessions: Sessions,
    session_loads: AtomicUsize,
    scratch: Scratch,
    sink_calls: AtomicUsize,
}

fn arg(args: &[&str], i: usize) -> Result<u64, String> {
    args.get(i)
        .ok_or_else(|| format!("missing argument {i}"))?
        .parse()
        .map_err(|e| format!("argument {i}: {e}"))
}

/// The roll call's stand-in database (a second Redis): a batch id is applied once (`SET NX` on
/// `batch:<id>`, as a unique constraint would), each applied mark counted in the hash `applied`.
struct RollSink<'a> {
    db: redis::aio::ConnectionManager,
    fail_every: usize,
    calls: &'a AtomicUsize,
}

impl Sink for RollSink<'_> {
    type Error = redis::RedisError;

    async fn write(&self, batch: &FlushBatch) -> Result<(), redis::RedisError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_every > 0 && n.is_multiple_of(self.fail_every) {
            return Err(redis::RedisError::from(std::io::Error::other(
                "the database refused the write",
            )));
        }
        let mut db = self.db.clone();
        // One transaction: the batch id and its marks, or nothing.
        let script = redis::Script::new(
            r"
if redis.call('SET', KEYS[1], '1', 'NX') then
  for i = 1, #ARGV do redis.call('HINCRBY', KEYS[2], ARGV[i], 1) end
end
return 1
",
        );
        let mut invocation = script.prepare_invoke();
        invocation.key(format!("batch:{}", batch.id)).key("applied");
        for (field, _) in &batch.fields {
            invocation.arg(field);
        }
        invocation.invoke_async::<i64>(&mut db).await.map(|_| ())
    }
}

impl Node {
    fn roll_hash(&self, class: u64) -> Result<ScratchHash, String> {
        let key = self
            .items
            .key(format!("roll-{class}"))
            .map_err(|e| e.to_string())?;
        Ok(self.scratch.hash(key))
    }

    async fn handle(self: Arc<Self>, command: &str, args: &[&str]) -> Result<String, String> {
        let key = |i: usize| -> Result<speedlayer::Key, String> {
            self.items.key(arg(args, i)?).map_err(|e| e.to_string())
        };
        match command {
            "get" => Ok(match self.cache.get::<u64>(&key(0)?).await {
                Some(v) => format!("value {v}"),
                None => "none".to_owned(),
            }),
            "set" => {
                self.cache
                    .set(&key(0)?, &arg(args, 1)?, MINUTE)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok("ok".to_owned())
            }
            "burst" => {
                let (k, callers, loader_ms, value) =
                    (key(0)?, arg(args, 1)?, arg(args, 2)?, arg(args, 3)?);
                let loads = Arc::new(AtomicUsize::new(0));
                let start = Arc::new(tokio::sync::Barrier::new(callers as usize));
                let mut tasks = Vec::new();
                for _ in 0..callers {
                    let (cache, k, loads, start) =
                        (self.cache.clone(), k.clone(), loads.clone(), start.clone());
                    tasks.push(tokio::spawn(async move {
                        start.wait().await;
                        cache
                            .get_or_set(&k, MINUTE, || async {
                                loads.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(loader_ms)).await;
                                Ok::<_, std::io::Error>(value)
                            })
                            .await
                            .map_err(|e| e.to_string())
                    }));
                }
                let mut values = Vec::new();
                for t in tasks {
                    values.push(t.await.map_err(|e| e.to_string())??);
                }
                values.sort_unstable();
                values.dedup();
                let values: Vec<String> = values.iter().map(u64::to_string).collect();
                Ok(format!(
                    "loads {} values {}",
                    loads.load(Ordering::SeqCst),
                    values.join(",")
                ))
            }
            "batch" => {
                // `callers` tasks of this process read ids `from..to` with one batch each; every
                // loaded row is counted, and every answer must be id × 10.
                let (from, to, callers, loader_ms) =
                    (arg(args, 0)?, arg(args, 1)?, arg(args, 2)?, arg(args, 3)?);
                let keys = self.items.keys(from..to).map_err(|e| e.to_string())?;
                let rows = Arc::new(AtomicUsize::new(0));
                let start = Arc::new(tokio::sync::Barrier::new(callers as usize));
                let mut tasks = Vec::new();
                for _ in 0..callers {
                    let (cache, keys, rows, start) = (
                        self.cache.clone(),
                        keys.clone(),
                        rows.clone(),
                        start.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        start.wait().await;
                        let batch = cache
                            .get_or_set_many(&keys, MINUTE, MINUTE, |ids: Vec<u64>| {
                                rows.fetch_add(ids.len(), Ordering::SeqCst);
                                async move {
                                    tokio::time::sleep(Duration::from_millis(loader_ms)).await;
                                    Ok::<_, std::io::Error>(
                                        ids.into_iter()
                                            .map(|id| (id, id * 10))
                                            .collect::<HashMap<u64, u64>>(),
                                    )
                                }
                            })
                            .await;
                        batch
                            .iter()
                            .all(|(id, answer)| matches!(answer, Ok(Some(v)) if *v == id * 10))
                    }));
                }
                let mut right = true;
                for t in tasks {
                    right &= t.await.map_err(|e| e.to_string())?;
                }
                Ok(format!(
                    "rows {} right {right}",
                    rows.load(Ordering::SeqCst)
                ))
            }
            "revoke" => {
                let expires = std::time::SystemTime::now() + Duration::from_secs(arg(args, 1)?);
                let jti = format!("jti-{}", arg(args, 0)?);
                let stored = self
                    .revocations
                    .revoke(&jti, expires)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(format!("revoked {stored}"))
            }
            "revoked" => {
                let jti = format!("jti-{}", arg(args, 0)?);
                Ok(format!("{:?}", self.revocations.check(&jti).await))
            }
            "presence-beat" => {
                // presence-beat <room> <member> <ms>
                let room = format!("class-{}", arg(args, 0)?);
                let member = format!("m{}", arg(args, 1)?);
                let ttl = Ttl::from_millis(arg(args, 2)?).map_err(|e| e.to_string())?;
                self.presence
                    .heartbeat(&room, &member, ttl)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok("ok".to_owned())
            }
            "presence-list" => {
                let room = format!("class-{}", arg(args, 0)?);
                let mut online = self
                    .presence
                    .online(&room)
                    .await
                    .map_err(|e| e.to_string())?;
                online.sort();
                Ok(format!("online {}", online.join(",")))
            }
            "session-get" => {
                // session-get <n> <database url>: the session of token tok-<n>, read through
                // the index from the stand-in sessions table (`session:<n>` holds the user).
                let n = arg(args, 0)?;
                let db = database(args.get(1).ok_or("missing the database url")?).await?;
                let loads = &self.session_loads;
                let found = self
                    .sessions
                    .get(&format!("tok-{n}"), || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        let user: Option<String> = redis::cmd("GET")
                            .arg(format!("session:{n}"))
                            .query_async(&mut db.clone())
                            .await?;
                        Ok::<_, redis::RedisError>(user.map(|user_id| SessionRecord {
                            user_id,
                            expires_at: std::time::SystemTime::now() + Duration::from_secs(3600),
                            data: (),
                        }))
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let loads = loads.load(Ordering::SeqCst);
                Ok(match found {
                    SessionLookup::Present(s) => format!("present {} loads {loads}", s.user_id),
                    SessionLookup::Absent => format!("absent loads {loads}"),
                    SessionLookup::Unknown => format!("unknown loads {loads}"),
                })
            }
            "roll-mark" => {
                // roll-mark <class> <from> <to>: marks fields from..to of the class's hash.
                let (class, from, to) = (arg(args, 0)?, arg(args, 1)?, arg(args, 2)?);
                let hash = self.roll_hash(class)?;
                for field in from..to {
                    hash.mark(&format!("s{field}"), "present")
                        .await
                        .map_err(|e| e.to_string())?;
                    if field % 20 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                Ok(format!("marked {}", to - from))
            }
            "roll-flush" => {
                // roll-flush <class> <database url> <fail every n-th sink call of this process>
                let class = arg(args, 0)?;
                let db = database(args.get(1).ok_or("missing the database url")?).await?;
                let fail_every = arg(args, 2)? as usize;
                let sink = RollSink {
                    db,
                    fail_every,
                    calls: &self.sink_calls,
                };
                match self.roll_hash(class)?.flush(&sink).await {
                    Ok(f) if f.busy => Ok("busy".to_owned()),
                    Ok(f) => Ok(format!("flushed {} {}", f.batches, f.fields)),
                    Err(FlushError::Sink(_)) => Ok("sink failed".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
            "session-revoke-user" => {
                let user = format!("u{}", arg(args, 0)?);
                let dropped = self
                    .sessions
                    .revoke_user(&user)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(format!("dropped {dropped}"))
            }
            "cancel" => {
                let k = key(0)?;
                let started = Arc::new(Notify::new());
                let load = {
                    let started = started.clone();
                    self.cache.get_or_set(&k, MINUTE, move || async move {
                        started.notify_one();
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok::<_, std::io::Error>(0u64)
                    })
                };
                tokio::select! {
                    _ = load => Err("the load cannot finish".to_owned()),
                    _ = started.notified() => Ok("cancelled".to_owned()),
                }
            }
            "hold" => {
                let (k, value, id) = (key(0)?, arg(args, 1)?, arg(args, 0)?);
                let (release, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
                let task = {
                    let (cache, release, started) =
                        (self.cache.clone(), release.clone(), started.clone());
                    tokio::spawn(async move {
                        cache
                            .get_or_set(&k, MINUTE, || async {
                                started.notify_one();
                                release.notified().await;
                                Ok::<_, std::io::Error>(value)
                            })
                            .await
                            .unwrap_or(u64::MAX)
                    })
                };
                started.notified().await;
                self.held.lock().await.insert(id, Held { release, task });
                Ok("holding".to_owned())
            }
            "release" => {
                let held = self
                    .held
                    .lock()
                    .await
                    .remove(&arg(args, 0)?)
                    .ok_or("nothing held under that id")?;
                held.release.notify_one();
                let value = held.task.await.map_err(|e| e.to_string())?;
                Ok(format!(
                    "returned {value} refused {}",
                    self.cache.stats().stale_sets_refused
                ))
            }
            "invalidate" => {
                let done = self
                    .cache
                    .store()
                    .invalidate(&[key(0)?], &[])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(format!("deferred {}", done.deferred))
            }
            "flush" => {
                let applied = self
                    .cache
                    .store()
                    .flush_invalidations(Duration::from_millis(arg(args, 0)?))
                    .await;
                Ok(format!("flushed {applied}"))
            }
            "lock-hold" => {
                let (id, lease) = (arg(args, 0)?, arg(args, 1)?);
                let name = self.locks.name(&FLEET, id).map_err(|e| e.to_string())?;
                let lease = Ttl::from_millis(lease).map_err(|e| e.to_string())?;
                Ok(match self.locks.acquire(&name, lease).await {
                    Acquire::Acquired(guard) => {
                        let token = guard.token();
                        self.guards.lock().await.insert(id, guard);
                        format!("token {token}")
                    }
                    Acquire::Contended { .. } => "contended".to_owned(),
                    Acquire::Unavailable => "unavailable".to_owned(),
                })
            }
            "lock-release" => {
                let guard = self
                    .guards
                    .lock()
                    .await
                    .remove(&arg(args, 0)?)
                    .ok_or("no lock held under that id")?;
                let released = guard.release().await.map_err(|e| e.to_string())?;
                Ok(format!("released {released}"))
            }
            "lock-contend" => {
                let (id, tasks, rounds, lease) =
                    (arg(args, 0)?, arg(args, 1)?, arg(args, 2)?, arg(args, 3)?);
                let name = self.locks.name(&FLEET, id).map_err(|e| e.to_string())?;
                let lease = Ttl::from_millis(lease).map_err(|e| e.to_string())?;
                let occupancy = format!("fleet:occupancy:{id}");
                let tokens = format!("fleet:tokens:{id}");
                // The shared record: on the server named, else on the node's own Redis.
                let record = match args.get(4) {
                    Some(url) => Some(database(url).await?),
                    None => self.raw.clone(),
                };
                let acquired = Arc::new(AtomicUsize::new(0));
                let overlaps = Arc::new(AtomicUsize::new(0));
                let mut workers = Vec::new();
                for _ in 0..tasks {
                    let (node, name, occupancy, tokens) = (
                        self.clone(),
                        name.clone(),
                        occupancy.clone(),
                        tokens.clone(),
                    );
                    let (acquired, overlaps, record) =
                        (acquired.clone(), overlaps.clone(), record.clone());
                    workers.push(tokio::spawn(async move {
                        let mut raw = record
                            .ok_or("lock-contend needs a single-server URL or the record's URL")?;
                        for _ in 0..rounds {
                            let wait = Duration::from_secs(10);
                            let Some(guard) =
                                node.locks.acquire_timeout(&name, lease, wait).await.guard()
                            else {
                                return Err("the lock was not acquired within 10 s".to_owned());
                            };
                            let inside: i64 = redis::cmd("INCR")
                                .arg(&occupancy)
                                .query_async(&mut raw)
                                .await
                                .map_err(|e| e.to_string())?;
                            if inside != 1 {
                                overlaps.fetch_add(1, Ordering::SeqCst);
                            }
                            let _: i64 = redis::cmd("RPUSH")
                                .arg(&tokens)
                                .arg(guard.token().get())
                                .query_async(&mut raw)
                                .await
                                .map_err(|e| e.to_string())?;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            let _: i64 = redis::cmd("DECR")
                                .arg(&occupancy)
                                .query_async(&mut raw)
                                .await
                                .map_err(|e| e.to_string())?;
                            acquired.fetch_add(1, Ordering::SeqCst);
                            guard.release().await.map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    }));
                }
                for w in workers {
                    w.await.map_err(|e| e.to_string())??;
                }
                Ok(format!(
                    "acquired {} overlaps {}",
                    acquired.load(Ordering::SeqCst),
                    overlaps.load(Ordering::SeqCst)
                ))
            }
            "count-run" => {
                let (id, n) = (arg(args, 0)?, arg(args, 1)?);
                let db = database(args.get(2).ok_or("missing the database url")?).await?;
                let key = self.counts.key(id).map_err(|e| e.to_string())?;
                let rows = format!("rows:{id}");
                let (mut updated, mut absent, mut unavailable) = (0, 0, 0);
                for i in 0..n {
                    let update = self.counters.begin(&key).await;
                    let _: i64 = redis::cmd("INCR")
                        .arg(&rows)
                        .query_async(&mut db.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    match update.increment(DAY).await {
                        Counted::Updated(_) => updated += 1,
                        Counted::Absent => absent += 1,
                        Counted::Unavailable => unavailable += 1,
                    }
                    if i % 7 == 0 {
                        self.counters
                            .get(&key, DAY, || count_rows(&db, &rows))
                            .await?;
                    }
                    if i % 50 == 0 {
                        self.counters
                            .reconcile(&key, DAY, || count_rows(&db, &rows))
                            .await?;
                    }
                }
                Ok(format!(
                    "done {n} updated {updated} absent {absent} unavailable {unavailable}"
                ))
            }
            "views-race" => {
                let (rows, ops, tasks) = (arg(args, 0)?, arg(args, 1)?, arg(args, 2)?);
                let db = database(args.get(3).ok_or("missing the database url")?).await?;
                views_race(&self.cache, &db, rows, ops, tasks).await
            }
            "count-get" => {
                let id = arg(args, 0)?;
                let db = database(args.get(1).ok_or("missing the database url")?).await?;
                let key = self.counts.key(id).map_err(|e| e.to_string())?;
                let rows = format!("rows:{id}");
                let n = self
                    .counters
                    .get(&key, DAY, || count_rows(&db, &rows))
                    .await?;
                Ok(format!("count {n}"))
            }
            "idem-burst" => {
                let (key, requests, body) = (
                    args.first().ok_or("missing the key")?.to_string(),
                    arg(args, 1)?,
                    args.get(2).ok_or("missing the body")?.to_string(),
                );
                let db = database(args.get(3).ok_or("missing the database url")?).await?;
                let key = IdempotencyKey::parse(&key).map_err(|e| e.to_string())?;
                let fingerprint = Fingerprint::of("POST", "/api/payments", body.as_bytes());
                let start = Arc::new(tokio::sync::Barrier::new(requests as usize));
                let mut tasks = Vec::new();
                for _ in 0..requests {
                    let (node, key, fingerprint, db, start) = (
                        self.clone(),
                        key.clone(),
                        fingerprint.clone(),
                        db.clone(),
                        start.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        start.wait().await;
                        let begin = node
                            .idempotency
                            .begin(&PAYMENTS, "parent-1", &key, &fingerprint)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(match begin {
                            Begin::Run(pending) => {
                                let n: i64 = redis::cmd("INCR")
                                    .arg(format!("payments:{}", key.as_str()))
                                    .query_async(&mut db.clone())
                                    .await
                                    .map_err(|e| e.to_string())?;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                let response =
                                    StoredResponse::new(201, format!("{{\"payment\":{n}}}"));
                                pending
                                    .complete(&response)
                                    .await
                                    .map_err(|e| e.to_string())?;
                                "ran"
                            }
                            Begin::Replay(_) => "replayed",
                            Begin::InProgress => "conflicts",
                            Begin::Mismatch => "mismatches",
                            Begin::Unavailable => "unavailable",
                        })
                    }));
                }
                let mut counts: HashMap<&str, usize> = HashMap::new();
                for t in tasks {
                    *counts
                        .entry(t.await.map_err(|e| e.to_string())??)
                        .or_default() += 1;
                }
                let get = |k: &str| counts.get(k).copied().unwrap_or(0);
                Ok(format!(
                    "ran {} replayed {} conflicts {} mismatches {} unavailable {}",
                    get("ran"),
                    get("replayed"),
                    get("conflicts"),
                    get("mismatches"),
                    get("unavailable")
                ))
            }
            "idem-begin" | "idem-check" => {
                // Begins a run under the key: `idem-begin` keeps it for `idem-complete`,
                // `idem-check` completes it at once (a run there is a retry that ran again).
                let key = args.first().ok_or("missing the key")?.to_string();
                let parsed = IdempotencyKey::parse(&key).map_err(|e| e.to_string())?;
                let fingerprint = Fingerprint::of("POST", "/api/payments", b"{}");
                let begin = self
                    .idempotency
                    .begin(&PAYMENTS, "parent-1", &parsed, &fingerprint)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(match begin {
                    Begin::Run(pending) if command == "idem-begin" => {
                        self.runs.lock().await.insert(key, pending);
                        "run".to_owned()
                    }
                    Begin::Run(pending) => {
                        let _ = pending.complete(&StoredResponse::new(201, "again")).await;
                        "ran".to_owned()
                    }
                    Begin::Replay(stored) => {
                        format!("replayed {}", String::from_utf8_lossy(&stored.body))
                    }
                    Begin::InProgress => "conflict".to_owned(),
                    Begin::Mismatch => "mismatch".to_owned(),
                    Begin::Unavailable => "unavailable".to_owned(),
                })
            }
            "idem-complete" => {
                let key = args.first().ok_or("missing the key")?.to_string();
                let body = args.get(1).ok_or("missing the body")?.to_string();
                let pending = self
                    .runs
                    .lock()
                    .await
                    .remove(&key)
                    .ok_or("no run begun under that key")?;
                let stored = pending
                    .complete(&StoredResponse::new(201, body))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(format!("stored {stored}"))
            }
            "watch" => {
                // Reads the key for a while; counts the reads that answered `old`, and tells
                // when the last of them began (wall-clock microseconds, taken before the read).
                let k = key(0)?;
                let old = arg(args, 1)?;
                let limit = Duration::from_millis(arg(args, 2)?);
                let started = std::time::Instant::now();
                let (mut reads, mut olds, mut values, mut last_old) = (0u64, 0u64, 0u64, 0u64);
                while started.elapsed() < limit {
                    let began = wall_micros();
                    match self.cache.get::<u64>(&k).await {
                        Some(v) if v == old => {
                            olds += 1;
                            last_old = began;
                        }
                        Some(_) => values += 1,
                        None => {}
                    }
                    reads += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok(format!(
                    "reads {reads} old {olds} other {values} last_old_at {last_old}"
                ))
            }
            "tier-warm" => {
                let k = key(0)?;
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                loop {
                    match self.cache.get_served::<u64>(&k).await {
                        Some((v, Served::Local)) => return Ok(format!("warm {v}")),
                        _ if std::time::Instant::now() > deadline => return Ok("cold".into()),
                        _ => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            }
            "tier-read" => Ok(match self.cache.get_served::<u64>(&key(0)?).await {
                Some((v, served)) => format!("value {v} served {served:?}"),
                None => "none".to_owned(),
            }),
            "tier-watch" => {
                let k = key(0)?;
                let old: Option<u64> = match args.get(1) {
                    Some(&"none") => None,
                    _ => Some(arg(args, 1)?),
                };
                let limit = Duration::from_millis(arg(args, 2)?);
                let started = std::time::Instant::now();
                let (mut last_old, mut first_new, mut relapses, mut reads) =
                    (0u64, 0u64, 0u64, 0u64);
                let mut changed_at = None;
                while started.elapsed() < limit {
                    if changed_at.is_some_and(|at: std::time::Instant| {
                        at.elapsed() > Duration::from_millis(30)
                    }) {
                        break;
                    }
                    let now = self.cache.get::<u64>(&k).await;
                    let at = wall_micros();
                    reads += 1;
                    if now == old {
                        last_old = at;
                        if changed_at.is_some() {
                            relapses += 1;
                        }
                    } else if changed_at.is_none() {
                        changed_at = Some(std::time::Instant::now());
                        first_new = at;
                    }
                    tokio::task::yield_now().await;
                }
                Ok(format!(
                    "last_old {last_old} first_new {first_new} relapses {relapses} reads {reads}"
                ))
            }
            "tier-write" => {
                let op = args.first().copied().unwrap_or_default();
                let k = key(1)?;
                let tag = Namespace::root()
                    .global()
                    .tag(&Ident::from_static("row"), arg(args, 1)?)
                    .map_err(|e| e.to_string())?;
                match op {
                    "set" => self
                        .cache
                        .set_tagged(&k, &arg(args, 2)?, MINUTE, std::slice::from_ref(&tag))
                        .await
                        .map_err(|e| e.to_string())?,
                    "delete" => {
                        self.cache.delete(&k).await;
                    }
                    "invalidate" => {
                        self.cache
                            .invalidate(&ItemChanged(arg(args, 1)?))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    "tag" => {
                        self.cache
                            .invalidate_tag(&tag)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    other => return Err(format!("unknown write {other:?}")),
                }
                Ok(format!("at {}", wall_micros()))
            }
            "outbox-write" => {
                let id = arg(args, 0)?;
                let pool = outbox_db(args.get(1).ok_or("missing path")?).await?;
                let outbox = speedlayer::outbox::Outbox::new(&self.cache, pool.clone());
                outbox.create_table().await.map_err(|e| e.to_string())?;
                let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
                sqlx::query("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, v INTEGER)")
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query("INSERT OR REPLACE INTO items (id, v) VALUES (?, 1)")
                    .bind(id as i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                outbox
                    .invalidate_in(&mut tx, &ItemChanged(id))
                    .await
                    .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                if args.get(2) == Some(&"1") {
                    // Killed between the commit and the invalidation.
                    std::process::abort();
                }
                self.cache
                    .invalidate(&ItemChanged(id))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok("committed".into())
            }
            "outbox-relay" => {
                let pool = outbox_db(args.first().ok_or("missing path")?).await?;
                let outbox = speedlayer::outbox::Outbox::new(&self.cache, pool);
                outbox.create_table().await.map_err(|e| e.to_string())?;
                let r = outbox.relay_once().await.map_err(|e| e.to_string())?;
                let depth = outbox.depth().await.map_err(|e| e.to_string())?;
                Ok(format!(
                    "applied {} released {} depth {depth}",
                    r.applied, r.released
                ))
            }
            "tier-stats" => {
                let s = self.cache.tier_stats().ok_or("no tier")?;
                Ok(format!(
                    "local_hits {} evicted {} losses {} starts {} trusted {}",
                    s.local_hits,
                    s.evicted_by_message,
                    s.channel_losses,
                    s.channel_starts,
                    s.trusted
                ))
            }
            "stats" => {
                let s = self.cache.stats();
                Ok(format!(
                    "loader_calls {} stale_sets_refused {} errors {} pending {}",
                    s.loader_calls, s.stale_sets_refused, s.errors, s.pending_invalidations
                ))
            }
            other => Err(format!("unknown command {other:?}")),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .expect("usage: speedlayer-fleet-node <redis url> ...");
    let millis = |i: usize, default: u64| {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_millis(default))
    };
    let mut config = Config::redis(RedisConfig::from_url(url).expect("a valid Redis URL"))
        .op_timeout(millis(2, 2_000))
        .cool_down(millis(3, 1_000))
        .lease_wait(millis(4, 50));
    let items = Namespace::root()
        .global()
        .keyspace(&Ident::from_static("fleet"), &Ident::from_static("item"));
    if let Ok(tier) = std::env::var("SPEEDLAYER_FLEET_TIER") {
        let mut settings = LocalTier::new()
            .keyspace(&items)
            .ttl(Duration::from_secs(60));
        if tier == "fail-safe" {
            settings = settings.fail_safe(Duration::from_secs(5));
        }
        config = config.local_tier(settings);
    }
    let cache = Cache::new(config).await.expect("valid configuration");
    // The shared record of `lock-contend`, on a single server (not on a cluster URL).
    let raw = match redis::Client::open(url.as_str()) {
        Ok(client) => Some(
            redis::aio::ConnectionManager::new(client)
                .await
                .expect("a raw connection for the shared record"),
        ),
        Err(_) => None,
    };
    let node = Arc::new(Node {
        revocations: Revocations::new(&cache),
        sessions: Sessions::new(&cache, Ttl::minutes(15)),
        session_loads: AtomicUsize::new(0),
        scratch: Scratch::new(&cache).claim_ttl(Ttl::seconds(5)),
        sink_calls: AtomicUsize::new(0),
        presence: Presence::new(&Scratch::new(&cache)),
        idempotency: Idempotency::new(&cache),
        counters: Counters::new(&cache),
        counts: Namespace::root()
            .global()
            .keyspace(&FLEET, &Ident::from_static("count")),
        locks: Locks::new(&cache),
        guards: Mutex::new(HashMap::new()),
        runs: Mutex::new(HashMap::new()),
        raw,
        items,
        cache,
        held: Mutex::new(HashMap::new()),
    });
    let (replies, mut outbox) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = outbox.recv().await {
            if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                return;
            }
        }
    });
    let _ = replies.send("0 ready\n".to_owned());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut words = line.split_whitespace();
        let (Some(n), Some(command)) = (words.next(), words.next()) else {
            continue;
        };
        if command == "quit" {
            break;
        }
        let (n, command) = (n.to_owned(), command.to_owned());
        let rest: Vec<String> = words.map(str::to_owned).collect();
        let (node, replies) = (node.clone(), replies.clone());
        tokio::spawn(async move {
            let args: Vec<&str> = rest.iter().map(String::as_str).collect();
            let reply = match node.handle(&command, &args).await {
                Ok(result) => result,
                Err(e) => format!("error {e}"),
            };
            let _ = replies.send(format!("{n} {reply}\n"));
        });
    }
    drop(replies);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}
