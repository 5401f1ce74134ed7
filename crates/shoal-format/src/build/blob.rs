//! The data-blob writer: copies the referenced chunks out of the spill into one OCI blob, computing
//! its sha256 (OCI digest) and its piece table (BLAKE3 per fixed-size piece) on the way.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::chunker::SpillChunk;
use crate::error::{Error, Result};
use crate::model::{Blake3, BlobInfo};
use crate::oci;

/// Hashes a byte stream into a sha256 and a piece table.
pub(crate) struct PieceHasher {
    sha: Sha256,
    piece: blake3::Hasher,
    in_piece: u64,
    piece_size: u64,
    size: u64,
    pieces: Vec<Blake3>,
}

impl PieceHasher {
    /// A hasher for pieces of `piece_size` bytes.
    pub fn new(piece_size: u32) -> Self {
        PieceHasher {
            sha: Sha256::new(),
            piece: blake3::Hasher::new(),
            in_piece: 0,
            piece_size: u64::from(piece_size),
            size: 0,
            pieces: Vec::new(),
        }
    }

    /// Feeds the next bytes of the blob.
    pub fn update(&mut self, mut data: &[u8]) {
        self.sha.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = usize::try_from(self.piece_size - self.in_piece).unwrap_or(usize::MAX);
            let n = room.min(data.len());
            self.piece.update(&data[..n]);
            self.in_piece += n as u64;
            data = &data[n..];
            if self.in_piece == self.piece_size {
                self.pieces.push(*self.piece.finalize().as_bytes());
                self.piece.reset();
                self.in_piece = 0;
            }
        }
    }

    /// The blob's digest, size, piece size and pieces.
    pub fn finish(mut self) -> BlobInfo {
        if self.in_piece > 0 {
            self.pieces.push(*self.piece.finalize().as_bytes());
        }
        BlobInfo {
            digest: self.sha.finalize().into(),
            size: self.size,
            piece_size: self.piece_size as u32,
            pieces: self.pieces,
        }
    }
}

/// Writes the chunks `order` (from the spill) back to back into a new blob in the layout `dir`;
/// returns the blob and each chunk's offset in it, in `order`.
pub(crate) fn write_data_blob(
    dir: &Path,
    spill: &File,
    order: &[SpillChunk],
    piece_size: u32,
) -> Result<(BlobInfo, Vec<u64>)> {
    let blobs = oci::blobs_dir(dir);
    let tmp = tempfile::NamedTempFile::new_in(&blobs).map_err(|e| Error::Io {
        op: "creating data blob in",
        path: blobs.clone(),
        source: e,
    })?;
    let mut out = BufWriter::with_capacity(4 << 20, tmp.as_file());
    let mut hasher = PieceHasher::new(piece_size);
    let mut offsets = Vec::with_capacity(order.len());
    let mut pos = 0u64;
    let mut buf = Vec::new();
    let spill_err = |e| Error::Io {
        op: "reading chunk spill file",
        path: "<temporary>".into(),
        source: e,
    };
    for c in order {
        buf.resize(c.stored_size as usize, 0);
        spill.read_exact_at(&mut buf, c.offset).map_err(spill_err)?;
        hasher.update(&buf);
        out.write_all(&buf).map_err(|e| Error::Io {
            op: "writing data blob",
            path: tmp.path().into(),
            source: e,
        })?;
        offsets.push(pos);
        pos += buf.len() as u64;
    }
    out.flush().map_err(|e| Error::Io {
        op: "writing data blob",
        path: tmp.path().into(),
        source: e,
    })?;
    drop(out);
    let info = hasher.finish();
    oci::persist_blob(dir, tmp, &info.digest)?;
    Ok((info, offsets))
}
