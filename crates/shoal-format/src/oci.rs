//! OCI image layouts on disk: `oci-layout`, `index.json`, manifests, configs and blobs, read with
//! bounds and digest checks, and written atomically. Shoal's media types and annotations are
//! specified in docs/format.md, "OCI image".

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, Digest, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType,
};
use sha2::{Digest as _, Sha256 as Sha};

use crate::error::{Error, Result};
use crate::model::Sha256;

/// Media type of the bootstrap layer of a Shoal image (the manifest's last layer). Under
/// `application/vnd.oci.image.layer.` so that containerd treats it as a layer.
pub const MEDIA_BOOTSTRAP: &str = "application/vnd.oci.image.layer.shoal.bootstrap.v1";
/// Media type of a Shoal data blob layer (compressed chunks back to back).
pub const MEDIA_BLOB: &str = "application/vnd.oci.image.layer.shoal.blob.v1";
/// Media types of the layout before Shoal images were containerd images (config, bootstrap, data
/// blob): read only to refuse such an image with an error that says to convert it again.
pub const LEGACY_MEDIA_TYPES: [&str; 3] = [
    "application/vnd.shoal.image.config.v1+json",
    "application/vnd.shoal.image.bootstrap.v1",
    "application/vnd.shoal.image.blob.v1",
];
/// Manifest annotation: the image's Merkle root hash (BLAKE3, hex).
pub const ANN_ROOT: &str = "dev.shoal.image.root";
/// Manifest annotation: the chunk size in bytes.
pub const ANN_CHUNK_SIZE: &str = "dev.shoal.image.chunk-size";
/// Data blob annotation: the piece size in bytes.
pub const ANN_PIECE_SIZE: &str = "dev.shoal.blob.piece-size";
/// Layer annotation naming a Shoal layer's role (`blob` or `bootstrap`); containerd passes
/// `containerd.io/snapshot/` annotations to the snapshotter's Prepare as labels.
pub const ANN_LAYER: &str = "containerd.io/snapshot/shoal.layer";
/// Bootstrap layer annotation: the image's Merkle root hash (hex), for the snapshotter.
pub const ANN_LAYER_ROOT: &str = "containerd.io/snapshot/shoal.root";
/// [`ANN_LAYER`] value of a data blob layer.
pub const LAYER_BLOB: &str = "blob";
/// [`ANN_LAYER`] value of the bootstrap layer.
pub const LAYER_BOOTSTRAP: &str = "bootstrap";
/// Index annotation naming a manifest's tag.
pub const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest index.json, manifest or config we read.
const MAX_JSON: u64 = 4 << 20;

/// An `oci:DIR[:TAG]` reference.
#[derive(Debug, Clone)]
pub struct LayoutRef {
    /// The layout directory.
    pub dir: PathBuf,
    /// The tag (`org.opencontainers.image.ref.name`), if given.
    pub tag: Option<String>,
}

