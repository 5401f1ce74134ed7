//! One swarm for one run: hosts on a shaped test net (origin relay, scheduler, seed, N peers),
//! each Shoal node a child process in its own host.
//!
//! ```text
//!  h0 origin: FaultRelay :5000 --(the bench's own namespace)--> docker-registry on loopback
//!  h1 scheduler :4471   h2 seed :4470   h3.. peers :4470      every link tbf-capped at B
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_api::Client as ApiClient;
use shoal_chaos::{Cmd, FaultRelay, Host, Proc, TestNet, Tmpfs};
use shoal_peer::PeerConfig;
use shoal_tls::{ClusterCa, NodeCertRequest};

use crate::Opts;

/// Repository the bench blob is pushed to.
pub const REPO: &str = "bench/fanout";
const RELAY_PORT: u16 = 5000;
const SCHED_PORT: u16 = 4471;
const PEER_PORT: u16 = 4470;
const ORIGIN: usize = 0;
const SCHED: usize = 1;
const SEED: usize = 2;
const FIRST_PEER: usize = 3;

/// A running swarm; every process, namespace and file goes on drop.
pub struct Swarm {
    /// The nodes' data on a tmpfs (`--tmpfs`); first, so it is unmounted first. Held only to
    /// be dropped with the swarm.
    pub _tmpfs: Option<Tmpfs>,
    pub net: TestNet,
    pub relay: FaultRelay,
    pub scheduler: Proc,
    pub seed: Proc,
    pub peers: Vec<Proc>,
    /// Local API socket of each peer.
    pub sockets: Vec<PathBuf>,
    /// The seed's local API socket.
    pub seed_socket: PathBuf,
    /// `docker://RELAY/REPO`.
    pub origin_ref: String,
}

impl Swarm {
    /// Builds the net, caps every link at `opts.bits_per_sec`, starts the relay in front of
    /// `registry_url`, the scheduler, the seed and the peers, and waits until each answers.
    pub async fn start(name: &str, opts: &Opts, registry_url: &str) -> Result<Swarm, String> {
        let net = TestNet::create(name, FIRST_PEER + opts.peers).map_err(|e| e.to_string())?;
        for i in 0..net.hosts().len() {
            net.set_bandwidth(i, Some(opts.bits_per_sec))
                .map_err(|e| e.to_string())?;
        }
        let origin = net.host(ORIGIN);
        let listener = origin.tcp_listener(RELAY_PORT).map_err(|e| e.to_string())?;
        let relay = FaultRelay::start_on(listener, registry_url).map_err(|e| e.to_string())?;
        let relay_host = format!("{}:{RELAY_PORT}", origin.addr());
        let origin_ref = format!("docker://{relay_host}/{REPO}");

        let dir = net.dir().to_path_buf();
        // Every node's store and the blob's copies: (N + 1) x 2 x S, plus room.
        let tmpfs = match opts.tmpfs {
            true => Some(
                Tmpfs::mount(
                    &dir.join("nodes"),
                    (opts.peers as u64 + 1) * (opts.blob_bytes * 2 + (256 << 20)),
                )
                .map_err(|e| e.to_string())?,
            ),
            false => None,
        };
        let ca = ClusterCa::init(&dir.join("ca"), "Shoal fan-out bench CA", 1)
            .map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;

        let sched_host = net.host(SCHED);
        let tls = identity(&ca, &dir, "scheduler", sched_host.addr())?;
        let listen = format!("0.0.0.0:{SCHED_PORT}");
        let scheduler = sched_host
            .spawn(
                "scheduler",
                node_cmd(&exe)
                    .args(["scheduler", &listen])
                    .arg(&tls)
                    .arg(&relay_host),
            )
            .map_err(|e| e.to_string())?;
        let sched_addr = sched_host.sock(SCHED_PORT);

        let start_peer = |host: &Host, name: &str, seed: bool| -> Result<(Proc, PathBuf), String> {
            let home = dir.join("nodes").join(name);
            let cfg = PeerConfig {
                host_id: name.into(),
                data_dir: home.join("data"),
                tls_dir: identity(&ca, &dir, name, host.addr())?,
                listen: SocketAddr::from(([0, 0, 0, 0], PEER_PORT)),
                advertise: vec![host.sock(PEER_PORT)],
                scheduler: Some(sched_addr),
                scheduler_name: "scheduler".into(),
                api_socket: home.join("peer.sock"),
                seed,
                cache_bytes: Some(opts.blob_bytes * 2 + (256 << 20)),
                piece_size: opts.piece_size,
                plain_http_registries: vec![relay_host.clone()],
                allowed_origins: vec![relay_host.clone()],
                ..PeerConfig::default()
            };
            std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
            let file = home.join("peer.toml");
            let text = toml::to_string(&cfg).map_err(|e| format!("peer config: {e}"))?;
            std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
            let proc = host
                .spawn(name, node_cmd(&exe).arg("peer").arg(&file))
                .map_err(|e| e.to_string())?;
            Ok((proc, cfg.api_socket))
        };
        let (seed, seed_sock) = start_peer(net.host(SEED), "seed", true)?;
        let mut peers = Vec::new();
        let mut sockets = Vec::new();
        for i in 0..opts.peers {
            let (p, s) = start_peer(net.host(FIRST_PEER + i), &format!("peer-{i}"), false)?;
            peers.push(p);
            sockets.push(s);
        }
        let mut swarm = Swarm {
            _tmpfs: tmpfs,
            net,
            relay,
            scheduler,
            seed,
            peers,
            sockets,
            seed_socket: seed_sock.clone(),
            origin_ref,
        };
        let mut all = swarm.sockets.clone();
        all.push(seed_sock);
        for s in &all {
            wait_api(s, Duration::from_secs(20))
                .await
                .map_err(|e| format!("{e}\n--- seed log ---\n{}", swarm.seed.log_tail(20)))?;
        }
        if !swarm.scheduler.is_running() {
            return Err(format!(
                "scheduler exited:\n{}",
                swarm.scheduler.log_tail(20)
            ));
        }
        // Registration with the scheduler follows the API by a round trip or two.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(swarm)
    }

