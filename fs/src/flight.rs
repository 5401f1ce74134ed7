//! Single flight per chunk: concurrent loaders of one chunk (kernel readahead, fetch-ahead, the
//! prefetch list) read or fetch it once; the others sleep until it is done (a condition variable,
//! not polling: a waiting sequential reader must wake as soon as the chunk is in memory), and
//! never past their read's deadline.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// One chunk's flight.
#[derive(Default)]
struct Slot {
    busy: Mutex<bool>,
    done: Condvar,
}

/// The chunks being loaded right now, by hash.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<[u8; 32], Arc<Slot>>>,
}

/// A chunk's flight, held; dropping it wakes the next waiter.
pub(crate) struct Held<'a> {
    flights: &'a Flights,
    key: [u8; 32],
    slot: Arc<Slot>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Flights {
    /// True when someone loads (or waits for) `key`.
    pub(crate) fn busy(&self, key: &[u8; 32]) -> bool {
        lock(&self.map).contains_key(key)
    }

    /// Takes the flight of `key`, waiting for its holder until `deadline`; `None` once the
    /// deadline has passed.
    pub(crate) fn take(&self, key: [u8; 32], deadline: Instant) -> Option<Held<'_>> {
        let slot = Arc::clone(lock(&self.map).entry(key).or_default());
        let mut busy = lock(&slot.busy);
        while *busy {
            let now = Instant::now();
            if now >= deadline {
                drop(busy);
                self.forget(key, &slot);
                return None;
            }
            busy = match slot.done.wait_timeout(busy, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        *busy = true;
        drop(busy);
        Some(Held {
            flights: self,
            key,
            slot,
        })
    }

    /// Drops the map's entry when nobody else holds or waits for it.
    fn forget(&self, key: [u8; 32], slot: &Arc<Slot>) {
        let mut map = lock(&self.map);
        // Two references: the map's and the caller's. New ones are only made under the map lock.
        if Arc::strong_count(slot) <= 2 && map.get(&key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            map.remove(&key);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        *lock(&self.slot.busy) = false;
        self.slot.done.notify_one();
        self.flights.forget(self.key, &self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waiters_wake_when_the_holder_finishes_and_give_up_at_their_deadline() {
        let f = Arc::new(Flights::default());
        let held = f.take([1; 32], Instant::now()).unwrap();
        assert!(f.busy(&[1; 32]));
        // A waiter whose deadline passes gets nothing, and does not block the holder.
        let t = Instant::now();
        assert!(f
            .take([1; 32], Instant::now() + Duration::from_millis(50))
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(50));
        // A waiter with time left wakes as soon as the holder lets go.
        let f2 = Arc::clone(&f);
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let got = f2.take([1; 32], Instant::now() + Duration::from_secs(10));
            (got.is_some(), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(held);
        let (got, waited) = waiter.join().unwrap();
        assert!(got);
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        // Everyone gone: the entry is forgotten.
        assert!(!f.busy(&[1; 32]));
        // Other chunks never wait.
        assert!(f.take([2; 32], Instant::now()).is_some());
    }
}
