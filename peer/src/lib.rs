//! Shoal's peer daemon: fetches blobs through the swarm (other peers over mutual-TLS QUIC, the
//! scheduler choosing parents, the origin as the last resort), caches them, and serves them to
//! other peers and to local clients.
//!
//! Data path (README.md draws it): a local client asks the [`api`] for bytes X..Y of blob B ->
//! [`download`] opens (or joins) B's task, asks the [`scheduler_client`] for parents, fetches the
//! pieces covering X..Y from the fastest parents (or the origin), verifies each piece against the
//! piece table as the store takes it, and streams it out -> meanwhile [`upload`] serves every
//! stored piece to other peers. [`seed`] mode fetches from the origin on the scheduler's order.
//!
//! Run a node with [`run`] (until SIGINT/SIGTERM) or [`Peer::start`] (in-process, for tests and
//! for components that embed the peer, like the registry proxy).

pub mod api;
mod budget;
mod config;
mod convert;
mod credentials;
pub mod discovery;
pub mod download;
mod error;
mod held_news;
mod load;
pub mod metrics;
pub mod proxy;
pub mod scheduler_client;
pub mod scheduler_ring;
mod seed;
mod sync;
mod transport;
pub mod upload;

use std::net::SocketAddr;
use std::sync::Arc;

use shoal_proto::{Heartbeat, HostId, Locality, RegisterHost, Role, SchedulerPush};
use shoal_store::{AsyncStore, StoreConfig};
use shoal_tls::{IdentityPaths, NodeIdentity};

pub use config::PeerConfig;
pub use download::{DownloadStats, Downloader, RangeStream, Task};
pub use error::PeerError;
pub use upload::UploadStats;

use download::{Ctx, Origins};
use scheduler_client::SchedEvent;
use scheduler_ring::SchedulerRing;
use transport::Transport;
use upload::Uploader;

