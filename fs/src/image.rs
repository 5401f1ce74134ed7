//! Opening the mount source: find the manifest, check the bootstrap against the manifest's digest
//! before loading it, and choose the origin its data blobs are read from.
//!
//! - `docker://HOST/REPO[:TAG|@DIGEST]`: manifest and bootstrap from the registry; blobs by range
//!   from the same repository (and through the peer, which is told that reference). A plain
//!   image with a Shoal index (index.rs) opens as one bootstrap per layer, each checked against
//!   the index's digest of it; the layers' blobs are the image's own.
//! - `oci:DIR[:TAG]`: a converted image in a local OCI layout, or a plain one whose index is
//!   listed in the same layout; blobs from `DIR/blobs`.
//! - a bootstrap file: blobs from `origin` (`docker://HOST/REPO`, through the peer too) or from
//!   `blob_dir` (`sha256/<hex>` files); checked against `bootstrap_digest` when given (the
//!   snapshotter always gives it).

use std::path::Path;
use std::sync::Arc;

use oci_spec::image::{Descriptor, ImageManifest};
use shoal_format::bootstrap::Bootstrap;
use shoal_format::image::find_bootstrap;
use shoal_format::oci::{self, LayoutRef};
use shoal_origin::{
    LocalDirOrigin, Origin, Reference, RegistryClient, RegistryOptions, RegistryOrigin,
};
use shoal_types::Digest;

use crate::config::FsConfig;
use crate::error::{FsError, Result};

/// Largest bootstrap read into memory.
const MAX_BOOTSTRAP: u64 = 1 << 30;

/// What a mount source opened to.
pub enum Opened {
    /// A Shoal image (or one layer's bootstrap file): one filesystem.
    Image(OpenedImage),
    /// An unconverted image with a Shoal index: one filesystem per layer, stacked by overlayfs.
    Layers(IndexedImage),
}

/// An unconverted image opened through its Shoal index.
pub struct IndexedImage {
    /// Each layer's bootstrap (bottom first), all reading from the image's origin.
    pub layers: Vec<OpenedImage>,
    /// The image manifest's digest.
    pub manifest: String,
    /// The index manifest's digest.
    pub index: String,
}

/// A mount source, opened and verified.
pub struct OpenedImage {
    /// The verified bootstrap.
    pub boot: Arc<Bootstrap>,
    /// Where data blobs are read from when no peer has them.
    pub origin: Arc<dyn Origin>,
    /// The registry reference the peer fetches from (`docker://HOST/REPO`), for registry images.
    pub origin_ref: Option<String>,
    /// Manifest digest, when the source has a manifest.
    pub manifest: Option<String>,
    /// The bootstrap's digest, when it was checked against one (the peer reads the data
    /// blobs' piece tables from it).
    pub bootstrap: Option<Digest>,
}

fn image_err(cfg: &FsConfig, reason: impl Into<String>) -> FsError {
    FsError::Image {
        image: cfg.source.clone(),
        reason: reason.into(),
    }
}

/// Checks `bytes` against `sha256:<hex>` `want`; returns the digest it checked.
fn check_digest(cfg: &FsConfig, bytes: &[u8], want: &str) -> Result<Digest> {
    let got = Digest::of(bytes);
    if got.to_string() != want {
        return Err(image_err(
            cfg,
            format!("bootstrap has digest {got}, the manifest says {want}: refusing it"),
        ));
    }
    Ok(got)
}

/// Opens `cfg.source`.
pub async fn open(cfg: &FsConfig) -> Result<Opened> {
    let src = cfg.source.as_str();
    if src.starts_with("docker://") {
        return tokio::time::timeout(cfg.fetch_timeout() * 3, open_registry(cfg))
            .await
            .map_err(|_| image_err(cfg, "registry did not answer in time"))?;
    }
    if let Some(r) = LayoutRef::parse(src) {
        return open_layout(cfg, &r);
    }
    open_bootstrap_file(cfg, Path::new(src)).map(Opened::Image)
}

