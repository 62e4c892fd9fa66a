//! Single-flight: concurrent loads of one key in one process share one loader call.
//!
//! moka's `try_get_with` coalesces the same way, but it leaves the loaded value in its cache,
//! where a call arriving after an invalidation would still be handed the old value. Here a
//! flight exists only while its load runs: the leader takes it out of the table before it
//! publishes its result, so a caller can only join a load that was running when it arrived, and
//! the result lives only in the members' hands. `tokio::sync::OnceCell` does the waiting: if the
//! task running the loader is cancelled, the next waiter runs its own loader.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OnceCell};

type FlightKey = (String, TypeId);

/// One load in progress: its result, once known, for every member.
pub(crate) struct Flight<T> {
    pub(crate) cell: OnceCell<T>,
    /// Set by the leader just before it reads the store: a value read then is current for the
    /// members that had joined, not necessarily for those that join afterwards.
    observing: AtomicBool,
    /// Set by the leader just before its loader runs: a value loaded then is current for the
    /// members that had joined, whether or not it could be stored.
    loading: AtomicBool,
    /// True while a leader that does not run the cell's initializer (a batch, which loads many
    /// flights with one loader call) owns the flight: members wait for it to publish or leave
    /// before they touch the cell.
    led_outside: AtomicBool,
    left: Notify,
}

impl<T> Flight<T> {
    /// A flight of its own, outside the table (nobody else can join it).
    pub(crate) fn private() -> Arc<Flight<T>> {
        Arc::new(Flight {
            cell: OnceCell::new(),
            observing: AtomicBool::new(false),
            loading: AtomicBool::new(false),
            led_outside: AtomicBool::new(false),
            left: Notify::new(),
        })
    }

    /// The leader is about to read the store.
    pub(crate) fn observe(&self) {
        self.observing.store(true, Ordering::SeqCst);
    }

    /// True when the leader had not started reading the store yet.
    pub(crate) fn before_observation(&self) -> bool {
        !self.observing.load(Ordering::SeqCst)
    }

    /// The leader is about to run its loader.
    pub(crate) fn start_loading(&self) {
        self.loading.store(true, Ordering::SeqCst);
    }

    /// True when the leader had not started its loader yet.
    pub(crate) fn before_loading(&self) -> bool {
        !self.loading.load(Ordering::SeqCst)
    }

    /// Waits while an outside leader owns the flight: once it returns, the cell holds that
    /// leader's result, or the leader left without one (cancelled) and the cell is free for the
    /// next member's initializer.
    pub(crate) async fn outside_leader_done(&self) {
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if !self.led_outside.load(Ordering::SeqCst) {
                return;
            }
            left.await;
        }
    }
}

/// The hold of an outside leader on a flight it created: it publishes the result without
/// running the cell's initializer, and leaving (publishing, or being dropped when its caller is
/// cancelled) lets the members go on. A flight it leaves is taken out of the table once it has a
/// result or no member is left.
pub(crate) struct OutsideLeader<'a, T: Send + Sync + 'static> {
    flights: &'a Flights,
    key: FlightKey,
    pub(crate) flight: Arc<Flight<T>>,
}

impl<T: Send + Sync + 'static> OutsideLeader<'_, T> {
    /// Publishes `value` to the members (if no member's initializer got there first) and takes
    /// the flight out of the table: nobody may join a load whose result is known.
    pub(crate) fn publish(&self, value: T) {
        // The cell is free: members wait for this leader before they initialize it.
        let _ = self.flight.cell.set(value);
        self.leave();
    }

    fn leave(&self) {
        if self.flight.led_outside.swap(false, Ordering::SeqCst) {
            self.flight.left.notify_waiters();
        }
        self.flights.leave(&self.key, &self.flight);
    }
}

impl<T: Send + Sync + 'static> Drop for OutsideLeader<'_, T> {
    fn drop(&mut self) {
        self.leave();
    }
}

#[derive(Default)]
pub(crate) struct Flights {
    // A std mutex: it is held only to look up or remove an entry, never across an await.
    table: Mutex<HashMap<FlightKey, Arc<dyn Any + Send + Sync>>>,
}

/// A caller's membership in a flight; leaving (by finishing or being dropped) removes the flight
/// from the table once it has a result or no other member.
pub(crate) struct Member<'a, T: Send + Sync + 'static> {
    flights: &'a Flights,
    key: FlightKey,
    pub(crate) flight: Arc<Flight<T>>,
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FlightKey, Arc<dyn Any + Send + Sync>>> {
        // Every change is one insert or remove: a panic elsewhere cannot leave it half-done.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn join<T: Send + Sync + 'static>(&self, key: &str) -> Member<'_, T> {
        self.join_as(key, false).0
    }

