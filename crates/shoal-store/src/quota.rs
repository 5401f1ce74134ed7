//! The quota: reservations before every write, LRU and TTL eviction, and what to do on ENOSPC.
//!
//! Usage counts Shoal's own bytes (data and metadata files), never the disk's fill level. A write
//! first reserves its bytes; if that would pass the high watermark, unpinned entries are evicted,
//! least recently used first, down to the low watermark. So usage never passes the high watermark.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::index::{lock, now_ms, Entry, EntryKey};
use crate::paths::{is_no_space, remove_if_exists};
use crate::store::{Counters, Store};

/// Bytes reserved against the quota; released on drop unless committed to an entry.
#[must_use]
pub(crate) struct Reservation<'a> {
    store: &'a Store,
    bytes: u64,
}

impl Reservation<'_> {
    /// The reserved bytes now belong to an entry.
    pub fn commit(mut self) {
        self.bytes = 0;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.store.sub_used(self.bytes);
        }
    }
}

impl Store {
    pub(crate) fn sub_used(&self, bytes: u64) {
        let _ = self
            .inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_sub(bytes))
            });
    }

    pub(crate) fn add_used(&self, bytes: u64) {
        self.inner.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn try_add(&self, bytes: u64) -> bool {
        let high = self.inner.config.high_watermark;
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(bytes).filter(|n| *n <= high)
            })
            .is_ok()
    }

    /// Reserves `bytes`, evicting LRU entries first if needed; fails when the rest is pinned.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<Reservation<'_>> {
        let cfg = &self.inner.config;
        for attempt in 0..3 {
            if self.try_add(bytes) {
                return Ok(Reservation { store: self, bytes });
            }
            if attempt < 2 && bytes <= cfg.high_watermark {
                self.evict_to(cfg.low_watermark.min(cfg.high_watermark - bytes));
            }
        }
        Err(Error::QuotaFull {
            needed: bytes,
            used: self.used_bytes(),
            high: cfg.high_watermark,
        })
    }

    /// Evicts unpinned entries, least recently used first, until usage is at most `target`.
    /// Returns the bytes freed.
    pub(crate) fn evict_to(&self, target: u64) -> u64 {
        let _one_pass = lock(&self.inner.evicting);
        if self.used_bytes() <= target {
            return 0;
        }
        let mut candidates: Vec<(u64, Arc<Entry>)> = self
            .inner
            .index
            .iter()
            .filter(|(_, e)| !e.is_pinned())
            .map(|(_, e)| (e.last_access.load(Ordering::Relaxed), e))
            .collect();
        candidates.sort_by_key(|(at, _)| *at);
        let mut freed = 0;
        for (_, entry) in candidates {
            if self.used_bytes() <= target {
                break;
            }
            if let Some(bytes) = self.remove_entry(&entry, false) {
                freed += bytes;
                Counters::bump(&self.inner.counters.evictions);
                tracing::debug!(entry = %entry.key, bytes, "evicted (lru)");
            }
        }
        freed
    }

    /// Evicts unpinned entries unused for longer than the TTL, then enforces the watermarks.
    /// Call it periodically (the async wrapper has a sweeper task). Returns the bytes freed.
    pub fn sweep(&self) -> u64 {
        let mut freed = 0;
        if let Some(ttl) = self.inner.config.ttl {
            let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
            let expired: Vec<Arc<Entry>> = self
                .inner
                .index
                .iter()
                .map(|(_, e)| e)
                .filter(|e| e.last_access.load(Ordering::Relaxed) < cutoff)
                .collect();
            for entry in expired {
                if let Some(bytes) = self.remove_entry(&entry, false) {
                    freed += bytes;
                    Counters::bump(&self.inner.counters.evictions);
                    tracing::debug!(entry = %entry.key, bytes, "evicted (ttl)");
                }
            }
        }
        if self.used_bytes() > self.inner.config.high_watermark {
            freed += self.evict_to(self.inner.config.low_watermark);
        }
        freed
    }

    /// Removes an entry and its files. Pinned entries stay unless `force` (bad bytes are never kept).
    /// Returns the bytes freed, or `None` if it was pinned or already gone.
    pub(crate) fn remove_entry(&self, entry: &Arc<Entry>, force: bool) -> Option<u64> {
        let _stripe = lock(self.stripe(&entry.key));
        self.remove_entry_locked(entry, force)
    }

    /// [`Store::remove_entry`] with the key's stripe already held.
    pub(crate) fn remove_entry_locked(&self, entry: &Arc<Entry>, force: bool) -> Option<u64> {
        let bytes = {
            let mut st = lock(&entry.state);
            if st.removed || (st.pins > 0 && !force) {
                return None;
            }
            st.removed = true;
            st.bytes
        };
        let paths = &self.inner.paths;
        match (&entry.key, &entry.at) {
            // The metadata goes first: a data file without it is an orphan that recovery deletes.
            (EntryKey::Blob(d), _) => {
                for file in [paths.meta(d), paths.data(d)] {
                    if let Err(e) = remove_if_exists(&file) {
                        tracing::warn!(path = %file.display(), error = %e, "could not remove evicted file");
                    }
                }
            }
            (EntryKey::Chunk(h), Some(at)) => self.inner.packs.free(h, at),
            (EntryKey::Chunk(_), None) => {}
        }
        if let Some(current) = self.inner.index.get(&entry.key) {
            if Arc::ptr_eq(&current, entry) {
                self.inner.index.invalidate(&entry.key);
            }
        }
        self.sub_used(bytes);
        Some(bytes)
    }

    /// Runs a write; on ENOSPC evicts (at least `needed` bytes or a tenth of the store) and tries
    /// once more; still full is [`Error::DiskFull`], which callers answer by streaming through.
    pub(crate) fn on_full<T>(
        &self,
        path: &Path,
        needed: u64,
        op: &'static str,
        mut write: impl FnMut() -> io::Result<T>,
    ) -> Result<T> {
        match write() {
            Ok(v) => Ok(v),
            Err(e) if is_no_space(&e) => {
                let used = self.used_bytes();
                let want = needed.max(used / 10);
                tracing::warn!(path = %path.display(), needed, used, "disk full; evicting and retrying");
                self.evict_to(used.saturating_sub(want));
                match write() {
                    Ok(v) => Ok(v),
                    Err(e) if is_no_space(&e) => Err(Error::DiskFull {
                        path: path.to_path_buf(),
                        needed,
                    }),
                    Err(e) => Err(Error::io(op, path, e)),
                }
            }
            Err(e) => Err(Error::io(op, path, e)),
        }
    }
}
