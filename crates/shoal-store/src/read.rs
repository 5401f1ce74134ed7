//! Reading blobs: verified pieces and ranges, and [`BlobReader`] for streams. Every piece is
//! checked against its BLAKE3 digest as it is read (in slices small enough to hash while still
//! in the CPU cache); bad bytes are dropped from the store and never handed back.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::index::{lock, Entry, PinGuard};
use crate::journal::{self, RecordKind};
use crate::key::{Blake3Hash, Digest, PieceLayout};
use crate::paths::bytes_gone;
use crate::store::{Counters, Store};

/// Largest range one `read_range` call returns (64 MiB); stream longer ranges piece by piece.
pub const MAX_RANGE: u64 = 64 << 20;

/// A piece or chunk is read and hashed this much at a time, so the hash reads bytes still in
/// the CPU cache.
const VERIFY_SLICE: usize = 256 << 10;

/// Fills `out` from `file` at `offset` and returns the BLAKE3 hash of what was read, hashing
/// each slice right after reading it, while it is still in the CPU cache.
pub(crate) fn read_hashed(file: &File, offset: u64, out: &mut [u8]) -> std::io::Result<Blake3Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut done = 0;
    for slice in out.chunks_mut(VERIFY_SLICE) {
        file.read_exact_at(slice, offset + done as u64)?;
        hasher.update(slice);
        done += slice.len();
    }
    Ok(Blake3Hash::from_bytes(*hasher.finalize().as_bytes()))
}

impl Store {
    /// Reads piece `index`, verified against its BLAKE3 digest. Bad bytes are dropped and reported
    /// as [`Error::Corrupt`], never returned.
    pub fn read_piece(&self, digest: &Digest, index: u32) -> Result<Bytes> {
        let (entry, _pin, layout) = self.blob_entry(digest).inspect_err(|_| self.miss())?;
        self.read_piece_pinned(digest, &entry, &layout, index)
    }

    fn read_piece_pinned(
        &self,
        digest: &Digest,
        entry: &Arc<Entry>,
        layout: &PieceLayout,
        index: u32,
    ) -> Result<Bytes> {
        let len = crate::blob::checked_piece_len(digest, layout, index)?;
        let path = self.inner.paths.data(digest);
        let file = match File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let mut buf = vec![0u8; len as usize];
        self.read_verified(digest, entry, layout, file.as_ref(), index, &mut buf)?;
        Ok(Bytes::from(buf))
    }

