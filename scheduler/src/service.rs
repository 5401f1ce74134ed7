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
    server_handshake, Codec, ErrorCode, ErrorReply, FailureReason, FetchFromOrigin, HostId as WireHost, OriginRef,
    Parent as WireParent, ParentsReply, PieceReport, PieceSet as WireSet, PushReply, Registered, Role,
    SchedulerPush, SchedulerReply, SchedulerRequest, TaskInfo, TaskMeta, ALPN_SCHEDULER,
};
use shoal_tls::{IdentityPaths, NodeIdentity};

use crate::{
    Decision, FailureKind, Held, HostId, HostLoad, HostRegistration, Locality, Parent, Scheduler, SchedulerConfig,
    SchedulerError, TaskAnnouncement, TaskId,
};

/// Most origin references remembered (one per task that named one).
const MAX_ORIGINS: usize = 200_000;

/// Where and as whom the service runs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// UDP address to listen on (default port 4471).
    pub listen: SocketAddr,
    /// The scheduler's name: its certificate's common name, which peers dial.
    pub host_id: String,
    /// Directory with `tls.crt`, `tls.key` and `ca.crt`.
    pub tls_dir: PathBuf,
    /// The core's settings.
    pub core: SchedulerConfig,
    /// Heartbeat interval asked of peers, in milliseconds.
    pub heartbeat_interval_ms: u32,
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
    HostId(#[from] shoal_proto::ProtoError),
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
    core: Mutex<Scheduler>,
    links: Mutex<HashMap<HostId, PeerLink>>,
    origins: Mutex<HashMap<TaskId, OriginRef>>,
    heartbeat_ms: u32,
    timeout_ms: u32,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Scheduler> {
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
    pub fn start(cfg: ServiceConfig, registry: &mut prometheus_client::registry::Registry) -> Result<Self, ServiceError> {
        shoal_tls::install_crypto_provider();
        let me = WireHost::new(cfg.host_id.clone())?;
        let identity = NodeIdentity::load(IdentityPaths::in_dir(&cfg.tls_dir))?;
        let watch = identity.spawn_watcher(shoal_tls::DEFAULT_RELOAD_INTERVAL);
        let mut server = shoal_tls::quic_server_config(&identity, &[ALPN_SCHEDULER])?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
        server.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(server, cfg.listen).map_err(|source| ServiceError::Bind { addr: cfg.listen, source })?;
        let timeout_ms = u32::try_from(cfg.core.host_timeout_secs.saturating_mul(1000)).unwrap_or(u32::MAX);
        let core = Scheduler::new(cfg.core, crate::SystemClock, registry)?;
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            links: Mutex::new(HashMap::new()),
            origins: Mutex::new(HashMap::new()),
            heartbeat_ms: cfg.heartbeat_interval_ms.max(100),
            timeout_ms,
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
                            Err(e) => tracing::info!(error = %e, "scheduler: connection refused during TLS handshake"),
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
                    let gone = shared.core().expire_hosts();
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
        self.shared.core().host_count()
    }

    /// Stops serving and closes every connection.
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint.close(shoal_proto::close_code::OK.into(), b"shutdown");
    }
}

impl Drop for SchedulerService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection, me: WireHost) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let check = |h: &shoal_proto::Hello| -> Result<(), String> {
        let who = shoal_tls::peer_identity(&conn).map_err(|e| e.to_string())?;
        if who.common_name != h.host_id.as_str() {
            return Err(format!("host id {} does not match certificate name {}", h.host_id, who.common_name));
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
    if let Ok(mut links) = shared.links.lock() {
        links.insert(host.clone(), PeerLink { conn: conn.clone(), codec });
    }
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let shared = Arc::clone(&shared);
        let host = host.clone();
        let wire_host = hello.host_id.clone();
        tokio::spawn(async move {
            let req = match codec.read::<_, SchedulerRequest>(&mut recv).await {
                Ok(r) => r,
                Err(e) => {
                    let reply = SchedulerReply::Error(ErrorReply::new(ErrorCode::BadRequest, e.to_string()));
                    let _ = codec.write(&mut send, &reply).await;
                    let _ = send.finish();
                    return;
                }
            };
            let reply = handle(&shared, &host, &wire_host, req);
            let _ = codec.write(&mut send, &reply).await;
            let _ = send.finish();
        });
    }
}

fn err(e: SchedulerError) -> SchedulerReply {
    let code = match &e {
        SchedulerError::UnknownHost { .. } => ErrorCode::UnknownHost,
        SchedulerError::NotInTask { .. } => ErrorCode::UnknownTask,
        SchedulerError::LimitReached { .. } => ErrorCode::Busy,
        _ => ErrorCode::BadRequest,
    };
    SchedulerReply::Error(ErrorReply::new(code, e.to_string()))
}

