//! `shoal image verify`: recompute every hash of an image from its blobs — the bootstrap's sha256
//! against the manifest, the Merkle tree, each data blob's sha256 and piece table, and every chunk
//! (decompressed, BLAKE3) — and name the first object that does not match.

use std::fs::File;
use std::io::Read;

use rayon::prelude::*;
use serde::Serialize;

use crate::build::PieceHasher;
use crate::error::{Error, Result};
use crate::image::{self, ShoalImage};
use crate::model::{ImageMeta, Payload};
use crate::oci::{self, LayoutRef};

/// What a successful verification covered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Inodes whose Merkle hashes were recomputed.
    pub inodes: u64,
    /// Data blobs checked (sha256 and pieces).
    pub blobs: u64,
    /// Bytes of data blobs read.
    pub blob_bytes: u64,
    /// Pieces checked.
    pub pieces: u64,
    /// Chunks decompressed and hashed.
    pub chunks: u64,
    /// The verified Merkle root (hex).
    pub root: String,
}

fn fail(object: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Verify {
        object: object.into(),
        reason: reason.into(),
    }
}

/// Verifies the Shoal image `r`; the error names the first bad object.
pub fn verify(r: &LayoutRef) -> Result<VerifyReport> {
    let img = ShoalImage::open(r)?;
    let meta = &img.meta;
    let root = crate::merkle::check(meta).map_err(|e| fail("Merkle tree", e.to_string()))?;
    let mut report = VerifyReport {
        inodes: meta.inodes.len() as u64,
        root: hex::encode(root),
        ..Default::default()
    };

    check_layout(&img, &report.root)?;

    for (i, b) in meta.blobs.iter().enumerate() {
        let name = format!("blob {}", oci::digest_string(&b.digest));
        let mut f = image::open_blob(&img.dir, meta, i)?;
        let mut h = PieceHasher::new(b.piece_size);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| fail(&name, format!("reading: {e}")))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let got = h.finish();
        if let Some(p) = got.pieces.iter().zip(&b.pieces).position(|(a, e)| a != e) {
            return Err(fail(
                &name,
                format!(
                    "piece {p} (bytes from {}) does not match the piece table",
                    p as u64 * u64::from(b.piece_size)
                ),
            ));
        }
        if got.size != b.size || got.pieces.len() != b.pieces.len() {
            return Err(fail(
                &name,
                format!("blob is {} bytes, the image says {}", got.size, b.size),
            ));
        }
        if got.digest != b.digest {
            return Err(fail(
                &name,
                format!("content has sha256:{}", hex::encode(got.digest)),
            ));
        }
        report.blobs += 1;
        report.blob_bytes += got.size;
        report.pieces += got.pieces.len() as u64;
    }

    let files: Vec<File> = (0..meta.blobs.len())
        .map(|i| image::open_blob(&img.dir, meta, i))
        .collect::<Result<_>>()?;
    let bad = meta
        .chunks
        .par_iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let res = match files.get(c.blob as usize) {
                Some(_) => image::read_chunk(meta, &files, c).err(),
                None => Some(format!(
                    "refers to blob {} which the image does not list",
                    c.blob
                )),
            };
            res.map(|reason| (i, reason))
        })
        .min_by_key(|(i, _)| *i);
    if let Some((i, reason)) = bad {
        let c = &meta.chunks[i];
        let blob = meta
            .blobs
            .get(c.blob as usize)
            .map(|b| oci::digest_string(&b.digest))
            .unwrap_or_default();
        return Err(fail(
            format!(
                "chunk {} (file {}, blob {blob})",
                hex::encode(c.hash),
                file_of_chunk(meta, i as u32)
            ),
            reason,
        ));
    }
    report.chunks = meta.chunks.len() as u64;
    Ok(report)
}

/// Checks the manifest and config against docs/format.md, "OCI image": the data blob layers are
/// exactly the bootstrap's blobs (digest and size, in order), the bootstrap is the last layer, the
/// layers carry the annotations the snapshotter reads, and the config has one diff_id per layer,
/// equal to the layer's digest (what containerd checks before it unpacks).
fn check_layout(img: &ShoalImage, root: &str) -> Result<()> {
    let manifest = format!("manifest {}", img.manifest_desc.digest());
    let layers = img.manifest.layers();
    let (last, blobs) = layers
        .split_last()
        .ok_or_else(|| fail(&manifest, "has no layers"))?;
    if last.digest() != img.bootstrap_desc.digest() {
        return Err(fail(&manifest, "the bootstrap is not its last layer"));
    }
    let listed: Vec<_> = blobs
        .iter()
        .map(|d| {
            (
                d.media_type().to_string(),
                oci::parse_digest(d.digest()),
                d.size(),
            )
        })
        .collect();
    let wanted: Vec<_> = img
        .meta
        .blobs
        .iter()
        .map(|b| (oci::MEDIA_BLOB.to_string(), Some(b.digest), b.size))
        .collect();
    if listed != wanted {
        return Err(fail(
            &manifest,
            "its data blob layers differ from the blobs the bootstrap lists",
        ));
    }
    let ann = |d: &oci_spec::image::Descriptor, key: &str| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(key))
            .cloned()
            .unwrap_or_default()
    };
    if let Some(d) = blobs
        .iter()
        .find(|d| ann(d, oci::ANN_LAYER) != oci::LAYER_BLOB)
    {
        return Err(fail(
            &manifest,
            format!(
                "data blob layer {} lacks the annotation {}={}",
                d.digest(),
                oci::ANN_LAYER,
                oci::LAYER_BLOB
            ),
        ));
    }
    if ann(last, oci::ANN_LAYER) != oci::LAYER_BOOTSTRAP || ann(last, oci::ANN_LAYER_ROOT) != root {
        return Err(fail(
            &manifest,
            format!(
                "the bootstrap layer lacks the annotations {}={} and {}=<root hash>",
                oci::ANN_LAYER,
                oci::LAYER_BOOTSTRAP,
                oci::ANN_LAYER_ROOT
            ),
        ));
    }
    let config = format!("config {}", img.manifest.config().digest());
    let bytes = oci::read_config(&img.dir, &img.manifest)?;
    let parsed = oci_spec::image::ImageConfiguration::from_reader(&bytes[..])
        .map_err(|e| fail(&config, format!("not an OCI image config: {e}")))?;
    let layer_digests: Vec<String> = layers.iter().map(|l| l.digest().to_string()).collect();
    if *parsed.rootfs().diff_ids() != layer_digests {
        return Err(fail(
            &config,
            "rootfs.diff_ids are not the manifest's layer digests, in order",
        ));
    }
    Ok(())
}

/// The path of the first file that uses chunk `chunk`, for error messages.
pub fn file_of_chunk(meta: &ImageMeta, chunk: u32) -> String {
    let paths = image::inode_paths(meta);
    meta.inodes
        .iter()
        .enumerate()
        .find(|(_, n)| matches!(&n.payload, Payload::File(f) if f.chunks.contains(&chunk)))
        .and_then(|(i, _)| paths.get(i).cloned().flatten())
        .map(|p| String::from_utf8_lossy(&p).into_owned())
        .unwrap_or_else(|| "<unreferenced>".into())
}
