//! Presence and typing: who is in a room, by heartbeat, shared by every server of the fleet.
//!
//! A room is a sorted set (`presence:room:<room>`) whose members are scored by the time their
//! presence ends (Redis server time, so servers with skewed clocks agree). A heartbeat moves a
//! member's end forward; members whose heartbeat stopped drop out once their time passes, and the
//! room itself expires with its last member. Typing indicators are the same, beside the room
//! (`{presence:room:<room>}:~typing`), with a TTL of a few seconds.
//!
//! Outage rule: fail closed (an error, not an empty room).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::Scratch;
use crate::error::Result;
use crate::key::{Ident, Key, KeySpace};
use crate::store::{MemoryLayer, Operation, Store, TwinTable, sibling_key};
use crate::ttl::Ttl;

const PRESENCE: Ident = Ident::from_static("presence");
const ROOM: Ident = Ident::from_static("room");

struct Scripts {
    #[cfg(feature = "redis")]
    beat: redis::Script,
    #[cfg(feature = "redis")]
    list: redis::Script,
    #[cfg(feature = "redis")]
    leave: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    #[cfg(feature = "redis")]
    beat: redis::Script::new(BEAT_SCRIPT),
    #[cfg(feature = "redis")]
    list: redis::Script::new(LIST_SCRIPT),
    #[cfg(feature = "redis")]
    leave: redis::Script::new(LEAVE_SCRIPT),
});

/// A heartbeat: member `ARGV[1]` of the room `KEYS[1]` is present for `ARGV[2]` ms from now.
/// Members past their time are dropped; the room lives as long as its longest-lived member.
/// Another client's key of another type is replaced.
pub const BEAT_SCRIPT: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(top[2]) - now))
return 1
";

/// The members of `KEYS[1]` whose time has not passed.
pub const LIST_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
";

/// Member `ARGV[1]` leaves `KEYS[1]`.
pub const LEAVE_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
";

/// Presence in rooms. Cheap to clone.
///
/// ```
/// use speedlayer::scratch::{Presence, Scratch};
/// use speedlayer::ttl::Ttl;
/// use speedlayer::Cache;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let presence = Presence::new(&Scratch::new(&Cache::memory()));
/// presence.heartbeat("class-7", "t17", Ttl::seconds(30)).await?;
/// presence.typing("class-7", "t17").await?;
/// assert_eq!(presence.online("class-7").await?, vec!["t17".to_owned()]);
/// assert_eq!(presence.typists("class-7").await?, vec!["t17".to_owned()]);
/// # Ok::<(), speedlayer::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Presence {
    store: Store,
    rooms: KeySpace,
    typing_ttl: Ttl,
}

impl Presence {
    /// Presence on the scratch capability's store.
    pub fn new(scratch: &Scratch) -> Presence {
        Presence {
            store: scratch.store().clone(),
            rooms: scratch.scope().keyspace(&PRESENCE, &ROOM),
            typing_ttl: Ttl::seconds(5),
        }
    }

    /// How long a typing indicator lasts after its last keystroke (5 s by default).
    pub fn typing_ttl(mut self, ttl: Ttl) -> Presence {
        self.typing_ttl = ttl;
        self
    }

    fn room_key(&self, room: &str) -> Result<Key> {
        Ok(self.rooms.key_str(room)?)
    }

    async fn run<O: Operation>(&self, op: &O) -> Result<O::Output> {
        super::switched_off(&self.store)?;
        super::run(&self.store, op, "presence").await
    }

    /// `member` is in `room` for `ttl` from now (send one every `ttl / 2` or so).
    pub async fn heartbeat(&self, room: &str, member: &str, ttl: Ttl) -> Result<()> {
        let key = self.room_key(room)?.as_str().to_owned();
        self.run(&Beat {
            set: &key,
            member,
            ttl,
        })
        .await
    }

    /// `member` left `room` (a closed socket).
    pub async fn leave(&self, room: &str, member: &str) -> Result<()> {
        let key = self.room_key(room)?.as_str().to_owned();
        self.run(&Leave { set: &key, member }).await
    }

    /// Who is in `room` now, sorted by how long they still are.
    pub async fn online(&self, room: &str) -> Result<Vec<String>> {
        let key = self.room_key(room)?.as_str().to_owned();
        self.run(&List { set: &key }).await
    }

    /// `member` is typing in `room` (for the typing TTL).
    pub async fn typing(&self, room: &str, member: &str) -> Result<()> {
        let key = sibling_key(&self.room_key(room)?, "typing");
        self.run(&Beat {
            set: &key,
            member,
            ttl: self.typing_ttl,
        })
        .await
    }

    /// Who is typing in `room` now.
    pub async fn typists(&self, room: &str) -> Result<Vec<String>> {
        let key = sibling_key(&self.room_key(room)?, "typing");
        self.run(&List { set: &key }).await
    }
}

/// The memory twin: each set's members and when their presence ends.
#[derive(Default)]
struct Table {
    sets: HashMap<String, HashMap<String, Instant>>,
}

fn with_set<R>(
    memory: &MemoryLayer,
    set: &str,
    f: impl FnOnce(&mut HashMap<String, Instant>, Instant) -> R,
) -> R {
    let twin: Arc<TwinTable<Table>> = memory.twin_table();
    let mut table = twin.lock();
    let now = Instant::now();
    let members = table.sets.entry(set.to_owned()).or_default();
    members.retain(|_, until| *until > now);
    let out = f(members, now);
    if members.is_empty() {
        table.sets.remove(set);
    }
    out
}

struct Beat<'a> {
    set: &'a str,
    member: &'a str,
    ttl: Ttl,
}

#[async_trait]
impl Operation for Beat<'_> {
    type Output = ();

    fn name(&self) -> &'static str {
        "presence heartbeat"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<()> {
        let mut invocation = SCRIPTS.beat.prepare_invoke();
        invocation
            .key(self.set)
            .arg(self.member)
            .arg(self.ttl.as_millis());
        redis.invoke::<i64>(&invocation).await.map(|_| ())
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<()> {
        with_set(memory, self.set, |members, now| {
            members.insert(self.member.to_owned(), now + self.ttl.as_duration());
        });
        Ok(())
    }
}

struct Leave<'a> {
    set: &'a str,
    member: &'a str,
}

#[async_trait]
impl Operation for Leave<'_> {
    type Output = ();

    fn name(&self) -> &'static str {
        "presence leave"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<()> {
        let mut invocation = SCRIPTS.leave.prepare_invoke();
        invocation.key(self.set).arg(self.member);
        redis.invoke::<i64>(&invocation).await.map(|_| ())
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<()> {
        with_set(memory, self.set, |members, _| {
            members.remove(self.member);
        });
        Ok(())
    }
}

struct List<'a> {
    set: &'a str,
}

#[async_trait]
impl Operation for List<'_> {
    type Output = Vec<String>;

    fn name(&self) -> &'static str {
        "presence list"
    }

    #[cfg(feature = "redis")]
    async fn on_redis(&self, redis: &crate::store::redis::RedisLayer) -> Result<Vec<String>> {
        let mut invocation = SCRIPTS.list.prepare_invoke();
        invocation.key(self.set);
        redis.invoke(&invocation).await
    }

    async fn on_memory(&self, memory: &MemoryLayer) -> Result<Vec<String>> {
        Ok(with_set(memory, self.set, |members, now| {
            let mut list: Vec<(&String, Duration)> = members
                .iter()
                .map(|(m, until)| (m, until.saturating_duration_since(now)))
                .collect();
            list.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)));
            list.into_iter().map(|(m, _)| m.clone()).collect()
        }))
    }
}
