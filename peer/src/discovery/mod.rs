//! Discovery without a scheduler: a libp2p Kademlia DHT among the cluster's peers, with a
//! provider record per blob digest, so that when no scheduler answers a download still finds
//! the peers holding its blob. libp2p only finds holders; the bytes (and the piece table) then
//! move over the mutual-TLS QUIC piece protocol, like any parent's.
//!
//! Data path: a piece is held -> [`Discovery::provide`] (once per blob) publishes a provider
//! record -> another peer's download with no scheduler calls [`Discovery::find_holders`] ->
//! Kademlia GET_PROVIDERS -> only providers whose identify attestation verified against the
//! cluster CA (identity.rs) are returned, with the host id and QUIC addresses they signed ->
//! the download dials them over QUIC. Blobs neither stored nor staged here any more are
//! withdrawn.
//! Joining: the hosts a scheduler lists (ListHosts), `dht_bootstrap` and `dht_bootstrap_dns`;
//! the DHT listens over TCP on the same port number as the QUIC piece server.
//! Scheme and limits: docs/protocol.md, "DHT discovery".

pub mod identity;
mod node;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::Serialize;
use shoal_proto::{Digest, HostId, SchedulerReply, SchedulerRequest};
use shoal_store::AsyncStore;
use shoal_tls::NodeIdentity;
use tokio::sync::{mpsc, oneshot};

use crate::error::PeerError;
use crate::scheduler_ring::SchedulerRing;

/// How long a lookup's answer is reused for the same blob (downloads ask every second).
const FIND_CACHE: Duration = Duration::from_secs(2);
/// Most hosts asked of a scheduler for bootstrap.
const BOOTSTRAP_HOSTS: u32 = 64;

/// A peer that holds (some of) a blob, as its verified attestation names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// Its host id (its certificate's name).
    pub host_id: HostId,
    /// Its QUIC piece-server addresses.
    pub addresses: Vec<SocketAddr>,
}

/// DHT figures (local API, tests).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DhtStatus {
    /// This node's PeerId.
    pub peer_id: String,
    /// Addresses the DHT listens on.
    pub listen: Vec<String>,
    /// Peers whose attestation verified.
    pub verified_peers: usize,
    /// Nodes refused for a missing or invalid attestation.
    pub refused_peers: u64,
    /// Provider records ignored because their provider is not a verified cluster node.
    pub ignored_records: u64,
    /// Blobs this node publishes provider records for.
    pub provided: usize,
}

/// Requests to the task that owns the libp2p swarm.
pub(crate) enum Command {
    Provide(Digest),
    FindHolders(Digest, oneshot::Sender<Vec<Holder>>),
    Bootstrap(Vec<SocketAddr>),
    Status(oneshot::Sender<DhtStatus>),
}

