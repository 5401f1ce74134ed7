//! `shoal snapshotter`: containerd's snapshots API as a proxy plugin, so that containers start on
//! lazily mounted Shoal images the way kubelet starts them, through containerd's CRI.
//!
//! ```text
//! kubelet -> containerd CRI (PullImage, CreateContainer)
//!   -> snapshots gRPC on a unix socket ........................ service.rs
//!   -> Prepare(layer, labels) ................................. snapshots.rs
//!        plain OCI layer: snapshots/<id>/{fs,work}, containerd applies the tar (as overlayfs)
//!        Shoal data blob: committed at once, AlreadyExists (never downloaded) ... labels.rs
//!        Shoal bootstrap (top): fetched through the peer, sha256-checked ........ bootstrap.rs
//!            and mounted by one `shoal fs mount` process per image ............. images.rs
//!        plain layer of an image with a Shoal index (looked up once per image) .. indexes.rs
//!            committed as that layer's own lazy mount (its bootstrap), AlreadyExists
//!   -> container Prepare: overlay, upper = its own dir, lower = the image's mount . overlay.rs
//! state: snapshots, parents, labels, lazy images in redb ....................... state.rs
//! ```
//!
//! Mount processes outlive the snapshotter; at start it adopts those still serving and mounts
//! again those that died. Lists take containerd's filters (filter.rs); usage is measured on
//! disk (usage.rs); metrics.rs counts calls and what each lazy image read and fetched.

pub mod api;
pub mod bootstrap;
mod config;
mod error;
mod filter;
pub mod images;
mod indexes;
mod labels;
mod metrics;
mod overlay;
mod service;
mod snapshots;
mod state;
mod usage;

use std::sync::Arc;
use std::time::Duration;

pub use config::{SnapshotterConfig, DEFAULT_ROOT, DEFAULT_SOCKET};
pub use error::{Result, SnapshotterError};
pub use images::{read_stats, ImageInfo};
pub use labels::{
    chain_ids, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, SHOAL_LAYER, TARGET_REF,
};

use bootstrap::BootstrapSource;
use images::{LazyImages, MountSettings};
use snapshots::Snapshots;

/// Runs the snapshotter until SIGINT or SIGTERM. Lazy mounts stay up for running containers.
pub fn run(config: SnapshotterConfig) -> Result<()> {
    config.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shoal-snapshotter")
        .enable_all()
        .build()
        .map_err(|e| SnapshotterError::io("starting runtime for", &config.root, e))?;
    rt.block_on(serve(config, shutdown_signal()))
}

/// Serves containerd on `config.socket` until `shutdown` completes (inside a tokio runtime;
/// [`run`] is the process's entry point, tests call this).
pub async fn serve(
    config: SnapshotterConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    config.validate()?;
    let root = config.root.clone();
    std::fs::create_dir_all(&root).map_err(|e| SnapshotterError::io("creating", &root, e))?;
    let shoal_binary = match &config.shoal_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| SnapshotterError::io("finding the shoal binary", "/proc/self/exe", e))?,
    };
    let source = BootstrapSource {
        peer: config.peer_socket.as_ref().map(shoal_api::Client::new),
        plain_http: config.plain_http.clone(),
        docker_config: config.docker_config.clone(),
    };
    let indexes = config.indexes.then(|| {
        indexes::Indexes::new(
            source.clone(),
            Duration::from_secs(config.no_index_cache_secs),
            tokio::runtime::Handle::current(),
        )
    });
    let settings = MountSettings {
        shoal_binary,
        source,
        mount_timeout: Duration::from_secs(config.mount_timeout_secs),
        cache_quota: config.image_cache_quota,
        fetch_timeout_secs: config.fetch_timeout_secs,
        prefetch: config.prefetch,
        log: config.mount_log.clone(),
    };
    let images_dir = root.join("images");
    let handle = tokio::runtime::Handle::current();
    // Opening adopts or remounts the lazy images: blocking work, off the runtime's workers.
    let core = tokio::task::spawn_blocking(move || {
        let images = LazyImages::new(images_dir, settings, handle)?;
        Snapshots::open(&root, images, indexes)
    })
    .await
    .map_err(|e| SnapshotterError::Config(format!("opening the snapshotter: {e}")))??;
    let core = Arc::new(core);
    let metrics = Arc::new(metrics::Metrics::new(config.root.join("images")));
    let _telemetry = match config.metrics_addr {
        Some(addr) => {
            let mut registry = prometheus_client::registry::Registry::default();
            metrics.register(registry.sub_registry_with_prefix("shoal_snapshotter"));
            Some(
                shoal_telemetry::serve(addr, registry, Arc::new(|| true))
                    .await
                    .map_err(|e| SnapshotterError::Config(format!("metrics server: {e}")))?,
            )
        }
        None => None,
    };
    let service = service::Service::new(core, metrics);
    service::serve(service, &config.socket, shutdown).await?;
    tracing::info!("snapshotter stopped; lazy mounts stay up for running containers");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot listen for signals; the snapshotter stops only when killed");
            std::future::pending::<()>().await
        }
    }
}
