//! `shoal image index`: index an existing OCI image (read once, never converted) and publish the
//! index beside it as an OCI referrer of its manifest; and the per-layer view `inspect` prints.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use oci_spec::image::{Descriptor, ImageManifest};
use shoal_format::index::{artifact, IndexOptions, Indexer, LayerIndex};
use shoal_format::oci::{self, LayoutRef};
use shoal_origin::{Bytes, Reference, ReferrerListing, RegistryClient};
use tempfile::TempDir;

use crate::registry::{self, RegistryArgs};

/// Arguments of `shoal image index`.
#[derive(Args)]
pub struct IndexArgs {
    /// The image to index: `docker://REF` or `oci:DIR[:TAG]`.
    src: String,
    /// `docker://REF` of the image in a registry: the index is pushed there as a referrer of the
    /// image manifest (default: SRC when it is `docker://`).
    #[arg(long)]
    target: Option<String>,
    /// `oci:DIR` to write the index into (default: SRC's layout for an `oci:` SRC, else a
    /// temporary one).
    #[arg(long)]
    output: Option<String>,
    /// Compressed bytes between gzip checkpoints; suffixes K and M allowed.
    #[arg(long, default_value = "4M", value_parser = crate::image::parse_size)]
    span: u32,
    /// Chunk size of the layer bootstraps (power of two, 64 KiB..16 MiB); suffixes K and M.
    #[arg(long, default_value = "1M", value_parser = crate::image::parse_size)]
    chunk_size: u32,
    /// File listing paths to prefetch after mount, one per line, in order (as `shoal image
    /// convert --prefetch`): each layer's bootstrap lists those the layer provides.
    #[arg(long)]
    prefetch: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// What `shoal image index` did.
#[derive(Debug, serde::Serialize)]
pub struct IndexReport {
    /// The indexed image's manifest digest.
    pub image: String,
    /// The index manifest's digest.
    pub index: String,
    /// Per layer, in order.
    pub layers: Vec<LayerIndex>,
    /// Bytes of the image: config and layers.
    pub image_bytes: u64,
    /// Bytes of the index: its manifest, config, bootstraps and side blobs.
    pub index_bytes: u64,
    /// `index_bytes / image_bytes`.
    pub ratio: f64,
    /// Seconds reading and indexing the layers.
    pub seconds: f64,
    /// Uncompressed tar bytes per second, in MB (10^6 bytes).
    pub mb_per_s: f64,
    /// Where the index was pushed and how it is listed (`api` or `tag`), if it was.
    pub pushed: Option<String>,
}

/// Runs `shoal image index`.
pub fn run(a: IndexArgs, reg: &RegistryArgs) -> anyhow::Result<()> {
    let opts = IndexOptions {
        chunk_size: a.chunk_size,
        span: u64::from(a.span),
        piece_size: shoal_proto::default_piece_size,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let src_ref = registry::parse_reference(&a.src).transpose()?;
    let target = match (&a.target, &src_ref) {
        (Some(t), _) => Some(
            registry::parse_reference(t)
                .with_context(|| format!("--target {t:?}: expected docker://REF"))??,
        ),
        (None, Some(r)) => Some(r.clone()),
        (None, None) => None,
    };
    let mut _tmp = None;
    let out_dir: PathBuf = match (&a.output, LayoutRef::parse(&a.src)) {
        (Some(o), _) => crate::image::layout(o)?.dir,
        (None, Some(r)) => r.dir,
        (None, None) => {
            let t = TempDir::new().context("creating a temporary directory")?;
            let d = t.path().to_path_buf();
            _tmp = Some(t);
            d
        }
    };
    let mut indexer = Indexer::new(&out_dir, opts)?;
    if let Some(p) = &a.prefetch {
        indexer.set_prefetch(crate::image::read_prefetch_list(p)?);
    }
    let (mdesc, manifest, image_dir) = match (&src_ref, LayoutRef::parse(&a.src)) {
        (Some(r), _) => {
            let client = reg.client(r)?;
            let (mdesc, manifest) = rt.block_on(remote_manifest(&client, r))?;
            refuse_shoal(&a.src, &mdesc, &manifest)?;
            for layer in manifest.layers() {
                let digest = digest_of(layer)?;
                let stream = rt
                    .block_on(client.fetch_blob(r, layer.digest()))
                    .with_context(|| format!("fetching layer {} of {r}", layer.digest()))?;
                let reader = StreamRead {
                    rt: rt.handle().clone(),
                    stream: Some(stream),
                    buf: Bytes::new(),
                };
                indexer.add_layer(&digest, layer.size(), reader)?;
            }
            (mdesc, manifest, None)
        }
        (None, Some(r)) => {
            let (mdesc, manifest) = oci::resolve(&r)?;
            refuse_shoal(&a.src, &mdesc, &manifest)?;
            for layer in manifest.layers() {
                let digest = digest_of(layer)?;
                let path = oci::blob_path(&r.dir, &digest);
                let f = std::fs::File::open(&path)
                    .with_context(|| format!("opening layer {}", path.display()))?;
                indexer.add_layer(&digest, layer.size(), std::io::BufReader::new(f))?;
            }
            (mdesc, manifest, Some(r.dir))
        }
        (None, None) => bail!("{:?}: expected docker://REF or oci:DIR[:TAG]", a.src),
    };
    indexer.check_prefetch()?;
    let index_desc = artifact::write(&out_dir, &mdesc, &indexer.reports, indexer.options())?;
    let index_bytes = index_desc.size()
        + 2
        + indexer
            .reports
            .iter()
            .map(|l| l.bootstrap.1 + l.side_blob.as_ref().map_or(0, |s| s.1))
            .sum::<u64>();
    let image_bytes =
        manifest.config().size() + manifest.layers().iter().map(|l| l.size()).sum::<u64>();
    let pushed = match &target {
        Some(t) => {
            let client = reg.client(t)?;
            let listing = rt.block_on(push_index(
                &client,
                t,
                &out_dir,
                &index_desc,
                &mdesc,
                image_dir.is_some(),
            ))?;
            Some(format!(
                "{t}@{} ({})",
                index_desc.digest(),
                match listing {
                    ReferrerListing::Api => "referrers API",
                    ReferrerListing::TagScheme => "referrers tag",
                }
            ))
        }
        None => None,
    };
    let tar: u64 = indexer.reports.iter().map(|l| l.tar_bytes).sum();
    let report = IndexReport {
        image: mdesc.digest().to_string(),
        index: index_desc.digest().to_string(),
        layers: indexer.reports.clone(),
        image_bytes,
        index_bytes,
        ratio: index_bytes as f64 / image_bytes.max(1) as f64,
        seconds: indexer.seconds,
        mb_per_s: tar as f64 / 1e6 / indexer.seconds.max(1e-9),
        pushed,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("image             {}", report.image);
        println!("index             {}", report.index);
        print_layers(&report.layers);
        println!(
            "index size        {} bytes = {:.2} % of the image's {} bytes",
            report.index_bytes,
            report.ratio * 100.0,
            report.image_bytes
        );
        println!(
            "time              {:.2} s ({:.1} MB/s of tar)",
            report.seconds, report.mb_per_s
        );
        if let Some(p) = &report.pushed {
            println!("pushed            {p}");
        }
    }
    Ok(())
}

/// One line per layer: compression, checkpoints, lazy or not.
pub fn print_layers(layers: &[LayerIndex]) {
    for (i, l) in layers.iter().enumerate() {
        println!(
            "layer {i:<3}         {} {:>11} bytes  {:<4}  {:>5} checkpoints  {}  {} files, bootstrap {} bytes{}{}",
            l.layer,
            l.size,
            format!("{:?}", l.compression).to_lowercase(),
            l.checkpoints,
            if l.lazy { "lazy" } else { "whole layer (not lazy)" },
            l.files,
            l.bootstrap.1,
            l.side_blob
                .as_ref()
                .map(|s| format!(", side blob {} bytes", s.1))
                .unwrap_or_default(),
            if l.prefetch > 0 {
                format!(", {} to prefetch", l.prefetch)
            } else {
                String::new()
            }
        );
    }
}

fn digest_of(d: &Descriptor) -> anyhow::Result<[u8; 32]> {
    oci::parse_digest(d.digest()).with_context(|| format!("unsupported digest {}", d.digest()))
}

fn refuse_shoal(src: &str, mdesc: &Descriptor, m: &ImageManifest) -> anyhow::Result<()> {
    if shoal_format::image::find_bootstrap(mdesc.digest().as_ref(), m)?.is_some() {
        bail!("{src} is already a Shoal image: it mounts lazily as it is, no index needed");
    }
    Ok(())
}

/// The manifest of `r` (for this platform) and its descriptor.
async fn remote_manifest(
    client: &RegistryClient,
    r: &Reference,
) -> anyhow::Result<(Descriptor, ImageManifest)> {
    let pulled = client
        .pull_manifest(r)
        .await
        .with_context(|| format!("pulling the manifest of {r}"))?;
    let manifest = ImageManifest::from_reader(&pulled.bytes[..])
        .with_context(|| format!("{r}: {} is not an image manifest", pulled.digest))?;
    let desc = Descriptor::new(
        oci_spec::image::MediaType::ImageManifest,
        pulled.bytes.len() as u64,
        pulled.digest.clone(),
    );
    Ok((desc, manifest))
}

/// Pushes the index in layout `dir` to `target`'s repository as a referrer of `subject`; the
/// image must be there (it is the subject).
async fn push_index(
    client: &RegistryClient,
    target: &Reference,
    dir: &std::path::Path,
    index: &Descriptor,
    subject: &Descriptor,
    check_subject: bool,
) -> anyhow::Result<ReferrerListing> {
    if check_subject {
        client
            .pull_manifest_raw(&target.with_digest(subject.digest().clone()))
            .await
            .with_context(|| {
                format!(
                    "{target} does not hold the indexed image {} (push the image there first)",
                    subject.digest()
                )
            })?;
    }
    let bytes = oci::read_blob(dir, index, shoal_origin::MAX_MANIFEST_BYTES as u64)?;
    let manifest = ImageManifest::from_reader(&bytes[..]).context("reading the index manifest")?;
    for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let path = oci::blob_path(dir, &digest_of(blob)?);
        client
            .push_blob_file(target, blob.digest(), &path)
            .await
            .with_context(|| format!("pushing index blob {} to {target}", blob.digest()))?;
    }
    let listing = client
        .push_referrer(target, bytes.into(), index, subject.digest())
        .await
        .with_context(|| format!("pushing the index manifest to {target}"))?;
    Ok(listing)
}

/// A registry blob stream read synchronously (the indexer is synchronous; this thread is not a
/// runtime thread, so it may block on the next piece).
struct StreamRead {
    rt: tokio::runtime::Handle,
    stream: Option<shoal_origin::ByteStream>,
    buf: Bytes,
}

impl Read for StreamRead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(0);
            };
            match self.rt.block_on(stream.next()) {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                None => self.stream = None,
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}