    /// [`join`](Flights::join) for a leader that does not run the cell's initializer: a flight
    /// this call creates is marked as led outside before anyone else can see it, and comes with
    /// the leader's hold.
    pub(crate) fn join_outside<T: Send + Sync + 'static>(
        &self,
        key: &str,
    ) -> (Member<'_, T>, Option<OutsideLeader<'_, T>>) {
        self.join_as(key, true)
    }

    fn join_as<T: Send + Sync + 'static>(
        &self,
        key: &str,
        outside: bool,
    ) -> (Member<'_, T>, Option<OutsideLeader<'_, T>>) {
        let flight_key = (key.to_owned(), TypeId::of::<T>());
        let mut table = self.lock();
        let existing = table
            .get(&flight_key)
            .and_then(|f| f.clone().downcast::<Flight<T>>().ok());
        let (flight, leader) = match existing {
            Some(flight) => (flight, None),
            None => {
                let flight = Flight::private();
                flight.led_outside.store(outside, Ordering::SeqCst);
                table.insert(flight_key.clone(), flight.clone());
                let leader = outside.then(|| OutsideLeader {
                    flights: self,
                    key: flight_key.clone(),
                    flight: flight.clone(),
                });
                (flight, leader)
            }
        };
        (
            Member {
                flights: self,
                key: flight_key,
                flight,
            },
            leader,
        )
    }

    /// Takes `flight` out of the table (if it is still the one there): later callers start a
    /// new flight instead of joining this one.
    pub(crate) fn retire<T: Send + Sync + 'static>(&self, key: &str, flight: &Arc<Flight<T>>) {
        let flight_key = (key.to_owned(), TypeId::of::<T>());
        self.remove_if(&flight_key, flight, |_| true);
    }

    /// A holder of `flight` lets go of it: the flight leaves the table once it has a result or
    /// no other holder is left (an outside leader's or a member's).
    fn leave<T: Send + Sync + 'static>(&self, key: &FlightKey, flight: &Arc<Flight<T>>) {
        // strong_count: the table's reference and the caller's; any more are other holders.
        self.remove_if(key, flight, |f| {
            f.cell.initialized() || Arc::strong_count(f) <= 2
        });
    }

    /// Takes `flight` out of the table if it is still the one there and `done` says so.
    fn remove_if<T: Send + Sync + 'static>(
        &self,
        key: &FlightKey,
        flight: &Arc<Flight<T>>,
        done: impl FnOnce(&Arc<Flight<T>>) -> bool,
    ) {
        let mut table = self.lock();
        let ours = table
            .get(key)
            .is_some_and(|f| std::ptr::addr_eq(Arc::as_ptr(f), Arc::as_ptr(flight)));
        if ours && done(flight) {
            table.remove(key);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl<T: Send + Sync + 'static> Drop for Member<'_, T> {
    fn drop(&mut self) {
        self.flights.leave(&self.key, &self.flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type R = Result<u32, ()>;

    #[tokio::test]
    async fn concurrent_members_share_one_load_and_leave_nothing_behind() {
        let flights = Arc::new(Flights::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let flights = flights.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                let member = flights.join::<R>("k");
                *member
                    .flight
                    .cell
                    .get_or_init(|| async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(7)
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_takes_over_when_the_loading_task_is_cancelled() {
        let flights = Arc::new(Flights::default());
        let leader_started = Arc::new(tokio::sync::Notify::new());
        let leader = {
            let (flights, started) = (flights.clone(), leader_started.clone());
            tokio::spawn(async move {
                let member = flights.join::<R>("k");
                *member
                    .flight
                    .cell
                    .get_or_init(|| async {
                        started.notify_one();
                        std::future::pending::<()>().await;
                        Ok(0)
                    })
                    .await
            })
        };
        leader_started.notified().await;
        let waiter_member = flights.join::<R>("k");
        // The waiter joined the leader's flight (table, leader and waiter hold it).
        assert_eq!(Arc::strong_count(&waiter_member.flight), 3);
        let waiter = {
            let flight = waiter_member.flight.clone();
            tokio::spawn(async move { *flight.cell.get_or_init(|| async { Ok(1) }).await })
        };
        tokio::task::yield_now().await;
        leader.abort();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter must not hang")
            .unwrap();
        assert_eq!(got, Ok(1));
        drop(waiter_member);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_retired_flight_cannot_be_joined() {
        let flights = Flights::default();
        let first = flights.join::<R>("k");
        flights.retire("k", &first.flight);
        let second = flights.join::<R>("k");
        assert!(!Arc::ptr_eq(&first.flight, &second.flight));
        // Retiring an old flight leaves the new one in place.
        flights.retire("k", &first.flight);
        assert_eq!(flights.len(), 1);
    }

    #[tokio::test]
    async fn a_finished_flight_is_not_reused() {
        let flights = Flights::default();
        let first = {
            let m = flights.join::<R>("k");
            *m.flight.cell.get_or_init(|| async { Ok(1) }).await
        };
        let second = {
            let m = flights.join::<R>("k");
            *m.flight.cell.get_or_init(|| async { Ok(2) }).await
        };
        assert_eq!((first, second), (Ok(1), Ok(2)));
    }

    #[tokio::test]
    async fn types_do_not_mix() {
        let flights = Flights::default();
        let a = flights.join::<R>("k");
        let b = flights.join::<Result<String, ()>>("k");
        // One flight per (key, type): the second join must not replace or reuse the first.
        assert_eq!(flights.len(), 2);
        assert_eq!(a.flight.cell.get_or_init(|| async { Ok(1) }).await, &Ok(1));
        assert_eq!(
            b.flight
                .cell
                .get_or_init(|| async { Ok("x".to_owned()) })
                .await,
            &Ok("x".to_owned())
        );
    }
}
