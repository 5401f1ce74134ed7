//! A converted Shoal image inside an OCI layout: find its manifest, check and load its bootstrap,
//! locate its data blobs, and summarise it (`shoal image inspect`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageManifest};
use serde::Serialize;

use crate::bootstrap::Bootstrap;
use crate::error::{Error, Result};
use crate::model::{ImageMeta, Payload};
use crate::oci::{self, LayoutRef};

/// Largest bootstrap blob we read into memory.
const MAX_BOOTSTRAP: u64 = 4 << 30;

/// An opened Shoal image: its manifest, verified bootstrap and metadata.
pub struct ShoalImage {
    /// The layout directory.
    pub dir: PathBuf,
    /// The manifest's descriptor (its digest names the image in the registry).
    pub manifest_desc: Descriptor,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The bootstrap layer's descriptor.
    pub bootstrap_desc: Descriptor,
    /// The loaded bootstrap (checked against the manifest's sha256 before loading).
    pub bootstrap: Bootstrap,
    /// The owned metadata.
    pub meta: ImageMeta,
}

/// The bootstrap layer of a Shoal image, found by its media type (docs/format.md, "OCI image");
/// `Ok(None)` for any other image. `name` (the manifest's digest or reference) goes into errors.
///
/// Refuses a manifest in the layout of earlier Shoal versions (Shoal config, bootstrap first) with
/// an error that says to convert the image again, and one whose Shoal layers do not add up to an
/// image (several bootstraps, data blobs without a bootstrap).
pub fn find_bootstrap<'m>(
    name: &str,
    manifest: &'m ImageManifest,
) -> Result<Option<&'m Descriptor>> {
    let refuse = |reason: String| Error::ImageLayout {
        manifest: name.to_string(),
        reason,
    };
    let media = |d: &Descriptor| d.media_type().to_string();
    let legacy = std::iter::once(manifest.config())
        .chain(manifest.layers())
        .any(|d| oci::LEGACY_MEDIA_TYPES.contains(&media(d).as_str()));
    if legacy {
        return Err(refuse(
            "a Shoal image in the layout of earlier Shoal versions (a Shoal config, the bootstrap as \
             first layer), which containerd cannot pull and this version does not read: convert the \
             source image again with `shoal image convert`"
                .into(),
        ));
    }
    let mut boots = manifest
        .layers()
        .iter()
        .filter(|l| media(l) == oci::MEDIA_BOOTSTRAP);
    let (first, more) = (boots.next(), boots.count());
    if more > 0 {
        return Err(refuse(format!(
            "{} Shoal bootstrap layers; a Shoal image has exactly one",
            more + 1
        )));
    }
    if first.is_none()
        && manifest
            .layers()
            .iter()
            .any(|l| media(l) == oci::MEDIA_BLOB)
    {
        return Err(refuse(
            "Shoal data blob layers but no bootstrap layer: the manifest is incomplete".into(),
        ));
    }
    Ok(first)
}

impl ShoalImage {
    /// Opens `oci:DIR[:TAG]`: the bootstrap's sha256 must match the manifest, then it is loaded.
    pub fn open(r: &LayoutRef) -> Result<ShoalImage> {
        let (manifest_desc, manifest) = oci::resolve(r)?;
        let name = manifest_desc.digest().to_string();
        let bootstrap_desc = find_bootstrap(&name, &manifest)?
            .cloned()
            .ok_or_else(|| Error::Oci {
                path: r.dir.clone(),
                reason: format!(
                    "manifest {name} is not a Shoal image (no bootstrap layer): convert it with `shoal image convert`"
                ),
            })?;
        let bytes =
            oci::read_blob(&r.dir, &bootstrap_desc, MAX_BOOTSTRAP).map_err(|e| Error::Verify {
                object: format!("bootstrap {}", bootstrap_desc.digest()),
                reason: e.to_string(),
            })?;
        let bootstrap = Bootstrap::load(bytes).map_err(|e| Error::Verify {
            object: format!("bootstrap {}", bootstrap_desc.digest()),
            reason: e.to_string(),
        })?;
        let meta = bootstrap.to_meta();
        Ok(ShoalImage {
            dir: r.dir.clone(),
            manifest_desc,
            manifest,
            bootstrap_desc,
            bootstrap,
            meta,
        })
    }

    /// The file holding data blob `i` of the metadata.
    pub fn blob_path(&self, i: usize) -> Option<PathBuf> {
        self.meta
            .blobs
            .get(i)
            .map(|b| oci::blob_path(&self.dir, &b.digest))
    }

    /// Counts and sizes for `shoal image inspect`.
    pub fn summary(&self) -> Summary {
        let mut s = summarize(&self.meta);
        s.manifest = self.manifest_desc.digest().to_string();
        s.bootstrap = self.bootstrap_desc.digest().to_string();
        s.bootstrap_size = self.bootstrap_desc.size();
        s
    }
}

