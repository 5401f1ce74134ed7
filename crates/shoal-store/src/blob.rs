//! Blobs: register a piece layout, write verified pieces, read verified pieces and ranges, complete.
//!
//! A piece write is: bytes verified against the piece table, `pwrite` into the sparse data file at
//! the piece's offset, then a `held` record appended to the journal; only then is the piece in
//! the in-memory bitmap. A crash before the record leaves bytes nobody points at. Nothing is
//! fsynced per piece: every read re-verifies, so bytes a power loss took are refetched.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sha2::Digest as _;

use crate::config::PutOutcome;
use crate::error::{Error, Result};
use crate::index::{BlobState, DigestAhead, Entry, EntryKey, PinGuard};
use crate::journal::{self, RecordKind, RECORD_LEN};
use crate::key::{Blake3Hash, Digest, PieceLayout};
use crate::ledger::{Counters, Ledger};
use crate::paths::{lock, now_ms, sync_dir};
use crate::read::{blob_entry, checked_piece_len, read_verified};
use shoal_types::PieceSet;

/// What [`Store::install_blob`] puts in place.
pub(crate) enum Install {
    /// Every piece, and the blob's sha256 matched: complete.
    Whole,
    /// These pieces (verified) of a blob still downloading.
    Partial(PieceSet),
}

/// What the store holds of one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobStatus {
    /// The blob's piece layout.
    pub layout: Arc<PieceLayout>,
    /// Pieces held (verified when written, verified again on every read).
    pub held: PieceSet,
    /// True once every piece is held and the whole blob matched its sha256.
    pub complete: bool,
}

/// Registers a blob's trusted piece layout (idempotent); pieces can be put after this.
pub(crate) fn ensure_blob(ledger: &Ledger, digest: &Digest, layout: &PieceLayout) -> Result<()> {
    let key = EntryKey::Blob(*digest);
    if let Some(e) = ledger.entry(&key) {
        return match e.layout.as_deref() == Some(layout) {
            true => Ok(()),
            false => Err(Error::LayoutMismatch {
                blob: digest.to_string(),
            }),
        };
    }
    let (header, check) = journal::encode_header(digest, layout);
    let reservation = ledger.reserve(header.len() as u64)?;
    let paths = &ledger.paths;
    let (dir, meta, data) = (
        paths.blob_dir(digest),
        paths.meta(digest),
        paths.data(digest),
    );
    fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
    let tmp = paths.temp();
    ledger
        .on_full(&meta, header.len() as u64, "write", || {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(&header)?;
            f.sync_data()
        })
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
    let _stripe = lock(ledger.index.stripe(&key));
    if let Some(e) = ledger.entry(&key) {
        let _ = fs::remove_file(&tmp);
        return match e.layout.as_deref() == Some(layout) {
            true => Ok(()),
            false => Err(Error::LayoutMismatch {
                blob: digest.to_string(),
            }),
        };
    }
    // The data file exists before the metadata names it; writers never create it.
    File::create(&data).map_err(|e| Error::io("create", &data, e))?;
    fs::rename(&tmp, &meta).map_err(|e| Error::io("rename into", &meta, e))?;
    sync_dir(&dir).map_err(|e| Error::io("sync", &dir, e))?;
    let state = BlobState {
        held: PieceSet::empty(layout.piece_count()),
        complete: false,
        check,
        generation: 0,
    };
    let entry = Entry::new(
        key,
        Some(Arc::new(layout.clone())),
        header.len() as u64,
        Some(state),
        now_ms(),
    );
    ledger.index.insert(entry);
    reservation.commit();
    Ok(())
}

/// Verifies `data` against piece `index`'s digest and stores it.
pub(crate) fn put_piece(
    ledger: &Ledger,
    digest: &Digest,
    index: u32,
    data: &[u8],
) -> Result<PutOutcome> {
    let (entry, pin, layout) = blob_entry(ledger, digest)?;
    verify_piece(digest, &layout, index, data)?;
    put_piece_verified(ledger, digest, &entry, &layout, index, data, pin)
}

