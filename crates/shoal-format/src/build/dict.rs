//! Chunk dictionaries: earlier converted images whose chunks a new image references in their own
//! data blobs instead of storing them again.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::ShoalImage;
use crate::model::{Blake3, BlobInfo, ChunkInfo};
use crate::oci::{self, LayoutRef};

/// Every chunk of the dictionary images and the blob holding it.
#[derive(Default)]
pub(crate) struct ChunkDict {
    /// Chunk hash -> (index into `blobs`, the chunk's record in that blob).
    pub chunks: HashMap<Blake3, (usize, ChunkInfo)>,
    /// Each distinct dictionary blob and the file holding it.
    pub blobs: Vec<(BlobInfo, PathBuf)>,
}

impl ChunkDict {
    /// Opens each image (bootstrap checked against its manifest) and indexes its chunks.
    pub fn load(refs: &[LayoutRef]) -> Result<ChunkDict> {
        let mut dict = ChunkDict::default();
        let mut by_digest: HashMap<[u8; 32], usize> = HashMap::new();
        for r in refs {
            let img = ShoalImage::open(r)?;
            let mut local = Vec::with_capacity(img.meta.blobs.len());
            for b in &img.meta.blobs {
                let path = oci::blob_path(&r.dir, &b.digest);
                if !path.is_file() {
                    return Err(Error::Oci {
                        path,
                        reason: format!(
                            "chunk dictionary blob {} is missing",
                            oci::digest_string(&b.digest)
                        ),
                    });
                }
                let idx = *by_digest.entry(b.digest).or_insert_with(|| {
                    dict.blobs.push((b.clone(), path));
                    dict.blobs.len() - 1
                });
                local.push(idx);
            }
            for c in &img.meta.chunks {
                if let Some(&blob) = local.get(c.blob as usize) {
                    dict.chunks.entry(c.hash).or_insert((blob, *c));
                }
            }
        }
        Ok(dict)
    }
}

/// Puts blob `src` into layout `dir` as a hardlink (or a copy across file systems).
pub(crate) fn link_blob(src: &Path, dir: &Path, info: &BlobInfo) -> Result<()> {
    let dst = oci::blob_path(dir, &info.digest);
    if dst.exists() {
        return Ok(());
    }
    if fs::hard_link(src, &dst).is_ok() {
        return Ok(());
    }
    let tmp = tempfile::NamedTempFile::new_in(oci::blobs_dir(dir)).map_err(|e| Error::Io {
        op: "creating blob copy in",
        path: dir.into(),
        source: e,
    })?;
    fs::copy(src, tmp.path()).map_err(|e| Error::Io {
        op: "copying chunk dictionary blob",
        path: src.into(),
        source: e,
    })?;
    oci::persist_blob(dir, tmp, &info.digest)
}
