//! Opening the mount source: find the manifest, check the bootstrap against the manifest's digest
//! before loading it, and choose the origin its data blobs are read from.
//!
//! - `docker://HOST/REPO[:TAG|@DIGEST]`: manifest and bootstrap from the registry; blobs by range
//!   from the same repository (and through the peer, which is told that reference).
//! - `oci:DIR[:TAG]`: a converted image in a local OCI layout; blobs from `DIR/blobs`.
//! - a bootstrap file: blobs from `origin` (`docker://HOST/REPO`, through the peer too) or from
//!   `blob_dir` (`sha256/<hex>` files); checked against `bootstrap_digest` when given (the
//!   snapshotter always gives it).

use std::path::Path;
use std::sync::Arc;

use oci_spec::image::ImageManifest;
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

/// The bootstrap layer of a Shoal manifest, found by its media type; `name` is the manifest's
/// digest. An old-layout image is refused with an error that says to convert it again.
fn bootstrap_layer(
    cfg: &FsConfig,
    name: &str,
    m: &ImageManifest,
) -> Result<oci_spec::image::Descriptor> {
    find_bootstrap(name, m)?.cloned().ok_or_else(|| {
        image_err(
            cfg,
            format!("manifest {name} is not a Shoal image: it has no bootstrap layer (convert it with `shoal image convert`)"),
        )
    })
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
pub async fn open(cfg: &FsConfig) -> Result<OpenedImage> {
    let src = cfg.source.as_str();
    if src.starts_with("docker://") {
        return tokio::time::timeout(cfg.fetch_timeout() * 3, open_registry(cfg))
            .await
            .map_err(|_| image_err(cfg, "registry did not answer in time"))?;
    }
    if let Some(r) = LayoutRef::parse(src) {
        return open_layout(cfg, &r);
    }
    open_bootstrap_file(cfg, Path::new(src))
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

async fn open_registry(cfg: &FsConfig) -> Result<OpenedImage> {
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
    let layer = bootstrap_layer(cfg, pulled.digest.as_ref(), &manifest)?;
    if layer.size() > MAX_BOOTSTRAP {
        return Err(image_err(
            cfg,
            format!(
                "bootstrap is {} bytes, over the limit of {MAX_BOOTSTRAP}",
                layer.size()
            ),
        ));
    }
    let stream = client.fetch_blob(&reference, layer.digest()).await?;
    let bytes = shoal_origin::collect_stream(stream, layer.size() as usize).await?;
    let bootstrap = check_digest(cfg, &bytes, layer.digest().as_ref())?;
    let boot = Bootstrap::load(bytes)?;
    let repo = format!(
        "docker://{}/{}",
        reference.registry(),
        reference.repository()
    );
    tracing::info!(image = %cfg.source, manifest = %pulled.digest, root = %hex::encode(boot.root_hash()), "image opened from registry");
    Ok(OpenedImage {
        boot: Arc::new(boot),
        origin: Arc::new(RegistryOrigin::new(client, reference)),
        origin_ref: Some(repo),
        manifest: Some(pulled.digest.to_string()),
        bootstrap: Some(bootstrap),
    })
}

fn open_layout(cfg: &FsConfig, r: &LayoutRef) -> Result<OpenedImage> {
    let (desc, manifest) = oci::resolve(r)?;
    let layer = bootstrap_layer(cfg, desc.digest().as_ref(), &manifest)?;
    // read_blob checks size and sha256 against the manifest's descriptor before we parse it.
    let bytes = oci::read_blob(&r.dir, &layer, MAX_BOOTSTRAP)?;
    let boot = Bootstrap::load(bytes)?;
    tracing::info!(image = %cfg.source, manifest = %desc.digest(), root = %hex::encode(boot.root_hash()), "image opened from OCI layout");
    Ok(OpenedImage {
        boot: Arc::new(boot),
        origin: Arc::new(LocalDirOrigin::new(r.dir.join("blobs"))),
        origin_ref: None,
        manifest: Some(desc.digest().to_string()),
        // read_blob checked it; a digest other than sha256 is not one the peer can name.
        bootstrap: Digest::parse(layer.digest().as_ref()).ok(),
    })
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
