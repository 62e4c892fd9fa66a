//! A lease a caller holds on a key (a cache load's, a counter recount's), given up if the caller
//! ends without storing.

use crate::key::Key;
use crate::store::{Source, Store, spawn_detached};

/// A lease held on `key` with `token` where it was granted (`source`). Dropped while still held
/// (the load failed, its value cannot be cached, or the caller's future was dropped mid-load),
/// it gives the lease up in the background, only if the key still holds this token.
pub(crate) struct LeaseHold<'a> {
    pub(crate) store: &'a Store,
    pub(crate) key: &'a Key,
    pub(crate) token: u64,
    pub(crate) source: Source,
    /// Still to give up on drop; the holder clears it once it stored (or released).
    pub(crate) held: bool,
}

impl LeaseHold<'_> {
    /// Gives the lease up now (a load that will store nothing), so that the next reader loads
    /// at once.
    pub(crate) async fn release(mut self) {
        self.held = false;
        release_quietly(self.store, self.key, self.token, self.source).await;
    }
}

impl Drop for LeaseHold<'_> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let (store, key, token, source) = (
            self.store.clone(),
            self.key.clone(),
            self.token,
            self.source,
        );
        // Without a runtime (the process is shutting down) the lease expires by its TTL.
        spawn_detached(async move { release_quietly(&store, &key, token, source).await });
    }
}

async fn release_quietly(store: &Store, key: &Key, token: u64, source: Source) {
    if let Err(e) = store.release_lease_at(key, token, source).await {
        tracing::debug!(key = %key, error = %e, "lease not released; it expires by its TTL");
    }
}

/// The leases a batch load holds, each where it was granted. Dropped while some are still held
/// (the load failed or the caller's future was dropped mid-load), it gives those up in the
/// background, in one call per store.
pub(crate) struct BatchLeases<'a> {
    pub(crate) store: &'a Store,
    /// Key, token, where granted, still held.
    pub(crate) held: Vec<(Key, u64, Source, bool)>,
}

impl BatchLeases<'_> {
    /// The leases at `which` that are still held, grouped by where they were granted.
    fn grouped(&self, which: impl Iterator<Item = usize>) -> Vec<(Source, Vec<(Key, u64)>)> {
        let mut groups: Vec<(Source, Vec<(Key, u64)>)> = Vec::new();
        for i in which {
            let (key, token, source, held) = &self.held[i];
            if !*held {
                continue;
            }
            match groups.iter_mut().find(|(s, _)| s == source) {
                Some((_, list)) => list.push((key.clone(), *token)),
                None => groups.push((*source, vec![(key.clone(), *token)])),
            }
        }
        groups
    }

    /// The leases still held, grouped by where they were granted; marks them given up.
    fn take_held(&mut self) -> Vec<(Source, Vec<(Key, u64)>)> {
        let groups = self.grouped(0..self.held.len());
        for entry in &mut self.held {
            entry.3 = false;
        }
        groups
    }

    /// Gives up the leases at `which` (indices into `held`) now. They count as held until the
    /// release returned, so that a caller dropped meanwhile still gives them up on drop.
    pub(crate) async fn release(&mut self, which: &[usize]) {
        let groups = self.grouped(which.iter().copied());
        for (source, leases) in &groups {
            release_many_quietly(self.store, leases, *source).await;
        }
        for &i in which {
            self.held[i].3 = false;
        }
    }

    /// Gives up every lease still held now.
    pub(crate) async fn release_all(&mut self) {
        for (source, leases) in self.take_held() {
            release_many_quietly(self.store, &leases, source).await;
        }
    }
}

impl Drop for BatchLeases<'_> {
    fn drop(&mut self) {
        let groups = self.take_held();
        if groups.is_empty() {
            return;
        }
        let store = self.store.clone();
        spawn_detached(async move {
            for (source, leases) in groups {
                release_many_quietly(&store, &leases, source).await;
            }
        });
    }
}

async fn release_many_quietly(store: &Store, leases: &[(Key, u64)], source: Source) {
    if let Err(e) = store.release_leases_at(leases, source).await {
        tracing::debug!(error = %e, leases = leases.len(), "leases not released; they expire by their TTL");
    }
}