    /// Reads held piece `index` from `file` (the blob's data file; `None`: it is gone) into
    /// `out` (exactly the piece's length), hashing each slice while it is still in the CPU cache.
    /// On a mismatch the piece is dropped and [`Error::Corrupt`] returned; `out` then holds
    /// bytes that must not be used.
    pub(crate) fn read_verified(
        &self,
        digest: &Digest,
        entry: &Arc<Entry>,
        layout: &PieceLayout,
        file: Option<&File>,
        index: u32,
        out: &mut [u8],
    ) -> Result<()> {
        let item = || format!("piece {index} of {digest}");
        let len = crate::blob::checked_piece_len(digest, layout, index)?;
        if out.len() as u64 != len {
            return Err(Error::OutOfRange {
                item: item(),
                reason: format!("a buffer of {} bytes for a {len}-byte piece", out.len()),
            });
        }
        let generation = {
            let st = lock(&entry.state);
            match st.blob.as_ref() {
                Some(b) if !st.removed && b.held.contains(index) => b.generation,
                _ => {
                    self.miss();
                    return Err(Error::NotPresent { item: item() });
                }
            }
        };
        let path = self.inner.paths.data(digest);
        let base = layout.piece_offset(index);
        let read = match file {
            Some(f) => read_hashed(f, base, out),
            None => Err(std::io::ErrorKind::NotFound.into()),
        };
        let good = match read {
            Ok(hash) => layout.piece_hash(index) == Some(&hash),
            Err(e) if bytes_gone(&e) => false,
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        if !good {
            self.drop_piece(digest, entry, index, generation, len);
            return Err(Error::Corrupt { item: item(), path });
        }
        self.hit();
        entry.touch();
        Ok(())
    }

    /// Forgets a piece that failed verification (only if nobody rewrote it since it was read).
    fn drop_piece(
        &self,
        digest: &Digest,
        entry: &Arc<Entry>,
        index: u32,
        generation: u64,
        len: u64,
    ) {
        Counters::bump(&self.inner.counters.corruptions);
        tracing::warn!(blob = %digest, piece = index, "stored piece failed verification; dropped");
        let mut st = lock(&entry.state);
        let Some(blob) = st.blob.as_mut() else { return };
        if blob.generation != generation || !blob.held.remove(index) {
            return;
        }
        blob.complete = false;
        let record = journal::encode_record(&blob.check, RecordKind::Dropped, index);
        let meta_path = self.inner.paths.meta(digest);
        let appended = OpenOptions::new()
            .append(true)
            .open(&meta_path)
            .and_then(|mut f| f.write_all(&record).and_then(|()| f.sync_data()));
        if let Err(e) = appended {
            // The journal still says held; the next read verifies again and never serves it.
            tracing::warn!(path = %meta_path.display(), error = %e, "could not journal a dropped piece");
        }
        st.bytes = st.bytes.saturating_sub(len);
        drop(st);
        self.sub_used(len);
    }

    /// Reads `len` bytes at `offset` (at most [`MAX_RANGE`]) from held pieces, each verified.
    /// Fails with [`Error::NotPresent`] if a covering piece is missing.
    pub fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let (entry, _pin, layout) = self.blob_entry(digest).inspect_err(|_| self.miss())?;
        let item = || format!("bytes {offset}+{len} of {digest}");
        if len > MAX_RANGE {
            return Err(Error::OutOfRange {
                item: item(),
                reason: format!("ranges are read at most {MAX_RANGE} bytes at a time"),
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > layout.size())
        {
            return Err(Error::OutOfRange {
                item: item(),
                reason: format!("the blob is {} bytes", layout.size()),
            });
        }
        let pieces = layout.pieces_for_range(offset, len);
        let missing = lock(&entry.state)
            .blob
            .as_ref()
            .and_then(|b| b.held.first_missing(pieces.clone()));
        if let Some(index) = missing {
            self.miss();
            return Err(Error::NotPresent {
                item: format!("piece {index} of {digest} (for bytes {offset}+{len})"),
            });
        }
        let mut out = Vec::new();
        for index in pieces {
            let piece = self.read_piece_pinned(digest, &entry, &layout, index)?;
            let start = layout.piece_offset(index);
            let from = offset.saturating_sub(start) as usize;
            let to = ((offset + len - start) as usize).min(piece.len());
            if len as usize == to - from {
                return Ok(piece.slice(from..to)); // the whole range lies in one piece
            }
            out.extend_from_slice(&piece[from..to]);
        }
        Ok(Bytes::from(out))
    }
}

/// A stream's handle on one blob: pins it (no eviction while a response streams) and keeps its
/// data file open after the first read, so each piece read costs one positioned read and a
/// hash. Reads may run on several threads at once.
#[derive(Debug)]
pub struct BlobReader {
    store: Store,
    digest: Digest,
    entry: Arc<Entry>,
    layout: Arc<PieceLayout>,
    /// Opened by the first read; `None`: the data file is gone (every read then fails as corrupt).
    file: OnceLock<Option<File>>,
    _pin: PinGuard,
}

impl Store {
    /// A reader over the held pieces of `digest` (memory only: the data file is opened by the
    /// first read). Fails with [`Error::UnknownBlob`] if the store does not know the blob.
    pub fn blob_reader(&self, digest: &Digest) -> Result<BlobReader> {
        let (entry, pin, layout) = self.blob_entry(digest).inspect_err(|_| self.miss())?;
        Ok(BlobReader {
            store: self.clone(),
            digest: *digest,
            entry,
            layout,
            file: OnceLock::new(),
            _pin: pin,
        })
    }
}

impl BlobReader {
    /// The blob's piece layout.
    pub fn layout(&self) -> &Arc<PieceLayout> {
        &self.layout
    }

    /// Reads piece `index` into `out`, which must be exactly the piece's length (a buffer the
    /// caller reuses: nothing is allocated). Verified against the piece's BLAKE3 digest; on a
    /// mismatch the piece is dropped from the store and [`Error::Corrupt`] returned, and `out`
    /// holds bytes that must not be used. A piece not held is [`Error::NotPresent`]. Blocks.
    pub fn read_piece_into(&self, index: u32, out: &mut [u8]) -> Result<()> {
        let file = self.file()?;
        self.store
            .read_verified(&self.digest, &self.entry, &self.layout, file, index, out)
    }

    fn file(&self) -> Result<Option<&File>> {
        if let Some(f) = self.file.get() {
            return Ok(f.as_ref());
        }
        let path = self.store.inner.paths.data(&self.digest);
        // Only "not there" is remembered; another failure (e.g. out of descriptors) is retried.
        let opened = match File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        Ok(self.file.get_or_init(|| opened).as_ref())
    }
}