fn put_piece_verified(
    ledger: &Ledger,
    digest: &Digest,
    entry: &Arc<Entry>,
    layout: &PieceLayout,
    index: u32,
    data: &[u8],
    _pin: PinGuard,
) -> Result<PutOutcome> {
    if held(entry, index) {
        entry.touch();
        return Ok(PutOutcome::AlreadyHeld);
    }
    let cost = data.len() as u64 + RECORD_LEN as u64;
    let reservation = ledger.reserve(cost)?;
    let paths = &ledger.paths;
    let (data_path, meta_path) = (paths.data(digest), paths.meta(digest));
    let offset = layout.piece_offset(index);
    let gone = || Error::UnknownBlob {
        blob: digest.to_string(),
    };
    let file = match OpenOptions::new().write(true).open(&data_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(gone()),
        Err(e) => return Err(Error::io("open", &data_path, e)),
    };
    // No fsync: every read verifies the bytes, so a piece whose write a power loss cut
    // short is refetched, never served (docs/store.md, "Crash safety").
    ledger.on_full(&data_path, data.len() as u64, "write", || {
        file.write_all_at(data, offset)
    })?;
    let mut st = lock(&entry.state);
    if st.removed {
        return Err(gone());
    }
    let Some(blob) = st.blob.as_mut() else {
        return Err(gone());
    };
    if blob.held.contains(index) {
        return Ok(PutOutcome::AlreadyHeld);
    }
    let record = journal::encode_record(&blob.check, RecordKind::Held, index);
    ledger.on_full(&meta_path, RECORD_LEN as u64, "append to", || {
        let mut meta = OpenOptions::new().append(true).open(&meta_path)?;
        meta.write_all(&record)
    })?;
    blob.held.insert(index);
    blob.generation += 1;
    st.bytes += cost;
    reservation.commit();
    entry.touch();
    Ok(PutOutcome::Stored)
}

/// Stores piece bytes that the caller already verified with [`verify_piece`].
pub(crate) fn put_verified(
    ledger: &Ledger,
    digest: &Digest,
    index: u32,
    data: &[u8],
) -> Result<PutOutcome> {
    let (entry, pin, layout) = blob_entry(ledger, digest)?;
    put_piece_verified(ledger, digest, &entry, &layout, index, data, pin)
}

/// What the store holds of a blob, if it knows the blob.
pub(crate) fn blob_status(ledger: &Ledger, digest: &Digest) -> Option<BlobStatus> {
    let entry = ledger.entry(&EntryKey::Blob(*digest))?;
    let st = lock(&entry.state);
    let blob = st.blob.as_ref()?;
    Some(BlobStatus {
        layout: entry.layout.clone()?,
        held: blob.held.clone(),
        complete: blob.complete,
    })
}

