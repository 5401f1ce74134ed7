//! Single flight: concurrent misses of one piece or chunk run one fetch, and all callers share it.
//!
//! moka's `try_get_with` already coalesces concurrent initialisations of one key (and hands the
//! error to every waiter); the value is removed right after, so the store on disk stays the one
//! source of truth and a later caller reads it from there.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use crate::blob::verify_piece;
use crate::chunk::verify_chunk;
use crate::error::{Error, Result};
use crate::index::EntryKey;
use crate::key::Item;
use crate::store::{Counters, Store};

/// A fetcher's error, boxed.
pub type FetchError = Box<dyn std::error::Error + Send + Sync>;

impl Store {
    /// Reads a piece or chunk from the store (verified).
    pub fn read_item(&self, item: &Item) -> Result<Bytes> {
        match item {
            Item::Piece(digest, index) => self.read_piece(digest, *index),
            Item::Chunk(hash) => self.get_chunk(hash),
        }
    }

    /// Checks fetched bytes against the trusted hash (piece table or chunk name).
    pub fn verify_item(&self, item: &Item, data: &[u8]) -> Result<()> {
        match item {
            Item::Piece(digest, index) => {
                let layout = self
                    .entry(&EntryKey::Blob(*digest))
                    .and_then(|e| e.layout.clone())
                    .ok_or_else(|| Error::UnknownBlob {
                        blob: digest.to_string(),
                    })?;
                verify_piece(digest, &layout, *index, data)
            }
            Item::Chunk(hash) => verify_chunk(hash, data),
        }
    }

    /// Caches bytes already verified by [`Store::verify_item`]. A store that cannot keep them
    /// (quota or disk full, blob evicted meanwhile) logs it: the bytes are still good to serve.
    pub(crate) fn keep_fetched(&self, item: &Item, data: &[u8]) {
        let kept = match item {
            Item::Piece(digest, index) => self.put_verified(digest, *index, data).map(|_| ()),
            Item::Chunk(hash) => self.put_chunk_verified(hash, data).map(|_| ()),
        };
        if let Err(e) = kept {
            Counters::bump(&self.inner.counters.uncached);
            tracing::warn!(%item, error = %e, "serving fetched bytes without caching them");
        }
    }

    pub(crate) fn count_fetch(&self) {
        Counters::bump(&self.inner.counters.fetches);
    }

    /// Returns the item from the store, or runs `fetch` once for all concurrent callers of the
    /// same item, verifies the bytes, stores them and returns them. For a piece, the blob must
    /// be registered with [`Store::ensure_blob`] first. Fetched bytes that do not verify are
    /// [`Error::HashMismatch`] (fetch from another source) and are never stored.
    pub fn get_or_fetch_blocking<E>(
        &self,
        item: Item,
        fetch: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Bytes>
    where
        E: Into<FetchError>,
    {
        match self.read_item(&item) {
            Ok(bytes) => return Ok(bytes),
            Err(e) if e.is_corrupt() || matches!(e, Error::NotPresent { .. }) => {}
            Err(e) => return Err(e),
        }
        let ran = AtomicBool::new(false);
        let result = self.inner.flights.try_get_with(item, || {
            ran.store(true, Ordering::Relaxed);
            if let Ok(bytes) = self.read_item(&item) {
                return Ok(bytes); // a flight that just ended stored it
            }
            self.count_fetch();
            let bytes = fetch().map_err(|e| Error::Fetch {
                item: item.to_string(),
                source: e.into(),
            })?;
            self.verify_item(&item, &bytes)?;
            self.keep_fetched(&item, &bytes);
            Ok::<_, Error>(bytes)
        });
        if ran.load(Ordering::Relaxed) {
            self.inner.flights.invalidate(&item);
        }
        result.map_err(Error::from_shared)
    }
}
