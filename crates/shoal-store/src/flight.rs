//! Single flight: concurrent misses of one piece or chunk run one fetch, and all callers share it.
//!
//! moka's `try_get_with` already coalesces concurrent initialisations of one key (and hands the
//! error to every waiter); the value is removed right after, so the store on disk stays the one
//! source of truth and a later caller reads it from there.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::key::Item;

/// A fetcher's error, boxed.
pub type FetchError = Box<dyn std::error::Error + Send + Sync>;

/// The loads in flight from threads, by item.
pub(crate) struct Flights {
    running: moka::sync::Cache<Item, Bytes>,
}

impl Flights {
    /// No flight yet.
    pub fn new() -> Self {
        Flights {
            running: moka::sync::Cache::builder().build(),
        }
    }

    /// Runs `load` once for all concurrent callers of `item` and hands each its result.
    pub fn coalesce(&self, item: Item, load: impl FnOnce() -> Result<Bytes>) -> Result<Bytes> {
        let ran = AtomicBool::new(false);
        let result = self.running.try_get_with(item, || {
            ran.store(true, Ordering::Relaxed);
            load()
        });
        if ran.load(Ordering::Relaxed) {
            self.running.invalidate(&item);
        }
        result.map_err(Error::from_shared)
    }
}
