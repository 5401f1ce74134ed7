//! The libp2p node: Kademlia (provider records per blob) and identify (attestations), driven by
//! one task that owns the swarm and takes commands from the [`super::Discovery`] handle.
//!
//! Admission: a peer counts only once its identify attestation verified (identity.rs). Only
//! then is it put in the routing table (manual bucket inserts), and only provider records whose
//! provider is verified are stored (record filtering); records from a peer still being
//! identified wait (bounded) for its attestation. A peer whose attestation fails is
//! disconnected and refused from then on.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::kad::store::{MemoryStore, RecordStore};
use libp2p::kad::{self, GetProvidersOk, ProviderRecord, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, Multiaddr, PeerId, StreamProtocol, Swarm};
use shoal_proto::Digest;
use shoal_store::AsyncStore;
use tokio::sync::{mpsc, oneshot};

use super::identity::{Claim, Verifier};
use super::{Command, DhtStatus, Holder};

/// Kademlia protocol name: Shoal's own DHT, apart from any public one.
pub(super) const KAD_PROTOCOL: &str = "/shoal/kad/1.0.0";
/// Identify protocol version string.
pub(super) const ID_PROTOCOL: &str = "/shoal/id/1.0.0";
/// A provider lookup answers after this long with what it has.
const FIND_DEADLINE: Duration = Duration::from_secs(3);
/// After a lookup, how long to wait for unverified providers to identify.
const VERIFY_WAIT: Duration = Duration::from_millis(1500);
/// Provider records waiting for their provider's attestation, per peer.
const MAX_PENDING_PER_PEER: usize = 256;
/// Peers with records waiting.
const MAX_PENDING_PEERS: usize = 256;
/// Refused PeerIds remembered.
const MAX_REFUSED: usize = 4096;

/// The network behaviour: Kademlia plus identify.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub kad: kad::Behaviour<MemoryStore>,
    pub identify: identify::Behaviour,
}

/// Kademlia settings: manual routing-table inserts (only verified peers), filtered provider
/// records, short lookups, records that expire soon after their holder stops republishing.
pub(super) fn kad_behaviour(peer: PeerId) -> kad::Behaviour<MemoryStore> {
    let mut cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    cfg.set_kbucket_inserts(kad::BucketInserts::Manual)
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        .set_query_timeout(Duration::from_secs(5))
        .set_provider_record_ttl(Some(Duration::from_secs(30 * 60)))
        .set_provider_publication_interval(Some(Duration::from_secs(10 * 60)));
    let mut k = kad::Behaviour::with_config(peer, MemoryStore::new(peer), cfg);
    // Every cluster node answers DHT requests (there is no public address to confirm first).
    k.set_mode(Some(kad::Mode::Server));
    k
}

/// A provider lookup in progress.
struct Find {
    blob: Digest,
    providers: HashSet<PeerId>,
    waiters: Vec<oneshot::Sender<Vec<Holder>>>,
    started: Instant,
    /// When the Kademlia query ended (then only unverified providers are awaited).
    finished: Option<Instant>,
}

/// The state of the task that owns the swarm.
pub(super) struct Node {
    pub swarm: Swarm<Behaviour>,
    pub verifier: Verifier,
    pub store: AsyncStore,
    /// Blobs still coming in (their provider records stay while any piece is staged).
    pub staging: Arc<crate::download::Staging>,
    pub provided: Arc<Mutex<HashSet<Digest>>>,
    pub me: PeerId,
    pub my_quic: Vec<SocketAddr>,
    verified: HashMap<PeerId, Claim>,
    refused: HashSet<PeerId>,
    pending: HashMap<PeerId, Vec<ProviderRecord>>,
    finds: HashMap<QueryId, Find>,
    ignored_records: u64,
    refused_peers: u64,
    last_bootstrap: Option<Instant>,
}

