//! The index as an OCI artifact: a manifest whose `subject` is the image manifest, whose
//! `artifactType` names a Shoal index, with an empty config and, per image layer in order, the
//! layer's bootstrap and (when it has one) its side blob. In an OCI layout it is listed in
//! `index.json` untagged; in a registry it is found through the referrers API or the OCI 1.1
//! referrers tag scheme (docs/format.md, "Layer index").

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageManifest, ImageManifestBuilder, MediaType};

use super::{IndexOptions, LayerIndex};
use crate::bootstrap::Bootstrap;
use crate::error::{Error, Result};
use crate::model::{ImageMeta, Sha256};
use crate::oci::{self, LayoutRef};

/// `artifactType` of a Shoal index.
pub const ARTIFACT_TYPE: &str = "application/vnd.shoal.index.v1";
/// Media type of a layer's bootstrap in an index.
pub const MEDIA_LAYER_BOOTSTRAP: &str = "application/vnd.shoal.index.bootstrap.v1";
/// Media type of a layer's side blob (deflate windows, chunks of sparse files).
pub const MEDIA_SIDE_BLOB: &str = "application/vnd.shoal.index.side.v1";
/// The empty config of an artifact (OCI 1.1).
pub const MEDIA_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Bootstrap and side blob annotation: the digest of the image layer they describe.
pub const ANN_LAYER: &str = "dev.shoal.index.layer";
/// Bootstrap annotation: the layer's compression (`none`, `gzip`, `zstd`).
pub const ANN_COMPRESSION: &str = "dev.shoal.index.compression";
/// Bootstrap annotation: the checkpoints the layer's chunks start from.
pub const ANN_CHECKPOINTS: &str = "dev.shoal.index.checkpoints";
/// Bootstrap annotation: `true`, or `false` for a layer read from its start (one zstd frame).
pub const ANN_LAZY: &str = "dev.shoal.index.lazy";
/// Manifest annotation: the checkpoint span in compressed bytes.
pub const ANN_SPAN: &str = "dev.shoal.index.span";
/// `index.json` annotation of a referrer: its subject's digest.
pub const ANN_SUBJECT: &str = "dev.shoal.index.subject";

/// Writes the artifact for `layers` (indexed into `dir`) with subject `subject` into the OCI
/// layout `dir`, listed untagged in its `index.json`; returns its descriptor.
pub fn write(
    dir: &Path,
    subject: &Descriptor,
    layers: &[LayerIndex],
    opts: &IndexOptions,
) -> Result<Descriptor> {
    let config = oci::write_blob(dir, MEDIA_EMPTY, b"{}")?;
    let mut descs = Vec::new();
    for l in layers {
        let digest = |s: &str| {
            oci::parse_digest(
                &s.parse()
                    .map_err(|e| bad(dir, format!("digest {s}: {e}")))?,
            )
            .ok_or_else(|| bad(dir, format!("digest {s}")))
        };
        let mut boot = oci::descriptor(
            MEDIA_LAYER_BOOTSTRAP,
            &digest(&l.bootstrap.0)?,
            l.bootstrap.1,
        )?;
        boot.set_annotations(Some(HashMap::from([
            (ANN_LAYER.to_string(), l.layer.clone()),
            (
                ANN_COMPRESSION.to_string(),
                format!("{:?}", l.compression).to_lowercase(),
            ),
            (ANN_CHECKPOINTS.to_string(), l.checkpoints.to_string()),
            (ANN_LAZY.to_string(), l.lazy.to_string()),
            (oci::ANN_ROOT.to_string(), l.root.clone()),
        ])));
        descs.push(boot);
        if let Some((d, size)) = &l.side_blob {
            let mut side = oci::descriptor(MEDIA_SIDE_BLOB, &digest(d)?, *size)?;
            side.set_annotations(Some(HashMap::from([(
                ANN_LAYER.to_string(),
                l.layer.clone(),
            )])));
            descs.push(side);
        }
    }
    let mut subject = subject.clone();
    subject.set_annotations(None);
    subject.set_platform(None);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(MediaType::from(ARTIFACT_TYPE))
        .config(config)
        .layers(descs)
        .subject(subject.clone())
        .annotations(HashMap::from([
            (ANN_SPAN.to_string(), opts.span.to_string()),
            (oci::ANN_CHUNK_SIZE.to_string(), opts.chunk_size.to_string()),
        ]))
        .build()
        .map_err(|e| bad(dir, format!("building the index manifest: {e}")))?;
    oci::add_referrer(
        dir,
        &manifest,
        ARTIFACT_TYPE,
        HashMap::from([(ANN_SUBJECT.to_string(), subject.digest().to_string())]),
    )
}