fn task_id(d: &shoal_proto::Digest) -> Result<TaskId, SchedulerError> {
    TaskId::new(&d.to_string())
}

fn wire_set(bitmap: Option<Vec<u8>>, count: u32) -> WireSet {
    let mut set = WireSet::empty(count).unwrap_or_else(|_| WireSet::empty(0).unwrap_or_else(|_| unreachable_set()));
    if let Some(bits) = bitmap {
        for (byte_i, byte) in bits.iter().enumerate() {
            for bit in 0..8u32 {
                if byte & (1 << bit) != 0 {
                    let _ = set.insert(byte_i as u32 * 8 + bit);
                }
            }
        }
    }
    set
}

/// An empty set of zero pieces cannot fail to build; this keeps `wire_set` panic-free.
fn unreachable_set() -> WireSet {
    match WireSet::full(0) {
        Ok(s) => s,
        Err(_) => unreachable_set(),
    }
}

fn handle(shared: &Shared, host: &HostId, wire_host: &WireHost, req: SchedulerRequest) -> SchedulerReply {
    match req {
        SchedulerRequest::RegisterHost(r) => {
            if r.host_id != *wire_host {
                return SchedulerReply::Error(ErrorReply::new(ErrorCode::Refused, "RegisterHost names another host than the connection's Hello"));
            }
            let reg = HostRegistration {
                id: host.clone(),
                addresses: r.addresses,
                locality: Locality {
                    zone: r.locality.zone.unwrap_or_default(),
                    rack: r.locality.rack.unwrap_or_default(),
                },
                upload_slots: r.upload_slots,
                is_seed: r.is_seed,
            };
            match shared.core().register_host(reg) {
                Ok(()) => SchedulerReply::Registered(Registered {
                    heartbeat_interval_ms: shared.heartbeat_ms,
                    host_timeout_ms: shared.timeout_ms,
                }),
                Err(e) => err(e),
            }
        }
        SchedulerRequest::Heartbeat(hb) => {
            let mut core = shared.core();
            let slots = 0u32.max(hb.free_upload_slots);
            match core.heartbeat(host, HostLoad { uploads_in_flight: 0u32.saturating_add(slots.min(0)) }) {
                Ok(()) => SchedulerReply::Ok,
                Err(e) => err(e),
            }
        }
        SchedulerRequest::LeaveHost => {
            shared.core().leave_host(host);
            if let Ok(mut links) = shared.links.lock() {
                links.remove(host);
            }
            SchedulerReply::Ok
        }
        SchedulerRequest::RegisterTask(t) => register_task(shared, host, t),
        SchedulerRequest::PiecesHeld(p) => {
            let task = match task_id(&p.blob) {
                Ok(t) => t,
                Err(e) => return err(e),
            };
            let pieces: Vec<u32> = match p.pieces {
                PieceReport::Full(set) => set.iter().collect(),
                PieceReport::Added(v) => v,
                // The core keeps no removals: an evicting peer leaves the task instead.
                PieceReport::Removed(_) => return SchedulerReply::Ok,
            };
            match shared.core().report_pieces(host, &task, &pieces) {
                Ok(_) => SchedulerReply::Ok,
                Err(e) => err(e),
            }
        }
        SchedulerRequest::RequestParents(r) => request_parents(shared, host, r),
        SchedulerRequest::ReportPieceFailure(r) => {
            let (Ok(task), Ok(parent)) = (task_id(&r.blob), HostId::new(r.parent.as_str())) else {
                return SchedulerReply::Error(ErrorReply::new(ErrorCode::BadRequest, "bad blob or parent"));
            };
            let kind = match r.reason {
                FailureReason::Connect => FailureKind::Unreachable,
                FailureReason::Timeout => FailureKind::Stalled,
                FailureReason::Corrupt => FailureKind::BadData,
                FailureReason::Refused | FailureReason::Busy | FailureReason::Protocol => FailureKind::Refused,
            };
            match shared.core().report_failure(host, &task, &parent, kind) {
                Ok(()) => SchedulerReply::Ok,
                Err(e) => err(e),
            }
        }
        SchedulerRequest::DownloadFinished(_) => SchedulerReply::Ok,
        SchedulerRequest::DownloadFailed(f) => {
            if let Ok(task) = task_id(&f.blob) {
                let _ = shared.core().report_origin_failure(host, &task);
            }
            SchedulerReply::Ok
        }
        SchedulerRequest::ListHosts { .. } => SchedulerReply::Error(ErrorReply::new(
            ErrorCode::Refused,
            "this scheduler does not list hosts yet (DHT bootstrap is not implemented)",
        )),
    }
}

