//! `shoal image pull REF --containerd SOCK`: a lazy pull for plain containerd users, doing what
//! containerd's CRI does for a Shoal image — and nothing of what `ctr image pull` does, which
//! downloads every layer before it unpacks. The manifest and config go into containerd's content
//! store, each layer is "unpacked" through containerd's snapshots service onto the `shoal`
//! snapshotter with the labels the CRI would pass (the snapshotter answers AlreadyExists: no
//! data blob is downloaded), and the image record is created, so that `ctr run --snapshotter
//! shoal REF ID` starts a container on the image's lazy mount.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, StatSnapshotRequest};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
    CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    Image, UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use oci_spec::image::{ImageConfiguration, ImageManifest};
use sha2::{Digest as _, Sha256};
use shoal_format::image::find_bootstrap;
use shoal_format::oci::ANN_LAYER;
use shoal_origin::{collect_stream, Reference};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::registry::{block_on, RegistryArgs};

/// Largest config blob accepted.
const MAX_CONFIG: usize = 4 << 20;
/// containerd's snapshot-label prefix that image layer annotations are passed on under.
const INHERITED: &str = "containerd.io/snapshot/";

/// `shoal image pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// `[docker://]HOST/REPO[:TAG|@DIGEST]` of a Shoal image.
    reference: String,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// containerd namespace (`ctr -n`; the CRI's is `k8s.io`).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The snapshotter's name in containerd's config.
    #[arg(long, default_value = "shoal")]
    snapshotter: String,
}

/// Runs `shoal image pull`.
pub fn run(args: PullArgs, reg: &RegistryArgs) -> anyhow::Result<()> {
    block_on(pull(args, reg))?
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A request carrying containerd's namespace (and lease) metadata.
fn req<T>(ns: &str, lease: Option<&str>, msg: T) -> anyhow::Result<Request<T>> {
    let mut r = Request::new(msg);
    let md = r.metadata_mut();
    md.insert(
        "containerd-namespace",
        ns.parse()
            .context("namespace is not a valid header value")?,
    );
    if let Some(l) = lease {
        md.insert("containerd-lease", l.parse().context("lease id")?);
    }
    Ok(r)
}

async fn pull(args: PullArgs, reg: &RegistryArgs) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let client = reg.client(&reference)?;
    let pulled = client
        .pull_manifest(&reference)
        .await
        .with_context(|| format!("fetching the manifest of {reference}"))?;
    let manifest = ImageManifest::from_reader(pulled.bytes.as_ref())
        .with_context(|| format!("{reference}: not an OCI image manifest"))?;
    if find_bootstrap(&reference.to_string(), &manifest)?.is_none() {
        bail!(
            "{reference} is not a Shoal image (no bootstrap layer): pull it with `ctr image pull` \
             (containerd unpacks plain images onto any snapshotter, `shoal` included), or convert \
             it with `shoal image convert`"
        );
    }
    let cfg_desc = manifest.config();
    let cfg_stream = client.fetch_blob(&reference, cfg_desc.digest()).await?;
    let cfg_bytes = collect_stream(cfg_stream, MAX_CONFIG).await?;
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&cfg_bytes)));
    if got != cfg_desc.digest().to_string() {
        bail!(
            "the config of {reference} has sha256 {got}, its manifest names {}",
            cfg_desc.digest()
        );
    }
    let config = ImageConfiguration::from_reader(cfg_bytes.as_slice())
        .context("the image config is not an OCI image config")?;
    let diff_ids: Vec<String> = config.rootfs().diff_ids().clone();
    if diff_ids.len() != manifest.layers().len() {
        bail!(
            "{reference}: {} layers but {} diff_ids in its config",
            manifest.layers().len(),
            diff_ids.len()
        );
    }
    let chain = shoal_fs::snapshotter::chain_ids(&diff_ids);
    let top = chain.last().cloned().context("the image has no layers")?;
    let name = args.reference.trim_start_matches("docker://").to_string();

    let channel = containerd_client::connect(&args.containerd)
        .await
        .with_context(|| format!("connecting to containerd at {}", args.containerd.display()))?;
    let ns = args.namespace.as_str();
    let mut leases = LeasesClient::new(channel.clone());
    let lease = leases
        .create(req(
            ns,
            None,
            CreateLeaseRequest {
                id: format!("shoal-pull-{}", now_ns()),
                labels: HashMap::from([(
                    "containerd.io/gc.expire".to_string(),
                    humantime_rfc3339(SystemTime::now() + Duration::from_secs(3600)),
                )]),
            },
        )?)
        .await
        .context("creating a lease (is containerd running?)")?
        .into_inner()
        .lease
        .context("containerd returned no lease")?;
    let result = unpack(
        &channel, ns, &lease.id, &args, &name, &pulled, &manifest, &cfg_bytes, &chain,
    )
    .await;
    // The image record and the config's snapshot label hold everything now; the lease goes.
    let _ = leases
        .delete(req(
            ns,
            None,
            DeleteLeaseRequest {
                id: lease.id.clone(),
                sync: false,
            },
        )?)
        .await;
    result?;
    println!(
        "pulled {name} lazily onto the `{}` snapshotter ({} layers, no data blob downloaded); \
         start it with: ctr -n {ns} run --snapshotter {} {name} ID",
        args.snapshotter,
        chain.len(),
        args.snapshotter
    );
    tracing::info!(image = %name, top = %top, "lazy pull done");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn unpack(
    channel: &Channel,
    ns: &str,
    lease: &str,
    args: &PullArgs,
    name: &str,
    pulled: &shoal_origin::PulledManifest,
    manifest: &ImageManifest,
    cfg_bytes: &[u8],
    chain: &[String],
) -> anyhow::Result<()> {
    let top = chain.last().cloned().unwrap_or_default();
    let cfg = manifest.config();
    // GC roots: the manifest keeps its config, the config keeps the unpacked snapshots.
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        cfg.digest().to_string(),
    )]);
    for (i, l) in manifest.layers().iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest().to_string(),
        );
    }
    let config_labels = HashMap::from([(
        format!("containerd.io/gc.ref.snapshot.{}", args.snapshotter),
        top.clone(),
    )]);
    let mut content = ContentClient::new(channel.clone());
    write_content(
        &mut content,
        ns,
        lease,
        pulled.digest.as_ref(),
        &pulled.bytes,
        manifest_labels,
    )
    .await?;
    write_content(
        &mut content,
        ns,
        lease,
        cfg.digest().as_ref(),
        cfg_bytes,
        config_labels,
    )
    .await?;

    let mut snapshots = SnapshotsClient::new(channel.clone());
    let mut parent = String::new();
    for (i, layer) in manifest.layers().iter().enumerate() {
        let exists = snapshots
            .stat(req(
                ns,
                Some(lease),
                StatSnapshotRequest {
                    snapshotter: args.snapshotter.clone(),
                    key: chain[i].clone(),
                },
            )?)
            .await
            .is_ok();
        if !exists {
            let mut labels: HashMap<String, String> = layer
                .annotations()
                .iter()
                .flatten()
                .filter(|(k, _)| k.starts_with(INHERITED))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !labels.contains_key(ANN_LAYER) {
                bail!("layer {} of {name} is not a Shoal layer", layer.digest());
            }
            labels.insert("containerd.io/snapshot.ref".into(), chain[i].clone());
            labels.insert(
                "containerd.io/snapshot/cri.image-ref".into(),
                name.to_string(),
            );
            labels.insert(
                "containerd.io/snapshot/cri.layer-digest".into(),
                layer.digest().to_string(),
            );
            labels.insert(
                "containerd.io/snapshot/cri.manifest-digest".into(),
                pulled.digest.to_string(),
            );
            let key = format!("extract-{}-{}", now_ns(), chain[i]);
            match snapshots
                .prepare(req(
                    ns,
                    Some(lease),
                    PrepareSnapshotRequest {
                        snapshotter: args.snapshotter.clone(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels,
                    },
                )?)
                .await
            {
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => bail!(
                    "the `{}` snapshotter refused layer {} ({}): {}",
                    args.snapshotter,
                    i,
                    layer.digest(),
                    s.message()
                ),
                Ok(_) => bail!(
                    "snapshotter `{}` unpacked layer {} as an ordinary layer: is it Shoal's \
                     snapshotter (`[proxy_plugins.{}]` in containerd's config)?",
                    args.snapshotter,
                    layer.digest(),
                    args.snapshotter
                ),
            }
        }
        parent = chain[i].clone();
    }

    let image = Image {
        name: name.to_string(),
        labels: HashMap::new(),
        target: Some(Descriptor {
            media_type: manifest
                .media_type()
                .as_ref()
                .map_or_else(|| pulled.media_type.clone(), |m| m.to_string()),
            digest: pulled.digest.to_string(),
            size: i64::try_from(pulled.bytes.len()).unwrap_or(i64::MAX),
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(channel.clone());
    let created = images
        .create(req(
            ns,
            Some(lease),
            CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            },
        )?)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(req(
                    ns,
                    Some(lease),
                    UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    },
                )?)
                .await
                .context("updating the image record")?;
            Ok(())
        }
        Err(s) => Err(s).context("creating the image record"),
    }
}

