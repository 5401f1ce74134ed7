//! A small harness: a cluster CA, a real docker-registry as origin, a real scheduler service and
//! in-process peers on loopback, so test bodies read like the scenario.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest as _;
use shoal_peer::{Peer, PeerConfig};
use shoal_proto::{Digest, OriginRef};
use shoal_scheduler::service::{SchedulerService, ServiceConfig};
use shoal_scheduler::SchedulerConfig;
use shoal_testkit::{or_skip, Registry, RegistryOpts};
use shoal_tls::{ClusterCa, NodeCertRequest};

pub const REPO: &str = "swarm/app";
pub const SCHEDULER: &str = "scheduler";

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca: ClusterCa,
    pub registry: Registry,
    pub scheduler: Option<SchedulerService>,
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Starts the registry (or returns None when docker-registry is missing) and a scheduler.
pub async fn cluster(with_scheduler: bool) -> Option<Cluster> {
    init_logs();
    shoal_tls::install_crypto_provider();
    let registry = or_skip(Registry::start(RegistryOpts::default()).await)?;
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&dir.path().join("ca"), "Shoal test CA", 30).unwrap();
    let mut c = Cluster {
        dir,
        ca,
        registry,
        scheduler: None,
    };
    if with_scheduler {
        c.start_scheduler();
    }
    Some(c)
}

impl Cluster {
    /// Issues a certificate for `name` into its own directory.
    pub fn identity(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join("tls").join(name);
        if !dir.join("tls.crt").exists() {
            let mut req = NodeCertRequest::new(name, 30);
            req.ips.push("127.0.0.1".parse().unwrap());
            self.ca.issue(&req).unwrap().write_to(&dir).unwrap();
        }
        dir
    }

    /// The origins every node and the scheduler allow: the cluster's registry (loopback, so
    /// it must be listed like any other).
    pub fn allowed(&self) -> Vec<String> {
        vec![self.registry.host()]
    }

    /// A scheduler's settings on `listen`, allowing [`Self::allowed`] and `extra`.
    pub fn scheduler_config(&self, listen: SocketAddr, extra: &[String]) -> ServiceConfig {
        let mut allowed_origins = self.allowed();
        allowed_origins.extend_from_slice(extra);
        ServiceConfig {
            listen,
            host_id: SCHEDULER.into(),
            tls_dir: self.identity(SCHEDULER),
            allowed_origins,
            core: SchedulerConfig::default(),
        }
    }

    pub fn start_scheduler(&mut self) {
        let cfg = self.scheduler_config("127.0.0.1:0".parse().unwrap(), &[]);
        let mut reg = prometheus_client::registry::Registry::default();
        self.scheduler = Some(SchedulerService::start(cfg, &mut reg).unwrap());
    }

    pub fn scheduler_addr(&self) -> Option<SocketAddr> {
        self.scheduler.as_ref().map(|s| s.local_addr().unwrap())
    }

    pub fn origin(&self) -> OriginRef {
        OriginRef {
            reference: format!("docker://{}/{REPO}", self.registry.host()),
            authorization: None,
        }
    }

    /// The config of peer `name` (a seed when `seed`), pointed at the scheduler if one runs.
    pub fn config(&self, name: &str, seed: bool) -> PeerConfig {
        let home = self.dir.path().join("nodes").join(name);
        PeerConfig {
            host_id: name.into(),
            data_dir: home.join("data"),
            tls_dir: self.identity(name),
            listen: "127.0.0.1:0".parse().unwrap(),
            scheduler: self.scheduler_addr(),
            scheduler_name: SCHEDULER.into(),
            api_socket: home.join("peer.sock"),
            seed,
            cache_bytes: Some(1 << 30),
            piece_size: Some(1 << 20),
            piece_timeout_ms: 5_000,
            connect_timeout_ms: 3_000,
            scheduler_timeout_ms: 3_000,
            piece_table_wait_ms: 60_000,
            allowed_origins: self.allowed(),
            ..PeerConfig::default()
        }
    }

    /// Starts a peer and waits until it is registered with the scheduler (if any).
    pub async fn start(&self, cfg: PeerConfig) -> Peer {
        let with_sched = cfg.scheduler.is_some();
        let peer = Peer::start(cfg).await.unwrap();
        if with_sched {
            wait_until(Duration::from_secs(10), || peer.scheduler_connected()).await;
        }
        peer
    }

    /// Pushes `len` random bytes as a blob; returns its digest.
    pub async fn push_blob(&self, len: usize, seed: u64) -> (Digest, Vec<u8>) {
        let data = shoal_testkit::random_bytes(len, seed);
        let d = self.registry.push_blob(REPO, &data).await.unwrap();
        (Digest::parse(&d).unwrap(), data)
    }
}

pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `host[:port]` of a `docker://HOST/REPO` reference (what allowed_origins lists).
pub fn host_of(reference: &str) -> String {
    let rest = reference.strip_prefix("docker://").unwrap_or(reference);
    rest.split('/').next().unwrap_or(rest).to_string()
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

pub fn file_sha256(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap())
}

/// Fetches the whole blob through `peer` and returns its bytes, read back through the range API.
pub async fn fetch(peer: &Peer, blob: Digest, origin: OriginRef) -> Vec<u8> {
    let task = peer.downloader().open(blob, Some(origin)).await.unwrap();
    task.fetch_all().await.unwrap();
    let size = task.size().unwrap();
    let mut stream = task.read_range(0, size).unwrap();
    let mut out = Vec::new();
    use futures::StreamExt;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}
