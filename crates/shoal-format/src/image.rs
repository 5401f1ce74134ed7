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

/// Reads chunk `c` of `meta` from the open blob files (`files[i]` holds blob `i`), decodes it
/// and checks its BLAKE3. A span chunk is decoded from its checkpoint, with the checkpoint's
/// window read (and checked) first.
pub fn read_chunk(
    meta: &ImageMeta,
    files: &[std::fs::File],
    c: &crate::model::ChunkInfo,
) -> std::result::Result<Vec<u8>, String> {
    let file = files
        .get(c.blob as usize)
        .ok_or_else(|| format!("refers to blob {} which the image does not list", c.blob))?;
    let stored = BlobRange {
        file,
        pos: c.offset,
    };
    let crate::model::ChunkEncoding::Span { checkpoint, .. } = c.encoding else {
        return crate::codec::decode_read(&c.hash, c.size, c.encoding, None, c.stored_size, stored);
    };
    let cp = *meta
        .checkpoints
        .get(checkpoint as usize)
        .ok_or_else(|| format!("refers to missing checkpoint {checkpoint}"))?;
    let window = match cp.kind {
        crate::model::CheckpointKind::Deflate { window, .. } => {
            let w = meta
                .chunks
                .get(window as usize)
                .filter(|w| !matches!(w.encoding, crate::model::ChunkEncoding::Span { .. }))
                .ok_or_else(|| format!("checkpoint {checkpoint} has no window chunk {window}"))?;
            Some(
                read_chunk(meta, files, w)
                    .map_err(|e| format!("window of checkpoint {checkpoint}: {e}"))?,
            )
        }
        _ => None,
    };
    let span = crate::codec::SpanStart {
        checkpoint: cp,
        window: window.as_deref(),
    };
    crate::codec::decode_read(
        &c.hash,
        c.size,
        c.encoding,
        Some(span),
        c.stored_size,
        stored,
    )
}

/// Reads a blob file from an offset on, without moving a shared file position.
struct BlobRange<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl std::io::Read for BlobRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Decodes a raw or zstd chunk's stored form (`stored`, as read from its blob) and checks that
/// it is `size` bytes whose BLAKE3 is `hash`. Span chunks need their checkpoint:
/// [`crate::codec::decode`] decodes every encoding.
pub fn decode_chunk(
    hash: &crate::model::Blake3,
    size: u32,
    encoding: crate::model::ChunkEncoding,
    stored: Vec<u8>,
) -> std::result::Result<Vec<u8>, String> {
    crate::codec::decode(hash, size, encoding, None, &stored)
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
