//! The snapshotter's configuration (`shoal snapshotter --config`): one serde struct, defaults in
//! one place, the same names as the flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{Result, SnapshotterError};

/// Where containerd's CRI looks for the `shoal` snapshotter's files: it reports image-fs usage
/// for `<containerd root>/io.containerd.snapshotter.v1.<name>`, and kubelet's image GC follows it.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.shoal";
/// The design's default socket.
pub const DEFAULT_SOCKET: &str = "/run/shoal/snapshotter.sock";

/// How `shoal snapshotter` runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    /// The unix socket containerd's proxy plugin dials (`[proxy_plugins.shoal] address`).
    pub socket: PathBuf,
    /// State, snapshot directories and lazy image mounts.
    pub root: PathBuf,
    /// The local peer's API socket: bootstraps and chunks are fetched through the swarm; `None`
    /// fetches from the origin only.
    pub peer_socket: Option<PathBuf>,
    /// Registry hosts spoken to over plain HTTP (loopback always is).
    pub plain_http: Vec<String>,
    /// A docker `config.json` with registry credentials for fetches that bypass the peer (the
    /// peer itself uses the credentials containerd sent through its registry proxy).
    pub docker_config: Option<PathBuf>,
    /// Metrics and health server (`/metrics`, `/healthz`, `/readyz`); `None` serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// The `shoal` binary that serves each lazy mount (`shoal fs mount`); default: this binary.
    pub shoal_binary: Option<PathBuf>,
    /// Longest wait for a lazy mount to come up (bootstrap fetched, verified, mounted), seconds.
    pub mount_timeout_secs: u64,
    /// Bytes each lazily mounted image may keep in its verified-chunk cache.
    pub image_cache_quota: u64,
    /// Longest time an uncached read in a lazy mount waits before failing with EIO, seconds.
    pub fetch_timeout_secs: u64,
    /// Fetch each image's prefetch list in the background once mounted.
    pub prefetch: bool,
    /// Log filter of the mount processes (`SHOAL_LOG` syntax).
    pub mount_log: String,
    /// Look for a Shoal index (`shoal image index`) of each plain image the CRI pulls, and mount
    /// the layers of one that has it lazily instead of unpacking them.
    pub indexes: bool,
    /// How long "this image has no Shoal index" is remembered per image manifest, seconds (its
    /// layers then make one lookup, not one each; an index pushed later is found after it).
    pub no_index_cache_secs: u64,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            root: PathBuf::from(DEFAULT_ROOT),
            peer_socket: Some(PathBuf::from("/run/shoal/peer.sock")),
            plain_http: Vec::new(),
            docker_config: None,
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 4491))),
            shoal_binary: None,
            mount_timeout_secs: 60,
            image_cache_quota: 10 << 30,
            fetch_timeout_secs: 20,
            prefetch: true,
            mount_log: "info".into(),
            indexes: true,
            no_index_cache_secs: 60,
        }
    }
}

impl SnapshotterConfig {
    /// Checks ranges and required fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(SnapshotterError::Config(m.to_string()));
        if self.socket.as_os_str().is_empty() || self.root.as_os_str().is_empty() {
            return bad("socket and root must be set");
        }
        if !self.root.is_absolute() {
            return bad("root must be an absolute path (containerd and the mounts refer to it)");
        }
        if !(1..=600).contains(&self.mount_timeout_secs) {
            return bad("mount_timeout_secs must be 1..=600");
        }
        if !(1..=300).contains(&self.fetch_timeout_secs) {
            return bad("fetch_timeout_secs must be 1..=300 (reads must never hang)");
        }
        if self.no_index_cache_secs > 24 * 3600 {
            return bad("no_index_cache_secs must be at most a day (86400)");
        }
        if self.image_cache_quota < 64 << 20 {
            return bad("image_cache_quota must be at least 64 MiB");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_takes_defaults_and_refuses_unknown_fields() {
        let c: SnapshotterConfig = toml::from_str("root = \"/tmp/x\"\nprefetch = false\n").unwrap();
        assert!(!c.prefetch);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        c.validate().unwrap();
        assert!(toml::from_str::<SnapshotterConfig>("roots = \"/x\"\n").is_err());
        let rel = SnapshotterConfig {
            root: "rel".into(),
            ..SnapshotterConfig::default()
        };
        assert!(rel.validate().is_err());
    }
}