/// Checks the whole blob against its sha256 once every piece is held, then marks it complete.
/// On a mismatch the blob is dropped ([`Error::BlobDigestMismatch`]): its piece table was wrong.
pub(crate) fn complete_blob(ledger: &Ledger, digest: &Digest) -> Result<()> {
    let (entry, _pin, layout) = blob_entry(ledger, digest)?;
    let (complete, missing) = match lock(&entry.state).blob.as_ref() {
        Some(b) => (b.complete, b.held.len() - b.held.held()),
        None => (false, layout.piece_count()),
    };
    if complete {
        return Ok(());
    }
    if missing > 0 {
        return Err(Error::Incomplete {
            blob: digest.to_string(),
            missing,
        });
    }
    // Waits for a digest_ahead running now, then hashes what it has not.
    let actual: [u8; 32] = {
        let mut ahead = lock(&entry.digest);
        let state = ahead.get_or_insert_with(Box::default);
        hash_held(ledger, digest, &entry, &layout, state)?;
        let sha = ahead.take().map(|s| s.sha).unwrap_or_default();
        sha.finalize().into()
    };
    if &actual != digest.as_bytes() {
        tracing::warn!(blob = %digest, "whole blob does not match its digest; dropped");
        Counters::bump(&ledger.counters.corruptions);
        ledger.remove_entry(&entry, true);
        return Err(Error::BlobDigestMismatch {
            blob: digest.to_string(),
            actual: hex::encode(actual),
        });
    }
    let meta_path = ledger.paths.meta(digest);
    let mut st = lock(&entry.state);
    let Some(blob) = st.blob.as_mut() else {
        return Err(Error::UnknownBlob {
            blob: digest.to_string(),
        });
    };
    if !blob.held.is_complete() {
        return Err(Error::Incomplete {
            blob: digest.to_string(),
            missing: blob.held.len() - blob.held.held(),
        });
    }
    let record = journal::encode_record(&blob.check, RecordKind::Complete, 0);
    ledger.on_full(&meta_path, RECORD_LEN as u64, "append to", || {
        let mut meta = OpenOptions::new().append(true).open(&meta_path)?;
        meta.write_all(&record)?;
        meta.sync_data()
    })?;
    blob.complete = true;
    st.bytes += RECORD_LEN as u64;
    drop(st);
    ledger.add_used(RECORD_LEN as u64);
    Ok(())
}

/// Hashes the blob's held pieces into its whole-blob sha256, in order, as far as they go
/// without a gap; [`Store::complete_blob`] then hashes only the rest. Call it as pieces
/// land (it returns at once if another call is hashing this blob); the reads are verified
/// like any other.
pub(crate) fn digest_ahead(ledger: &Ledger, digest: &Digest) -> Result<()> {
    let (entry, _pin, layout) = blob_entry(ledger, digest)?;
    let Ok(mut ahead) = entry.digest.try_lock() else {
        return Ok(());
    };
    if lock(&entry.state).blob.as_ref().is_none_or(|b| b.complete) {
        return Ok(());
    }
    let state = ahead.get_or_insert_with(Box::default);
    hash_held(ledger, digest, &entry, &layout, state)
}

/// Advances `state` over the held pieces from `state.next` on, up to the first missing one.
fn hash_held(
    ledger: &Ledger,
    digest: &Digest,
    entry: &Arc<Entry>,
    layout: &PieceLayout,
    state: &mut DigestAhead,
) -> Result<()> {
    if state.next >= layout.piece_count() || !held(entry, state.next) {
        return Ok(());
    }
    let path = ledger.paths.data(digest);
    let file = match File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    let mut buf = vec![0u8; layout.piece_size() as usize];
    while state.next < layout.piece_count() && held(entry, state.next) {
        let index = state.next;
        let len = layout.piece_len(index).unwrap_or(0) as usize;
        let piece = buf.get_mut(..len).ok_or_else(|| Error::InvalidLayout {
            blob: digest.to_string(),
            reason: format!("piece {index} is longer than the piece size"),
        })?;
        read_verified(ledger, digest, entry, layout, file.as_ref(), index, piece)?;
        state.sha.update(&*piece);
        state.next += 1;
    }
    Ok(())
}

/// Removes a blob and its files; fails with [`Error::Pinned`] while someone pins it.
pub(crate) fn remove_blob(ledger: &Ledger, digest: &Digest) -> Result<()> {
    let Some(entry) = ledger.entry(&EntryKey::Blob(*digest)) else {
        return Ok(());
    };
    match ledger.remove_entry(&entry, false) {
        Some(_) => Ok(()),
        None if entry.is_pinned() => Err(Error::Pinned {
            item: digest.to_string(),
        }),
        None => Ok(()),
    }
}

/// Pins a blob so eviction leaves it alone while the guard lives (e.g. during its download).
pub(crate) fn pin_blob(ledger: &Ledger, digest: &Digest) -> Result<PinGuard> {
    let (_, pin, _) = blob_entry(ledger, digest)?;
    Ok(pin)
}

