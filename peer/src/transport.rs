//! The peer's one QUIC endpoint (UDP): it serves pieces and dials parents and the scheduler, all
//! with mutual TLS from the cluster CA, and runs the Hello exchange on every new connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::{client_handshake, Codec, Hello, HostId, Role, ALPN_PEER, ALPN_SCHEDULER};
use shoal_tls::NodeIdentity;

use crate::budget::PieceBudget;
use crate::error::PeerError;

/// A connection after a successful Hello: the connection and the negotiated codec.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    pub conn: quinn::Connection,
    pub codec: Codec,
}

/// The endpoint, its client configs, and cached connections to parents by host id.
#[derive(Debug)]
pub(crate) struct Transport {
    endpoint: quinn::Endpoint,
    peer_client: quinn::ClientConfig,
    sched_client: quinn::ClientConfig,
    hello: Hello,
    links: Mutex<HashMap<HostId, Link>>,
    connect_timeout: Duration,
    budget: PieceBudget,
}

/// Ack-eliciting packets a receiver takes before it must send an ACK (see `transport_config`).
const ACK_EVERY_PACKETS: u32 = 10;

/// Keep-alive and idle timeout of links to peers: idle links survive NAT, a dead parent is
/// noticed (and a slow one is replaced by the swarm long before this).
const PEER_LIVENESS: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(30));

/// Keep-alive and idle timeout of links to schedulers: a scheduler that stops answering must be
/// noticed within seconds, so that downloads turn to their parents and the DHT for piece tables
/// and parents instead of waiting on it. The idle timeout is the smaller of the two ends', so
/// this side's sets it.
const SCHEDULER_LIVENESS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(4));

/// Transport parameters of every connection, with its keep-alive interval and idle timeout.
fn transport_config((keep_alive, idle): (Duration, Duration)) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    // Pieces are large: let one stream and the connection carry several at once.
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    // Each download from a parent also keeps one held-set watch stream open (WatchHeld), so
    // a hundred downloads from one seed must not use up the streams piece requests need.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    // Pieces are bulk transfers: one ACK per ten packets (or 5 ms) instead of one per two
    // (QUIC ACK frequency extension, asked of the other end).
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_EVERY_PACKETS - 1))
        .max_ack_delay(Some(Duration::from_millis(5)));
    t.ack_frequency_config(Some(acks));
    Arc::new(t)
}

impl Transport {
    /// Binds the endpoint on `listen` as a piece server (ALPN `shoal-peer/1`).
    pub fn bind(
        identity: &Arc<NodeIdentity>,
        listen: SocketAddr,
        role: Role,
        host_id: HostId,
        connect_timeout: Duration,
        budget: PieceBudget,
    ) -> Result<Self, PeerError> {
        let mut server = shoal_tls::quic_server_config(identity, &[ALPN_PEER])?;
        server.transport_config(transport_config(PEER_LIVENESS));
        let endpoint = quinn::Endpoint::server(server, listen)
            .map_err(|e| PeerError::io("bind QUIC endpoint on", listen, e))?;
        let mut peer_client = shoal_tls::quic_client_config(identity, &[ALPN_PEER])?;
        peer_client.transport_config(transport_config(PEER_LIVENESS));
        let mut sched_client = shoal_tls::quic_client_config(identity, &[ALPN_SCHEDULER])?;
        sched_client.transport_config(transport_config(SCHEDULER_LIVENESS));
        Ok(Transport {
            endpoint,
            peer_client,
            sched_client,
            hello: Hello::new(role, host_id),
            links: Mutex::new(HashMap::new()),
            connect_timeout,
            budget,
        })
    }

    /// The endpoint (the piece server accepts on it).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, PeerError> {
        self.endpoint
            .local_addr()
            .map_err(|e| PeerError::io("read local address of", "QUIC endpoint", e))
    }

    /// This node's host id.
    pub fn host_id(&self) -> &HostId {
        &self.hello.host_id
    }

    /// The peer's piece memory budget (budget.rs): every piece moved over this endpoint or
    /// read from the origin holds room in it.
    pub fn budget(&self) -> &PieceBudget {
        &self.budget
    }

    /// A connection to parent `host` (cached), trying its addresses in order.
    pub async fn parent(&self, host: &HostId, addrs: &[SocketAddr]) -> Result<Link, PeerError> {
        if let Some(link) = self.cached(host) {
            return Ok(link);
        }
        let mut last = PeerError::Connect {
            who: host.to_string(),
            reason: "no address".into(),
        };
        for addr in addrs {
            match self.dial(*addr, host.as_str(), &self.peer_client).await {
                Ok(link) => {
                    if let Ok(mut links) = self.links.lock() {
                        links.insert(host.clone(), link.clone());
                    }
                    return Ok(link);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn cached(&self, host: &HostId) -> Option<Link> {
        let mut links = self.links.lock().ok()?;
        match links.get(host) {
            Some(l) if l.conn.close_reason().is_none() => Some(l.clone()),
            Some(_) => {
                links.remove(host);
                None
            }
            None => None,
        }
    }

    /// Forgets the cached connection to `host`, e.g. after one download dropped it: the next
    /// request dials afresh. The connection itself is not closed here: other downloads share it
    /// and their requests in flight finish on it (closing it failed all of them at once, and each
    /// then dropped a healthy parent: docs/benchmarks.md, "Peer memory"). A dead connection
    /// closes itself (idle timeout), a live one when its last user lets go of it.
    pub fn forget(&self, host: &HostId) {
        let link = self.links.lock().ok().and_then(|mut l| l.remove(host));
        drop(link);
    }

    /// A new connection to the scheduler at `addr`, whose certificate must name `name`.
    pub async fn scheduler(&self, addr: SocketAddr, name: &str) -> Result<Link, PeerError> {
        self.dial(addr, name, &self.sched_client).await
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        name: &str,
        cfg: &quinn::ClientConfig,
    ) -> Result<Link, PeerError> {
        let who = || format!("{name} at {addr}");
        let fail = |reason: String| PeerError::Connect { who: who(), reason };
        let attempt = async {
            let connecting = self
                .endpoint
                .connect_with(cfg.clone(), addr, name)
                .map_err(|e| fail(e.to_string()))?;
            let conn = connecting.await.map_err(|e| fail(e.to_string()))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
            let negotiated = client_handshake(&mut recv, &mut send, &self.hello)
                .await
                .map_err(|e| fail(format!("Hello: {e}")))?;
            let _ = send.finish();
            if negotiated.host_id.as_str() != name {
                conn.close(shoal_proto::close_code::REFUSED.into(), b"host id");
                return Err(fail(format!(
                    "it introduced itself as {} instead",
                    negotiated.host_id
                )));
            }
            Ok(Link {
                conn,
                codec: negotiated.codec,
            })
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.connect_timeout)))?
    }

    /// Closes every connection and the endpoint.
    pub fn close(&self) {
        self.endpoint
            .close(shoal_proto::close_code::OK.into(), b"shutdown");
    }
}

/// Checks a Hello against the connection's verified certificate: the host id must be the
/// certificate's name, so no node can speak for another.
pub(crate) fn check_hello(
    conn: &quinn::Connection,
    hello: &Hello,
    allowed: &[Role],
) -> Result<(), String> {
    let who = shoal_tls::peer_identity(conn).map_err(|e| e.to_string())?;
    if who.common_name != hello.host_id.as_str() {
        return Err(format!(
            "host id {} does not match certificate name {}",
            hello.host_id, who.common_name
        ));
    }
    if !allowed.contains(&hello.role) {
        return Err(format!("role {:?} may not connect here", hello.role));
    }
    Ok(())
}
