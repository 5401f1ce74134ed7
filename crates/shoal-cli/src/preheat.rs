//! `shoal preheat docker://REF`: makes seeds fetch every blob of an image before any peer asks.
//! Resolves the manifest at the registry (shoal-origin), then sends the scheduler one `Preheat`
//! request (docs/protocol.md, "Messages") over mutual-TLS QUIC with this node's certificate;
//! the scheduler orders a seed per blob to fetch it from the origin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use oci_spec::image::ImageManifest;
use shoal_proto::{
    client_handshake, Digest, Hello, HostId, OriginRef, Preheat, PreheatOutcome, Role,
    SchedulerReply, SchedulerRequest, TaskMeta, ALPN_SCHEDULER,
};
use shoal_tls::{IdentityPaths, NodeIdentity};

use crate::registry::{parse_reference, RegistryArgs};

/// How long connecting and the one request may take together.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `shoal preheat`: have seeds fetch an image's blobs ahead of time.
#[derive(Args, Debug)]
pub struct PreheatArgs {
    /// The image: `docker://HOST/REPO:TAG` or `docker://HOST/REPO@sha256:...`.
    image: String,
    /// The scheduler's QUIC address (`HOST:PORT`).
    #[arg(long, env = "SHOAL_SCHEDULER")]
    scheduler: String,
    /// The scheduler certificate's name.
    #[arg(long, default_value = "shoal-scheduler")]
    scheduler_name: String,
    /// Directory with this node's tls.crt, tls.key and ca.crt (any cluster certificate).
    #[arg(long, default_value = "/etc/shoal/tls")]
    tls_dir: PathBuf,
    /// Piece size of the preheated blobs; must match the peers' `piece_size` if they set one
    /// (default: the size-based default every peer uses).
    #[arg(long)]
    piece_size: Option<u32>,
    /// Print the scheduler's answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Runs `shoal preheat`.
pub fn run(args: PreheatArgs) -> anyhow::Result<()> {
    crate::registry::block_on(preheat(args))?
}

async fn preheat(args: PreheatArgs) -> anyhow::Result<()> {
    let Some(reference) = parse_reference(&args.image) else {
        bail!("{:?}: expected docker://HOST/REPO:TAG", args.image);
    };
    let reference = reference?;
    let client = args.registry.client(&reference)?;
    let pulled = client
        .pull_manifest(&reference)
        .await
        .with_context(|| format!("resolving the manifest of {reference}"))?;
    let manifest = ImageManifest::from_reader(&pulled.bytes[..])
        .with_context(|| format!("{reference}: {} is not an image manifest", pulled.digest))?;
    let mut blobs = Vec::new();
    for desc in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let blob = Digest::parse(desc.digest().as_ref())
            .with_context(|| format!("{reference}: unsupported digest {}", desc.digest()))?;
        let size = desc.size();
        blobs.push(TaskMeta {
            blob,
            size,
            piece_size: args
                .piece_size
                .unwrap_or_else(|| shoal_proto::default_piece_size(size)),
        });
    }
    let origin = OriginRef {
        reference: format!(
            "{}{}/{}",
            crate::registry::SCHEME,
            reference.registry(),
            reference.repository()
        ),
        authorization: None,
    };
    let request = SchedulerRequest::Preheat(Preheat { blobs, origin });
    let reply = tokio::time::timeout(TIMEOUT, ask(&args, &request))
        .await
        .with_context(|| {
            format!(
                "the scheduler at {} did not answer within {TIMEOUT:?}",
                args.scheduler
            )
        })??;
    let outcomes = match reply {
        SchedulerReply::Preheated(r) => r.outcomes,
        SchedulerReply::Error(e) => bail!(
            "the scheduler refused the preheat: {:?}: {}",
            e.code,
            e.message
        ),
        other => bail!("unexpected answer from the scheduler: {other:?}"),
    };
    if args.json {
        println!("{}", serde_json::to_string(&outcomes)?);
    } else {
        println!("{reference} ({}): {} blobs", pulled.digest, outcomes.len());
        for (blob, outcome) in &outcomes {
            match outcome {
                PreheatOutcome::Ordered { seed } => println!("  {blob}  fetching on seed {seed}"),
                PreheatOutcome::AlreadyWarm => println!("  {blob}  already on a seed"),
                PreheatOutcome::NoSeed { reason } => println!("  {blob}  NOT preheated: {reason}"),
            }
        }
    }
    if outcomes
        .iter()
        .any(|(_, o)| matches!(o, PreheatOutcome::NoSeed { .. }))
    {
        bail!("some blobs could not be preheated (see above)");
    }
    Ok(())
}

/// Connects to the scheduler with this node's certificate and sends one request.
async fn ask(args: &PreheatArgs, request: &SchedulerRequest) -> anyhow::Result<SchedulerReply> {
    let addr: SocketAddr = tokio::net::lookup_host(&args.scheduler)
        .await
        .with_context(|| format!("resolving --scheduler {}", args.scheduler))?
        .next()
        .with_context(|| format!("--scheduler {} resolves to no address", args.scheduler))?;
    let identity: Arc<NodeIdentity> = NodeIdentity::load(IdentityPaths::in_dir(&args.tls_dir))
        .with_context(|| format!("loading the certificate in {}", args.tls_dir.display()))?;
    let me = crate::peer::certificate_name(&args.tls_dir)?;
    let config = shoal_tls::quic_client_config(&identity, &[ALPN_SCHEDULER])?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let endpoint = quinn::Endpoint::client(bind).context("opening a UDP socket")?;
    let conn = endpoint
        .connect_with(config, addr, &args.scheduler_name)
        .with_context(|| format!("connecting to {addr}"))?
        .await
        .with_context(|| {
            format!(
                "connecting to the scheduler {} at {addr} (is it running, and is its certificate from the same CA?)",
                args.scheduler_name
            )
        })?;
    let (mut send, mut recv) = conn.open_bi().await.context("opening the Hello stream")?;
    let hello = Hello::new(Role::Peer, HostId::new(me)?);
    let negotiated = client_handshake(&mut recv, &mut send, &hello)
        .await
        .context("Hello with the scheduler")?;
    let _ = send.finish();
    let (mut send, mut recv) = conn.open_bi().await.context("opening a request stream")?;
    negotiated
        .codec
        .write(&mut send, request)
        .await
        .context("sending the preheat request")?;
    let _ = send.finish();
    let reply: SchedulerReply = negotiated
        .codec
        .read(&mut recv)
        .await
        .context("reading the scheduler's answer")?;
    conn.close(shoal_proto::close_code::OK.into(), b"done");
    endpoint.wait_idle().await;
    Ok(reply)
}