    /// Peer host `i` (0-based among the peers).
    pub fn peer_host(&self, i: usize) -> &Host {
        self.net.host(FIRST_PEER + i)
    }

    /// The relay's `HOST:PORT` as the peer hosts reach it.
    pub fn relay_addr(&self) -> SocketAddr {
        self.net.host(ORIGIN).sock(RELAY_PORT)
    }

    /// The seed's host.
    pub fn seed_host(&self) -> &Host {
        self.net.host(SEED)
    }

    /// Directory of logs and node data.
    pub fn dir(&self) -> &Path {
        self.net.dir()
    }
}

fn node_cmd(exe: &Path) -> Cmd {
    let mut c = Cmd::new(exe).arg("node");
    if let Ok(v) = std::env::var("SHOAL_LOG") {
        c = c.env("SHOAL_LOG", v);
    }
    c
}

/// Issues `name`'s certificate (DNS name `name`, IP `ip`) into `<dir>/tls/<name>`.
fn identity(ca: &ClusterCa, dir: &Path, name: &str, ip: IpAddr) -> Result<PathBuf, String> {
    let out = dir.join("tls").join(name);
    if !out.join("tls.crt").exists() {
        let mut req = NodeCertRequest::new(name, 1);
        req.ips.push(ip);
        ca.issue(&req)
            .and_then(|c| c.write_to(&out))
            .map_err(|e| format!("certificate for {name}: {e}"))?;
    }
    Ok(out)
}

async fn wait_api(sock: &Path, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if sock.exists() && ApiClient::new(sock).cache().await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "peer API {} did not answer within {limit:?}",
                sock.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes and packets `host` has sent so far and packets its tbf dropped
/// (`tc -s qdisc show dev eth0` in the host: the egress cap).
pub fn egress(host: &Host) -> (u64, u64) {
    let Ok(out) = host.run("tc", &["-s", "qdisc", "show", "dev", "eth0"]) else {
        return (0, 0);
    };
    let after = |key: &str| -> u64 {
        out.split_once(key)
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|v| v.trim_end_matches(',').parse().ok())
            .unwrap_or(0)
    };
    (after("Sent "), after("dropped "))
}
