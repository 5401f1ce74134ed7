//! Pieces of a blob written before its piece table is known (a peer that streams pieces against
//! published hashes): a file in the store's temp directory, piece i at offset i * piece size.
//! Once the table is known the file becomes the blob's data file without being copied
//! ([`crate::Store::adopt_blob`]); a file never adopted is deleted when dropped, and the temp
//! directory is emptied when the store opens, so a crash leaves nothing behind.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::blob::{install_blob, Install};
use crate::error::{Error, Result};
use crate::index::EntryKey;
use crate::key::{Blake3Hash, Digest, PieceLayout};
use crate::ledger::Ledger;
use crate::paths::lock;
use shoal_types::PieceSet;

/// A blob's pieces staged in the store's temp directory until its piece table is known.
#[derive(Debug)]
pub struct StagedFile {
    file: File,
    /// Where it is; `None` once adopted (or removed).
    path: Mutex<Option<PathBuf>>,
}

impl StagedFile {
    /// Writes `buf` at `offset` (bytes the caller verified; see [`crate::Store::adopt_blob`]).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Reads exactly `buf.len()` bytes at `offset` (unverified: the caller checks them).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if let Some(path) = lock(&self.path).take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// A new, empty staged file in the store's temp directory.
pub(crate) fn staged_file(ledger: &Ledger) -> Result<StagedFile> {
    let path = ledger.paths.temp();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io("create", &path, e))?;
    Ok(StagedFile {
        file,
        path: Mutex::new(Some(path)),
    })
}

/// Makes `staged` the data file of blob `digest`, without copying a byte. `pieces` are
/// (index, BLAKE3) of the pieces written to it, each checked by the caller against that
/// hash before it was written; those whose hash is the layout's are held, the others left
/// out. (Every read verifies the bytes again, as for any piece.) Returns false, adopting
/// nothing, when the store knows the blob already: the caller then puts the pieces one by
/// one. The file stays readable and writable through `staged`; pieces written to it later
/// are not held until put.
pub(crate) fn adopt_blob(
    ledger: &Ledger,
    digest: &Digest,
    layout: PieceLayout,
    staged: &StagedFile,
    pieces: &[(u32, Blake3Hash)],
) -> Result<bool> {
    if ledger.entry(&EntryKey::Blob(*digest)).is_some() {
        return Ok(false);
    }
    let mut held = PieceSet::empty(layout.piece_count());
    for (i, hash) in pieces {
        if layout.piece_hash(*i) == Some(hash) {
            held.insert(*i);
        }
    }
    let mut path = lock(&staged.path);
    let Some(at) = path.clone() else {
        return Ok(false);
    };
    // Not synced: the blob is not complete yet, and its pieces are verified on every read
    // (docs/store.md, "Crash safety").
    let adopted = install_blob(ledger, digest, layout, &at, Install::Partial(held))?;
    if adopted {
        *path = None;
    }
    Ok(adopted)
}
