//! The peer's settings: one serde struct, every default in [`PeerConfig::default`], the same
//! names as the `shoal peer` flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::PeerError;

/// Everything `shoal peer` (and `shoal peer --seed`) can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerConfig {
    /// This host's id: its node name, which must equal its certificate's common name.
    pub host_id: String,
    /// Data directory; the store lives in `<data_dir>/store`.
    pub data_dir: PathBuf,
    /// Directory holding `tls.crt`, `tls.key` and `ca.crt` (a mounted Secret).
    pub tls_dir: PathBuf,
    /// UDP address the piece server listens on (QUIC).
    pub listen: SocketAddr,
    /// Addresses announced to the scheduler for other peers to dial; empty: the bound address.
    pub advertise: Vec<SocketAddr>,
    /// The scheduler's QUIC address; `None` runs without a scheduler (origin only).
    pub scheduler: Option<SocketAddr>,
    /// The scheduler's certificate name (TLS server name checked on connect).
    pub scheduler_name: String,
    /// Several schedulers' QUIC addresses (with `scheduler`, if set); each blob goes to one of
    /// them by rendezvous hashing, and to the next one when that one does not answer.
    pub schedulers: Vec<SocketAddr>,
    /// `name:port` whose addresses are the schedulers (a Kubernetes headless Service);
    /// resolved again every `scheduler_dns_refresh_secs`. Not together with a static list.
    pub scheduler_dns: Option<String>,
    /// How often `scheduler_dns` is resolved again, in seconds.
    pub scheduler_dns_refresh_secs: u64,
    /// Join the peers' Kademlia DHT (TCP, same port number as `listen`) to find holders of a
    /// blob when no scheduler answers.
    pub dht: bool,
    /// Peers' addresses (their `listen`/`advertise` address: the DHT uses the same port over
    /// TCP) to join the DHT through, besides the hosts the schedulers list.
    pub dht_bootstrap: Vec<SocketAddr>,
    /// `name:port` whose addresses are peers to join the DHT through (a headless Service of
    /// the peer DaemonSet).
    pub dht_bootstrap_dns: Option<String>,
    /// Unix socket of the local API (HTTP over UDS).
    pub api_socket: PathBuf,
    /// TCP address `shoal peer` serves `/metrics`, `/healthz` and `/readyz` on.
    pub metrics_listen: SocketAddr,
    /// Run as a seed: register as one, fetch from origin when the scheduler asks, keep more cache.
    pub seed: bool,
    /// Store quota in bytes (high watermark); `None`: 20 GiB for a peer, 200 GiB for a seed.
    pub cache_bytes: Option<u64>,
    /// Evict cached blobs unused for this many seconds (0: never).
    pub cache_ttl_secs: u64,
    /// Zone label sent to the scheduler (locality-aware parent selection).
    pub zone: Option<String>,
    /// Rack label sent to the scheduler.
    pub rack: Option<String>,
    /// Pieces served at once; further requests are answered "busy".
    pub upload_slots: u32,
    /// Upload rate limit in bytes per second (0: unlimited).
    pub upload_bytes_per_sec: u64,
    /// Pieces fetched at once per download.
    pub download_concurrency: usize,
    /// Piece bytes held in memory at once by the whole peer: downloads (at most a quarter),
    /// reads for local clients and the registry proxy (at most half) and uploads (at most half)
    /// together (budget.rs). Bounds the peer's memory however many downloads and readers run
    /// (docs/operations.md).
    pub piece_memory_bytes: u64,
    /// Most piece requests in flight to one parent (few, so a parent's uplink is shared by
    /// more children and each piece arrives, and can be passed on, sooner).
    pub per_parent_concurrency: usize,
    /// A piece fetch from a parent that receives no byte for this long is a stall: the parent is
    /// dropped. A slow parent that keeps sending is not.
    pub piece_timeout_ms: u64,
    /// An origin read (a HEAD, or a body) that receives nothing for this long fails, naming the
    /// origin, instead of waiting on a black-holed connection.
    pub origin_idle_timeout_ms: u64,
    /// Verified pieces of plain blobs whose piece table is not whole yet, kept in files in the
    /// store's temp directory until it is (docs/protocol.md, "Streamed piece hashes"); beyond
    /// this many bytes downloads wait for the table.
    pub staging_bytes: u64,
    /// Connecting (QUIC + TLS + Hello) to a parent or the scheduler gives up after this long.
    pub connect_timeout_ms: u64,
    /// One scheduler request gives up after this long; the download then goes on without it.
    pub scheduler_timeout_ms: u64,
    /// How long a download without a piece table waits for one to be published (a seed
    /// fetching the blob) before it goes to the origin itself.
    pub piece_table_wait_ms: u64,
    /// Piece size for blobs first fetched from origin by this peer; `None`: `shoal_proto::default_piece_size`.
    pub piece_size: Option<u32>,
    /// Registries spoken to over plain HTTP (loopback is always plain HTTP).
    pub plain_http_registries: Vec<String>,
    /// The only origins this peer fetches from, or (a seed) fetches from for the scheduler:
    /// registries as `host[:port]`, `s3://HOST[:PORT]/BUCKET`, `dir:/PATH`. Empty: none. A
    /// registry's redirects are followed, but to a loopback or link-local address only when
    /// that `host:port` is listed too (docs/operations.md, "Allowed origins").
    pub allowed_origins: Vec<String>,
    /// The registry proxy for container runtimes (`[proxy]`).
    pub proxy: crate::proxy::ProxyConfig,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            host_id: String::new(),
            data_dir: PathBuf::from("/var/lib/shoal"),
            tls_dir: PathBuf::from("/etc/shoal/tls"),
            listen: SocketAddr::from(([0, 0, 0, 0], 4470)),
            advertise: Vec::new(),
            scheduler: None,
            scheduler_name: "shoal-scheduler".into(),
            schedulers: Vec::new(),
            scheduler_dns: None,
            scheduler_dns_refresh_secs: 30,
            dht: true,
            dht_bootstrap: Vec::new(),
            dht_bootstrap_dns: None,
            api_socket: PathBuf::from("/run/shoal/peer.sock"),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 4490)),
            seed: false,
            cache_bytes: None,
            cache_ttl_secs: 0,
            zone: None,
            rack: None,
            upload_slots: 32,
            upload_bytes_per_sec: 0,
            download_concurrency: 16,
            piece_memory_bytes: 512 << 20,
            per_parent_concurrency: 2,
            piece_timeout_ms: 30_000,
            origin_idle_timeout_ms: 15_000,
            staging_bytes: 4 << 30,
            connect_timeout_ms: 5_000,
            scheduler_timeout_ms: 5_000,
            piece_table_wait_ms: 120_000,
            piece_size: None,
            plain_http_registries: Vec::new(),
            allowed_origins: Vec::new(),
            proxy: crate::proxy::ProxyConfig::default(),
        }
    }
}