/// Loads a layer bootstrap checked against `desc` and against the layer it must describe.
fn layer_bootstrap(
    cfg: &FsConfig,
    layer: &str,
    desc: &Descriptor,
    bytes: Vec<u8>,
) -> Result<Bootstrap> {
    check_digest(cfg, &bytes, desc.digest().as_ref())?;
    let boot = Bootstrap::load(bytes)?;
    let blob0 = boot
        .blob(0)
        .map(|b| Digest::from_bytes(b.digest).to_string());
    if blob0.as_deref() != Some(layer) {
        return Err(image_err(
            cfg,
            format!(
                "the index's bootstrap {} does not read layer {layer}",
                desc.digest()
            ),
        ));
    }
    Ok(boot)
}

fn too_big(cfg: &FsConfig, size: u64) -> Result<()> {
    if size > MAX_BOOTSTRAP {
        return Err(image_err(
            cfg,
            format!("bootstrap is {size} bytes, over the limit of {MAX_BOOTSTRAP}"),
        ));
    }
    Ok(())
}

/// How this mount speaks to registries.
fn registry_options(cfg: &FsConfig) -> RegistryOptions {
    RegistryOptions {
        plain_http: cfg.plain_http.iter().cloned().collect(),
        read_timeout: cfg.fetch_timeout(),
        request_timeout: cfg.fetch_timeout(),
        max_attempts: 3,
        ..RegistryOptions::default()
    }
}

async fn open_registry(cfg: &FsConfig) -> Result<Opened> {
    let reference = Reference::parse(&cfg.source)?;
    let client = RegistryClient::new(registry_options(cfg))?;
    let pulled = client.pull_manifest(&reference).await?;
    let manifest = ImageManifest::from_reader(pulled.bytes.as_ref()).map_err(|e| {
        image_err(
            cfg,
            format!(
                "manifest {} is not an OCI image manifest: {e}",
                pulled.digest
            ),
        )
    })?;
    let repo = format!(
        "docker://{}/{}",
        reference.registry(),
        reference.repository()
    );
    let origin: Arc<dyn Origin> = Arc::new(RegistryOrigin::new(client.clone(), reference.clone()));
    let Some(layer) = find_bootstrap(pulled.digest.as_ref(), &manifest)?.cloned() else {
        // A plain image: lazily only through its Shoal index.
        let found = crate::index::find_in_registry(&client, &reference, &pulled.digest)
            .await?
            .ok_or_else(|| crate::index::no_index(&cfg.source, pulled.digest.as_ref()))?;
        found.check_layers(&cfg.source, &manifest)?;
        let mut layers = Vec::with_capacity(found.layers.len());
        for (digest, desc) in &found.layers {
            too_big(cfg, desc.size())?;
            let stream = client.fetch_blob(&reference, desc.digest()).await?;
            let bytes = shoal_origin::collect_stream(stream, desc.size() as usize).await?;
            layers.push(OpenedImage {
                boot: Arc::new(layer_bootstrap(cfg, digest, desc, bytes)?),
                origin: Arc::clone(&origin),
                origin_ref: Some(repo.clone()),
                manifest: Some(pulled.digest.to_string()),
                bootstrap: None,
            });
        }
        tracing::info!(image = %cfg.source, manifest = %pulled.digest, index = %found.digest, layers = layers.len(), "unconverted image opened through its Shoal index");
        return Ok(Opened::Layers(IndexedImage {
            layers,
            manifest: pulled.digest.to_string(),
            index: found.digest,
        }));
    };
    too_big(cfg, layer.size())?;
    let stream = client.fetch_blob(&reference, layer.digest()).await?;
    let bytes = shoal_origin::collect_stream(stream, layer.size() as usize).await?;
    let bootstrap = check_digest(cfg, &bytes, layer.digest().as_ref())?;
    let boot = Bootstrap::load(bytes)?;
    tracing::info!(image = %cfg.source, manifest = %pulled.digest, root = %hex::encode(boot.root_hash()), "image opened from registry");
    Ok(Opened::Image(OpenedImage {
        boot: Arc::new(boot),
        origin,
        origin_ref: Some(repo),
        manifest: Some(pulled.digest.to_string()),
        bootstrap: Some(bootstrap),
    }))
}

