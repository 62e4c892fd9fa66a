//! Get-or-set for many keys: one read for all of them, one loader call for the misses, one
//! write for what was loaded, each key under its own lease (see [`Cache::get_or_set_many`]).
//! The rules are those of a single [`get_or_set`](Cache::get_or_set), key by key.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use super::flight::{Flight, OutsideLeader};
use super::{Cache, Flown, Fresh, LeaseWait};
use crate::key::{Key, Tag};
use crate::store::{BatchLeases, IndexWindow, LeaseRequest, Leased, LeasedEntry, Source};
use crate::ttl::{Ttl, TtlPolicy};

/// One key's answer in a [`Batch`]: the row (`None` when the loader did not return it, now or
/// when it was cached as absent), or the error of the loader call that was to fetch it.
pub type BatchEntry<T, E> = Result<Option<T>, Arc<E>>;

/// What [`Cache::get_or_set_many`] returns: one answer per key given, in the order given.
///
/// - `Ok(Some(row))`: found in the cache or loaded.
/// - `Ok(None)`: the loader did not return this id (now, or within the negative TTL).
/// - `Err(e)`: the loader call that was to fetch this key failed; nothing was cached for it.
///   Other keys of the same batch are unaffected: those found in the cache are still `Ok`.
///
/// An id given twice gets the same answer twice.
#[derive(Debug)]
pub struct Batch<Id, T, E> {
    entries: Vec<(Id, BatchEntry<T, E>)>,
}

impl<Id: Clone, T: Clone, E> Clone for Batch<Id, T, E> {
    fn clone(&self) -> Self {
        Batch {
            entries: self.entries.clone(),
        }
    }
}

impl<Id, T, E> Batch<Id, T, E> {
    /// Number of answers (the number of keys given).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True for a batch of no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every id with its answer, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, &BatchEntry<T, E>)> {
        self.entries.iter().map(|(id, r)| (id, r))
    }

    /// The rows found (cached or loaded), with their ids, in the order given.
    pub fn found(&self) -> impl Iterator<Item = (&Id, &T)> {
        self.entries
            .iter()
            .filter_map(|(id, r)| r.as_ref().ok()?.as_ref().map(|v| (id, v)))
    }

    /// The ids whose loader call failed, with its error.
    pub fn errors(&self) -> impl Iterator<Item = (&Id, &Arc<E>)> {
        self.entries
            .iter()
            .filter_map(|(id, r)| r.as_ref().err().map(|e| (id, e)))
    }

    /// True when no key failed.
    pub fn is_complete(&self) -> bool {
        self.entries.iter().all(|(_, r)| r.is_ok())
    }

    /// The answers, in the order given.
    pub fn into_entries(self) -> Vec<(Id, BatchEntry<T, E>)> {
        self.entries
    }
}

impl<Id: PartialEq, T, E> Batch<Id, T, E> {
    /// The answer for `id`, if it was in the batch.
    pub fn get(&self, id: &Id) -> Option<&BatchEntry<T, E>> {
        self.entries.iter().find(|(i, _)| i == id).map(|(_, r)| r)
    }
}

impl<Id: Eq + Hash, T, E> Batch<Id, T, E> {
    /// The rows found, by id, or the first loader error: for pages that are all-or-nothing.
    pub fn into_map(self) -> Result<HashMap<Id, T>, Arc<E>> {
        let mut out = HashMap::with_capacity(self.entries.len());
        for (id, r) in self.entries {
            if let Some(v) = r? {
                out.insert(id, v);
            }
        }
        Ok(out)
    }
}

/// Keys with the tags to record for them.
type TagMembers = Vec<(Key, Vec<Tag>)>;

/// A load's result as its leader knows it: the value and its freshness, or the loader's error.
type Loaded<V, E> = Result<(V, Fresh), Arc<E>>;

/// One key a batch loads itself.
struct Lead<'k, Id, V: Send + Sync + 'static, E: Send + Sync + 'static> {
    /// Index among the batch's distinct keys.
    at: usize,
    id: Id,
    key: &'k Key,
    /// What the first read found and could not decode.
    undecodable: Option<Bytes>,
    flight: Arc<Flight<Flown<V, E>>>,
    /// This batch's hold on the flight, through which the callers waiting on it get the result.
    leader: Option<OutsideLeader<'k, Flown<V, E>>>,
}

