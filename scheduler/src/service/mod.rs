//! The scheduler's QUIC service: peers connect with mutual TLS (ALPN `shoal-sched/1`), say Hello,
//! and send one [`SchedulerRequest`] per stream; each is applied to the core ([`Scheduler`])
//! under one lock and answered. Seed fetch orders go back to the seed as a [`SchedulerPush`] on
//! the connection the seed made. Hosts that stop heartbeating are expired every second.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal_proto::{
    server_handshake, Codec, ErrorCode, ErrorReply, HostId, PushReply, Role, SchedulerPush,
    SchedulerReply, SchedulerRequest, ALPN_SCHEDULER,
};
use shoal_tls::{IdentityPaths, NodeIdentity};

mod config;

pub use config::SchedulerServiceConfig;

use crate::adapter::ProtoAdapter;
use crate::{Scheduler, SchedulerConfig, SchedulerError};

/// Where and as whom the service runs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// UDP address to listen on (default port 4471).
    pub listen: SocketAddr,
    /// The scheduler's name: its certificate's common name, which peers dial.
    pub host_id: String,
    /// Directory with `tls.crt`, `tls.key` and `ca.crt`.
    pub tls_dir: PathBuf,
    /// The only origins tasks and preheats may name (`SchedulerServiceConfig::allowed_origins`).
    pub allowed_origins: Vec<String>,
    /// The core's settings.
    pub core: SchedulerConfig,
}

/// What can stop the service from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// TLS identity or configuration.
    #[error(transparent)]
    Tls(#[from] shoal_tls::TlsError),
    /// Core configuration.
    #[error(transparent)]
    Core(#[from] SchedulerError),
    /// The scheduler's own host id is invalid.
    #[error("scheduler host id: {0}")]
    HostId(#[from] shoal_proto::IdError),
    /// The SIGTERM handler could not be installed.
    #[error("install SIGTERM handler: {0}")]
    Signal(std::io::Error),
    /// Binding the UDP socket failed.
    #[error("bind scheduler QUIC endpoint on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A peer's connection, for pushes.
#[derive(Clone)]
struct PeerLink {
    conn: quinn::Connection,
    codec: Codec,
}

struct Shared {
    /// The core and the proto adapter, under one lock: every request is one short critical section.
    core: Mutex<(Scheduler, ProtoAdapter)>,
    links: Mutex<HashMap<HostId, PeerLink>>,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, (Scheduler, ProtoAdapter)> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running scheduler service.
pub struct SchedulerService {
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SchedulerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerService").finish_non_exhaustive()
    }
}

impl SchedulerService {
    /// Loads the identity, binds the endpoint and starts serving; metrics go to `registry`.
    pub fn start(
        cfg: ServiceConfig,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Self, ServiceError> {
        shoal_tls::install_crypto_provider();
        let me = HostId::new(&cfg.host_id)?;
        let allowed = config::allowed_list(&cfg.allowed_origins)?;
        if let Some(warning) = allowed.empty_warning() {
            tracing::warn!("{warning}");
        }
        let identity = NodeIdentity::load(IdentityPaths::in_dir(&cfg.tls_dir))?;
        let watch = identity.spawn_watcher(shoal_tls::DEFAULT_RELOAD_INTERVAL);
        let mut server = shoal_tls::quic_server_config(&identity, &[ALPN_SCHEDULER])?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
        server.transport_config(Arc::new(transport));
        let endpoint =
            quinn::Endpoint::server(server, cfg.listen).map_err(|source| ServiceError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let core = Scheduler::new(cfg.core, crate::SystemClock, registry)?;
        let adapter = ProtoAdapter::new(allowed, registry);
        let shared = Arc::new(Shared {
            core: Mutex::new((core, adapter)),
            links: Mutex::new(HashMap::new()),
        });
        let accept = {
            let endpoint = endpoint.clone();
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    let shared = Arc::clone(&shared);
                    let me = me.clone();
                    tokio::spawn(async move {
                        match incoming.await {
                            Ok(conn) => serve_connection(shared, conn, me).await,
                            Err(e) => {
                                tracing::info!(error = %e, "scheduler: connection refused during TLS handshake")
                            }
                        }
                    });
                }
            })
        };
        let expire = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let gone = {
                        let mut guard = shared.core();
                        let (core, adapter) = &mut *guard;
                        adapter.expire(core)
                    };
                    if !gone.is_empty() {
                        if let Ok(mut links) = shared.links.lock() {
                            for h in &gone {
                                links.remove(h);
                            }
                        }
                    }
                }
            })
        };
        Ok(SchedulerService {
            endpoint,
            tasks: vec![accept, expire, watch],
            shared,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Registered hosts now.
    pub fn host_count(&self) -> usize {
        self.shared.core().0.host_count()
    }

    /// Stops serving and closes every connection.
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint
            .close(shoal_proto::close_code::OK.into(), b"shutdown");
    }
}