/// What `shoal image inspect` prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Manifest digest.
    pub manifest: String,
    /// Bootstrap digest.
    pub bootstrap: String,
    /// Bootstrap size in bytes.
    pub bootstrap_size: u64,
    /// Merkle root hash (hex).
    pub root: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Inodes of each kind.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Devices, fifos.
    pub special: u64,
    /// Sum of regular file sizes (each inode once).
    pub file_bytes: u64,
    /// Chunk references across all files.
    pub chunk_refs: u64,
    /// Unique chunks.
    pub unique_chunks: u64,
    /// Uncompressed bytes of the unique chunks.
    pub unique_bytes: u64,
    /// Stored (compressed) bytes of the unique chunks.
    pub stored_bytes: u64,
    /// `file_bytes / unique_bytes`.
    pub dedup_ratio: f64,
    /// Data blobs: digest and size.
    pub blobs: Vec<(String, u64)>,
    /// Prefetch list length.
    pub prefetch: u64,
}

/// Counts and sizes of an image's metadata.
pub fn summarize(meta: &ImageMeta) -> Summary {
    let mut s = Summary {
        chunk_size: meta.chunk_size,
        ..Summary::default()
    };
    for inode in &meta.inodes {
        match &inode.payload {
            Payload::Dir(_) => s.dirs += 1,
            Payload::File(f) => {
                s.files += 1;
                s.file_bytes += f.size;
                s.chunk_refs += f.chunks.len() as u64;
            }
            Payload::Symlink(_) => s.symlinks += 1,
            Payload::Device(_) | Payload::Special => s.special += 1,
        }
    }
    let mut seen = HashSet::new();
    for c in &meta.chunks {
        if seen.insert(c.hash) {
            s.unique_chunks += 1;
            s.unique_bytes += u64::from(c.size);
            s.stored_bytes += u64::from(c.stored_size);
        }
    }
    s.dedup_ratio = if s.unique_bytes == 0 {
        1.0
    } else {
        s.file_bytes as f64 / s.unique_bytes as f64
    };
    s.root = meta
        .inodes
        .first()
        .map(|i| hex::encode(i.hash))
        .unwrap_or_default();
    s.blobs = meta
        .blobs
        .iter()
        .map(|b| (oci::digest_string(&b.digest), b.size))
        .collect();
    s.prefetch = meta.prefetch.len() as u64;
    s
}

/// Opens the data blob file of blob `i` for reading.
pub fn open_blob(dir: &Path, meta: &ImageMeta, i: usize) -> Result<std::fs::File> {
    let b = meta
        .blobs
        .get(i)
        .ok_or_else(|| Error::InvalidBootstrap(format!("chunk refers to missing blob {i}")))?;
    let path = oci::blob_path(dir, &b.digest);
    std::fs::File::open(&path).map_err(|e| Error::Verify {
        object: format!("blob {}", oci::digest_string(&b.digest)),
        reason: format!("cannot open {}: {e}", path.display()),
    })
}

/// Reads chunk `c` from its open blob file, decompresses it and checks its BLAKE3.
pub fn read_chunk(
    file: &std::fs::File,
    c: &crate::model::ChunkInfo,
) -> std::result::Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    // Stored forms are never much larger than a 16 MiB chunk.
    if c.stored_size > 32 << 20 || c.size > 16 << 20 {
        return Err(format!(
            "stored size {} or size {} out of range",
            c.stored_size, c.size
        ));
    }
    let mut stored = vec![0u8; c.stored_size as usize];
    file.read_exact_at(&mut stored, c.offset)
        .map_err(|e| format!("reading {} bytes at {}: {e}", c.stored_size, c.offset))?;
    decode_chunk(&c.hash, c.size, c.encoding, stored)
}

/// Decodes a chunk's stored form (`stored`, as read from its blob) and checks that it is `size`
/// bytes whose BLAKE3 is `hash`, the chunk's name. The one check between any source and a reader.
pub fn decode_chunk(
    hash: &crate::model::Blake3,
    size: u32,
    encoding: crate::model::ChunkEncoding,
    stored: Vec<u8>,
) -> std::result::Result<Vec<u8>, String> {
    let data = match encoding {
        crate::model::ChunkEncoding::Raw => stored,
        crate::model::ChunkEncoding::Zstd => {
            zstd::bulk::decompress(&stored, size as usize).map_err(|e| format!("zstd: {e}"))?
        }
    };
    if data.len() != size as usize {
        return Err(format!(
            "decompressed to {} bytes, expected {size}",
            data.len()
        ));
    }
    if *blake3::hash(&data).as_bytes() != *hash {
        return Err("BLAKE3 of the content does not match the chunk's name".into());
    }
    Ok(data)
}

/// The path of every inode reachable from the root (first name for hardlinks), `/`-rooted.
pub fn inode_paths(meta: &ImageMeta) -> Vec<Option<Vec<u8>>> {
    let mut paths: Vec<Option<Vec<u8>>> = vec![None; meta.inodes.len()];
    if let Some(p) = paths.first_mut() {
        *p = Some(b"/".to_vec());
    }
    let mut stack = vec![0usize];
    while let Some(i) = stack.pop() {
        let Some(Payload::Dir(entries)) = meta.inodes.get(i).map(|n| &n.payload) else {
            continue;
        };
        let base = paths[i].clone().unwrap_or_default();
        for e in entries {
            let child = e.inode as usize;
            if paths.get(child).is_some_and(|p| p.is_none()) {
                let mut p = base.clone();
                if p.len() > 1 {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                paths[child] = Some(p);
                stack.push(child);
            }
        }
    }
    paths
}
