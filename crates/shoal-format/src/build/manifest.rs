//! The converted image's OCI side: layer descriptors (data blobs first, the bootstrap last), a
//! standard OCI image config with one diff_id per layer, and the manifest, so that containerd can
//! pull the image (docs/format.md, "OCI image").

use std::collections::HashMap;

use oci_spec::image::{
    Arch, Descriptor, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};

use super::source::Source;
use crate::error::{Error, Result};
use crate::model::ImageMeta;
use crate::oci::{self, LayoutRef};

/// Writes the bootstrap `boot`, the config and the manifest of `meta` into `out` (the data blobs
/// are already there) and tags the manifest `tag`; returns the manifest's descriptor.
pub(super) fn write_image(
    src: &Source,
    out: &LayoutRef,
    tag: &str,
    meta: &ImageMeta,
    boot: &[u8],
    root_hex: &str,
) -> Result<Descriptor> {
    let mut layers: Vec<Descriptor> = Vec::with_capacity(meta.blobs.len() + 1);
    for b in &meta.blobs {
        let mut d = oci::descriptor(oci::MEDIA_BLOB, &b.digest, b.size)?;
        d.set_annotations(Some(HashMap::from([
            (oci::ANN_LAYER.to_string(), oci::LAYER_BLOB.to_string()),
            (oci::ANN_PIECE_SIZE.to_string(), b.piece_size.to_string()),
        ])));
        layers.push(d);
    }
    // The bootstrap goes last: the top of containerd's layer chain is the image's lazy mount.
    let mut boot_desc = oci::write_blob(&out.dir, oci::MEDIA_BOOTSTRAP, boot)?;
    boot_desc.set_annotations(Some(HashMap::from([
        (oci::ANN_LAYER.to_string(), oci::LAYER_BOOTSTRAP.to_string()),
        (oci::ANN_LAYER_ROOT.to_string(), root_hex.to_string()),
    ])));
    layers.push(boot_desc);

    let config = image_config(src, &layers)?;
    let json = oci::canonical_json(&config)
        .map_err(|e| oci_err(out, format!("encoding the image config: {e}")))?;
    let config_desc = oci::write_blob(&out.dir, MediaType::ImageConfig.as_ref(), json.as_bytes())?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(layers)
        .annotations(HashMap::from([
            (oci::ANN_ROOT.to_string(), root_hex.to_string()),
            (oci::ANN_CHUNK_SIZE.to_string(), meta.chunk_size.to_string()),
        ]))
        .build()
        .map_err(|e| oci_err(out, format!("building manifest: {e}")))?;
    oci::add_manifest(&out.dir, &manifest, tag)
}

fn oci_err(out: &LayoutRef, reason: String) -> Error {
    Error::Oci {
        path: out.dir.clone(),
        reason,
    }
}

/// The OCI image config: platform, runtime config, `created` and `author` of the source image's
/// config (else this host's platform); one diff_id per layer, each the layer's own digest (Shoal
/// layers have no tar form), and one history entry per layer. Nothing Shoal-specific: that stays
/// in the manifest's annotations.
fn image_config(src: &Source, layers: &[Descriptor]) -> Result<ImageConfiguration> {
    let source = match src {
        Source::Layout(r) => Some(source_config(r)?),
        Source::Dir(_) | Source::Tar(_) => None,
    };
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(
            layers
                .iter()
                .map(|l| l.digest().to_string())
                .collect::<Vec<_>>(),
        )
        .build()
        .map_err(|e| bad_config(format!("rootfs: {e}")))?;
    let history = layers
        .iter()
        .map(|l| {
            let what = if l.media_type().to_string() == oci::MEDIA_BOOTSTRAP {
                "bootstrap (image metadata)"
            } else {
                "data blob (file chunks)"
            };
            HistoryBuilder::default()
                .created_by(format!("shoal image convert: {what}"))
                .empty_layer(false)
                .build()
                .map_err(|e| bad_config(format!("history: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut b = ImageConfigurationBuilder::default()
        .architecture(Arch::default())
        .os(Os::default())
        .rootfs(rootfs)
        .history(history);
    if let Some(s) = source {
        b = b.architecture(s.architecture().clone()).os(s.os().clone());
        if let Some(v) = s.variant() {
            b = b.variant(v.clone());
        }
        // oci-spec's `Config` holds exactly the OCI runtime fields (Entrypoint, Cmd, Env, User,
        // WorkingDir, ExposedPorts, Volumes, Labels, StopSignal); Docker-only ones are not kept.
        if let Some(c) = s.config() {
            b = b.config(c.clone());
        }
        if let Some(c) = s.created() {
            b = b.created(c.clone());
        }
        if let Some(a) = s.author() {
            b = b.author(a.clone());
        }
    }
    b.build().map_err(|e| bad_config(e.to_string()))
}

/// The source image's config, parsed as an OCI image config.
fn source_config(r: &LayoutRef) -> Result<ImageConfiguration> {
    let (desc, manifest) = oci::resolve(r)?;
    let bytes = oci::read_config(&r.dir, &manifest)?;
    ImageConfiguration::from_reader(&bytes[..]).map_err(|e| Error::BadSource {
        source_name: format!("oci:{}", r.dir.display()),
        reason: format!(
            "config {} of manifest {} is not an OCI image config: {e}",
            manifest.config().digest(),
            desc.digest()
        ),
    })
}

fn bad_config(reason: String) -> Error {
    Error::BadOption(format!("building the image config: {reason}"))
}
