//! Reads racing writes, as an application does them: views cached with `get_or_set_tagged`
//! whose loaders read rows through `get_or_set_many_tagged` (a dashboard built from cached
//! profiles), writers that commit a new row version and then invalidate the row's tag. A read
//! issued after a write returned must never show an older version, through either cache level.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use speedlayer::key::{Ident, Namespace, Tag};
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Key};

use crate::support::Backend;

const ROWS: u32 = 4;
const TASKS: usize = 16;
const OPS_PER_TASK: usize = 500;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Row {
    id: u32,
    version: u64,
    load: u64,
}

static LOADS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug, Serialize, Deserialize)]
struct View {
    rows: Vec<Row>,
}

/// The database (committed versions) and what writers have seen returned.
struct World {
    cache: Cache,
    committed: Vec<AtomicU64>,
    confirmed: Vec<AtomicU64>,
    stale: std::sync::Mutex<Vec<String>>,
}

fn scope() -> speedlayer::key::Scope {
    Namespace::root().global()
}

fn key_in(domain: &'static str, entity: &'static str, id: impl std::fmt::Display) -> Key {
    scope()
        .key(&Ident::from_static(domain), &Ident::from_static(entity), id)
        .unwrap()
}

fn row_key(id: u32) -> Key {
    key_in("row", "profile", id)
}

fn view_key(name: &str) -> Key {
    key_in("view", "page", name)
}

fn row_tag(id: u32) -> Tag {
    scope().tag(&Ident::from_static("shows"), id).unwrap()
}

/// A short, random pause: the windows between a read, a lease and a store are what is tested.
async fn jitter() {
    let micros = rand::random::<u64>() % 1_500;
    if micros > 300 {
        tokio::time::sleep(Duration::from_micros(micros)).await;
    } else {
        tokio::task::yield_now().await;
    }
}

impl World {
    /// The rows, read through the row cache in one batch.
    async fn rows(&self, ids: &[u32]) -> Result<Vec<Row>, std::io::Error> {
        let keys: Vec<(u32, Key)> = ids.iter().map(|&id| (id, row_key(id))).collect();
        let batch = self
            .cache
            .get_or_set_many_tagged(
                &keys,
                Ttl::seconds(60),
                Ttl::seconds(30),
                |id: &u32| vec![row_tag(*id)],
                |missing: Vec<u32>| async move {
                    jitter().await;
                    let load = LOADS.fetch_add(1, Ordering::SeqCst);
                    let rows: HashMap<u32, Row> = missing
                        .into_iter()
                        .map(|id| {
                            let version = self.committed[id as usize].load(Ordering::SeqCst);
                            (id, Row { id, version, load })
                        })
                        .collect();
                    jitter().await;
                    Ok::<_, std::io::Error>(rows)
                },
            )
            .await;
        let map = batch
            .into_map()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(ids.iter().filter_map(|id| map.get(id).cloned()).collect())
    }

    /// A view of `ids`, cached under `name` with the tags of its rows.
    async fn view(&self, name: &str, ids: &[u32]) -> Result<View, Arc<std::io::Error>> {
        let tags: Vec<Tag> = ids.iter().map(|&id| row_tag(id)).collect();
        self.cache
            .get_or_set_tagged(&view_key(name), Ttl::seconds(60), &tags, || async {
                jitter().await;
                let rows = self.rows(ids).await?;
                jitter().await;
                Ok(View { rows })
            })
            .await
    }

    async fn write(&self, id: u32) {
        let version = self.committed[id as usize].fetch_add(1, Ordering::SeqCst) + 1;
        jitter().await;
        self.cache.invalidate_tag(&row_tag(id)).await.unwrap();
        self.confirmed[id as usize].fetch_max(version, Ordering::SeqCst);
    }

    async fn read(&self, choice: u64) {
        let (name, ids): (String, Vec<u32>) = match choice % 3 {
            0 => {
                let id = (choice / 3) as u32 % ROWS;
                (format!("one-{id}"), vec![id])
            }
            1 => ("all".into(), (0..ROWS).collect()),
            _ => {
                let id = (choice / 3) as u32 % ROWS;
                let ids = vec![id, (id + 1) % ROWS];
                (format!("pair-{id}"), ids)
            }
        };
        let before: Vec<u64> = ids
            .iter()
            .map(|&id| self.confirmed[id as usize].load(Ordering::SeqCst))
            .collect();
        // One read in four asks for the rows themselves, the others for a view built from them.
        let view = if choice % 4 == 3 {
            View {
                rows: self.rows(&ids).await.unwrap(),
            }
        } else {
            self.view(&name, &ids).await.unwrap()
        };
        for (&id, seen) in ids.iter().zip(before) {
            let got = view.rows.iter().find(|r| r.id == id).map(|r| r.version);
            if got.is_none_or(|v| v < seen) {
                let load = view.rows.iter().find(|r| r.id == id).map(|r| r.load);
                self.stale.lock().unwrap().push(format!(
                    "view {name}: row {id} at {got:?} (load {load:?}), after version {seen} was confirmed"
                ));
            }
        }
    }
}