/// Moves a data file into place as blob `digest` with `layout`: a whole blob (an import,
/// its sha256 matched) replaces what the store had; a partial one (pieces verified by the
/// caller) is installed only if the store does not know the blob yet (returns false).
pub(crate) fn install_blob(
    ledger: &Ledger,
    digest: &Digest,
    layout: PieceLayout,
    data_tmp: &std::path::Path,
    install: Install,
) -> Result<bool> {
    let key = EntryKey::Blob(*digest);
    let (held, complete) = match install {
        Install::Whole => {
            let mut held = PieceSet::empty(layout.piece_count());
            for i in 0..layout.piece_count() {
                held.insert(i);
            }
            (held, true)
        }
        Install::Partial(held) => (held, false),
    };
    let meta = journal::encode_compact(digest, &layout, &held, complete);
    let data_bytes: u64 = held.iter().filter_map(|i| layout.piece_len(i)).sum();
    let reservation = ledger.reserve(data_bytes + meta.len() as u64)?;
    let paths = &ledger.paths;
    let (dir, meta_path, data_path) = (
        paths.blob_dir(digest),
        paths.meta(digest),
        paths.data(digest),
    );
    fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
    let meta_tmp = paths.temp();
    ledger
        .on_full(&meta_path, meta.len() as u64, "write", || {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&meta_tmp)?;
            f.write_all(&meta)?;
            f.sync_data()
        })
        .inspect_err(|_| {
            let _ = fs::remove_file(&meta_tmp);
        })?;
    let _stripe = lock(ledger.index.stripe(&key));
    if let Some(old) = ledger.entry(&key) {
        if !complete {
            // A partial blob never replaces what the store has: the caller moves its pieces.
            let _ = fs::remove_file(&meta_tmp);
            return Ok(false);
        }
        if ledger.remove_entry_locked(&old, false).is_none() {
            let _ = fs::remove_file(&meta_tmp);
            return Err(Error::Pinned {
                item: digest.to_string(),
            });
        }
    }
    // Data first, then the metadata that names it: a crash between leaves an orphan data file.
    fs::rename(data_tmp, &data_path).map_err(|e| Error::io("rename into", &data_path, e))?;
    fs::rename(&meta_tmp, &meta_path).map_err(|e| Error::io("rename into", &meta_path, e))?;
    sync_dir(&dir).map_err(|e| Error::io("sync", &dir, e))?;
    let check = journal::decode(digest, &meta)
        .map(|r| r.check)
        .map_err(|reason| Error::InvalidLayout {
            blob: digest.to_string(),
            reason,
        })?;
    let state = BlobState {
        held,
        complete,
        check,
        generation: 0,
    };
    let bytes = data_bytes + meta.len() as u64;
    let entry = Entry::new(key, Some(Arc::new(layout)), bytes, Some(state), now_ms());
    ledger.index.insert(entry);
    reservation.commit();
    Ok(true)
}

fn held(entry: &Entry, index: u32) -> bool {
    lock(&entry.state)
        .blob
        .as_ref()
        .is_some_and(|b| b.held.contains(index))
}

/// Checks piece bytes against the layout: index in range, exact length, BLAKE3 digest.
pub fn verify_piece(digest: &Digest, layout: &PieceLayout, index: u32, data: &[u8]) -> Result<()> {
    let item = || format!("piece {index} of {digest}");
    let len = checked_piece_len(digest, layout, index)?;
    if data.len() as u64 != len {
        return Err(Error::OutOfRange {
            item: item(),
            reason: format!("expected {len} bytes, got {}", data.len()),
        });
    }
    if layout.piece_hash(index) != Some(&Blake3Hash::of(data)) {
        return Err(Error::HashMismatch { item: item() });
    }
    Ok(())
}