fn open_layout(cfg: &FsConfig, r: &LayoutRef) -> Result<Opened> {
    let (desc, manifest) = oci::resolve(r)?;
    let origin: Arc<dyn Origin> = Arc::new(LocalDirOrigin::new(r.dir.join("blobs")));
    let Some(layer) = find_bootstrap(desc.digest().as_ref(), &manifest)?.cloned() else {
        let found = crate::index::find_in_layout(&r.dir, desc.digest().as_ref())?
            .ok_or_else(|| crate::index::no_index(&cfg.source, desc.digest().as_ref()))?;
        found.check_layers(&cfg.source, &manifest)?;
        let layers = found
            .layers
            .iter()
            .map(|(digest, d)| {
                let bytes = oci::read_blob(&r.dir, d, MAX_BOOTSTRAP)?;
                Ok(OpenedImage {
                    boot: Arc::new(layer_bootstrap(cfg, digest, d, bytes)?),
                    origin: Arc::clone(&origin),
                    origin_ref: None,
                    manifest: Some(desc.digest().to_string()),
                    bootstrap: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(image = %cfg.source, manifest = %desc.digest(), index = %found.digest, layers = layers.len(), "unconverted image opened through its Shoal index");
        return Ok(Opened::Layers(IndexedImage {
            layers,
            manifest: desc.digest().to_string(),
            index: found.digest,
        }));
    };
    // read_blob checks size and sha256 against the manifest's descriptor before we parse it.
    let bytes = oci::read_blob(&r.dir, &layer, MAX_BOOTSTRAP)?;
    let boot = Bootstrap::load(bytes)?;
    tracing::info!(image = %cfg.source, manifest = %desc.digest(), root = %hex::encode(boot.root_hash()), "image opened from OCI layout");
    Ok(Opened::Image(OpenedImage {
        boot: Arc::new(boot),
        origin,
        origin_ref: None,
        manifest: Some(desc.digest().to_string()),
        // read_blob checked it; a digest other than sha256 is not one the peer can name.
        bootstrap: Digest::parse(layer.digest().as_ref()).ok(),
    }))
}

fn open_bootstrap_file(cfg: &FsConfig, path: &Path) -> Result<OpenedImage> {
    if !path.is_file() {
        return Err(FsError::BadSource {
            source_name: cfg.source.clone(),
            reason: "no such file".into(),
        });
    }
    let (origin, origin_ref): (Arc<dyn Origin>, Option<String>) = match (&cfg.origin, &cfg.blob_dir) {
        (Some(repo), _) => {
            let reference = Reference::parse(repo)?;
            let client = RegistryClient::new(registry_options(cfg))?;
            let repo = format!("docker://{}/{}", reference.registry(), reference.repository());
            (Arc::new(RegistryOrigin::new(client, reference)), Some(repo))
        }
        (None, Some(blob_dir)) => (Arc::new(LocalDirOrigin::new(blob_dir)), None),
        (None, None) => {
            return Err(FsError::BadSource {
                source_name: cfg.source.clone(),
                reason: "a bootstrap file needs blob_dir (--blob-dir) or origin (--origin docker://HOST/REPO) to read its data blobs from"
                    .into(),
            })
        }
    };
    let boot = Bootstrap::open(path)?;
    let bootstrap = match &cfg.bootstrap_digest {
        Some(want) => Some(check_digest(cfg, boot.bytes(), want)?),
        None => {
            tracing::warn!(bootstrap = %path.display(), "no bootstrap digest given: trusting the local file as is");
            None
        }
    };
    Ok(OpenedImage {
        boot: Arc::new(boot),
        origin,
        origin_ref,
        manifest: None,
        bootstrap,
    })
}