fn register_task(shared: &Shared, host: &HostId, t: shoal_proto::RegisterTask) -> SchedulerReply {
    let task = match task_id(&t.task.blob) {
        Ok(id) => id,
        Err(e) => return err(e),
    };
    let held = match &t.held {
        Some(set) if set.is_complete() && set.count() > 0 => Held::All,
        Some(set) if !set.is_empty() => Held::Bitmap(set.as_bytes().to_vec()),
        _ => Held::Nothing,
    };
    let announcement = TaskAnnouncement {
        task: task.clone(),
        size: t.task.size,
        piece_size: t.task.piece_size,
        held,
    };
    if let Some(origin) = t.origin {
        if let Ok(mut o) = shared.origins.lock() {
            if o.len() >= MAX_ORIGINS {
                o.clear();
            }
            o.insert(task.clone(), origin);
        }
    }
    let mut core = shared.core();
    if let Err(e) = core.announce_task(host, announcement) {
        return err(e);
    }
    if let Some(table) = t.piece_table {
        if core.piece_table(&task).is_none() {
            if let Err(e) = core.publish_piece_table(host, &task, table) {
                return err(e);
            }
        }
    }
    SchedulerReply::Task(TaskInfo {
        task: TaskMeta {
            blob: t.task.blob,
            size: t.task.size,
            piece_size: t.task.piece_size,
        },
        piece_table: core.piece_table(&task).map(|p| p.to_vec()),
    })
}

fn request_parents(shared: &Shared, host: &HostId, r: shoal_proto::RequestParents) -> SchedulerReply {
    let task = match task_id(&r.blob) {
        Ok(id) => id,
        Err(e) => return err(e),
    };
    let count = r.wanted.count();
    let (decision, wire) = {
        let mut core = shared.core();
        let decision = match core.decide(host, &task) {
            Ok(d) => d,
            Err(e) => return err(e),
        };
        let to_wire = |p: &Parent| WireParent {
            host_id: WireHost::new(p.host.as_str()).unwrap_or_else(|_| wire_fallback()),
            addresses: p.addresses.iter().copied().take(shoal_proto::MAX_ADDRESSES).collect(),
            pieces: wire_set(core.held_bitmap(&p.host, &task), count),
            is_seed: p.is_seed,
        };
        let keep = |p: &&Parent| !r.exclude.iter().any(|x| x.as_str() == p.host.as_str());
        let wire: Vec<WireParent> = match &decision {
            Decision::Parents(list) => list.iter().filter(keep).map(to_wire).collect(),
            Decision::SeedFetch { parents, .. } => parents.iter().filter(keep).map(to_wire).collect(),
            _ => Vec::new(),
        };
        (decision, wire)
    };
    match decision {
        Decision::Parents(_) | Decision::Done => SchedulerReply::Parents(ParentsReply::Parents(wire)),
        Decision::SeedFetch { seed, .. } => {
            order_seed(shared, &seed.host, &task, r.blob, count);
            SchedulerReply::Parents(ParentsReply::Parents(wire))
        }
        Decision::BackToSource => SchedulerReply::Parents(ParentsReply::BackToSource {
            reason: "nobody holds the missing pieces and no seed can fetch them".into(),
        }),
        Decision::Wait { retry_after } => SchedulerReply::Parents(ParentsReply::WaitForSeed {
            retry_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
        }),
    }
}

/// A host id the core accepted always passes the wire rules in practice; this keeps the
/// conversion panic-free if one does not.
fn wire_fallback() -> WireHost {
    match WireHost::new("invalid-host-id") {
        Ok(h) => h,
        Err(_) => wire_fallback(),
    }
}

/// Sends a FetchFromOrigin to `seed` in the background; a refusal is reported to the core.
fn order_seed(shared: &Shared, seed: &HostId, task: &TaskId, blob: shoal_proto::Digest, _count: u32) {
    let link = shared.links.lock().ok().and_then(|l| l.get(seed).cloned());
    let origin = shared.origins.lock().ok().and_then(|o| o.get(task).cloned());
    let size_and_piece = {
        let core = shared.core();
        core.task_geometry(task)
    };
    let (Some(link), Some(origin), Some((size, piece_size))) = (link, origin, size_and_piece) else {
        tracing::warn!(seed = %seed, blob = %task, "cannot order the seed: no connection, origin or task");
        let _ = shared.core().report_origin_failure(seed, task);
        return;
    };
    let push = SchedulerPush::FetchFromOrigin(FetchFromOrigin {
        task: TaskMeta { blob, size, piece_size },
        origin,
    });
    tokio::spawn(async move {
        let sent = async {
            let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| e.to_string())?;
            link.codec.write(&mut send, &push).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            link.codec.read::<_, PushReply>(&mut recv).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(10), sent).await {
            Ok(Ok(PushReply::Accepted)) => {}
            other => tracing::warn!(reply = ?other.map(|r| r.map(|_| ())), "seed did not take the origin fetch"),
        }
    });
}
