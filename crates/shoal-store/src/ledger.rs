//! The ledger: the store's state and its owner. What is held (the index), where its files are
//! (the paths and the chunk packs), what it costs against the quota, and the counters.
//!
//! Usage counts Shoal's own bytes (data, group hashes and metadata files), never the disk's fill
//! level. A write first reserves its bytes; if that would pass the high watermark, unpinned
//! entries are evicted, least recently used first, down to the low watermark. So usage never
//! passes the high watermark. The blob and chunk modules above work through this type; nothing
//! below it knows the store.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{StoreConfig, StoreStats};
use crate::error::{Error, Result};
use crate::index::{Entry, EntryKey, Index};
use crate::pack::Packs;
use crate::paths::{is_no_space, lock, now_ms, remove_if_exists, Paths};

/// Counters the stats report.
#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub corruptions: AtomicU64,
    pub fetches: AtomicU64,
    pub uncached: AtomicU64,
}

impl Counters {
    /// Adds one.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The store's state: index, files, quota and counters.
pub(crate) struct Ledger {
    pub paths: Paths,
    pub config: StoreConfig,
    pub index: Index,
    /// The chunk packs.
    pub packs: Packs,
    pub counters: Counters,
    used: AtomicU64,
    /// One eviction pass at a time.
    evicting: Mutex<()>,
}

/// Bytes reserved against the quota; released on drop unless committed to an entry.
#[must_use]
pub(crate) struct Reservation<'a> {
    ledger: &'a Ledger,
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
            self.ledger.sub_used(self.bytes);
        }
    }
}

impl Ledger {
    /// An empty ledger over opened files (recovery fills it).
    pub fn new(paths: Paths, config: StoreConfig, packs: Packs) -> Self {
        Ledger {
            paths,
            config,
            index: Index::new(),
            packs,
            counters: Counters::default(),
            used: AtomicU64::new(0),
            evicting: Mutex::new(()),
        }
    }

    /// The live index entry for `key`, if any.
    pub fn entry(&self, key: &EntryKey) -> Option<Arc<Entry>> {
        self.index.get(key)
    }

    /// Counts a read answered from the store.
    pub fn hit(&self) {
        Counters::bump(&self.counters.hits);
    }

    /// Counts a read of something the store does not hold.
    pub fn miss(&self) {
        Counters::bump(&self.counters.misses);
    }

    /// Bytes Shoal's entries use right now (including reservations).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn sub_used(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_sub(bytes))
            });
    }

    pub fn add_used(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn try_add(&self, bytes: u64) -> bool {
        let high = self.config.high_watermark;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(bytes).filter(|n| *n <= high)
            })
            .is_ok()
    }

    /// Reserves `bytes`, evicting LRU entries first if needed; fails when the rest is pinned.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation<'_>> {
        let cfg = &self.config;
        for attempt in 0..3 {
            if self.try_add(bytes) {
                return Ok(Reservation {
                    ledger: self,
                    bytes,
                });
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
    pub fn evict_to(&self, target: u64) -> u64 {
        let _one_pass = lock(&self.evicting);
        if self.used_bytes() <= target {
            return 0;
        }
        let mut candidates: Vec<(u64, Arc<Entry>)> = self
            .index
            .entries()
            .filter(|e| !e.is_pinned())
            .map(|e| (e.last_access.load(Ordering::Relaxed), e))
            .collect();
        candidates.sort_by_key(|(at, _)| *at);
        let mut freed = 0;
        for (_, entry) in candidates {
            if self.used_bytes() <= target {
                break;
            }
            if let Some(bytes) = self.remove_entry(&entry, false) {
                freed += bytes;
                Counters::bump(&self.counters.evictions);
                tracing::debug!(entry = %entry.key, bytes, "evicted (lru)");
            }
        }
        freed
    }

    /// Evicts unpinned entries unused for longer than the TTL, then enforces the watermarks.
    /// Returns the bytes freed.
    pub fn sweep(&self) -> u64 {
        let mut freed = 0;
        if let Some(ttl) = self.config.ttl {
            let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
            let expired: Vec<Arc<Entry>> = self
                .index
                .entries()
                .filter(|e| e.last_access.load(Ordering::Relaxed) < cutoff)
                .collect();
            for entry in expired {
                if let Some(bytes) = self.remove_entry(&entry, false) {
                    freed += bytes;
                    Counters::bump(&self.counters.evictions);
                    tracing::debug!(entry = %entry.key, bytes, "evicted (ttl)");
                }
            }
        }
        if self.used_bytes() > self.config.high_watermark {
            freed += self.evict_to(self.config.low_watermark);
        }
        freed
    }

    /// Removes an entry and its files. Pinned entries stay unless `force` (bad bytes are never kept).
    /// Returns the bytes freed, or `None` if it was pinned or already gone.
    pub fn remove_entry(&self, entry: &Arc<Entry>, force: bool) -> Option<u64> {
        let _stripe = lock(self.index.stripe(&entry.key));
        self.remove_entry_locked(entry, force)
    }

    /// [`Ledger::remove_entry`] with the key's stripe already held.
    pub fn remove_entry_locked(&self, entry: &Arc<Entry>, force: bool) -> Option<u64> {
        let bytes = {
            let mut st = lock(&entry.state);
            if st.removed || (st.pins > 0 && !force) {
                return None;
            }
            st.removed = true;
            st.bytes
        };
        match (&entry.key, &entry.at) {
            // The metadata goes first: a data file without it is an orphan that recovery deletes.
            (EntryKey::Blob(d), _) => {
                for file in [self.paths.meta(d), self.paths.data(d)] {
                    if let Err(e) = remove_if_exists(&file) {
                        tracing::warn!(path = %file.display(), error = %e, "could not remove evicted file");
                    }
                }
            }
            (EntryKey::Chunk(h), Some(at)) => self.packs.free(h, at),
            (EntryKey::Chunk(_), None) => {}
        }
        self.index.forget(entry);
        self.sub_used(bytes);
        Some(bytes)
    }

    /// Runs a write; on ENOSPC evicts (at least `needed` bytes or a tenth of the store) and tries
    /// once more; still full is [`Error::DiskFull`], which callers answer by streaming through.
    pub fn on_full<T>(
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

    /// A snapshot of sizes and counters.
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let mut s = StoreStats {
            used_bytes: self.used_bytes(),
            high_watermark: self.config.high_watermark,
            low_watermark: self.config.low_watermark,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corruptions: c.corruptions.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed),
            uncached: c.uncached.load(Ordering::Relaxed),
            ..StoreStats::default()
        };
        for entry in self.index.entries() {
            let st = lock(&entry.state);
            if st.removed {
                continue;
            }
            if st.pins > 0 {
                s.pinned += 1;
            }
            match (&entry.key, &st.blob) {
                (EntryKey::Blob(_), Some(b)) => {
                    s.blobs += 1;
                    s.pieces += u64::from(b.held.held());
                    if b.complete {
                        s.complete_blobs += 1;
                    }
                }
                _ => s.chunks += 1,
            }
        }
        s
    }
}
