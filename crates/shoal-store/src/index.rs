//! The in-memory index: what is held, how many bytes it costs, who pins it, when it was used.
//! Memory only; the files behind the entries belong to the ledger (ledger.rs).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::key::{Blake3Hash, Digest, PieceLayout};
use crate::pack::ChunkLoc;
use crate::paths::{lock, now_ms};
use shoal_types::PieceSet;

/// Lock stripes for structural changes (create, commit, remove) of entries.
const STRIPES: usize = 64;

/// The unit of eviction: a whole blob (all its pieces) or one chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum EntryKey {
    Blob(Digest),
    Chunk(Blake3Hash),
}

impl EntryKey {
    /// First byte of the key: picks the lock stripe.
    pub fn first_byte(&self) -> u8 {
        match self {
            EntryKey::Blob(d) => d.as_bytes()[0],
            EntryKey::Chunk(h) => h.as_bytes()[0],
        }
    }
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKey::Blob(d) => write!(f, "blob {d}"),
            EntryKey::Chunk(h) => write!(f, "chunk {h}"),
        }
    }
}

/// What the journal says about a blob, mirrored in memory.
#[derive(Debug)]
pub(crate) struct BlobState {
    pub held: PieceSet,
    pub complete: bool,
    /// Header check of the metadata file, to append records.
    pub check: [u8; 32],
    /// Bumped on every piece written, so a reader only drops the bytes it actually saw.
    pub generation: u64,
}

/// The sha256 of a blob's first `next` pieces, hashed ahead of completion
/// ([`crate::Store::digest_ahead`]) so that completing it hashes only the rest.
#[derive(Debug, Default)]
pub(crate) struct DigestAhead {
    pub sha: sha2::Sha256,
    pub next: u32,
}

/// Mutable part of an entry, behind one lock.
#[derive(Debug)]
pub(crate) struct EntryState {
    pub pins: u32,
    /// Set once the entry is evicted or dropped; nobody may pin or write it after that.
    pub removed: bool,
    /// Bytes this entry counts against the quota.
    pub bytes: u64,
    pub blob: Option<BlobState>,
}

/// One indexed blob or chunk.
#[derive(Debug)]
pub(crate) struct Entry {
    pub key: EntryKey,
    /// The trusted piece table (blobs only).
    pub layout: Option<Arc<PieceLayout>>,
    /// Where the bytes lie (chunks only).
    pub at: Option<ChunkLoc>,
    pub state: Mutex<EntryState>,
    /// Milliseconds since the Unix epoch of the last read or write (LRU and TTL).
    pub last_access: AtomicU64,
    /// Blobs only: the whole-blob sha256 so far, locked while someone advances it.
    pub digest: Mutex<Option<Box<DigestAhead>>>,
}

/// Every indexed blob and chunk by key (eviction is the ledger's own: moka cannot pin entries
/// nor evict down to a low watermark), and the stripes that serialise changes to one key.
pub(crate) struct Index {
    map: moka::sync::Cache<EntryKey, Arc<Entry>>,
    /// Serialise create, commit and remove of one key (readers never take these).
    stripes: Vec<Mutex<()>>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Index {
            map: moka::sync::Cache::builder().build(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The live entry for `key`, if any.
    pub fn get(&self, key: &EntryKey) -> Option<Arc<Entry>> {
        self.map.get(key).filter(|e| !lock(&e.state).removed)
    }

    /// Adds (or replaces) the entry for its key.
    pub fn insert(&self, entry: Arc<Entry>) {
        self.map.insert(entry.key, entry);
    }

    /// Forgets `entry`, unless its key already names a newer one.
    pub fn forget(&self, entry: &Arc<Entry>) {
        if let Some(current) = self.map.get(&entry.key) {
            if Arc::ptr_eq(&current, entry) {
                self.map.invalidate(&entry.key);
            }
        }
    }

    /// Every entry (some may be removed by the time they are looked at).
    pub fn entries(&self) -> impl Iterator<Item = Arc<Entry>> + '_ {
        self.map.iter().map(|(_, e)| e)
    }

    /// The lock stripe that serialises structural changes to `key`.
    pub fn stripe(&self, key: &EntryKey) -> &Mutex<()> {
        &self.stripes[usize::from(key.first_byte()) % STRIPES]
    }
}

impl Entry {
    /// A new, unpinned entry.
    pub fn new(
        key: EntryKey,
        layout: Option<Arc<PieceLayout>>,
        bytes: u64,
        blob: Option<BlobState>,
        last_access: u64,
    ) -> Arc<Self> {
        Self::build(key, layout, None, bytes, blob, last_access)
    }

    fn build(
        key: EntryKey,
        layout: Option<Arc<PieceLayout>>,
        at: Option<ChunkLoc>,
        bytes: u64,
        blob: Option<BlobState>,
        last_access: u64,
    ) -> Arc<Self> {
        Arc::new(Entry {
            key,
            layout,
            at,
            state: Mutex::new(EntryState {
                pins: 0,
                removed: false,
                bytes,
                blob,
            }),
            last_access: AtomicU64::new(last_access),
            digest: Mutex::new(None),
        })
    }

    /// A new, unpinned chunk entry for the bytes (and group hashes) at `at`.
    pub fn chunk(hash: Blake3Hash, at: ChunkLoc, last_access: u64) -> Arc<Self> {
        Self::build(
            EntryKey::Chunk(hash),
            None,
            Some(at),
            at.span(),
            None,
            last_access,
        )
    }

    /// Marks the entry used now.
    pub fn touch(&self) {
        self.last_access.store(now_ms(), Ordering::Relaxed);
    }

    /// Pins the entry unless it was already removed.
    pub fn pin(self: &Arc<Self>) -> Option<PinGuard> {
        let mut st = lock(&self.state);
        if st.removed {
            return None;
        }
        st.pins += 1;
        Some(PinGuard {
            entry: Arc::clone(self),
        })
    }

    /// True while someone holds a pin (racy: the eviction path re-checks under the lock).
    pub fn is_pinned(&self) -> bool {
        lock(&self.state).pins > 0
    }
}

/// Keeps a blob or chunk from being evicted while it is alive (RAII).
///
/// A pin does not stop a corrupt entry from being dropped: bad bytes are never kept.
#[derive(Debug)]
pub struct PinGuard {
    entry: Arc<Entry>,
}

impl PinGuard {
    /// What is pinned, for logs.
    pub fn describe(&self) -> String {
        self.entry.key.to_string()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut st = lock(&self.entry.state);
        st.pins = st.pins.saturating_sub(1);
    }
}
