//! Finding the Shoal index of an unconverted image (`shoal image index`, docs/format.md "Layer
//! index"): the OCI artifact whose subject is the image manifest, through the registry's
//! referrers API or its referrers tag, or listed in an OCI layout; checked against its digest,
//! and per image layer the descriptor of that layer's bootstrap.

use std::path::Path;

use oci_spec::image::{Descriptor, ImageManifest};
use shoal_format::index::artifact;
use shoal_origin::{Digest, Reference, RegistryClient};

use crate::error::{FsError, Result};

/// Largest index manifest read.
const MAX_INDEX_MANIFEST: u64 = 4 << 20;

/// The Shoal index of one image manifest.
#[derive(Debug, Clone)]
pub struct FoundIndex {
    /// The index manifest's digest.
    pub digest: String,
    /// Per image layer, bottom first: the layer's digest and its bootstrap's descriptor.
    pub layers: Vec<(String, Descriptor)>,
}

impl FoundIndex {
    /// The bootstrap descriptor of the layer with digest `layer`, if the index has it.
    pub fn layer(&self, layer: &str) -> Option<&Descriptor> {
        self.layers.iter().find(|(l, _)| l == layer).map(|(_, d)| d)
    }

    /// Checks that the index describes exactly the layers of `manifest`, in order.
    pub fn check_layers(&self, name: &str, manifest: &ImageManifest) -> Result<()> {
        let want: Vec<String> = manifest
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .collect();
        let have: Vec<&String> = self.layers.iter().map(|(l, _)| l).collect();
        if want.iter().collect::<Vec<_>>() != have {
            return Err(FsError::Image {
                image: name.to_string(),
                reason: format!(
                    "the Shoal index {} describes other layers than the image has ({} of {}): index the image again with `shoal image index`",
                    self.digest,
                    have.len(),
                    want.len()
                ),
            });
        }
        Ok(())
    }
}

fn bad(name: &str, reason: String) -> FsError {
    FsError::Image {
        image: name.to_string(),
        reason,
    }
}

/// The layers of index manifest `index` (named `digest`), which must have `subject` as subject.
fn found(name: &str, digest: &str, index: &ImageManifest, subject: &str) -> Result<FoundIndex> {
    let of = index.subject().as_ref().map(|s| s.digest().to_string());
    if of.as_deref() != Some(subject) {
        return Err(bad(
            name,
            format!("the Shoal index {digest} is not an index of manifest {subject}"),
        ));
    }
    let layers = artifact::layer_bootstraps(index)
        .into_iter()
        .map(|d| {
            let layer = d
                .annotations()
                .as_ref()
                .and_then(|a| a.get(artifact::ANN_LAYER))
                .cloned()
                .ok_or_else(|| {
                    bad(
                        name,
                        format!(
                            "the Shoal index {digest} has a layer bootstrap without {}",
                            artifact::ANN_LAYER
                        ),
                    )
                })?;
            Ok((layer, d.clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(FoundIndex {
        digest: digest.to_string(),
        layers,
    })
}

/// The Shoal index of manifest `subject` in `reference`'s repository: the referrers API, else
/// the referrers tag; `None` when there is none.
pub async fn find_in_registry(
    client: &RegistryClient,
    reference: &Reference,
    subject: &Digest,
) -> Result<Option<FoundIndex>> {
    let name = reference.to_string();
    let refs = client.referrers(reference, subject).await?;
    let Some(desc) = refs.into_iter().find(|d| {
        d.artifact_type().as_ref().map(|t| t.to_string()).as_deref()
            == Some(artifact::ARTIFACT_TYPE)
    }) else {
        return Ok(None);
    };
    if desc.size() > MAX_INDEX_MANIFEST {
        return Err(bad(
            &name,
            format!("its Shoal index {} is too large", desc.digest()),
        ));
    }
    // By digest: the client checks the bytes' sha256 against it.
    let pulled = client
        .pull_manifest_raw(&reference.with_digest(desc.digest().clone()))
        .await?;
    let index = ImageManifest::from_reader(pulled.bytes.as_ref()).map_err(|e| {
        bad(
            &name,
            format!("its Shoal index {} is not a manifest: {e}", desc.digest()),
        )
    })?;
    found(&name, desc.digest().as_ref(), &index, subject.as_ref()).map(Some)
}

/// The Shoal index of manifest `subject` listed in the OCI layout `dir`; `None` when there is none.
pub fn find_in_layout(dir: &Path, subject: &str) -> Result<Option<FoundIndex>> {
    let name = dir.display().to_string();
    match artifact::find(dir, subject)? {
        Some((desc, index)) => found(&name, desc.digest().as_ref(), &index, subject).map(Some),
        None => Ok(None),
    }
}

/// The error of a plain image without an index: what to run instead.
pub fn no_index(image: &str, manifest: &str) -> FsError {
    FsError::Image {
        image: image.to_string(),
        reason: format!(
            "manifest {manifest} is a plain OCI image without a Shoal index, so it cannot be mounted lazily: \
             index it with `shoal image index {image}` (the index is pushed beside it; the image is not changed), \
             or convert it with `shoal image convert`"
        ),
    }
}
