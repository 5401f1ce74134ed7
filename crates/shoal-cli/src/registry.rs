//! `docker://` sources and targets for `shoal image`: pulls an image into a local OCI layout (so the
//! builder reads registry images like any other) and pushes a layout's image to a registry.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_spec::image::{Descriptor, ImageManifest};
use sha2::{Digest as _, Sha256};
use shoal_format::oci::{self, LayoutRef};
use shoal_origin::{
    Credentials, PlatformSpec, PushOutcome, Reference, RegistryClient, RegistryOptions,
    OCI_MANIFEST,
};

/// The `docker://` prefix that names a registry reference.
pub const SCHEME: &str = "docker://";

/// How to reach registries named by `docker://` references.
#[derive(Args, Clone, Debug, Default)]
pub struct RegistryArgs {
    /// User name for the registry (otherwise docker's config.json, then anonymous).
    #[arg(long, env = "SHOAL_REGISTRY_USER", global = true)]
    registry_user: Option<String>,
    /// Password for `--registry-user`.
    #[arg(
        long,
        env = "SHOAL_REGISTRY_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    registry_password: Option<String>,
    /// A registry host[:port] to speak plain HTTP to (loopback hosts always do); repeatable.
    #[arg(long, global = true)]
    plain_http: Vec<String>,
    /// Platform to pick from a multi-arch image, e.g. `linux/arm64/v8` (default: this machine's).
    #[arg(long, global = true)]
    platform: Option<String>,
}

impl RegistryArgs {
    /// A registry client for `reference`'s host, configured from these flags.
    pub fn client(&self, reference: &Reference) -> anyhow::Result<RegistryClient> {
        let mut opts = RegistryOptions::default();
        match (&self.registry_user, &self.registry_password) {
            (Some(user), Some(pass)) => {
                opts.credentials.insert(
                    reference.registry().to_string(),
                    Credentials::new(user.clone(), pass.clone()),
                );
            }
            (Some(_), None) => {
                bail!("--registry-user needs --registry-password (or SHOAL_REGISTRY_PASSWORD)")
            }
            _ => {}
        }
        opts.plain_http.extend(self.plain_http.iter().cloned());
        if let Some(p) = &self.platform {
            opts.platform = PlatformSpec::parse(p)
                .with_context(|| format!("--platform {p:?}: expected OS/ARCH[/VARIANT]"))?;
        }
        RegistryClient::new(opts).context("creating the registry client")
    }
}

/// Parses `docker://HOST/REPO[:TAG|@DIGEST]`, or `None` when `s` is not a registry reference.
pub fn parse_reference(s: &str) -> Option<anyhow::Result<Reference>> {
    s.starts_with(SCHEME)
        .then(|| Reference::parse(s).with_context(|| format!("{s:?} is not a registry reference")))
}

/// Runs `fut` to completion on a runtime made for this one command.
pub fn block_on<F: std::future::Future>(fut: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(fut))
}

/// Progress bars on a terminal; nothing otherwise (or when the output is JSON).
pub struct Progress {
    bars: MultiProgress,
}

impl Progress {
    /// Draws on stderr only when it is a terminal and `quiet` is false.
    pub fn new(quiet: bool) -> Self {
        let target = if !quiet && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Progress {
            bars: MultiProgress::with_draw_target(target),
        }
    }

    fn bar(&self, what: &str, len: u64) -> ProgressBar {
        let bar = self.bars.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:24} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_string());
        bar
    }
}