impl PeerConfig {
    /// Reads a TOML config file; unknown fields are an error.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, PeerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PeerError::Config(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| PeerError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), PeerError> {
        shoal_proto::HostId::new(self.host_id.clone())
            .map_err(|e| PeerError::Config(format!("host_id: {e}")))?;
        let positive = [
            ("upload_slots", u64::from(self.upload_slots)),
            ("download_concurrency", self.download_concurrency as u64),
            ("per_parent_concurrency", self.per_parent_concurrency as u64),
            ("piece_timeout_ms", self.piece_timeout_ms),
            ("origin_idle_timeout_ms", self.origin_idle_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("scheduler_timeout_ms", self.scheduler_timeout_ms),
            (
                "scheduler_dns_refresh_secs",
                self.scheduler_dns_refresh_secs,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(PeerError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.piece_memory_bytes < crate::budget::MIN_BUDGET {
            return Err(PeerError::Config(format!(
                "piece_memory_bytes {} must be at least {} (a piece of the largest size in each share)",
                self.piece_memory_bytes,
                crate::budget::MIN_BUDGET
            )));
        }
        crate::scheduler_ring::check_config(self)?;
        if let Some(ps) = self.piece_size {
            if !ps.is_power_of_two()
                || !(shoal_proto::MIN_PIECE_SIZE..=shoal_proto::MAX_PIECE_SIZE).contains(&ps)
            {
                return Err(PeerError::Config(format!(
                    "piece_size {ps} must be a power of two from {} to {}",
                    shoal_proto::MIN_PIECE_SIZE,
                    shoal_proto::MAX_PIECE_SIZE
                )));
            }
        }
        self.allowed_list()?;
        Ok(())
    }

    /// `allowed_origins` parsed; refusals speak of "this seed" on a seed.
    pub fn allowed_list(&self) -> Result<shoal_origin::AllowedOrigins, PeerError> {
        let owner = match self.seed {
            true => shoal_origin::ListOwner::Seed,
            false => shoal_origin::ListOwner::Peer,
        };
        shoal_origin::AllowedOrigins::parse(&self.allowed_origins, owner)
            .map_err(|e| PeerError::Config(e.to_string()))
    }

    /// The store quota in force.
    pub fn cache_quota(&self) -> u64 {
        self.cache_bytes
            .unwrap_or(if self.seed { 200 << 30 } else { 20 << 30 })
    }

    pub(crate) fn piece_timeout(&self) -> Duration {
        Duration::from_millis(self.piece_timeout_ms)
    }

    pub(crate) fn origin_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.origin_idle_timeout_ms)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn scheduler_timeout(&self) -> Duration {
        Duration::from_millis(self.scheduler_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_unknown_fields() {
        let cfg = PeerConfig {
            host_id: "node-a".into(),
            ..PeerConfig::default()
        };
        let text = toml::to_string(&cfg).unwrap();
        let back: PeerConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
        let err = toml::from_str::<PeerConfig>("host_id = \"a\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let partial: PeerConfig = toml::from_str("host_id = \"a\"\nseed = true\n").unwrap();
        assert!(partial.seed);
        assert_eq!(partial.cache_quota(), 200 << 30);
    }

    #[test]
    fn validation() {
        assert!(PeerConfig::default().validate().is_err(), "empty host id");
        let mut cfg = PeerConfig {
            host_id: "n1".into(),
            ..PeerConfig::default()
        };
        cfg.validate().unwrap();
        cfg.piece_size = Some(1000);
        assert!(cfg.validate().is_err());
        cfg.piece_size = None;
        cfg.upload_slots = 0;
        assert!(cfg.validate().is_err());
        cfg.upload_slots = 1;
        cfg.piece_memory_bytes = 1 << 20;
        assert!(cfg.validate().is_err(), "a budget smaller than one piece");
        cfg.piece_memory_bytes = 256 << 20;
        cfg.allowed_origins = vec!["registry.example".into(), "dir:/srv/blobs".into()];
        cfg.validate().unwrap();
        cfg.allowed_origins.push("registry.example/team".into());
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("allowed_origins entry \"registry.example/team\""),
            "{err}"
        );
    }
}
