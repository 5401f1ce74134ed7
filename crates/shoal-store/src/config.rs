//! What the store is told when it opens ([`StoreConfig`]) and what it answers ([`StoreStats`],
//! [`PutOutcome`]).

use std::path::PathBuf;
use std::time::Duration;

/// Where the store lives and how much of the disk it may use.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The store's directory; nothing is written outside it.
    pub root: PathBuf,
    /// When Shoal's bytes would pass this, the store evicts down to `low_watermark` first.
    pub high_watermark: u64,
    /// Eviction stops once usage is at or below this.
    pub low_watermark: u64,
    /// Unpinned entries not used for this long are evicted by [`crate::Store::sweep`].
    pub ttl: Option<Duration>,
    /// Memory for chunks' verified group hashes (docs/store.md, "Reading part of a chunk"):
    /// 2 KiB per MiB of chunk, so the default 16 MiB covers 8 GiB of chunks read at random.
    pub group_hash_cache_bytes: u64,
}

impl StoreConfig {
    /// A config with a quota of `quota` bytes: high watermark at the quota, low at 80% of it, no
    /// TTL, 16 MiB of group hashes in memory.
    pub fn new(root: impl Into<PathBuf>, quota: u64) -> Self {
        StoreConfig {
            root: root.into(),
            high_watermark: quota,
            low_watermark: quota / 10 * 8,
            ttl: None,
            group_hash_cache_bytes: 16 << 20,
        }
    }
}

/// A snapshot of the store's counters (a plain struct; metrics exporters read it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes Shoal's entries use (data plus metadata files).
    pub used_bytes: u64,
    /// The configured high watermark.
    pub high_watermark: u64,
    /// The configured low watermark.
    pub low_watermark: u64,
    /// Blobs indexed (partial or complete).
    pub blobs: u64,
    /// Blobs whose sha256 was verified.
    pub complete_blobs: u64,
    /// Pieces held across all blobs.
    pub pieces: u64,
    /// Chunks indexed.
    pub chunks: u64,
    /// Entries pinned right now.
    pub pinned: u64,
    /// Reads answered from the store.
    pub hits: u64,
    /// Reads of things not in the store.
    pub misses: u64,
    /// Entries evicted (LRU or TTL).
    pub evictions: u64,
    /// Stored items that failed verification and were dropped.
    pub corruptions: u64,
    /// Fetches run by `get_or_fetch` (after coalescing).
    pub fetches: u64,
    /// Fetched items served without being cached (quota or disk full).
    pub uncached: u64,
}

/// What a put did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PutOutcome {
    /// The bytes were verified and written.
    Stored,
    /// The store already held them; nothing was written.
    AlreadyHeld,
}