/// Pulls `reference` (for the configured platform) into the OCI layout at `dir`, tagged `tag`:
/// config and layers are streamed to disk and checked against their digests.
pub async fn pull_to_layout(
    client: &RegistryClient,
    reference: &Reference,
    dir: &Path,
    tag: &str,
    progress: &Progress,
) -> anyhow::Result<LayoutRef> {
    let pulled = client
        .pull_manifest(reference)
        .await
        .with_context(|| format!("pulling the manifest of {reference}"))?;
    let manifest = ImageManifest::from_reader(&pulled.bytes[..]).with_context(|| {
        format!(
            "{reference}: manifest {} is not an image manifest",
            pulled.digest
        )
    })?;
    oci::init_layout(dir)?;
    for desc in std::iter::once(manifest.config()).chain(manifest.layers()) {
        fetch_blob(client, reference, dir, desc, progress).await?;
    }
    oci::add_manifest(dir, &manifest, tag)?;
    Ok(LayoutRef {
        dir: dir.to_path_buf(),
        tag: Some(tag.to_string()),
    })
}

async fn fetch_blob(
    client: &RegistryClient,
    reference: &Reference,
    dir: &Path,
    desc: &Descriptor,
    progress: &Progress,
) -> anyhow::Result<()> {
    let digest = oci::parse_digest(desc.digest())
        .with_context(|| format!("{reference}: unsupported digest {}", desc.digest()))?;
    if oci::blob_path(dir, &digest).exists() {
        return Ok(());
    }
    let short = desc.digest().to_string();
    let bar = progress.bar(&short[..short.len().min(19)], desc.size());
    let mut tmp = tempfile::NamedTempFile::new_in(oci::blobs_dir(dir))
        .context("creating a temporary blob file")?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut stream = client
        .fetch_blob(reference, desc.digest())
        .await
        .with_context(|| format!("fetching blob {} of {reference}", desc.digest()))?;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.with_context(|| format!("reading blob {} of {reference}", desc.digest()))?;
        received += chunk.len() as u64;
        if received > desc.size() {
            bail!(
                "{reference}: blob {} is longer than the {} bytes its descriptor says",
                desc.digest(),
                desc.size()
            );
        }
        hasher.update(&chunk);
        tmp.write_all(&chunk).context("writing a blob to disk")?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    let got: [u8; 32] = hasher.finalize().into();
    if received != desc.size() || got != digest {
        bail!(
            "{reference}: blob {} arrived with {received} bytes and sha256:{}; refusing it",
            desc.digest(),
            hex::encode(got)
        );
    }
    oci::persist_blob(dir, tmp, &digest)?;
    Ok(())
}

/// What a push sent.
#[derive(Debug, Default, serde::Serialize)]
pub struct PushSummary {
    /// The pushed manifest's digest.
    pub manifest: String,
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Blobs the registry already had (not sent).
    pub skipped: usize,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// Pushes the image `layout` names to `target`, skipping blobs the registry already has.
pub async fn push_layout(
    client: &RegistryClient,
    layout: &LayoutRef,
    target: &Reference,
    progress: &Progress,
) -> anyhow::Result<PushSummary> {
    let (desc, manifest) = oci::resolve(layout)?;
    let mut summary = PushSummary::default();
    for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let digest = oci::parse_digest(blob.digest())
            .with_context(|| format!("unsupported digest {}", blob.digest()))?;
        let path = oci::blob_path(&layout.dir, &digest);
        let bar = progress.bar("push", blob.size());
        let outcome = client
            .push_blob_file(target, blob.digest(), &path)
            .await
            .with_context(|| format!("pushing blob {} to {target}", blob.digest()))?;
        bar.finish();
        match outcome {
            PushOutcome::Uploaded => {
                summary.uploaded += 1;
                summary.bytes += blob.size();
            }
            PushOutcome::AlreadyExists => summary.skipped += 1,
        }
    }
    // The manifest goes up byte for byte as it is in the layout, so its digest stays the same.
    let bytes = oci::read_blob(&layout.dir, &desc, shoal_origin::MAX_MANIFEST_BYTES as u64)?;
    let digest = client
        .push_manifest(target, bytes.into(), OCI_MANIFEST)
        .await
        .with_context(|| format!("pushing the manifest to {target}"))?;
    summary.manifest = digest.to_string();
    Ok(summary)
}
