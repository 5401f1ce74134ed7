//! The JSON answers of the local API.

use serde::{Deserialize, Serialize};
use shoal_types::Digest;

/// One download, as `GET /tasks` answers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskStatus {
    /// The blob.
    pub blob: Digest,
    /// Size in bytes, once known.
    pub size: Option<u64>,
    /// Piece size, once known.
    pub piece_size: Option<u32>,
    /// Number of pieces, once known.
    pub pieces: Option<u32>,
    /// Pieces held now (stored, or staged while the piece table is not whole).
    pub held: u32,
    /// True once the whole blob matched its sha256.
    pub complete: bool,
    /// True while a download runs.
    pub running: bool,
    /// Bytes received from peers.
    pub bytes_from_peers: u64,
    /// Bytes received from the origin.
    pub bytes_from_origin: u64,
    /// The last failure, if the download failed.
    pub error: Option<String>,
}

/// Store figures, as `GET /cache` answers them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheStatus {
    /// Bytes Shoal's entries use.
    pub used_bytes: u64,
    /// High watermark (quota).
    pub high_watermark: u64,
    /// Blobs indexed (partial or complete).
    pub blobs: u64,
    /// Blobs whose sha256 was verified.
    pub complete_blobs: u64,
    /// Pieces held.
    pub pieces: u64,
    /// Corrupt items found and dropped.
    pub corruptions: u64,
    /// Bytes received from peers by this process.
    pub bytes_from_peers: u64,
    /// Bytes received from origins by this process.
    pub bytes_from_origin: u64,
}

/// The node's state, as `GET /status` answers it (`shoal status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// This host's id.
    pub host_id: String,
    /// Whether it runs as a seed.
    pub seed: bool,
    /// Scheduler addresses it knows (static or resolved).
    pub schedulers: Vec<std::net::SocketAddr>,
    /// Schedulers it is registered with now.
    pub schedulers_connected: usize,
    /// Store figures.
    pub cache: CacheStatus,
    /// Every download it knows.
    pub tasks: Vec<TaskStatus>,
}