fn bad(dir: &Path, reason: String) -> Error {
    Error::Oci {
        path: dir.to_path_buf(),
        reason,
    }
}

/// The Shoal index of the image manifest `subject` listed in layout `dir`, if there is one.
pub fn find(dir: &Path, subject: &str) -> Result<Option<(Descriptor, ImageManifest)>> {
    for desc in oci::referrers(dir, ARTIFACT_TYPE)? {
        let bytes = oci::read_blob(dir, &desc, 4 << 20)?;
        let m = ImageManifest::from_reader(&bytes[..]).map_err(|e| {
            bad(
                dir,
                format!("malformed index manifest {}: {e}", desc.digest()),
            )
        })?;
        if m.subject()
            .as_ref()
            .map(|s| s.digest().to_string())
            .as_deref()
            == Some(subject)
        {
            return Ok(Some((desc, m)));
        }
    }
    Ok(None)
}

/// One layer of an indexed image, opened: its bootstrap (checked against the index manifest's
/// digest) and the files of the blobs it names, found in the image's and the index's layouts.
pub struct IndexedLayer {
    /// The loaded bootstrap.
    pub bootstrap: Bootstrap,
    /// Its owned metadata.
    pub meta: ImageMeta,
    /// The file of each blob of the bootstrap, in its order.
    pub blob_paths: Vec<PathBuf>,
    /// The bootstrap's descriptor in the index manifest.
    pub desc: Descriptor,
}

/// The bootstrap descriptors of an index manifest, one per image layer, in order.
pub fn layer_bootstraps(index: &ImageManifest) -> Vec<&Descriptor> {
    index
        .layers()
        .iter()
        .filter(|d| d.media_type().to_string() == MEDIA_LAYER_BOOTSTRAP)
        .collect()
}

/// Opens layer `i` of an indexed image: the image in `image`, the index in `index_dir`.
pub fn open_layer(
    image: &LayoutRef,
    index_dir: &Path,
    index: &ImageManifest,
    i: usize,
) -> Result<IndexedLayer> {
    let desc = layer_bootstraps(index)
        .get(i)
        .copied()
        .cloned()
        .ok_or_else(|| bad(index_dir, format!("the index has no layer {i}")))?;
    let bytes = oci::read_blob(index_dir, &desc, 1 << 30)?;
    let bootstrap = Bootstrap::load(bytes).map_err(|e| Error::Verify {
        object: format!("layer bootstrap {}", desc.digest()),
        reason: e.to_string(),
    })?;
    let meta = bootstrap.to_meta();
    let blob_paths = meta
        .blobs
        .iter()
        .map(|b| find_blob(&[&image.dir, index_dir], &b.digest))
        .collect::<Result<_>>()?;
    Ok(IndexedLayer {
        bootstrap,
        meta,
        blob_paths,
        desc,
    })
}

fn find_blob(dirs: &[&Path], digest: &Sha256) -> Result<PathBuf> {
    dirs.iter()
        .map(|d| oci::blob_path(d, digest))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Oci {
            path: dirs.first().map(|d| d.to_path_buf()).unwrap_or_default(),
            reason: format!("blob {} is in neither layout", oci::digest_string(digest)),
        })
}