/// 16 tasks of reads and writes over 4 rows: views over cached rows never show a version older
/// than one whose write returned before the read began.
pub async fn nested_loads_racing_writes_never_serve_older_rows(backend: &Backend) {
    let world = Arc::new(World {
        cache: Cache::new(backend.config()).await.unwrap(),
        committed: (0..ROWS).map(|_| AtomicU64::new(1)).collect(),
        confirmed: (0..ROWS).map(|_| AtomicU64::new(1)).collect(),
        stale: std::sync::Mutex::new(Vec::new()),
    });
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let world = world.clone();
            tokio::spawn(async move {
                for _ in 0..OPS_PER_TASK {
                    let choice = rand::random::<u64>();
                    if choice.is_multiple_of(8) {
                        world.write((choice / 8) as u32 % ROWS).await;
                    } else {
                        world.read(choice / 8).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await
    .expect("the race finishes");
    let stale = world.stale.lock().unwrap().clone();
    assert!(
        stale.is_empty(),
        "{} stale reads, the first: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    let s = world.cache.stats();
    assert!(s.hits > 0 && s.loader_calls > 0, "{s:?}");
}

/// A call a [`Gated`] layer holds up.
#[derive(Debug, PartialEq)]
enum Gate {
    /// The next removal that includes this key.
    Removal(Key),
    /// The next time members of this tag are dropped from its index (after their removal).
    Forget(Tag),
}

/// A held call: what it is, the signal that it was reached, and the one that lets it go.
type Hold = (Gate, Arc<Notify>, Arc<Notify>);

/// A layer that passes every call to a store, except the calls armed to be held up: an
/// invalidation can be stopped between reading a tag's index and removing its entries, or
/// after removing them and before dropping them from the index.
#[derive(Debug)]
struct Gated {
    inner: speedlayer::store::Store,
    /// Calls to hold up, each once, the first match first.
    armed: std::sync::Mutex<Vec<Hold>>,
}

use speedlayer::Result as SlResult;
use speedlayer::store::{
    BackendKind, CacheLayer, Entry, LeaseRequest, Leased, LeasedEntry, Remaining, TagChunk,
    TagCursor, TagMember,
};
use tokio::sync::Notify;

impl Gated {
    /// Holds up the next removal of `key`: the first notify fires when it is reached, the
    /// second lets it go on.
    fn arm(&self, key: Key) -> (Arc<Notify>, Arc<Notify>) {
        self.arm_gate(Gate::Removal(key))
    }

    fn arm_gate(&self, gate: Gate) -> (Arc<Notify>, Arc<Notify>) {
        let (reached, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        self.armed
            .lock()
            .unwrap()
            .push((gate, reached.clone(), go.clone()));
        (reached, go)
    }

    async fn gate(&self, matches: impl Fn(&Gate) -> bool) {
        let held = {
            let mut armed = self.armed.lock().unwrap();
            armed
                .iter()
                .position(|(gate, _, _)| matches(gate))
                .map(|at| armed.remove(at))
        };
        if let Some((_, reached, go)) = held {
            reached.notify_one();
            go.notified().await;
        }
    }

    async fn gate_removal(&self, keys: &[Key]) {
        self.gate(|g| matches!(g, Gate::Removal(key) if keys.contains(key)))
            .await
    }
}

#[async_trait::async_trait]
impl CacheLayer for Gated {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    async fn get(&self, key: &Key) -> SlResult<Option<bytes::Bytes>> {
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[Key]) -> SlResult<Vec<Option<bytes::Bytes>>> {
        self.inner.get_many(keys).await
    }
    async fn set(&self, key: &Key, value: bytes::Bytes, ttl: Ttl) -> SlResult<()> {
        self.inner.set(key, value, ttl).await
    }
    async fn set_many(&self, entries: &[Entry]) -> SlResult<()> {
        self.inner.set_many(entries).await
    }
    async fn delete(&self, key: &Key) -> SlResult<bool> {
        self.gate_removal(std::slice::from_ref(key)).await;
        self.inner.delete(key).await
    }
    async fn delete_many(&self, keys: &[Key]) -> SlResult<u64> {
        self.gate_removal(keys).await;
        self.inner.delete_many(keys).await
    }
    async fn remaining_ttl(&self, key: &Key) -> SlResult<Remaining> {
        self.inner.remaining_ttl(key).await
    }
    async fn set_if_absent(&self, key: &Key, value: bytes::Bytes, ttl: Ttl) -> SlResult<bool> {
        self.inner.set_if_absent(key, value, ttl).await
    }
    async fn increment(&self, key: &Key, delta: i64, ttl: Ttl) -> SlResult<i64> {
        self.inner.increment(key, delta, ttl).await
    }
    async fn get_or_lease(
        &self,
        key: &Key,
        token: u64,
        lease_ttl: Ttl,
        replace: Option<&[u8]>,
    ) -> SlResult<Leased> {
        self.inner
            .get_or_lease(key, token, lease_ttl, replace)
            .await
    }
    async fn set_leased(
        &self,
        key: &Key,
        token: u64,
        value: bytes::Bytes,
        ttl: Ttl,
    ) -> SlResult<bool> {
        self.inner.set_leased(key, token, value, ttl).await
    }
    async fn release_lease(&self, key: &Key, token: u64) -> SlResult<bool> {
        self.inner.release_lease(key, token).await
    }
    async fn get_or_lease_many(
        &self,
        requests: &[LeaseRequest<'_>],
        lease_ttl: Ttl,
    ) -> SlResult<Vec<Leased>> {
        self.inner.get_or_lease_many(requests, lease_ttl).await
    }
    async fn set_leased_many(&self, entries: &[LeasedEntry]) -> SlResult<Vec<bool>> {
        self.inner.set_leased_many(entries).await
    }
    async fn peek(&self, key: &Key) -> SlResult<Option<Remaining>> {
        self.inner.peek(key).await
    }
    async fn touch(&self, key: &Key, ttl: Ttl) -> SlResult<bool> {
        self.inner.touch(key, ttl).await
    }
    async fn tag_add(&self, tags: &[Tag], member: &Key, ttl: Ttl) -> SlResult<()> {
        self.inner.tag_add(tags, member, ttl).await
    }
    async fn tag_members(&self, tag: &Tag, cursor: &TagCursor, limit: usize) -> SlResult<TagChunk> {
        self.inner.tag_members(tag, cursor, limit).await
    }
    async fn tag_forget(&self, tag: &Tag, members: &[TagMember]) -> SlResult<u64> {
        self.gate(|g| *g == Gate::Forget(tag.clone())).await;
        self.inner.tag_forget(tag, members).await
    }
    async fn sweep(
        &self,
        pattern: &speedlayer::KeyPattern,
        batch: usize,
        max: u64,
    ) -> SlResult<u64> {
        self.inner.sweep(pattern, batch, max).await
    }
    async fn ping(&self) -> SlResult<()> {
        self.inner.ping().await
    }
}

/// A cache over the backend, through a [`Gated`] layer.
async fn gated_cache(backend: &Backend) -> (Arc<Gated>, Cache) {
    let config = backend.config();
    let gated = Arc::new(Gated {
        inner: speedlayer::store::Store::connect(&config).await.unwrap(),
        armed: std::sync::Mutex::new(Vec::new()),
    });
    let store = speedlayer::store::Store::from_layer(gated.clone(), &config);
    (gated, Cache::from_store(store, &config))
}

/// Starts an invalidation of row 0's tag and waits until it is held up before removing the row;
/// the notify lets it go on.
async fn held_invalidation(
    gated: &Gated,
    cache: &Cache,
) -> (tokio::task::JoinHandle<SlResult<u64>>, Arc<Notify>) {
    let (reached, go) = gated.arm(row_key(0));
    let invalidation = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.invalidate_tag(&row_tag(0)).await })
    };
    reaches(&reached, "the invalidation reaches the row's removal").await;
    (invalidation, go)
}

/// Waits (at most 5 s) for a held call to be reached.
async fn reaches(reached: &Notify, what: &str) {
    tokio::time::timeout(Duration::from_secs(5), reached.notified())
        .await
        .expect(what);
}

/// What a held invalidation removed, once it finished.
async fn finished(invalidation: tokio::task::JoinHandle<SlResult<u64>>) -> u64 {
    tokio::time::timeout(Duration::from_secs(5), invalidation)
        .await
        .expect("the invalidation finishes")
        .unwrap()
        .unwrap()
}

/// Row 0 through the cache, tagged with its tag; loaded at the `committed` version.
async fn read_row_0(cache: &Cache, committed: &AtomicU64) -> Row {
    cache
        .get_or_set_tagged(&row_key(0), Ttl::seconds(60), &[row_tag(0)], || async {
            Ok::<_, std::io::Error>(Row {
                id: 0,
                version: committed.load(Ordering::SeqCst),
                load: 0,
            })
        })
        .await
        .unwrap()
}

/// The view `name`, built from row 0 read through the cache and tagged with the row's tag.
async fn read_view_of_row_0(cache: &Cache, committed: &AtomicU64, name: &str) -> View {
    cache
        .get_or_set_tagged(&view_key(name), Ttl::seconds(60), &[row_tag(0)], || async {
            Ok::<_, std::io::Error>(View {
                rows: vec![read_row_0(cache, committed).await],
            })
        })
        .await
        .unwrap()
}

/// The race the random test above looks for, made to happen: an invalidation has read a tag's
/// index and not yet removed the row it lists, when a view is built from that cached row and
/// registered under the same tag. The view holds the old row, and the index the invalidation read
/// does not list it; once the invalidation has returned, neither the row nor the view may still
/// hold the old version.
pub async fn an_entry_built_from_a_cached_entry_during_its_invalidation_is_removed_too(
    backend: &Backend,
) {
    let (gated, cache) = gated_cache(backend).await;
    let committed = AtomicU64::new(1);
    let read_row = || read_row_0(&cache, &committed);
    let read_view = || read_view_of_row_0(&cache, &committed, "one-0");
    assert_eq!(read_row().await.version, 1);

    // The write commits, and its invalidation stops before it removes the row.
    committed.store(2, Ordering::SeqCst);
    let (invalidation, go) = held_invalidation(&gated, &cache).await;
    // Built meanwhile from the cached row: the old version, which is allowed while the
    // invalidation has not returned.
    assert_eq!(read_view().await.rows[0].version, 1);
    go.notify_one();
    let removed = finished(invalidation).await;
    assert!(removed >= 2, "the row and the view were removed: {removed}");

    // After it returned, no read shows version 1.
    assert_eq!(read_row().await.version, 2);
    assert_eq!(read_view().await.rows[0].version, 2);
}

/// Two writes to one row invalidate its tag at once. The first is held up between reading the
/// index and removing the entry; the second must still remove the entry before it returns (it
/// may not take the first one's reading of the index for a removal).
pub async fn concurrent_invalidations_of_one_tag_each_remove_its_entries(backend: &Backend) {
    let (gated, cache) = gated_cache(backend).await;
    let row = Row {
        id: 0,
        version: 1,
        load: 0,
    };
    cache
        .set_tagged(&row_key(0), &row, Ttl::seconds(60), &[row_tag(0)])
        .await
        .unwrap();

    let (first, go) = held_invalidation(&gated, &cache).await;
    cache.invalidate_tag(&row_tag(0)).await.unwrap();
    assert!(
        cache.get::<Row>(&row_key(0)).await.is_none(),
        "the second invalidation returned while the entry was still there"
    );
    go.notify_one();
    finished(first).await;
    assert!(cache.get::<Row>(&row_key(0)).await.is_none());
}

/// Two writes to one row, in two processes, invalidate its tag at once; both read the index
/// before either removed the row, and a view is built from the cached (old) row meanwhile and
/// registered under the tag after both readings. The first removes the row; the second then
/// finds nothing left to remove. It must still look at the index again before it returns, and
/// remove the view: what its first reading listed counts, not what it removed.
pub async fn the_second_of_two_concurrent_invalidations_removes_what_was_built_meanwhile(
    backend: &Backend,
) {
    let (gated, cache) = gated_cache(backend).await;
    let committed = AtomicU64::new(1);
    let read_row = || read_row_0(&cache, &committed);
    let read_view = || read_view_of_row_0(&cache, &committed, "both-0");
    assert_eq!(read_row().await.version, 1);
    committed.store(2, Ordering::SeqCst);

    // Both invalidations have read the index (the row alone) and wait to remove the row.
    let (first, first_go) = held_invalidation(&gated, &cache).await;
    let (second, second_go) = held_invalidation(&gated, &cache).await;
    // The view, built from the cached row: the old version, registered after both readings.
    assert_eq!(read_view().await.rows[0].version, 1);
    // The first removes the row, then stops before dropping it from the index.
    let (forget_reached, forget_go) = gated.arm_gate(Gate::Forget(row_tag(0)));
    first_go.notify_one();
    reaches(&forget_reached, "the first invalidation removed the row").await;
    // The second finds the row gone.
    second_go.notify_one();
    finished(second).await;
    assert_eq!(
        read_view().await.rows[0].version,
        2,
        "the second invalidation returned while the view built from the old row was still there"
    );
    forget_go.notify_one();
    finished(first).await;
    assert_eq!(read_view().await.rows[0].version, 2);
}
