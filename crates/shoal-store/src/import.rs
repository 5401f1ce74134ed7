//! Whole blobs from a stream (a seed fetching from origin): hashed while written, installed only if
//! the sha256 matches, with the piece table computed on the way.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;

use sha2::Digest as _;

use crate::blob::{blob_status, install_blob, Install};
use crate::error::{Error, Result};
use crate::key::{Blake3Hash, Digest, PieceLayout, MAX_PIECES, MAX_PIECE_SIZE, MIN_PIECE_SIZE};
use crate::ledger::Ledger;

/// Deletes a temporary file unless it was moved into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Streams a whole blob from `reader` into the store, computing its piece table with
/// `piece_size`. It becomes visible, complete, only if its sha256 equals `digest`.
/// Returns the computed layout (the seed publishes it). An already complete blob is kept.
pub(crate) fn import_blob(
    ledger: &Ledger,
    digest: &Digest,
    piece_size: u32,
    reader: &mut dyn Read,
) -> Result<PieceLayout> {
    if let Some(status) = blob_status(ledger, digest) {
        if status.complete {
            return Ok((*status.layout).clone());
        }
    }
    if !piece_size.is_power_of_two() || !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&piece_size) {
        return Err(Error::InvalidLayout {
            blob: digest.to_string(),
            reason: format!("piece size {piece_size} is not a power of two from {MIN_PIECE_SIZE} to {MAX_PIECE_SIZE}"),
        });
    }
    let path = ledger.paths.temp();
    let mut temp = TempFile(Some(path.clone()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io("create", &path, e))?;
    let mut sha = sha2::Sha256::new();
    let mut pieces = Vec::new();
    let mut buf = vec![0u8; piece_size as usize];
    let mut size = 0u64;
    loop {
        let n = read_full(reader, &mut buf).map_err(|e| Error::Fetch {
            item: digest.to_string(),
            source: Box::new(e),
        })?;
        if n == 0 {
            break;
        }
        if pieces.len() >= MAX_PIECES as usize {
            return Err(Error::OutOfRange {
                item: digest.to_string(),
                reason: format!("more than {MAX_PIECES} pieces of {piece_size} bytes"),
            });
        }
        let piece = &buf[..n];
        sha.update(piece);
        pieces.push(Blake3Hash::of(piece));
        ledger.on_full(&path, n as u64, "write", || file.write_all(piece))?;
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    let actual: [u8; 32] = sha.finalize().into();
    if &actual != digest.as_bytes() {
        return Err(Error::BlobDigestMismatch {
            blob: digest.to_string(),
            actual: hex::encode(actual),
        });
    }
    file.sync_data().map_err(|e| Error::io("sync", &path, e))?;
    drop(file);
    let layout = PieceLayout::new(digest, size, piece_size, pieces)?;
    install_blob(ledger, digest, layout.clone(), &path, Install::Whole)?;
    temp.0 = None;
    Ok(layout)
}