impl Node {
    pub fn new(
        swarm: Swarm<Behaviour>,
        verifier: Verifier,
        store: AsyncStore,
        staging: Arc<crate::download::Staging>,
        provided: Arc<Mutex<HashSet<Digest>>>,
        my_quic: Vec<SocketAddr>,
    ) -> Self {
        let me = *swarm.local_peer_id();
        Node {
            swarm,
            verifier,
            store,
            staging,
            provided,
            me,
            my_quic,
            verified: HashMap::new(),
            refused: HashSet::new(),
            pending: HashMap::new(),
            finds: HashMap::new(),
            ignored_records: 0,
            refused_peers: 0,
            last_bootstrap: None,
        }
    }

    /// Runs until the handle is dropped.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut sweep = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.event(ev),
                _ = tick.tick() => self.answer_due(),
                _ = sweep.tick() => self.withdraw_evicted(),
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Provide(blob) => {
                if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key(&blob)) {
                    tracing::warn!(%blob, error = %e, "DHT: could not publish provider record");
                }
            }
            Command::FindHolders(blob, tx) => {
                let q = self.swarm.behaviour_mut().kad.get_providers(key(&blob));
                self.finds.insert(
                    q,
                    Find {
                        blob,
                        providers: HashSet::new(),
                        waiters: vec![tx],
                        started: Instant::now(),
                        finished: None,
                    },
                );
            }
            Command::Bootstrap(addrs) => self.dial_bootstrap(addrs),
            Command::Status(tx) => {
                let listen = self.swarm.listeners().map(|a| a.to_string()).collect();
                let provided = self.provided.lock().map(|p| p.len()).unwrap_or(0);
                let _ = tx.send(DhtStatus {
                    peer_id: self.me.to_string(),
                    listen,
                    verified_peers: self.verified.len(),
                    refused_peers: self.refused_peers,
                    ignored_records: self.ignored_records,
                    provided,
                });
            }
        }
    }

    /// Dials bootstrap addresses (the DHT listens on the QUIC port number, over TCP), except
    /// this node's own and those of peers already verified.
    fn dial_bootstrap(&mut self, addrs: Vec<SocketAddr>) {
        let known: HashSet<SocketAddr> = self
            .verified
            .values()
            .flat_map(|c| c.addresses.iter().copied())
            .collect();
        for a in addrs {
            if self.my_quic.contains(&a) || known.contains(&a) {
                continue;
            }
            if let Err(e) = self.swarm.dial(tcp_addr(a)) {
                tracing::debug!(addr = %a, error = %e, "DHT: bootstrap dial failed");
            }
        }
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. }
                if self.refused.contains(&peer_id) =>
            {
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.identified(peer_id, info),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => self.kad_event(ev),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                // Its claim stays valid (it is signed); only pending records are dropped.
                self.pending.remove(&peer_id);
            }
            _ => {}
        }
    }

    fn identified(&mut self, peer: PeerId, info: identify::Info) {
        match self.verifier.verify(&peer, &info.agent_version) {
            Ok(claim) => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                for a in info.listen_addrs.iter().filter(|a| is_tcp(a)) {
                    kad.add_address(&peer, a.clone());
                }
                for rec in self.pending.remove(&peer).unwrap_or_default() {
                    let _ = kad.store_mut().add_provider(rec);
                }
                let new = self.verified.insert(peer, claim.clone()).is_none();
                if new {
                    tracing::debug!(%peer, host = %claim.host_id, "DHT: peer verified");
                    let due = self
                        .last_bootstrap
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(2));
                    if due {
                        self.last_bootstrap = Some(Instant::now());
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
            }
            Err(why) => {
                tracing::warn!(%peer, reason = %why, "DHT: refusing a node without a valid cluster attestation");
                self.refuse(peer);
            }
        }
    }

    fn refuse(&mut self, peer: PeerId) {
        self.refused_peers += 1;
        if self.refused.len() >= MAX_REFUSED {
            self.refused.clear();
        }
        self.refused.insert(peer);
        self.verified.remove(&peer);
        if let Some(recs) = self.pending.remove(&peer) {
            self.ignored_records += recs.len() as u64;
        }
        let kad = &mut self.swarm.behaviour_mut().kad;
        kad.remove_peer(&peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn kad_event(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } => self.add_provider(record),
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                    providers, ..
                })) => {
                    if let Some(f) = self.finds.get_mut(&id) {
                        f.providers.extend(providers);
                    }
                    if step.last {
                        self.query_done(id);
                    }
                }
                QueryResult::GetProviders(_) => self.query_done(id),
                _ => {}
            },
            _ => {}
        }
    }

    fn add_provider(&mut self, record: ProviderRecord) {
        let who = record.provider;
        if self.verified.contains_key(&who) {
            let _ = self
                .swarm
                .behaviour_mut()
                .kad
                .store_mut()
                .add_provider(record);
        } else if self.refused.contains(&who) {
            self.ignored_records += 1;
            tracing::debug!(peer = %who, "DHT: ignored a provider record from a refused node");
        } else if self.pending.len() < MAX_PENDING_PEERS || self.pending.contains_key(&who) {
            let list = self.pending.entry(who).or_default();
            if list.len() < MAX_PENDING_PER_PEER {
                list.push(record);
            } else {
                self.ignored_records += 1;
            }
        } else {
            self.ignored_records += 1;
        }
    }

    /// The Kademlia query ended: unverified providers are dialled so they can identify.
    fn query_done(&mut self, id: QueryId) {
        let unverified: Vec<PeerId> = match self.finds.get_mut(&id) {
            Some(f) if f.finished.is_none() => {
                f.finished = Some(Instant::now());
                f.providers
                    .iter()
                    .filter(|p| {
                        **p != self.me
                            && !self.verified.contains_key(p)
                            && !self.refused.contains(p)
                    })
                    .copied()
                    .collect()
            }
            _ => return,
        };
        for p in unverified {
            let _ = self.swarm.dial(p);
        }
        self.answer_due();
    }

    /// Answers lookups whose providers are all verified (or refused), or whose time is up.
    fn answer_due(&mut self) {
        let due: Vec<QueryId> = self
            .finds
            .iter()
            .filter(|(_, f)| {
                let all_known = f.providers.iter().all(|p| {
                    *p == self.me || self.verified.contains_key(p) || self.refused.contains(p)
                });
                match f.finished {
                    Some(t) => all_known || t.elapsed() >= VERIFY_WAIT,
                    None => f.started.elapsed() >= FIND_DEADLINE,
                }
            })
            .map(|(q, _)| *q)
            .collect();
        for q in due {
            let Some(f) = self.finds.remove(&q) else {
                continue;
            };
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&q) {
                query.finish();
            }
            let holders: Vec<Holder> = f
                .providers
                .iter()
                .filter(|p| **p != self.me)
                .filter_map(|p| self.verified.get(p))
                .map(|c| Holder {
                    host_id: c.host_id.clone(),
                    addresses: c.addresses.clone(),
                })
                .collect();
            let ignored = f
                .providers
                .iter()
                .filter(|p| **p != self.me && !self.verified.contains_key(p))
                .count();
            self.ignored_records += ignored as u64;
            tracing::debug!(blob = %f.blob, holders = holders.len(), ignored, "DHT: providers found");
            for w in f.waiters {
                let _ = w.send(holders.clone());
            }
        }
    }

    /// Withdraws provider records of blobs neither the store nor staging holds any more
    /// (evicted, removed, or a download that failed).
    fn withdraw_evicted(&mut self) {
        let gone: Vec<Digest> = match self.provided.lock() {
            Ok(p) => p
                .iter()
                .filter(|b| {
                    self.store.blob_status(b).is_none_or(|s| s.held.held() == 0)
                        && self.staging.held(b).is_none()
                })
                .copied()
                .collect(),
            Err(_) => return,
        };
        for blob in gone {
            self.swarm.behaviour_mut().kad.stop_providing(&key(&blob));
            if let Ok(mut p) = self.provided.lock() {
                p.remove(&blob);
            }
            tracing::debug!(%blob, "DHT: provider record withdrawn (blob no longer held)");
        }
    }
}

/// The DHT key of a blob: its digest's text (`sha256:<hex>`).
pub(super) fn key(blob: &Digest) -> RecordKey {
    RecordKey::new(&blob.to_string())
}

/// `/ip4|ip6/IP/tcp/PORT` of a socket address.
pub(super) fn tcp_addr(a: SocketAddr) -> Multiaddr {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
        std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(a.port()))
}

fn is_tcp(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::Tcp(_)))
}
