//! The store handle: configuration, opening (lock, version, recovery), the index and the stats.

use std::fs::{self, File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::index::{lock, Entry, EntryKey};
use crate::key::Item;
use crate::pack::Packs;
use crate::paths::Paths;

const VERSION_LINE: &str = "shoal-store 1";
const STRIPES: usize = 64;

/// Where the store lives and how much of the disk it may use.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The store's directory; nothing is written outside it.
    pub root: PathBuf,
    /// When Shoal's bytes would pass this, the store evicts down to `low_watermark` first.
    pub high_watermark: u64,
    /// Eviction stops once usage is at or below this.
    pub low_watermark: u64,
    /// Unpinned entries not used for this long are evicted by [`Store::sweep`].
    pub ttl: Option<Duration>,
}

impl StoreConfig {
    /// A config with a quota of `quota` bytes: high watermark at the quota, low at 80% of it, no TTL.
    pub fn new(root: impl Into<PathBuf>, quota: u64) -> Self {
        StoreConfig {
            root: root.into(),
            high_watermark: quota,
            low_watermark: quota / 10 * 8,
            ttl: None,
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
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) struct Inner {
    pub paths: Paths,
    pub config: StoreConfig,
    pub index: moka::sync::Cache<EntryKey, Arc<Entry>>,
    /// Serialise create, commit and remove of one key (readers never take these).
    pub stripes: Vec<Mutex<()>>,
    pub used: AtomicU64,
    pub counters: Counters,
    /// One eviction pass at a time.
    pub evicting: Mutex<()>,
    /// Fetches in flight from threads (single flight for `get_or_fetch_blocking`).
    pub flights: moka::sync::Cache<Item, Bytes>,
    /// The chunk packs.
    pub packs: Packs,
    /// Held for the store's lifetime: the flock that keeps a second process out.
    _lock: File,
}

/// The node's content-addressed store. Cheap to clone; all clones share one index.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.paths.root)
            .field("used", &self.used_bytes())
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the store at `config.root`: locks it, replays every blob journal, drops
    /// what does not check, and evicts down to the low watermark if it is over the high one.
    pub fn open(config: StoreConfig) -> Result<Store> {
        if config.high_watermark == 0 || config.low_watermark > config.high_watermark {
            return Err(Error::Config(format!(
                "need 0 < low watermark ({}) <= high watermark ({})",
                config.low_watermark, config.high_watermark
            )));
        }
        let paths = Paths::new(&config.root);
        for dir in [&paths.root, &paths.blobs, &paths.chunks, &paths.tmp] {
            fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        }
        let lock_path = paths.root.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open", &lock_path, e))?;
        rustix::fs::flock(
            &lock_file,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .map_err(|_| Error::Locked {
            root: paths.root.clone(),
        })?;
        check_version(&paths)?;
        clear_dir(&paths.tmp)?;
        let (packs, found) = Packs::open(&paths.chunks)
            .map_err(|e| Error::io("open the chunk packs in", &paths.chunks, e))?;
        let store = Store {
            inner: Arc::new(Inner {
                packs,
                paths,
                index: moka::sync::Cache::builder().build(),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                used: AtomicU64::new(0),
                counters: Counters::default(),
                evicting: Mutex::new(()),
                flights: moka::sync::Cache::builder().build(),
                config,
                _lock: lock_file,
            }),
        };
        store.recover(found)?;
        if store.used_bytes() > store.inner.config.high_watermark {
            store.evict_to(store.inner.config.low_watermark);
        }
        Ok(store)
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Bytes Shoal's entries use right now (including space reserved by writes in progress).
    pub fn used_bytes(&self) -> u64 {
        self.inner.used.load(Ordering::Acquire)
    }

    /// A snapshot of sizes and counters.
    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        let mut s = StoreStats {
            used_bytes: self.used_bytes(),
            high_watermark: self.inner.config.high_watermark,
            low_watermark: self.inner.config.low_watermark,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corruptions: c.corruptions.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed),
            uncached: c.uncached.load(Ordering::Relaxed),
            ..StoreStats::default()
        };
        for (_, entry) in self.inner.index.iter() {
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

    /// The live index entry for `key`, if any.
    pub(crate) fn entry(&self, key: &EntryKey) -> Option<Arc<Entry>> {
        self.inner
            .index
            .get(key)
            .filter(|e| !lock(&e.state).removed)
    }

    /// The lock stripe that serialises structural changes to `key`.
    pub(crate) fn stripe(&self, key: &EntryKey) -> &Mutex<()> {
        let i = usize::from(key.first_byte()) % STRIPES;
        &self.inner.stripes[i]
    }

    pub(crate) fn hit(&self) {
        Counters::bump(&self.inner.counters.hits);
    }

    pub(crate) fn miss(&self) {
        Counters::bump(&self.inner.counters.misses);
    }
}

fn check_version(paths: &Paths) -> Result<()> {
    let path = paths.root.join("VERSION");
    match fs::read_to_string(&path) {
        Ok(found) if found.trim() == VERSION_LINE => Ok(()),
        Ok(found) => Err(Error::UnsupportedVersion {
            root: paths.root.clone(),
            found: found.chars().take(100).collect(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::paths::write_atomic(&paths.temp(), &path, format!("{VERSION_LINE}\n").as_bytes())
                .map_err(|e| Error::io("write", &path, e))
        }
        Err(e) => Err(Error::io("read", &path, e)),
    }
}

fn clear_dir(dir: &std::path::Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            crate::paths::remove_if_exists(&path).map_err(|e| Error::io("remove", &path, e))?;
        }
    }
    Ok(())
}