/// How a batch's key stands after the lease step.
enum Step<V> {
    /// Lease asked, no answer yet (another process holds it).
    Pending,
    /// This batch holds the lease, granted there; `guard` is its place in the lease guard.
    Leased { source: Source, guard: usize },
    /// Another load stored a value between the read and the lease.
    Found(V),
    /// Loaded without caching.
    Uncached,
}

/// The settings of one batch call.
struct Plan<'a, Id> {
    policy: &'a TtlPolicy,
    negative_ttl: Ttl,
    longest: Ttl,
    tags_for: &'a (dyn Fn(&Id) -> Vec<Tag> + Send + Sync),
    first_read: Source,
}

impl Cache {
    /// [`get_or_set_optional`](Cache::get_or_set_optional) for many keys at once, with one
    /// loader call for all the misses; see [`Batch`] for the shape of the answer.
    ///
    /// - **Round trips.** All keys are read in one (`MGET`); on a warm cache that is the whole
    ///   call. The misses are then leased in one (one script, atomic for the batch, so two
    ///   batches never interleave their leases and hold each other up),
    ///   their tags recorded in one (if any), and the loaded rows stored in one, each key under
    ///   its own lease: a key deleted, written or tag-invalidated while the loader runs is
    ///   returned but not stored.
    /// - **Another process's load.** A key another process is loading is waited for (up to
    ///   [`Config::lease_wait`](crate::Config::lease_wait)) and, if its value does not come,
    ///   loaded with the rest without being cached.
    /// - **This process's loads.** A key another caller of this process is loading (a batch, or
    ///   `get_or_set_optional` of the same types) is not loaded again: the batch waits for that
    ///   load while it loads the rest, so unrelated keys never queue behind it.
    /// - **Outages.** With the backend unusable, the call waits on it at most once (the read),
    ///   then loads everything and keeps it in the fallback, if any, as a single key does.
    ///
    /// `keys` pairs each id with its key (build them with [`KeySpace::keys`]); the loader gets
    /// the ids whose keys missed and returns the rows it found. Rows are cached for `ttl`
    /// (jitter applied), ids the loader did not return as absent for `negative_ttl`. Rows the
    /// loader returns for ids it was not asked for are ignored.
    ///
    /// The loader is called once, or not at all on a warm cache; a second call happens only for
    /// keys whose shared load in another caller of this process produced nothing this caller may
    /// use (that caller was cancelled, or an invalidation may have overtaken its value), so it
    /// is `FnMut`.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use serde::{Deserialize, Serialize};
    /// use speedlayer::key::{Ident, Namespace};
    /// use speedlayer::ttl::Ttl;
    /// use speedlayer::Cache;
    ///
    /// #[derive(Clone, Serialize, Deserialize, PartialEq, Debug)]
    /// struct Student { name: String }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache = Cache::memory();
    /// let students = Namespace::root().global()
    ///     .keyspace(&Ident::from_static("school"), &Ident::from_static("student"));
    /// let keys = students.keys([1_i64, 2, 3])?;
    ///
    /// let batch = cache
    ///     .get_or_set_many(&keys, Ttl::seconds(300), Ttl::seconds(30), |ids: Vec<i64>| async move {
    ///         // SELECT id, name FROM students WHERE id = ANY($1): id 3 does not exist.
    ///         Ok::<_, std::io::Error>(
    ///             ids.into_iter()
    ///                 .filter(|id| *id != 3)
    ///                 .map(|id| (id, Student { name: format!("student {id}") }))
    ///                 .collect::<HashMap<_, _>>(),
    ///         )
    ///     })
    ///     .await;
    /// assert_eq!(batch.found().count(), 2);
    /// assert!(matches!(batch.get(&3), Some(Ok(None))));
    /// # Ok::<(), speedlayer::Error>(())
    /// # }).unwrap();
    /// ```
    ///
    /// [`KeySpace::keys`]: crate::key::KeySpace::keys
    pub async fn get_or_set_many<Id, T, E, F, Fut>(
        &self,
        keys: &[(Id, Key)],
        ttl: impl Into<TtlPolicy>,
        negative_ttl: Ttl,
        loader: F,
    ) -> Batch<Id, T, E>
    where
        Id: Clone + Eq + Hash + Send + Sync,
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<Id>) -> Fut,
        Fut: Future<Output = Result<HashMap<Id, T>, E>>,
    {
        self.get_or_set_many_tagged(keys, ttl, negative_ttl, |_| Vec::new(), loader)
            .await
    }

    /// [`get_or_set_many`](Cache::get_or_set_many) with tags per entry: `tags_for(id)` gives the
    /// tags of that id's entry (added to those the registry's rules give its key).
    pub async fn get_or_set_many_tagged<Id, T, E, F, Fut, G>(
        &self,
        keys: &[(Id, Key)],
        ttl: impl Into<TtlPolicy>,
        negative_ttl: Ttl,
        tags_for: G,
        mut loader: F,
    ) -> Batch<Id, T, E>
    where
        Id: Clone + Eq + Hash + Send + Sync,
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<Id>) -> Fut,
        Fut: Future<Output = Result<HashMap<Id, T>, E>>,
        G: Fn(&Id) -> Vec<Tag> + Send + Sync,
    {
        let c = &self.inner.counters;
        let policy = ttl.into();
        // The distinct keys, and for each key given, which of them it is.
        let mut distinct: Vec<usize> = Vec::with_capacity(keys.len());
        let mut slot_of: Vec<usize> = Vec::with_capacity(keys.len());
        {
            let mut seen: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
            for (i, (_, key)) in keys.iter().enumerate() {
                let slot = *seen.entry(key.as_str()).or_insert_with(|| {
                    distinct.push(i);
                    distinct.len() - 1
                });
                slot_of.push(slot);
            }
        }
        let unique: Vec<Key> = distinct.iter().map(|&i| keys[i].1.clone()).collect();
        let mut answers: Vec<Option<BatchEntry<T, E>>> = (0..unique.len()).map(|_| None).collect();
        if unique.iter().any(|k| !self.caches(k)) {
            // Switched off (or a never-cached domain among the keys): one loader call for
            // every key, nothing stored.
            c.misses.fetch_add(unique.len() as u64, Ordering::Relaxed);
            c.loader_calls.fetch_add(1, Ordering::Relaxed);
            let ids: Vec<Id> = distinct.iter().map(|&i| keys[i].0.clone()).collect();
            let answer: Vec<BatchEntry<T, E>> = match loader(ids).await {
                Ok(rows) => distinct
                    .iter()
                    .map(|&i| Ok(rows.get(&keys[i].0).cloned()))
                    .collect(),
                Err(e) => {
                    c.loader_errors.fetch_add(1, Ordering::Relaxed);
                    let e = Arc::new(e);
                    distinct.iter().map(|_| Err(e.clone())).collect()
                }
            };
            for (slot, a) in answer.into_iter().enumerate() {
                answers[slot] = Some(a);
            }
            return assemble(keys, slot_of, answers);
        }

        // 1. One read for every key.
        let (found, first_read) = match self.inner.store.get_many_with_source(&unique).await {
            Ok((found, source)) if found.len() == unique.len() => (found, source),
            Ok((found, _)) => {
                tracing::warn!(
                    asked = unique.len(),
                    answered = found.len(),
                    "the backend answered a batch read with the wrong number of values; treating it as misses"
                );
                (vec![None; unique.len()], Source::Nothing)
            }
            Err(e) => {
                tracing::debug!(error = %e, "batch read failed; treating it as misses");
                (vec![None; unique.len()], Source::Nothing)
            }
        };
        let mut misses: Vec<(usize, Option<Bytes>)> = Vec::new();
        for (at, bytes) in found.into_iter().enumerate() {
            match bytes {
                Some(bytes) => match serde_json::from_slice::<Option<T>>(&bytes) {
                    Ok(v) => {
                        c.hits.fetch_add(1, Ordering::Relaxed);
                        answers[at] = Some(Ok(v));
                    }
                    Err(e) => {
                        tracing::warn!(key = %unique[at], error = %e, "cached value does not decode; replacing it");
                        c.decode_failures.fetch_add(1, Ordering::Relaxed);
                        misses.push((at, Some(bytes)));
                    }
                },
                None => misses.push((at, None)),
            }
        }

        if !misses.is_empty() {
            let plan = Plan {
                policy: &policy,
                negative_ttl,
                longest: policy.ttl().max(negative_ttl),
                tags_for: &tags_for,
                first_read,
            };
            let id_of = |at: usize| keys[distinct[at]].0.clone();

            // 2. Join this process's loads of the missing keys: lead the new ones, wait for the
            // others, both at once (two batches leading each other's keys never wait on each
            // other).
            let mut members = Vec::with_capacity(misses.len());
            let mut leads = Vec::new();
            for (at, undecodable) in &misses {
                let (member, leader) = self
                    .inner
                    .flights
                    .join_outside::<Flown<Option<T>, E>>(unique[*at].as_str());
                match leader {
                    Some(leader) => leads.push(Lead {
                        at: *at,
                        id: id_of(*at),
                        key: &unique[*at],
                        undecodable: undecodable.clone(),
                        flight: member.flight.clone(),
                        leader: Some(leader),
                    }),
                    None => members.push((*at, member)),
                }
            }
            let waits = members.iter().map(|(at, member)| {
                let before_observation = member.flight.before_observation();
                let before_loading = member.flight.before_loading();
                async move {
                    member.flight.outside_leader_done().await;
                    // A leader that left without a result (cancelled) leaves the cell free:
                    // `None` sends this key to this caller's own load below.
                    let flown = member.flight.cell.get_or_init(|| async { None }).await;
                    (*at, flown.clone(), before_observation, before_loading)
                }
            });
            let (waited, led) =
                tokio::join!(join_all(waits), self.lead_batch(leads, &plan, &mut loader));
            drop(members);
            for (at, result) in led {
                answers[at] = Some(self.count_led(result));
            }
            // 3. Keys whose shared load gave nothing usable here: loaded by this caller.
            let mut again = Vec::new();
            for (at, flown, before_observation, before_loading) in waited {
                match flown {
                    Some(Ok((v, fresh))) if fresh.usable_by(before_observation, before_loading) => {
                        c.coalesced.fetch_add(1, Ordering::Relaxed);
                        answers[at] = Some(Ok(v));
                    }
                    Some(Err(e)) => {
                        c.coalesced.fetch_add(1, Ordering::Relaxed);
                        answers[at] = Some(Err(e));
                    }
                    _ => again.push(at),
                }
            }
            if !again.is_empty() {
                let undecodable: HashMap<usize, Option<Bytes>> = misses.into_iter().collect();
                let leads = again
                    .into_iter()
                    .map(|at| Lead {
                        at,
                        id: id_of(at),
                        key: &unique[at],
                        undecodable: undecodable.get(&at).cloned().flatten(),
                        flight: Flight::private(),
                        leader: None,
                    })
                    .collect();
                for (at, result) in self.lead_batch(leads, &plan, &mut loader).await {
                    answers[at] = Some(self.count_led(result));
                }
            }
        }

        assemble(keys, slot_of, answers)
    }

    /// Counts a key this caller loaded (or found while leasing) and returns its answer.
    fn count_led<V, E>(&self, result: Loaded<V, E>) -> Result<V, Arc<E>> {
        let c = &self.inner.counters;
        let counter = match &result {
            Ok((_, Fresh::Found)) => &c.hits,
            _ => &c.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result.map(|(v, _)| v)
    }

    /// Leads the loads of `leads`: leases them in one call, records their tags in one call,
    /// loads them in one loader call, stores them in one call, and publishes each result to the
    /// callers waiting on its flight.
    async fn lead_batch<Id, T, E, F, Fut>(
        &self,
        mut leads: Vec<Lead<'_, Id, Option<T>, E>>,
        plan: &Plan<'_, Id>,
        loader: &mut F,
    ) -> Vec<(usize, Loaded<Option<T>, E>)>
    where
        Id: Clone + Eq + Hash + Send + Sync,
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<Id>) -> Fut,
        Fut: Future<Output = Result<HashMap<Id, T>, E>>,
    {
        if leads.is_empty() {
            return Vec::new();
        }
        let inner = &*self.inner;
        let tokens: Vec<u64> = leads.iter().map(|_| crate::store::new_token()).collect();
        let mut steps: Vec<Step<Option<T>>> = leads.iter().map(|_| Step::Pending).collect();
        let mut guard = BatchLeases {
            store: &inner.store,
            held: Vec::new(),
        };
        for lead in &leads {
            lead.flight.observe();
        }

        // Lease every key in one call; wait a little for keys another process is loading.
        let skip_primary = plan.first_read != Source::Primary;
        let mut wait = LeaseWait::new(inner.lease_wait);
        loop {
            let pending: Vec<usize> = (0..leads.len())
                .filter(|&i| matches!(steps[i], Step::Pending))
                .collect();
            if pending.is_empty() {
                break;
            }
            let requests: Vec<LeaseRequest<'_>> = pending
                .iter()
                .map(|&i| LeaseRequest {
                    key: leads[i].key,
                    token: tokens[i],
                    replace: leads[i].undecodable.as_deref(),
                })
                .collect();
            let leased = inner
                .store
                .get_or_lease_many_with_source(&requests, inner.lease_ttl, skip_primary)
                .await;
            let (leased, source) = match leased {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!(error = %e, "no leases; the batch will not be cached");
                    for &i in &pending {
                        steps[i] = Step::Uncached;
                        // The script may have leased some keys before it failed: given up
                        // (compare-and-delete) when the batch ends.
                        guard
                            .held
                            .push((leads[i].key.clone(), tokens[i], Source::Primary, true));
                    }
                    break;
                }
            };
            let mut waiting = 0;
            for (&i, answer) in pending.iter().zip(leased) {
                steps[i] = match answer {
                    Leased::Value(bytes) => match serde_json::from_slice::<Option<T>>(&bytes) {
                        Ok(v) => Step::Found(v),
                        Err(_) => {
                            self.discard(leads[i].key);
                            Step::Uncached
                        }
                    },
                    Leased::Granted => {
                        guard
                            .held
                            .push((leads[i].key.clone(), tokens[i], source, true));
                        Step::Leased {
                            source,
                            guard: guard.held.len() - 1,
                        }
                    }
                    Leased::Denied if source != Source::Nothing => {
                        waiting += 1;
                        Step::Pending
                    }
                    Leased::Denied => {
                        inner.counters.leases_denied.fetch_add(1, Ordering::Relaxed);
                        Step::Uncached
                    }
                };
            }
            if waiting == 0 {
                break;
            }
            if !wait.pause().await {
                for step in &mut steps {
                    if matches!(step, Step::Pending) {
                        *step = Step::Uncached;
                    }
                }
                inner
                    .counters
                    .leases_denied
                    .fetch_add(waiting, Ordering::Relaxed);
                break;
            }
        }

        let mut out: Vec<(usize, Loaded<Option<T>, E>)> = Vec::with_capacity(leads.len());
        // Values another load stored meanwhile: no loading for those.
        for (i, lead) in leads.iter_mut().enumerate() {
            if let Step::Found(v) = &steps[i] {
                publish(lead, Ok((v.clone(), Fresh::Found)));
                out.push((lead.at, Ok((v.clone(), Fresh::Found))));
            }
        }

        // Tags, before any value exists that they must reach; per store the leases came from.
        let mut window = None;
        let mut tagged = vec![false; leads.len()];
        // Per store the leases came from: the tagged keys, with their tags (computed once).
        let mut by_source: Vec<(Source, Vec<usize>, TagMembers)> = Vec::new();
        for (i, lead) in leads.iter().enumerate() {
            if let Step::Leased { source, .. } = steps[i] {
                let tags = self.tags_of(lead.key, &(plan.tags_for)(&lead.id));
                if !tags.is_empty() {
                    tagged[i] = true;
                    let member = (lead.key.clone(), tags);
                    match by_source.iter_mut().find(|(s, _, _)| *s == source) {
                        Some((_, at, list)) => {
                            at.push(i);
                            list.push(member);
                        }
                        None => by_source.push((source, vec![i], vec![member])),
                    }
                }
            }
        }
        if !by_source.is_empty() {
            let index = IndexWindow::starting_now(plan.longest, inner.lease_ttl.as_duration());
            window = Some(index);
            for (source, members, list) in by_source {
                if let Err(e) = inner.store.tag_add_many_at(&list, index.ttl, source).await {
                    tracing::debug!(error = %e, "tags not recorded; these entries will not be cached");
                    let mut release = Vec::new();
                    for &i in &members {
                        if let Step::Leased { guard: g, .. } = steps[i] {
                            release.push(g);
                        }
                        steps[i] = Step::Uncached;
                    }
                    guard.release(&release).await;
                }
            }
        }

        // One loader call for everything still missing.
        let to_load: Vec<usize> = (0..leads.len())
            .filter(|&i| !matches!(steps[i], Step::Found(_)))
            .collect();
        if to_load.is_empty() {
            return out;
        }
        for &i in &to_load {
            leads[i].flight.start_loading();
        }
        inner.counters.loader_calls.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<Id> = to_load.iter().map(|&i| leads[i].id.clone()).collect();
        let loaded = loader(ids)
            .instrument(tracing::debug_span!(
                "speedlayer.load_many",
                keys = to_load.len()
            ))
            .await;
        let rows = match loaded {
            Ok(rows) => rows,
            Err(e) => {
                inner.counters.loader_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(keys = to_load.len(), "batch loader failed; nothing cached");
                guard.release_all().await;
                let e = Arc::new(e);
                for &i in &to_load {
                    publish(&mut leads[i], Err(e.clone()));
                    out.push((leads[i].at, Err(e.clone())));
                }
                return out;
            }
        };
        // `get`, not `remove`: two keys of one batch may carry the same id.
        let values: Vec<Option<T>> = to_load
            .iter()
            .map(|&i| rows.get(&leads[i].id).cloned())
            .collect();

        // Store what this batch holds leases for, per store, in one call each.
        let mut fresh = vec![Fresh::Unknown; leads.len()];
        let mut writes: Vec<(Source, Vec<(usize, LeasedEntry)>)> = Vec::new();
        let mut uncacheable = Vec::new();
        for (&i, value) in to_load.iter().zip(&values) {
            let Step::Leased { source, guard: g } = steps[i] else {
                continue;
            };
            // Nobody may join once the value is about to be stored (see `lease_and_load`).
            inner
                .flights
                .retire(leads[i].key.as_str(), &leads[i].flight);
            let mut ttl = match value {
                Some(_) => plan.policy.pick(),
                None => plan.negative_ttl,
            };
            if let (true, Some(index)) = (tagged[i], window) {
                ttl = index.cut(ttl).unwrap_or(Ttl::MIN);
            }
            match self.encode(value) {
                Ok(bytes) => {
                    let entry = LeasedEntry {
                        key: leads[i].key.clone(),
                        token: tokens[i],
                        value: bytes,
                        ttl,
                    };
                    match writes.iter_mut().find(|(s, _)| *s == source) {
                        Some((_, list)) => list.push((i, entry)),
                        None => writes.push((source, vec![(i, entry)])),
                    }
                }
                Err(e) => {
                    inner.counters.uncacheable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %leads[i].key, error = %e, "loaded value not cached");
                    uncacheable.push(g);
                }
            }
        }
        for (source, list) in writes {
            let entries: Vec<LeasedEntry> = list.iter().map(|(_, e)| e.clone()).collect();
            let stored = inner.store.set_leased_many_at(&entries, source).await;
            for (n, (i, _)) in list.iter().enumerate() {
                // Stored or refused, the lease is spent either way.
                if let Step::Leased { guard: g, .. } = steps[*i] {
                    guard.held[g].3 = false;
                }
                match &stored {
                    Ok(flags) if flags.get(n) == Some(&true) => fresh[*i] = Fresh::Stored,
                    Ok(_) => {
                        inner
                            .counters
                            .stale_sets_refused
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            key = %leads[*i].key,
                            "the key was invalidated or written during the load; value not cached"
                        );
                    }
                    Err(e) => {
                        tracing::debug!(key = %leads[*i].key, error = %e, "cache fill failed")
                    }
                }
            }
        }
        guard.release(&uncacheable).await;
        for (&i, value) in to_load.iter().zip(values) {
            publish(&mut leads[i], Ok((value.clone(), fresh[i])));
            out.push((leads[i].at, Ok((value, fresh[i]))));
        }
        out
    }
}

