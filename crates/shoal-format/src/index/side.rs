//! A layer's side blob: what its bootstrap needs that is not a byte range of the original layer —
//! the windows of its deflate checkpoints and the chunks of sparse files (holes are not in the
//! tar) — each stored zstd-compressed or raw, like a data blob's chunks.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::Path;

use super::Placement;
use crate::build::PieceHasher;
use crate::error::{Error, Result};
use crate::model::{Blake3, BlobInfo, ChunkEncoding};
use crate::oci;

/// zstd level of side-blob chunks.
const LEVEL: i32 = 3;

/// Where a chunk sits in a side blob.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SideChunk {
    pub hash: Blake3,
    pub size: u32,
    pub offset: u64,
    pub stored_size: u32,
    pub encoding: ChunkEncoding,
}

/// A side blob being written into an OCI layout.
pub(crate) struct SideBlob {
    layer: u32,
    out: Option<BufWriter<tempfile::NamedTempFile>>,
    dir: std::path::PathBuf,
    pos: u64,
    seen: HashMap<Blake3, SideChunk>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::Io {
        op,
        path: path.to_path_buf(),
        source: e,
    }
}

impl SideBlob {
    /// A side blob for layer `layer`, written into layout `dir` when it gets any chunk.
    pub fn new(dir: &Path, layer: u32) -> SideBlob {
        SideBlob {
            layer,
            out: None,
            dir: dir.to_path_buf(),
            pos: 0,
            seen: HashMap::new(),
        }
    }

    /// Stores `data` (named `hash`) once; returns where.
    pub fn chunk(&mut self, hash: &Blake3, data: &[u8]) -> Result<SideChunk> {
        if let Some(c) = self.seen.get(hash) {
            return Ok(*c);
        }
        if self.out.is_none() {
            let blobs = oci::blobs_dir(&self.dir);
            let tmp = tempfile::NamedTempFile::new_in(&blobs)
                .map_err(io_err("creating side blob in", &blobs))?;
            self.out = Some(BufWriter::new(tmp));
        }
        let compressed = zstd::bulk::compress(data, LEVEL).ok();
        let (stored, encoding) = match &compressed {
            Some(c) if c.len() < data.len() => (&c[..], ChunkEncoding::Zstd),
            _ => (data, ChunkEncoding::Raw),
        };
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| Error::BadOption("side blob closed".into()))?;
        out.write_all(stored)
            .map_err(io_err("writing side blob in", &self.dir))?;
        let c = SideChunk {
            hash: *hash,
            size: data.len() as u32,
            offset: self.pos,
            stored_size: stored.len() as u32,
            encoding,
        };
        self.pos += stored.len() as u64;
        self.seen.insert(*hash, c);
        Ok(c)
    }

    /// Stores a file chunk; returns its placement.
    pub fn add(&mut self, hash: &Blake3, data: &[u8]) -> Result<Placement> {
        let c = self.chunk(hash, data)?;
        Ok(Placement::Side {
            layer: self.layer,
            chunk: c,
        })
    }

    /// Finishes the blob (digest, piece table with `piece_size(size)`) and moves it to its place
    /// in the layout; `None` when nothing was stored.
    pub fn finish(self, piece_size: impl Fn(u64) -> u32) -> Result<Option<BlobInfo>> {
        let Some(out) = self.out else {
            return Ok(None);
        };
        let tmp = out.into_inner().map_err(|e| Error::Io {
            op: "writing side blob in",
            path: self.dir.clone(),
            source: e.into_error(),
        })?;
        let mut file: &File = tmp.as_file();
        file.rewind()
            .map_err(io_err("reading side blob in", &self.dir))?;
        let mut h = PieceHasher::new(piece_size(self.pos));
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(io_err("reading side blob in", &self.dir))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let info = h.finish();
        oci::persist_blob(&self.dir, tmp, &info.digest)?;
        Ok(Some(info))
    }
}