/// The Shoal index of image `src` (its per-layer view), when there is one.
pub fn find_index(
    src: &str,
    reg: &RegistryArgs,
) -> anyhow::Result<Option<(Descriptor, Vec<LayerIndexView>)>> {
    if let Some(r) = LayoutRef::parse(src) {
        let (mdesc, _) = oci::resolve(&r)?;
        let Some((desc, m)) = artifact::find(&r.dir, mdesc.digest().as_ref())? else {
            return Ok(None);
        };
        return Ok(Some((desc, views(&m))));
    }
    let Some(r) = registry::parse_reference(src) else {
        return Ok(None);
    };
    let r = r?;
    let client = reg.client(&r)?;
    registry::block_on(async {
        let (mdesc, manifest) = remote_manifest(&client, &r).await?;
        if shoal_format::image::find_bootstrap(mdesc.digest().as_ref(), &manifest)?.is_some() {
            return Ok(None);
        }
        let refs = client.referrers(&r, mdesc.digest()).await?;
        let Some(desc) = refs.into_iter().find(|d| {
            d.artifact_type().as_ref().map(|t| t.to_string()).as_deref()
                == Some(artifact::ARTIFACT_TYPE)
        }) else {
            return Ok(None);
        };
        let pulled = client
            .pull_manifest_raw(&r.with_digest(desc.digest().clone()))
            .await?;
        let m =
            ImageManifest::from_reader(&pulled.bytes[..]).context("reading the index manifest")?;
        Ok(Some((desc, views(&m))))
    })?
}

/// What `inspect` shows of one indexed layer (from the index manifest's annotations).
#[derive(Debug, serde::Serialize)]
pub struct LayerIndexView {
    /// The layer's digest.
    pub layer: String,
    /// Its compression.
    pub compression: String,
    /// Checkpoints its chunks start from.
    pub checkpoints: String,
    /// Whether reads fetch only what they need.
    pub lazy: bool,
    /// The bootstrap's digest and size.
    pub bootstrap: (String, u64),
}

fn views(index: &ImageManifest) -> Vec<LayerIndexView> {
    artifact::layer_bootstraps(index)
        .into_iter()
        .map(|d| {
            let ann = |k: &str| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(k))
                    .cloned()
                    .unwrap_or_default()
            };
            LayerIndexView {
                layer: ann(artifact::ANN_LAYER),
                compression: ann(artifact::ANN_COMPRESSION),
                checkpoints: ann(artifact::ANN_CHECKPOINTS),
                lazy: ann(artifact::ANN_LAZY) == "true",
                bootstrap: (d.digest().to_string(), d.size()),
            }
        })
        .collect()
}