/// A handle on the DHT node; cheap to share.
pub struct Discovery {
    tx: mpsc::UnboundedSender<Command>,
    provided: Arc<Mutex<HashSet<Digest>>>,
    found: Mutex<HashMap<Digest, (Instant, Vec<Holder>)>>,
    peer_id: PeerId,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("peer_id", &self.peer_id)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Discovery {
    /// Starts the DHT node on TCP `listen_ip:port` (port 0 or a taken port: any free one),
    /// attesting `host_id` with QUIC addresses `quic`.
    pub(crate) fn start(
        identity: &Arc<NodeIdentity>,
        host_id: HostId,
        quic: Vec<SocketAddr>,
        listen_ip: IpAddr,
        port: u16,
        store: AsyncStore,
        staging: Arc<crate::download::Staging>,
    ) -> Result<Arc<Self>, PeerError> {
        let key_path = identity.paths().key.clone();
        let key_pem =
            std::fs::read(&key_path).map_err(|e| PeerError::io("read", key_path.display(), e))?;
        let keypair = identity::keypair_from_tls_key(&key_pem)?;
        let peer_id = keypair.public().to_peer_id();
        let claim = identity::Claim {
            host_id,
            addresses: quic.clone(),
        };
        let agent = identity::attest(identity, &peer_id, &claim)?;
        let verifier = identity::Verifier::new(identity)?;
        let fail = |e: String| PeerError::Config(format!("starting the DHT node: {e}"));
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default().nodelay(true),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .map_err(|e| fail(e.to_string()))?
            .with_behaviour(|key| node::Behaviour {
                kad: node::kad_behaviour(key.public().to_peer_id()),
                identify: libp2p::identify::Behaviour::new(
                    libp2p::identify::Config::new(node::ID_PROTOCOL.into(), key.public())
                        .with_agent_version(agent),
                ),
            })
            .map_err(|e| fail(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let bound = match swarm.listen_on(node::tcp_addr(SocketAddr::new(listen_ip, port))) {
            Ok(_) => port,
            Err(e) => {
                tracing::warn!(port, error = %e, "DHT: the QUIC port number is taken over TCP; listening on another (peers will not find this node by its QUIC port)");
                swarm
                    .listen_on(node::tcp_addr(SocketAddr::new(listen_ip, 0)))
                    .map_err(|e| fail(e.to_string()))?;
                0
            }
        };
        for a in &quic {
            if !a.ip().is_unspecified() && bound != 0 {
                swarm.add_external_address(node::tcp_addr(SocketAddr::new(a.ip(), bound)));
            }
        }
        let provided = Arc::new(Mutex::new(HashSet::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        let node = node::Node::new(swarm, verifier, store, staging, Arc::clone(&provided), quic);
        let task = tokio::spawn(node.run(rx));
        tracing::info!(%peer_id, port = bound, "DHT node started");
        Ok(Arc::new(Discovery {
            tx,
            provided,
            found: Mutex::new(HashMap::new()),
            peer_id,
            port: bound,
            task,
        }))
    }

    /// This node's libp2p PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Publishes a provider record for `blob` (once; again after it was withdrawn).
    pub fn provide(&self, blob: Digest) {
        let new = self.provided.lock().is_ok_and(|mut p| p.insert(blob));
        if new {
            let _ = self.tx.send(Command::Provide(blob));
        }
    }

    /// Whether a provider record for `blob` is published now.
    pub fn provides(&self, blob: &Digest) -> bool {
        self.provided.lock().is_ok_and(|p| p.contains(blob))
    }

    /// The verified cluster peers that announced holding `blob` (not this node).
    pub async fn find_holders(&self, blob: Digest) -> Vec<Holder> {
        if let Some((at, holders)) = self.found.lock().ok().and_then(|f| f.get(&blob).cloned()) {
            if at.elapsed() < FIND_CACHE {
                return holders;
            }
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::FindHolders(blob, tx)).is_err() {
            return Vec::new();
        }
        let holders = rx.await.unwrap_or_default();
        if let Ok(mut f) = self.found.lock() {
            if f.len() > 1024 {
                f.clear();
            }
            f.insert(blob, (Instant::now(), holders.clone()));
        }
        holders
    }

    /// Dials peers at these addresses (their QUIC address: the DHT uses the same port, TCP).
    pub fn bootstrap(&self, addrs: Vec<SocketAddr>) {
        if !addrs.is_empty() {
            let _ = self.tx.send(Command::Bootstrap(addrs));
        }
    }

    /// DHT figures.
    pub async fn status(&self) -> DhtStatus {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Status(tx)).is_err() {
            return DhtStatus::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Keeps joining the DHT: every few seconds while no peer is verified, then every minute,
    /// dials the hosts a scheduler lists plus `fixed` and the addresses behind `dns`.
    pub(crate) fn spawn_bootstrap(
        self: &Arc<Self>,
        ring: Option<Arc<SchedulerRing>>,
        fixed: Vec<SocketAddr>,
        dns: Option<String>,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            // Every address ever learnt is tried again each round: the scheduler that named
            // the peers may be gone by the time the DHT needs them (it forms after the loss).
            let mut known: Vec<SocketAddr> = Vec::new();
            loop {
                let Some(d) = this.upgrade() else { return };
                let mut addrs = std::mem::take(&mut known);
                addrs.extend(fixed.iter().copied());
                if let Some(name) = &dns {
                    match crate::scheduler_ring::resolve(name).await {
                        Ok(a) => addrs.extend(a),
                        Err(e) => {
                            tracing::debug!(error = %e, "DHT: bootstrap name did not resolve")
                        }
                    }
                }
                if let Some(s) = ring.as_ref().and_then(|r| r.any()) {
                    let req = SchedulerRequest::ListHosts {
                        limit: BOOTSTRAP_HOSTS,
                    };
                    if let Ok(SchedulerReply::Hosts(list)) = s.request(&req).await {
                        addrs.extend(list.hosts.into_iter().flat_map(|h| h.addresses));
                    }
                }
                addrs.sort();
                addrs.dedup();
                d.bootstrap(addrs.clone());
                known = addrs;
                let joined = d.status().await.verified_peers > 0;
                drop(d);
                let wait = if joined { 60 } else { 2 };
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
        })
    }
}