impl LayoutRef {
    /// Parses `oci:DIR[:TAG]`; `None` when `s` does not start with `oci:`.
    pub fn parse(s: &str) -> Option<LayoutRef> {
        let rest = s.strip_prefix("oci:")?;
        let is_tag = |t: &str| {
            !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        Some(match rest.rsplit_once(':') {
            Some((dir, tag)) if is_tag(tag) && !dir.is_empty() => LayoutRef {
                dir: dir.into(),
                tag: Some(tag.to_string()),
            },
            _ => LayoutRef {
                dir: rest.into(),
                tag: None,
            },
        })
    }
}

fn oci_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Oci {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// `DIR/blobs/sha256`.
pub fn blobs_dir(dir: &Path) -> PathBuf {
    dir.join("blobs").join("sha256")
}

/// The file holding blob `digest` in layout `dir`.
pub fn blob_path(dir: &Path, digest: &Sha256) -> PathBuf {
    blobs_dir(dir).join(hex::encode(digest))
}

/// `sha256:<hex>` of a digest.
pub fn digest_string(d: &Sha256) -> String {
    format!("sha256:{}", hex::encode(d))
}

/// Parses an OCI sha256 digest into bytes.
pub fn parse_digest(d: &Digest) -> Option<Sha256> {
    let s = d.to_string();
    let hex_part = s.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

fn to_digest(d: &Sha256) -> Result<Digest> {
    digest_string(d)
        .parse()
        .map_err(|e| oci_err(Path::new("."), format!("bad digest: {e}")))
}

/// Creates `DIR/oci-layout` and `DIR/blobs/sha256` if missing.
pub fn init_layout(dir: &Path) -> Result<()> {
    let blobs = blobs_dir(dir);
    fs::create_dir_all(&blobs).map_err(|e| Error::Io {
        op: "creating",
        path: blobs.clone(),
        source: e,
    })?;
    let layout = dir.join("oci-layout");
    if !layout.exists() {
        write_atomic(dir, &layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    Ok(())
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| Error::Io {
        op: "writing",
        path: path.to_path_buf(),
        source: e,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Moves a finished temporary file to its place as blob `digest`.
pub fn persist_blob(dir: &Path, tmp: tempfile::NamedTempFile, digest: &Sha256) -> Result<()> {
    let path = blob_path(dir, digest);
    tmp.persist(&path).map_err(|e| Error::Io {
        op: "storing blob",
        path,
        source: e.error,
    })?;
    Ok(())
}

/// Writes `bytes` as a blob; returns a descriptor of `media_type`.
pub fn write_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
    let digest: Sha256 = Sha::digest(bytes).into();
    let path = blob_path(dir, &digest);
    if !path.exists() {
        write_atomic(&blobs_dir(dir), &path, bytes)?;
    }
    Ok(Descriptor::new(
        MediaType::from(media_type),
        bytes.len() as u64,
        to_digest(&digest)?,
    ))
}

/// A descriptor of an existing blob.
pub fn descriptor(media_type: &str, digest: &Sha256, size: u64) -> Result<Descriptor> {
    Ok(Descriptor::new(
        MediaType::from(media_type),
        size,
        to_digest(digest)?,
    ))
}

/// Reads a small blob (manifest, config, bootstrap up to `max` bytes) and checks its digest and
/// size against `desc`.
pub fn read_blob(dir: &Path, desc: &Descriptor, max: u64) -> Result<Vec<u8>> {
    let digest = parse_digest(desc.digest())
        .ok_or_else(|| oci_err(dir, format!("unsupported digest {}", desc.digest())))?;
    let path = blob_path(dir, &digest);
    if desc.size() > max {
        return Err(oci_err(
            &path,
            format!(
                "blob is {} bytes, more than the limit of {max}",
                desc.size()
            ),
        ));
    }
    let mut bytes = Vec::new();
    let file = fs::File::open(&path).map_err(|e| Error::Io {
        op: "opening blob",
        path: path.clone(),
        source: e,
    })?;
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Io {
            op: "reading blob",
            path: path.clone(),
            source: e,
        })?;
    if bytes.len() as u64 != desc.size() {
        return Err(oci_err(
            &path,
            format!(
                "blob {} is {} bytes, descriptor says {}",
                desc.digest(),
                bytes.len(),
                desc.size()
            ),
        ));
    }
    let got: Sha256 = Sha::digest(&bytes).into();
    if got != digest {
        return Err(oci_err(
            &path,
            format!(
                "blob {} has sha256:{}: content does not match its digest",
                desc.digest(),
                hex::encode(got)
            ),
        ));
    }
    Ok(bytes)
}

fn read_index(dir: &Path) -> Result<Option<ImageIndex>> {
    let path = dir.join("index.json");
    let file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Io {
                op: "opening",
                path,
                source: e,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Io {
            op: "reading",
            path: path.clone(),
            source: e,
        })?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(oci_err(&path, "index.json is larger than 4 MiB"));
    }
    ImageIndex::from_reader(&bytes[..])
        .map(Some)
        .map_err(|e| oci_err(&path, format!("malformed index.json: {e}")))
}

fn tag_of(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(ANN_REF_NAME))
        .map(String::as_str)
}

/// Finds the manifest for `r` (its tag; without a tag the only manifest, else `latest`) and reads it.
pub fn resolve(r: &LayoutRef) -> Result<(Descriptor, ImageManifest)> {
    let index = read_index(&r.dir)?
        .ok_or_else(|| oci_err(&r.dir, "no index.json: not an OCI image layout"))?;
    // Referrers (artifacts about an image, listed untagged) are not images to resolve.
    let manifests: Vec<Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| d.artifact_type().is_none() || tag_of(d).is_some())
        .cloned()
        .collect();
    let desc = match &r.tag {
        Some(t) => manifests.iter().find(|d| tag_of(d) == Some(t.as_str())),
        None if manifests.len() == 1 => manifests.first(),
        None => manifests.iter().find(|d| tag_of(d) == Some("latest")),
    };
    let tags: Vec<_> = manifests.iter().filter_map(tag_of).collect();
    let desc = desc.cloned();
    let mut desc = desc
        .ok_or_else(|| {
            oci_err(
                &r.dir,
                format!(
                    "no manifest tagged {:?}; tags: {tags:?}",
                    r.tag.as_deref().unwrap_or("latest")
                ),
            )
        })?
        .clone();
    // A nested index (multi-platform image): take its first image manifest.
    for _ in 0..4 {
        if *desc.media_type() != MediaType::ImageIndex {
            break;
        }
        let bytes = read_blob(&r.dir, &desc, MAX_JSON)?;
        let nested = ImageIndex::from_reader(&bytes[..])
            .map_err(|e| oci_err(&r.dir, format!("malformed index {}: {e}", desc.digest())))?;
        desc = nested
            .manifests()
            .first()
            .ok_or_else(|| {
                oci_err(
                    &r.dir,
                    format!("index {} lists no manifests", desc.digest()),
                )
            })?
            .clone();
    }
    let bytes = read_blob(&r.dir, &desc, MAX_JSON)?;
    let manifest = ImageManifest::from_reader(&bytes[..])
        .map_err(|e| oci_err(&r.dir, format!("malformed manifest {}: {e}", desc.digest())))?;
    Ok((desc, manifest))
}

/// Reads a manifest's config blob (bounded, digest-checked).
pub fn read_config(dir: &Path, manifest: &ImageManifest) -> Result<Vec<u8>> {
    read_blob(dir, manifest.config(), MAX_JSON)
}

/// Writes `manifest` as a blob and names it `tag` in `DIR/index.json` (replacing that tag).
pub fn add_manifest(dir: &Path, manifest: &ImageManifest, tag: &str) -> Result<Descriptor> {
    let json =
        canonical_json(manifest).map_err(|e| oci_err(dir, format!("encoding manifest: {e}")))?;
    let mut desc = write_blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        json.as_bytes(),
    )?;
    desc.set_media_type(MediaType::ImageManifest);
    desc.set_annotations(Some(HashMap::from([(
        ANN_REF_NAME.to_string(),
        tag.to_string(),
    )])));
    let mut manifests: Vec<Descriptor> = match read_index(dir)? {
        Some(i) => i
            .manifests()
            .iter()
            .filter(|d| tag_of(d) != Some(tag))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    manifests.push(desc.clone());
    write_index(dir, manifests)?;
    Ok(desc)
}

/// Writes `manifest` (an artifact of type `artifact_type` with a subject) as a blob and lists it
/// untagged in `DIR/index.json` with `annotations`, replacing an entry that has the same
/// artifact type and annotations (an earlier index of the same image).
pub fn add_referrer(
    dir: &Path,
    manifest: &ImageManifest,
    artifact_type: &str,
    annotations: HashMap<String, String>,
) -> Result<Descriptor> {
    let json =
        canonical_json(manifest).map_err(|e| oci_err(dir, format!("encoding manifest: {e}")))?;
    let mut desc = write_blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        json.as_bytes(),
    )?;
    desc.set_media_type(MediaType::ImageManifest);
    desc.set_artifact_type(Some(MediaType::from(artifact_type)));
    desc.set_annotations(Some(annotations.clone()));
    let same = |d: &Descriptor| {
        d.artifact_type().as_ref().map(|t| t.to_string()).as_deref() == Some(artifact_type)
            && d.annotations().as_ref() == Some(&annotations)
    };
    let mut manifests: Vec<Descriptor> = match read_index(dir)? {
        Some(i) => i.manifests().iter().filter(|d| !same(d)).cloned().collect(),
        None => Vec::new(),
    };
    manifests.push(desc.clone());
    write_index(dir, manifests)?;
    Ok(desc)
}

/// The untagged entries of `DIR/index.json` whose artifact type is `artifact_type`.
pub fn referrers(dir: &Path, artifact_type: &str) -> Result<Vec<Descriptor>> {
    Ok(read_index(dir)?
        .map(|i| {
            i.manifests()
                .iter()
                .filter(|d| {
                    d.artifact_type().as_ref().map(|t| t.to_string()).as_deref()
                        == Some(artifact_type)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default())
}

fn write_index(dir: &Path, manifests: Vec<Descriptor>) -> Result<()> {
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()
        .map_err(|e| oci_err(dir, format!("building index.json: {e}")))?;
    let json =
        canonical_json(&index).map_err(|e| oci_err(dir, format!("encoding index.json: {e}")))?;
    write_atomic(dir, &dir.join("index.json"), json.as_bytes())
}

/// JSON with object keys sorted: oci-spec keeps annotations in a `HashMap`, whose order changes
/// from run to run, and a manifest's digest must not.
pub(crate) fn canonical_json<T: serde::Serialize>(v: &T) -> serde_json::Result<String> {
    serde_json::to_string(&serde_json::to_value(v)?)
}