/// Writes `data` as content `digest` (or only sets `labels` when containerd has it already).
async fn write_content(
    content: &mut ContentClient<Channel>,
    ns: &str,
    lease: &str,
    digest: &str,
    data: &[u8],
    labels: HashMap<String, String>,
) -> anyhow::Result<()> {
    let total = i64::try_from(data.len()).unwrap_or(i64::MAX);
    let reference = format!("shoal-pull-{digest}");
    let msgs = vec![
        WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: reference.clone(),
            total,
            expected: digest.to_string(),
            offset: 0,
            data: data.to_vec(),
            labels: HashMap::new(),
        },
        WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: reference,
            total,
            expected: digest.to_string(),
            offset: total,
            data: Vec::new(),
            labels: labels.clone(),
        },
    ];
    let stream = futures::stream::iter(msgs);
    let written = content.write(req(ns, Some(lease), stream)?).await;
    let mut responses = match written {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::AlreadyExists => {
            return update_labels(content, ns, digest, labels).await
        }
        Err(s) => {
            return Err(s)
                .with_context(|| format!("writing {digest} into containerd's content store"))
        }
    };
    loop {
        match responses.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                return update_labels(content, ns, digest, labels).await
            }
            Err(s) => {
                return Err(s)
                    .with_context(|| format!("writing {digest} into containerd's content store"))
            }
        }
    }
}

async fn update_labels(
    content: &mut ContentClient<Channel>,
    ns: &str,
    digest: &str,
    labels: HashMap<String, String>,
) -> anyhow::Result<()> {
    use containerd_client::services::v1::{Info, UpdateRequest};
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    content
        .update(req(
            ns,
            None,
            UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    labels,
                    ..Info::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            },
        )?)
        .await
        .with_context(|| format!("labelling {digest} in containerd's content store"))?;
    Ok(())
}

/// RFC 3339 UTC time (containerd's `gc.expire` label format).
fn humantime_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let ts = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    ts.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