impl Drop for SchedulerService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection, me: HostId) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let check = |h: &shoal_proto::Hello| -> Result<(), String> {
        let who = shoal_tls::peer_identity(&conn).map_err(|e| e.to_string())?;
        if who.common_name != h.host_id.as_str() {
            return Err(format!(
                "host id {} does not match certificate name {}",
                h.host_id, who.common_name
            ));
        }
        if !matches!(h.role, Role::Peer | Role::Seed) {
            return Err("only peers and seeds talk to the scheduler".into());
        }
        Ok(())
    };
    let hello = server_handshake(&mut recv, &mut send, Role::Scheduler, &me, check).await;
    let _ = send.finish();
    let (hello, negotiated) = match hello {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(remote = %conn.remote_address(), error = %e, "scheduler: Hello refused");
            conn.close(e.close_code().into(), b"hello refused");
            return;
        }
    };
    let Ok(host) = HostId::new(hello.host_id.as_str()) else {
        conn.close(shoal_proto::close_code::REFUSED.into(), b"host id");
        return;
    };
    let codec = negotiated.codec;
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let shared = Arc::clone(&shared);
        let host = host.clone();
        let conn = conn.clone();
        let wire_host = hello.host_id.clone();
        tokio::spawn(async move {
            let req = match codec.read::<_, SchedulerRequest>(&mut recv).await {
                Ok(r) => r,
                Err(e) => {
                    let reply = SchedulerReply::Error(ErrorReply::new(
                        ErrorCode::BadRequest,
                        e.to_string(),
                    ));
                    let _ = codec.write(&mut send, &reply).await;
                    let _ = send.finish();
                    return;
                }
            };
            let leaving = matches!(req, SchedulerRequest::LeaveHost);
            let handled = {
                let mut guard = shared.core();
                let (core, adapter) = &mut *guard;
                adapter.handle(core, &wire_host, req)
            };
            // Pushes go only to a connection that registered a host: an operator's connection
            // (e.g. `shoal preheat` with the same certificate) never takes a peer's link.
            if matches!(handled.reply, SchedulerReply::Registered(_)) {
                if let Ok(mut links) = shared.links.lock() {
                    links.insert(host.clone(), PeerLink { conn, codec });
                }
            }
            let _ = codec.write(&mut send, &handled.reply).await;
            let _ = send.finish();
            if leaving {
                if let Ok(mut links) = shared.links.lock() {
                    links.remove(&host);
                }
            }
            for (to, push) in handled.pushes {
                push_to(&shared, to, push);
            }
        });
    }
}

/// Sends a push (a seed's origin-fetch order) to `to` on the connection it made, in the
/// background; a host that is not connected or does not answer is logged (it is asked again on
/// the next decision that needs it). A seed that refuses an order (its origin is outside the
/// seed's allowed_origins) leaves the task, whose origin is then refused to every asker: the
/// fetch is not ordered elsewhere.
fn push_to(shared: &Arc<Shared>, to: HostId, push: SchedulerPush) {
    let Some(link) = shared.links.lock().ok().and_then(|l| l.get(&to).cloned()) else {
        tracing::warn!(host = %to, "cannot push to a host that is not connected");
        return;
    };
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let sent = async {
            let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| e.to_string())?;
            link.codec
                .write(&mut send, &push)
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            link.codec
                .read::<_, PushReply>(&mut recv)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(10), sent).await {
            Ok(Ok(PushReply::Accepted)) => {}
            Ok(Ok(PushReply::Refused(e))) => {
                tracing::warn!(host = %to, reason = %e.message, "push refused");
                let mut guard = shared.core();
                let (core, adapter) = &mut *guard;
                adapter.push_refused(core, &to, &push, &e);
            }
            Ok(Err(e)) => tracing::warn!(host = %to, error = %e, "push failed"),
            Err(_) => tracing::warn!(host = %to, "push not answered within 10 s"),
        }
    });
}

/// Runs the scheduler service until SIGINT or SIGTERM (metrics are registered in a registry
/// owned here; embed [`SchedulerService::start`] to export them).
pub async fn run(cfg: ServiceConfig) -> Result<(), ServiceError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let service = SchedulerService::start(cfg, &mut registry)?;
    tracing::info!(addr = ?service.local_addr().ok(), "scheduler started");
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServiceError::Signal)?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    service.shutdown();
    Ok(())
}
