//! The filesystem's configuration: one serde struct, defaults in one place, the same names as the
//! `shoal fs mount` flags.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{FsError, Result};

/// How to mount one image (`shoal fs mount SRC MOUNTPOINT`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FsConfig {
    /// The image: `docker://HOST/REPO[:TAG|@DIGEST]`, `oci:DIR[:TAG]`, or a bootstrap file.
    pub source: String,
    /// Where to mount it (an existing directory).
    pub mountpoint: PathBuf,
    /// Directory holding data blobs as `sha256/<hex>` (an OCI layout's `blobs/`); needed when
    /// `source` is a bootstrap file.
    pub blob_dir: Option<PathBuf>,
    /// Expected `sha256:<hex>` of a bootstrap file given as `source` (its manifest digest entry).
    pub bootstrap_digest: Option<String>,
    /// Where the data blobs of a bootstrap file given as `source` live: `docker://HOST/REPO`
    /// (read through the peer, else that repository). Instead of `blob_dir`.
    pub origin: Option<String>,
    /// Verified-chunk cache directory (a Shoal store); one mounting process owns it at a time.
    pub cache_dir: PathBuf,
    /// Bytes the chunk cache may use.
    pub cache_quota: u64,
    /// The local peer's API socket; `None` reads from the origin only.
    pub peer_socket: Option<PathBuf>,
    /// Hosts spoken to over plain HTTP (loopback always is).
    pub plain_http: Vec<String>,
    /// Longest time an uncached read waits for its bytes before failing with EIO, in seconds.
    pub fetch_timeout_secs: u64,
    /// Largest byte range asked of a source in one request (adjacent chunks are merged up to it).
    pub max_request_bytes: u64,
    /// Largest gap of unneeded bytes between two chunks that are still merged into one request.
    pub max_gap_bytes: u64,
    /// Stored bytes of a file loaded ahead of a sequential read of it (0 = off): fetched in
    /// the background when not cached, read and verified from the disk cache when cached.
    pub fetch_ahead_bytes: u64,
    /// Stored bytes following a file in its data blob, fetched when a read that missed the
    /// caches reaches the file's end (the neighbouring small files; 0 = off).
    pub blob_ahead_bytes: u64,
    /// Fetch the bootstrap's prefetch list in the background after mount.
    pub prefetch: bool,
    /// Also fetch every blob of the image to completion in the background.
    pub prefetch_all: bool,
    /// Bandwidth limit of the background whole-blob fetch, bytes per second (0 = unlimited).
    pub prefetch_bytes_per_sec: u64,
    /// Write the order in which files are first read to this file (`--record-access`).
    pub record_access: Option<PathBuf>,
    /// Threads serving reads (fetch, decompress, verify) off the FUSE loop.
    pub read_threads: usize,
    /// Bytes of recently verified chunks kept in memory.
    pub memory_cache_bytes: u64,
    /// Let users other than the mounting one read the mount (needs `user_allow_other` when not root).
    pub allow_other: bool,
    /// Write the mount's counters here as JSON about once a second (the snapshotter's metrics
    /// and `shoal status` read them).
    pub stats_file: Option<PathBuf>,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            source: String::new(),
            mountpoint: PathBuf::new(),
            blob_dir: None,
            bootstrap_digest: None,
            origin: None,
            cache_dir: PathBuf::from("/var/lib/shoal/fs-cache"),
            cache_quota: 10 << 30,
            peer_socket: None,
            plain_http: Vec::new(),
            fetch_timeout_secs: 20,
            max_request_bytes: 8 << 20,
            max_gap_bytes: 64 << 10,
            fetch_ahead_bytes: 2 << 20,
            blob_ahead_bytes: 128 << 10,
            prefetch: true,
            prefetch_all: false,
            prefetch_bytes_per_sec: 0,
            record_access: None,
            read_threads: 16,
            memory_cache_bytes: 64 << 20,
            allow_other: false,
            stats_file: None,
        }
    }
}

impl FsConfig {
    /// A config for `source` at `mountpoint` with every other field at its default.
    pub fn new(source: impl Into<String>, mountpoint: impl Into<PathBuf>) -> Self {
        FsConfig {
            source: source.into(),
            mountpoint: mountpoint.into(),
            ..FsConfig::default()
        }
    }

    /// The read deadline as a duration.
    pub fn fetch_timeout(&self) -> Duration {
        Duration::from_secs(self.fetch_timeout_secs)
    }

    /// Checks ranges and required fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(FsError::Config(m.to_string()));
        if self.source.is_empty() {
            return bad("no image source given");
        }
        if self.mountpoint.as_os_str().is_empty() {
            return bad("no mountpoint given");
        }
        if !(1..=300).contains(&self.fetch_timeout_secs) {
            return bad("fetch_timeout_secs must be 1..=300 (reads must never hang)");
        }
        if !(64 << 10..=256 << 20).contains(&self.max_request_bytes) {
            return bad("max_request_bytes must be 64 KiB..=256 MiB");
        }
        if self.max_gap_bytes > self.max_request_bytes {
            return bad("max_gap_bytes must not exceed max_request_bytes");
        }
        if self.fetch_ahead_bytes > 64 << 20 || self.blob_ahead_bytes > 64 << 20 {
            return bad("fetch_ahead_bytes and blob_ahead_bytes must be at most 64 MiB");
        }
        if !(1..=256).contains(&self.read_threads) {
            return bad("read_threads must be 1..=256");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_uses_defaults_and_rejects_unknown_fields() {
        let c: FsConfig = toml::from_str(
            "source = \"oci:/img\"\nmountpoint = \"/mnt\"\nfetch_timeout_secs = 5\n",
        )
        .unwrap();
        assert_eq!(c.fetch_timeout_secs, 5);
        assert_eq!(c.max_request_bytes, FsConfig::default().max_request_bytes);
        c.validate().unwrap();
        assert!(toml::from_str::<FsConfig>("source = \"x\"\nfetch_timout_secs = 5\n").is_err());
    }

    #[test]
    fn reads_can_never_wait_forever() {
        assert!(FsConfig::default().fetch_timeout_secs <= 30);
        let c = FsConfig {
            fetch_timeout_secs: 0,
            ..FsConfig::new("oci:/img", "/mnt")
        };
        assert!(c.validate().is_err());
        let c = FsConfig {
            max_gap_bytes: 1 << 30,
            ..FsConfig::new("oci:/img", "/mnt")
        };
        assert!(c.validate().is_err());
    }
}
