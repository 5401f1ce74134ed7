//! What a Prepare's labels say about the layer being unpacked. containerd's unpacker sets
//! `containerd.io/snapshot.ref` (the chain id the layer will be committed as) and passes on every
//! layer annotation under `containerd.io/snapshot/`: the Shoal image format marks its layers
//! there (docs/format.md, "OCI image"), and containerd's CRI adds the image reference and the
//! layer's digest (`containerd.io/snapshot/cri.*`, with `disable_snapshot_annotations = false`).

use std::collections::BTreeMap;

use shoal_origin::Reference;

use super::error::{Result, SnapshotterError};

/// The chain id the unpacker will commit this layer as (containerd's remote-snapshot key).
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
/// Shoal layer kind: `blob` or `bootstrap` (a layer annotation of converted images).
pub const SHOAL_LAYER: &str = shoal_format::oci::ANN_LAYER;
/// The image reference containerd's CRI is pulling.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the layer being unpacked (CRI).
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The digest of the image manifest (CRI).
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// A layer of a Shoal image, as a Prepare announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShoalLayer {
    /// A data blob: its files are in the image's mount; nothing to download.
    Blob {
        /// The chain id to commit it as.
        target: String,
    },
    /// The bootstrap, top of the chain: the image is mounted lazily here.
    Bootstrap {
        /// The chain id to commit it as.
        target: String,
        /// `sha256:<hex>` of the bootstrap.
        digest: String,
        /// The image reference (`HOST/REPO[:TAG|@DIGEST]`).
        reference: Reference,
    },
}

/// The Shoal layer a Prepare announces, `None` for any other layer (unpacked the ordinary way).
pub fn shoal_layer(labels: &BTreeMap<String, String>) -> Result<Option<ShoalLayer>> {
    let Some(kind) = labels.get(SHOAL_LAYER) else {
        return Ok(None);
    };
    let Some(target) = labels.get(TARGET_REF).cloned() else {
        // Not containerd's unpacker (no chain id to commit under): an ordinary snapshot, and the
        // caller's applier will refuse the layer's media type by name.
        return Ok(None);
    };
    match kind.as_str() {
        shoal_format::oci::LAYER_BLOB => Ok(Some(ShoalLayer::Blob { target })),
        shoal_format::oci::LAYER_BOOTSTRAP => {
            let need = |key: &str| {
                labels.get(key).ok_or_else(|| {
                    SnapshotterError::InvalidArgument(format!(
                        "Shoal bootstrap layer {target} came without the {key} label: pull through \
                         containerd's CRI with disable_snapshot_annotations = false, or with \
                         `shoal image pull`"
                    ))
                })
            };
            let digest = need(CRI_LAYER_DIGEST)?.clone();
            if !is_sha256(&digest) {
                return Err(SnapshotterError::InvalidArgument(format!(
                    "{CRI_LAYER_DIGEST} {digest:?} is not a sha256 digest"
                )));
            }
            let image_ref = need(CRI_IMAGE_REF)?;
            let reference = Reference::parse(&format!("docker://{image_ref}")).map_err(|e| {
                SnapshotterError::InvalidArgument(format!("image reference {image_ref:?}: {e}"))
            })?;
            Ok(Some(ShoalLayer::Bootstrap {
                target,
                digest,
                reference,
            }))
        }
        other => Err(SnapshotterError::InvalidArgument(format!(
            "{SHOAL_LAYER} is {other:?}: this snapshotter knows `blob` and `bootstrap` (a newer image format?)"
        ))),
    }
}

/// A plain layer the CRI is pulling, as its Prepare announces it: where a Shoal index of its
/// image would be found, and which layer of it this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainLayer {
    /// The chain id to commit it as.
    pub target: String,
    /// `sha256:<hex>` of the layer.
    pub layer: String,
    /// `sha256:<hex>` of the image manifest.
    pub manifest: String,
    /// The image reference (`HOST/REPO[:TAG|@DIGEST]`).
    pub reference: Reference,
}