/// The batch's answers in the order the keys were given: each answer is moved to its last use
/// and cloned only for an id given twice.
fn assemble<Id: Clone, T: Clone, E>(
    keys: &[(Id, Key)],
    slot_of: Vec<usize>,
    mut answers: Vec<Option<BatchEntry<T, E>>>,
) -> Batch<Id, T, E> {
    let mut uses = vec![0usize; answers.len()];
    for &slot in &slot_of {
        uses[slot] += 1;
    }
    let entries = keys
        .iter()
        .zip(slot_of)
        .map(|((id, _), slot)| {
            uses[slot] -= 1;
            let answer = if uses[slot] == 0 {
                answers[slot].take()
            } else {
                answers[slot].clone()
            };
            let answer = answer.unwrap_or_else(|| unreachable!("every distinct key is answered"));
            (id.clone(), answer)
        })
        .collect();
    Batch { entries }
}

/// Hands a load's result to the callers of this process waiting on its flight, and takes the
/// flight out of the table (nobody may join a load whose result is known).
fn publish<Id, V, E>(lead: &mut Lead<'_, Id, V, E>, result: Loaded<V, E>)
where
    V: Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    // Publishing fills the cell, and a leader that leaves a filled flight takes it out of the
    // table; a lead without a leader has a private flight, never in the table.
    if let Some(leader) = lead.leader.take() {
        leader.publish(Some(result));
    }
}
