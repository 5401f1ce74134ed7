//! The store handle: opening (lock, version, recovery) and the public API. The state lives in
//! the ledger (ledger.rs) and the chunk half (chunk.rs); each method here hands its call to the
//! module that does the work, so this file is the store's table of contents.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::blob::{self, BlobStatus};
use crate::chunk::{self, verify_chunk, Chunks};
use crate::config::{PutOutcome, StoreConfig, StoreStats};
use crate::error::{Error, Result};
use crate::flight::{FetchError, Flights};
use crate::index::{EntryKey, PinGuard};
use crate::key::{Blake3Hash, Digest, Item, PieceLayout};
use crate::ledger::{Counters, Ledger};
use crate::pack::Packs;
use crate::paths::{remove_if_exists, write_atomic, Paths};
use crate::read::{self, BlobReader};
use crate::staged::{self, StagedFile};
use crate::{import, recover};

const VERSION_LINE: &str = "shoal-store 1";

struct Inner {
    ledger: Arc<Ledger>,
    chunks: Chunks,
    /// Fetches in flight from threads (single flight for `get_or_fetch_blocking`).
    flights: Flights,
    /// Held for the store's lifetime: the flock that keeps a second process out.
    _lock: File,
}

/// The node's content-addressed store. Cheap to clone; all clones share one index.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.ledger().paths.root)
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
        let chunks = Chunks::new(config.group_hash_cache_bytes);
        let ledger = Arc::new(Ledger::new(paths, config, packs));
        recover::recover(&ledger, found)?;
        if ledger.used_bytes() > ledger.config.high_watermark {
            ledger.evict_to(ledger.config.low_watermark);
        }
        Ok(Store {
            inner: Arc::new(Inner {
                ledger,
                chunks,
                flights: Flights::new(),
                _lock: lock_file,
            }),
        })
    }

    fn ledger(&self) -> &Arc<Ledger> {
        &self.inner.ledger
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.ledger().config
    }

    /// Bytes Shoal's entries use right now (including space reserved by writes in progress).
    pub fn used_bytes(&self) -> u64 {
        self.ledger().used_bytes()
    }

    /// A snapshot of sizes and counters.
    pub fn stats(&self) -> StoreStats {
        self.ledger().stats()
    }

    /// Evicts unpinned entries unused for longer than the TTL, then enforces the watermarks.
    /// Call it periodically (the async wrapper has a sweeper task). Returns the bytes freed.
    pub fn sweep(&self) -> u64 {
        self.ledger().sweep()
    }

    // Blobs (blob.rs, read.rs, staged.rs, import.rs).

    /// Registers a blob's trusted piece layout (idempotent); pieces can be put after this.
    pub fn ensure_blob(&self, digest: &Digest, layout: &PieceLayout) -> Result<()> {
        blob::ensure_blob(self.ledger(), digest, layout)
    }

    /// Verifies `data` against piece `index`'s digest and stores it.
    pub fn put_piece(&self, digest: &Digest, index: u32, data: &[u8]) -> Result<PutOutcome> {
        blob::put_piece(self.ledger(), digest, index, data)
    }

    /// What the store holds of a blob, if it knows the blob.
    pub fn blob_status(&self, digest: &Digest) -> Option<BlobStatus> {
        blob::blob_status(self.ledger(), digest)
    }

    /// Checks the whole blob against its sha256 once every piece is held, then marks it complete.
    /// On a mismatch the blob is dropped ([`Error::BlobDigestMismatch`]): its piece table was wrong.
    pub fn complete_blob(&self, digest: &Digest) -> Result<()> {
        blob::complete_blob(self.ledger(), digest)
    }

    /// Hashes the blob's held pieces into its whole-blob sha256, in order, as far as they go
    /// without a gap; [`Store::complete_blob`] then hashes only the rest. Call it as pieces
    /// land (it returns at once if another call is hashing this blob); the reads are verified
    /// like any other.
    pub fn digest_ahead(&self, digest: &Digest) -> Result<()> {
        blob::digest_ahead(self.ledger(), digest)
    }

    /// Removes a blob and its files; fails with [`Error::Pinned`] while someone pins it.
    pub fn remove_blob(&self, digest: &Digest) -> Result<()> {
        blob::remove_blob(self.ledger(), digest)
    }

    /// Pins a blob so eviction leaves it alone while the guard lives (e.g. during its download).
    pub fn pin_blob(&self, digest: &Digest) -> Result<PinGuard> {
        blob::pin_blob(self.ledger(), digest)
    }

    /// Reads piece `index`, verified against its BLAKE3 digest. Bad bytes are dropped and reported
    /// as [`Error::Corrupt`], never returned.
    pub fn read_piece(&self, digest: &Digest, index: u32) -> Result<Bytes> {
        read::read_piece(self.ledger(), digest, index)
    }

    /// Reads `len` bytes at `offset` (at most [`crate::MAX_RANGE`]) from held pieces, each
    /// verified. Fails with [`Error::NotPresent`] if a covering piece is missing.
    pub fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        read::read_range(self.ledger(), digest, offset, len)
    }

    /// A reader over the held pieces of `digest` (memory only: the data file is opened by the
    /// first read). Fails with [`Error::UnknownBlob`] if the store does not know the blob.
    pub fn blob_reader(&self, digest: &Digest) -> Result<BlobReader> {
        read::blob_reader(self.ledger(), digest)
    }

    /// A new, empty staged file in the store's temp directory.
    pub fn staged_file(&self) -> Result<StagedFile> {
        staged::staged_file(self.ledger())
    }

    /// Makes `staged` the data file of blob `digest`, without copying a byte. `pieces` are
    /// (index, BLAKE3) of the pieces written to it, each checked by the caller against that
    /// hash before it was written; those whose hash is the layout's are held, the others left
    /// out. (Every read verifies the bytes again, as for any piece.) Returns false, adopting
    /// nothing, when the store knows the blob already: the caller then puts the pieces one by
    /// one. The file stays readable and writable through `staged`; pieces written to it later
    /// are not held until put.
    pub fn adopt_blob(
        &self,
        digest: &Digest,
        layout: PieceLayout,
        staged: &StagedFile,
        pieces: &[(u32, Blake3Hash)],
    ) -> Result<bool> {
        staged::adopt_blob(self.ledger(), digest, layout, staged, pieces)
    }

    /// Streams a whole blob from `reader` into the store, computing its piece table with
    /// `piece_size`. It becomes visible, complete, only if its sha256 equals `digest`.
    /// Returns the computed layout (the seed publishes it). An already complete blob is kept.
    pub fn import_blob(
        &self,
        digest: &Digest,
        piece_size: u32,
        reader: &mut dyn Read,
    ) -> Result<PieceLayout> {
        import::import_blob(self.ledger(), digest, piece_size, reader)
    }

    // Chunks (chunk.rs).

    /// Verifies `data` against `hash` and stores it with its group hashes (a no-op if held).
    pub fn put_chunk(&self, hash: &Blake3Hash, data: &[u8]) -> Result<PutOutcome> {
        self.inner.chunks.put(self.ledger(), hash, data)
    }

    /// Reads a chunk, verified against its hash. Bad bytes are dropped and reported as
    /// [`Error::Corrupt`], never returned.
    pub fn get_chunk(&self, hash: &Blake3Hash) -> Result<Bytes> {
        let mut buf = Vec::new();
        self.read_chunk_into(hash, &mut buf)?;
        Ok(Bytes::from(buf))
    }

    /// [`Store::get_chunk`] into `out` (resized to the chunk's length): a caller that reuses its
    /// buffers reads without faulting in fresh memory for every chunk. On an error `out` holds
    /// bytes that must not be used.
    pub fn read_chunk_into(&self, hash: &Blake3Hash, out: &mut Vec<u8>) -> Result<()> {
        self.inner.chunks.read_into(self.ledger(), hash, out)
    }

    /// Reads bytes `range` of a chunk, reading and checking only the 16 KiB groups that cover it
    /// against the chunk's group hashes (themselves checked against its name; docs/store.md,
    /// "Reading part of a chunk"). `out` is filled with those groups and the returned range is
    /// where `range` lies in it. Bad bytes or group hashes drop the chunk and are
    /// [`Error::Corrupt`]; `out` is then not to be used.
    pub fn read_chunk_part(
        &self,
        hash: &Blake3Hash,
        range: Range<u64>,
        out: &mut Vec<u8>,
    ) -> Result<Range<usize>> {
        self.inner.chunks.read_part(self.ledger(), hash, range, out)
    }

    /// Starts reading the held ones of `hashes` from the disk in the background, so that their
    /// reads that follow find them in the page cache (a read-ahead of chunks that are read in
    /// order; packs keep such chunks next to each other, so the disk sees one long read).
    pub fn will_need_chunks(&self, hashes: &[Blake3Hash]) {
        chunk::will_need(self.ledger(), hashes);
    }

    /// Where a chunk's bytes lie on disk: its pack file, offset and length (for tools and tests;
    /// its group hashes, if any, follow its bytes).
    pub fn chunk_at(&self, hash: &Blake3Hash) -> Option<(PathBuf, u64, u64)> {
        chunk::chunk_at(self.ledger(), hash)
    }

    /// True when the chunk is indexed (its bytes are verified when read).
    pub fn has_chunk(&self, hash: &Blake3Hash) -> bool {
        self.ledger().entry(&EntryKey::Chunk(*hash)).is_some()
    }

    /// Removes a chunk; fails with [`Error::Pinned`] while someone pins it.
    pub fn remove_chunk(&self, hash: &Blake3Hash) -> Result<()> {
        chunk::remove(self.ledger(), hash)
    }

    /// Pins a chunk so eviction leaves it alone while the guard lives.
    pub fn pin_chunk(&self, hash: &Blake3Hash) -> Result<PinGuard> {
        chunk::pin(self.ledger(), hash)
    }

    // Fetch through (flight.rs coalesces).

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
                    .ledger()
                    .entry(&EntryKey::Blob(*digest))
                    .and_then(|e| e.layout.clone())
                    .ok_or_else(|| Error::UnknownBlob {
                        blob: digest.to_string(),
                    })?;
                blob::verify_piece(digest, &layout, *index, data)
            }
            Item::Chunk(hash) => verify_chunk(hash, data),
        }
    }

    /// Caches bytes already verified by [`Store::verify_item`]. A store that cannot keep them
    /// (quota or disk full, blob evicted meanwhile) logs it: the bytes are still good to serve.
    pub(crate) fn keep_fetched(&self, item: &Item, data: &[u8]) {
        let kept = match item {
            Item::Piece(digest, index) => {
                blob::put_verified(self.ledger(), digest, *index, data).map(|_| ())
            }
            Item::Chunk(hash) => self.put_chunk(hash, data).map(|_| ()),
        };
        if let Err(e) = kept {
            Counters::bump(&self.ledger().counters.uncached);
            tracing::warn!(%item, error = %e, "serving fetched bytes without caching them");
        }
    }

    pub(crate) fn count_fetch(&self) {
        Counters::bump(&self.ledger().counters.fetches);
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
        self.inner.flights.coalesce(item, || {
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
            Ok(bytes)
        })
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
            write_atomic(&paths.temp(), &path, format!("{VERSION_LINE}\n").as_bytes())
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
            remove_if_exists(&path).map_err(|e| Error::io("remove", &path, e))?;
        }
    }
    Ok(())
}
