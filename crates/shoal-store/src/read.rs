//! Reading blobs: verified pieces and ranges, and [`BlobReader`] for streams. Every piece is
//! checked against its BLAKE3 digest as it is read (in slices small enough to hash while still
//! in the CPU cache); bad bytes are dropped from the store and never handed back.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::index::{Entry, EntryKey, PinGuard};
use crate::journal::{self, RecordKind};
use crate::key::{Digest, PieceLayout};
use crate::ledger::{Counters, Ledger};
use crate::paths::{bytes_gone, lock, read_hashed};

/// Largest range one `read_range` call returns (64 MiB); stream longer ranges piece by piece.
pub const MAX_RANGE: u64 = 64 << 20;

/// The blob's entry, pinned, and its piece layout; [`Error::UnknownBlob`] if not held.
pub(crate) fn blob_entry(
    ledger: &Ledger,
    digest: &Digest,
) -> Result<(Arc<Entry>, PinGuard, Arc<PieceLayout>)> {
    let unknown = || Error::UnknownBlob {
        blob: digest.to_string(),
    };
    let entry = ledger.entry(&EntryKey::Blob(*digest)).ok_or_else(unknown)?;
    let pin = entry.pin().ok_or_else(unknown)?;
    let layout = entry.layout.clone().ok_or_else(unknown)?;
    Ok((entry, pin, layout))
}

/// The length of piece `index`, or `OutOfRange` when the blob has no such piece.
pub(crate) fn checked_piece_len(digest: &Digest, layout: &PieceLayout, index: u32) -> Result<u64> {
    layout.piece_len(index).ok_or_else(|| Error::OutOfRange {
        item: format!("piece {index} of {digest}"),
        reason: format!("the blob has {} pieces", layout.piece_count()),
    })
}

/// Reads piece `index`, verified against its BLAKE3 digest. Bad bytes are dropped and reported
/// as [`Error::Corrupt`], never returned.
pub(crate) fn read_piece(ledger: &Ledger, digest: &Digest, index: u32) -> Result<Bytes> {
    let (entry, _pin, layout) = blob_entry(ledger, digest).inspect_err(|_| ledger.miss())?;
    read_piece_pinned(ledger, digest, &entry, &layout, index)
}

fn read_piece_pinned(
    ledger: &Ledger,
    digest: &Digest,
    entry: &Arc<Entry>,
    layout: &PieceLayout,
    index: u32,
) -> Result<Bytes> {
    let len = checked_piece_len(digest, layout, index)?;
    let path = ledger.paths.data(digest);
    let file = match File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    let mut buf = vec![0u8; len as usize];
    crate::read::read_verified(
        ledger,
        digest,
        entry,
        layout,
        file.as_ref(),
        index,
        &mut buf,
    )?;
    Ok(Bytes::from(buf))
}

/// Reads held piece `index` from `file` (the blob's data file; `None`: it is gone) into
/// `out` (exactly the piece's length), hashing each slice while it is still in the CPU cache.
/// On a mismatch the piece is dropped and [`Error::Corrupt`] returned; `out` then holds
/// bytes that must not be used.
pub(crate) fn read_verified(
    ledger: &Ledger,
    digest: &Digest,
    entry: &Arc<Entry>,
    layout: &PieceLayout,
    file: Option<&File>,
    index: u32,
    out: &mut [u8],
) -> Result<()> {
    let item = || format!("piece {index} of {digest}");
    let len = checked_piece_len(digest, layout, index)?;
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
                ledger.miss();
                return Err(Error::NotPresent { item: item() });
            }
        }
    };
    let path = ledger.paths.data(digest);
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
        drop_piece(ledger, digest, entry, index, generation, len);
        return Err(Error::Corrupt { item: item(), path });
    }
    ledger.hit();
    entry.touch();
    Ok(())
}

/// Forgets a piece that failed verification (only if nobody rewrote it since it was read).
fn drop_piece(
    ledger: &Ledger,
    digest: &Digest,
    entry: &Arc<Entry>,
    index: u32,
    generation: u64,
    len: u64,
) {
    Counters::bump(&ledger.counters.corruptions);
    tracing::warn!(blob = %digest, piece = index, "stored piece failed verification; dropped");
    let mut st = lock(&entry.state);
    let Some(blob) = st.blob.as_mut() else { return };
    if blob.generation != generation || !blob.held.remove(index) {
        return;
    }
    blob.complete = false;
    let record = journal::encode_record(&blob.check, RecordKind::Dropped, index);
    let meta_path = ledger.paths.meta(digest);
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
    ledger.sub_used(len);
}

/// Reads `len` bytes at `offset` (at most [`MAX_RANGE`]) from held pieces, each verified.
/// Fails with [`Error::NotPresent`] if a covering piece is missing.
pub(crate) fn read_range(ledger: &Ledger, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
    let (entry, _pin, layout) = blob_entry(ledger, digest).inspect_err(|_| ledger.miss())?;
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
        ledger.miss();
        return Err(Error::NotPresent {
            item: format!("piece {index} of {digest} (for bytes {offset}+{len})"),
        });
    }
    let mut out = Vec::new();
    for index in pieces {
        let piece = read_piece_pinned(ledger, digest, &entry, &layout, index)?;
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

/// A stream's handle on one blob: pins it (no eviction while a response streams) and keeps its
/// data file open after the first read, so each piece read costs one positioned read and a
/// hash. Reads may run on several threads at once.
pub struct BlobReader {
    ledger: Arc<Ledger>,
    digest: Digest,
    entry: Arc<Entry>,
    layout: Arc<PieceLayout>,
    /// Opened by the first read; `None`: the data file is gone (every read then fails as corrupt).
    file: OnceLock<Option<File>>,
    _pin: PinGuard,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// A reader over the held pieces of `digest` (memory only: the data file is opened by the
/// first read). Fails with [`Error::UnknownBlob`] if the store does not know the blob.
pub(crate) fn blob_reader(ledger: &Arc<Ledger>, digest: &Digest) -> Result<BlobReader> {
    let (entry, pin, layout) = blob_entry(ledger, digest).inspect_err(|_| ledger.miss())?;
    Ok(BlobReader {
        ledger: Arc::clone(ledger),
        digest: *digest,
        entry,
        layout,
        file: OnceLock::new(),
        _pin: pin,
    })
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
        read_verified(
            &self.ledger,
            &self.digest,
            &self.entry,
            &self.layout,
            file,
            index,
            out,
        )
    }

    fn file(&self) -> Result<Option<&File>> {
        if let Some(f) = self.file.get() {
            return Ok(f.as_ref());
        }
        let path = self.ledger.paths.data(&self.digest);
        // Only "not there" is remembered; another failure (e.g. out of descriptors) is retried.
        let opened = match File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        Ok(self.file.get_or_init(|| opened).as_ref())
    }
}