/// A running peer: piece server, downloads, scheduler connection and local API.
pub struct Peer {
    downloader: Arc<Downloader>,
    store: AsyncStore,
    uploader: Arc<Uploader>,
    transport: Arc<Transport>,
    sched: Option<Arc<SchedulerRing>>,
    dht: Option<Arc<discovery::Discovery>>,
    quic_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _identity_watch: tokio::task::JoinHandle<()>,
    proxy: Option<proxy::ProxyServer>,
    /// Connections the local API accepted.
    api_connections: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("quic_addr", &self.quic_addr)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Starts every part of the peer; returns once the piece server and the local API listen.
    pub async fn start(config: PeerConfig) -> Result<Peer, PeerError> {
        config.validate()?;
        shoal_tls::install_crypto_provider();
        let host_id = HostId::new(config.host_id.clone())?;
        let identity = NodeIdentity::load(IdentityPaths::in_dir(&config.tls_dir))?;
        let identity_watch = identity.spawn_watcher(shoal_tls::DEFAULT_RELOAD_INTERVAL);
        let mut store_cfg = StoreConfig::new(config.data_dir.join("store"), config.cache_quota());
        if config.cache_ttl_secs > 0 {
            store_cfg.ttl = Some(std::time::Duration::from_secs(config.cache_ttl_secs));
        }
        let store = AsyncStore::open(store_cfg).await?;
        let role = if config.seed { Role::Seed } else { Role::Peer };
        // The only origins this node reaches (proxy, local API, downloads, seed orders).
        let allowed = Arc::new(config.allowed_list()?);
        if let Some(warning) = allowed.empty_warning() {
            tracing::warn!("{warning}");
        }
        // One cap on piece bytes in memory for downloads, origin reads and uploads (budget.rs).
        let budget = budget::PieceBudget::new(config.piece_memory_bytes);
        let transport = Arc::new(Transport::bind(
            &identity,
            config.listen,
            role,
            host_id.clone(),
            config.connect_timeout(),
            budget.clone(),
        )?);
        let quic_addr = transport.local_addr()?;
        let held_news = Arc::new(held_news::HeldNews::default());
        let uploader = Arc::new(Uploader::new(
            store.clone(),
            Arc::clone(&held_news),
            config.upload_slots,
            config.upload_bytes_per_sec,
            budget,
            config.seed,
        ));
        let mut tasks = vec![uploader.spawn(Arc::clone(&transport))];
        let advertised = if config.advertise.is_empty() {
            vec![quic_addr]
        } else {
            config.advertise.clone()
        };
        let staging = Arc::new(download::Staging::new(store.clone(), config.staging_bytes));
        uploader.serve_staged(Arc::clone(&staging));
        let dht = if config.dht {
            Some(discovery::Discovery::start(
                &identity,
                host_id.clone(),
                advertised.clone(),
                config.listen.ip(),
                quic_addr.port(),
                store.clone(),
                Arc::clone(&staging),
            )?)
        } else {
            None
        };

        let download_stats: Arc<DownloadStats> = Arc::default();
        let (sched, events) = match scheduler_ring::source_of(&config) {
            Some(source) => {
                let advertise = if config.advertise.is_empty() {
                    vec![quic_addr]
                } else {
                    config.advertise.clone()
                };
                let registration = RegisterHost {
                    host_id: host_id.clone(),
                    addresses: advertise,
                    locality: Locality {
                        zone: config.zone.clone(),
                        rack: config.rack.clone(),
                    },
                    upload_slots: config.upload_slots,
                    upload_bytes_per_sec: config.upload_bytes_per_sec,
                    is_seed: config.seed,
                };
                let up = Arc::clone(&uploader);
                let meter =
                    load::LoadMeter::new(Arc::clone(&up.stats), Arc::clone(&download_stats));
                let hooks = scheduler_client::HostHooks {
                    load: Arc::new(move || {
                        let (upload, download) = meter.rates();
                        Heartbeat {
                            free_upload_slots: up.free_slots(),
                            upload_bytes_per_sec: upload,
                            download_bytes_per_sec: download,
                        }
                    }),
                    gate: seed::push_gate(config.seed, Arc::clone(&allowed)),
                };
                let (client, events) = SchedulerRing::new(
                    Arc::clone(&transport),
                    source,
                    config.scheduler_name.clone(),
                    config.scheduler_timeout(),
                    registration,
                    hooks,
                );
                tasks.push(client.spawn());
                (Some(client), Some(events))
            }
            None => (None, None),
        };

        let seen_credentials = Arc::new(credentials::SeenCredentials::default());
        let origins = Origins::new(
            &config.plain_http_registries,
            Arc::clone(&allowed),
            Arc::clone(&seen_credentials),
        )?;
        let downloader = Arc::new(Downloader::new(Ctx {
            store: store.clone(),
            transport: Arc::clone(&transport),
            sched: sched.clone(),
            dht: dht.clone(),
            origins,
            config: config.clone(),
            me: host_id,
            stats: download_stats,
            staging,
            held_news,
        }));
        if let Some(mut events) = events {
            let d = Arc::clone(&downloader);
            tasks.push(tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    match ev {
                        SchedEvent::Registered | SchedEvent::Lost => d.announce_all(),
                        SchedEvent::Push(SchedulerPush::FetchFromOrigin(order)) => {
                            seed::fetch_from_origin(&d, order)
                        }
                        SchedEvent::Push(SchedulerPush::PiecesUpdate(u)) => d.pieces_update(u),
                    }
                }
            }));
        }
        if let Some(d) = &dht {
            tasks.push(d.spawn_bootstrap(
                sched.clone(),
                config.dht_bootstrap.clone(),
                config.dht_bootstrap_dns.clone(),
            ));
        }
        let api_connections = Arc::default();
        let api_state = Arc::new(api::ApiState {
            downloader: Arc::clone(&downloader),
            store: store.clone(),
            connections: Arc::clone(&api_connections),
        });
        tasks.push(api::serve(&config.api_socket, api_state)?);
        let proxy = if config.proxy.enabled {
            let p = proxy::start(
                config.proxy.clone(),
                &config.plain_http_registries,
                Arc::clone(&allowed),
                Arc::clone(&downloader),
                store.clone(),
                &identity,
                seen_credentials,
            );
            Some(p.await?)
        } else {
            None
        };
        if config.cache_ttl_secs > 0 {
            tasks.push(store.spawn_sweeper(std::time::Duration::from_secs(
                config.cache_ttl_secs.clamp(1, 600),
            )));
        }
        // Evictions reach the scheduler within a few seconds (the DHT withdraws on its own sweep).
        tasks.push(downloader.spawn_dropped_piece_reports(std::time::Duration::from_secs(3)));
        tracing::info!(host = %config.host_id, quic = %quic_addr, api = %config.api_socket.display(), seed = config.seed, "peer started");
        Ok(Peer {
            downloader,
            store,
            uploader,
            transport,
            sched,
            dht,
            quic_addr,
            tasks,
            _identity_watch: identity_watch,
            proxy,
            api_connections,
        })
    }

    /// The piece server's bound UDP address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The registry proxy's bound address, when `proxy.enabled`.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy.as_ref().map(|p| p.local_addr())
    }

    /// The registry proxy's request counters, when `proxy.enabled`.
    pub fn proxy_stats(&self) -> Option<&proxy::ProxyStats> {
        self.proxy.as_ref().map(|p| p.stats())
    }

    /// The operator's allowed origins, with the refusals counted so far (for `/metrics`).
    pub fn allowed_origins(&self) -> &Arc<shoal_origin::AllowedOrigins> {
        self.downloader.allowed_origins()
    }

    /// The downloads (for in-process users such as the registry proxy).
    pub fn downloader(&self) -> &Arc<Downloader> {
        &self.downloader
    }

    /// The store.
    pub fn store(&self) -> &AsyncStore {
        &self.store
    }

    /// Piece server counters.
    pub fn upload_stats(&self) -> &UploadStats {
        &self.uploader.stats
    }

    /// Connections the local API has accepted (its clients keep theirs between requests).
    pub fn api_connections(&self) -> u64 {
        self.api_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Test hook (feature `test-hooks`, which the shipped binary never enables): from now on
    /// flip one byte of every piece this peer uploads, so that tests see children catch it.
    #[cfg(feature = "test-hooks")]
    pub fn corrupt_uploads(&self, on: bool) {
        self.uploader
            .corrupt
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a scheduler connection is up (any of them).
    pub fn scheduler_connected(&self) -> bool {
        self.schedulers_connected() > 0
    }

    /// The DHT node, when `dht` is on.
    pub fn discovery(&self) -> Option<&Arc<discovery::Discovery>> {
        self.dht.as_ref()
    }

    /// How many schedulers this peer is registered with now.
    pub fn schedulers_connected(&self) -> usize {
        self.sched.as_ref().map_or(0, |s| s.connected())
    }

    /// Leaves the scheduler (best effort), then stops serving and closes every connection.
    pub async fn shutdown(self) {
        if let Some(p) = &self.proxy {
            p.shutdown().await; // requests in flight finish first
        }
        if let Some(s) = &self.sched {
            s.leave().await;
        }
        self.stop_now();
    }

    /// Stops at once without telling anyone, as a crash would (for tests of failure handling).
    pub fn kill(self) {
        self.stop_now();
    }

    fn stop_now(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self._identity_watch.abort();
        if let Some(p) = &self.proxy {
            p.abort();
        }
        self.transport.close();
    }
}

/// Runs a peer (or a seed) until SIGINT or SIGTERM, then leaves the scheduler and stops.
pub async fn run(config: PeerConfig) -> Result<(), PeerError> {
    let peer = Peer::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("peer shutting down");
    peer.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<(), PeerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| PeerError::io("install handler for", "SIGTERM", e))?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(|e| PeerError::io("wait for", "SIGINT", e)),
        _ = term.recv() => Ok(()),
    }
}