/// The plain layer a Prepare from containerd's CRI announces (`None` without the CRI's labels
/// or the chain id: then the layer is unpacked the ordinary way, with no index looked for).
pub fn plain_layer(labels: &BTreeMap<String, String>) -> Option<PlainLayer> {
    if labels.contains_key(SHOAL_LAYER) {
        return None;
    }
    let target = labels.get(TARGET_REF)?.clone();
    let layer = labels
        .get(CRI_LAYER_DIGEST)
        .filter(|d| is_sha256(d))?
        .clone();
    let manifest = labels
        .get(CRI_MANIFEST_DIGEST)
        .filter(|d| is_sha256(d))?
        .clone();
    let reference = Reference::parse(&format!("docker://{}", labels.get(CRI_IMAGE_REF)?)).ok()?;
    Some(PlainLayer {
        target,
        layer,
        manifest,
        reference,
    })
}

/// containerd's chain ids of a layer stack's diff ids (the names committed layers get): the first
/// is the first diff id, each next one the sha256 of "<previous chain id> <diff id>".
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    use sha2::Digest as _;
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(format!("{prev} {d}")))
            ),
        };
        out.push(next);
    }
    out
}

/// True for `sha256:` and 64 lower-case hex digits.
pub fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn chain_ids_follow_containerd() {
        use sha2::Digest as _;
        let c = chain_ids(&["sha256:aa".into(), "sha256:bb".into()]);
        assert_eq!(c[0], "sha256:aa");
        let second = sha2::Sha256::digest("sha256:aa sha256:bb");
        assert_eq!(c[1], format!("sha256:{}", hex::encode(second)));
    }

    #[test]
    fn recognises_shoal_layers() {
        assert_eq!(shoal_layer(&labels(&[(TARGET_REF, "c1")])).unwrap(), None);
        assert_eq!(
            shoal_layer(&labels(&[(TARGET_REF, "c1"), (SHOAL_LAYER, "blob")])).unwrap(),
            Some(ShoalLayer::Blob {
                target: "c1".into()
            })
        );
        let top = shoal_layer(&labels(&[
            (TARGET_REF, "c2"),
            (SHOAL_LAYER, "bootstrap"),
            (CRI_LAYER_DIGEST, D),
            (CRI_IMAGE_REF, "127.0.0.1:5000/app:v1"),
        ]))
        .unwrap();
        let Some(ShoalLayer::Bootstrap {
            digest, reference, ..
        }) = top
        else {
            panic!("not a bootstrap: {top:?}")
        };
        assert_eq!(digest, D);
        assert_eq!(reference.repository(), "app");
    }

    #[test]
    fn plain_layers_of_the_cri_are_recognised() {
        let all = [
            (TARGET_REF, "c1"),
            (CRI_LAYER_DIGEST, D),
            (CRI_MANIFEST_DIGEST, D),
            (CRI_IMAGE_REF, "127.0.0.1:5000/app:v1"),
        ];
        let p = plain_layer(&labels(&all)).expect("a CRI layer");
        assert_eq!((p.target.as_str(), p.layer.as_str()), ("c1", D));
        assert_eq!(p.reference.repository(), "app");
        // Anything missing or malformed: the ordinary unpack, no lookup.
        for skip in 0..all.len() {
            let some: Vec<_> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, kv)| *kv)
                .collect();
            assert_eq!(plain_layer(&labels(&some)), None, "without {}", all[skip].0);
        }
        let mut bad = all;
        bad[2] = (CRI_MANIFEST_DIGEST, "sha256:zz");
        assert_eq!(plain_layer(&labels(&bad)), None);
        let mut shoal = all.to_vec();
        shoal.push((SHOAL_LAYER, "blob"));
        assert_eq!(plain_layer(&labels(&shoal)), None);
    }

    #[test]
    fn a_bootstrap_without_what_it_needs_is_a_clear_error() {
        let err = shoal_layer(&labels(&[(TARGET_REF, "c2"), (SHOAL_LAYER, "bootstrap")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("disable_snapshot_annotations"), "{err}");
        let err = shoal_layer(&labels(&[
            (TARGET_REF, "c2"),
            (SHOAL_LAYER, "bootstrap"),
            (CRI_LAYER_DIGEST, "sha256:zz"),
            (CRI_IMAGE_REF, "r/x"),
        ]))
        .unwrap_err();
        assert!(matches!(err, SnapshotterError::InvalidArgument(_)));
        assert!(shoal_layer(&labels(&[(TARGET_REF, "c"), (SHOAL_LAYER, "zzz")])).is_err());
    }
}
