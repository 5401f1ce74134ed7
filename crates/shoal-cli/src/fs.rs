//! `shoal fs mount|umount`: the lazy, chunk-verified image filesystem.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use shoal_fs::FsConfig;

/// Where the local peer's API listens by default (design.md, "Defaults").
const DEFAULT_PEER_SOCKET: &str = "/run/shoal/peer.sock";

/// The `shoal fs` subcommands.
#[derive(Subcommand)]
pub enum FsCommand {
    /// Mount an image read-only and lazily; serves until unmounted, SIGINT or SIGTERM.
    Mount(Box<MountArgs>),
    /// Unmount a Shoal mount.
    Umount {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
}

/// `shoal fs mount`: every flag overrides the field of the same name in `--config`.
#[derive(Args)]
pub struct MountArgs {
    /// `docker://HOST/REPO[:TAG|@DIGEST]`, `oci:DIR[:TAG]`, or a bootstrap file.
    source: String,
    /// An existing directory to mount on.
    mountpoint: PathBuf,
    /// A TOML file of filesystem settings (the fields below, snake_case).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of data blobs (`sha256/<hex>`) when SOURCE is a bootstrap file.
    #[arg(long)]
    blob_dir: Option<PathBuf>,
    /// Expected `sha256:<hex>` of a bootstrap file given as SOURCE.
    #[arg(long)]
    bootstrap_digest: Option<String>,
    /// `docker://HOST/REPO` holding the data blobs of a bootstrap file given as SOURCE.
    #[arg(long)]
    origin: Option<String>,
    /// Write the mount's counters to FILE as JSON about once a second.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Verified-chunk cache directory.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Bytes the chunk cache may use.
    #[arg(long)]
    cache_quota: Option<u64>,
    /// The local peer's API socket (default /run/shoal/peer.sock; reads go to the origin when the
    /// peer is not running).
    #[arg(long, conflicts_with = "no_peer")]
    peer_socket: Option<PathBuf>,
    /// Read from the origin only, never through a local peer.
    #[arg(long)]
    no_peer: bool,
    /// A registry host to speak plain HTTP to (loopback always is); repeatable.
    #[arg(long)]
    plain_http: Vec<String>,
    /// Longest wait of an uncached read before it fails with EIO, seconds (1..=300).
    #[arg(long)]
    fetch_timeout_secs: Option<u64>,
    /// Largest byte range asked of a source at once.
    #[arg(long)]
    max_request_bytes: Option<u64>,
    /// Largest gap of unneeded bytes bridged when merging chunk requests.
    #[arg(long)]
    max_gap_bytes: Option<u64>,
    /// Stored bytes of a file loaded ahead of a sequential read of it (0 = off).
    #[arg(long)]
    fetch_ahead_bytes: Option<u64>,
    /// Stored bytes following a file in its blob, fetched when a cold read reaches the file's
    /// end (0 = off).
    #[arg(long)]
    blob_ahead_bytes: Option<u64>,
    /// Do not fetch the image's prefetch list after mount.
    #[arg(long)]
    no_prefetch: bool,
    /// Fetch every blob of the image in the background.
    #[arg(long)]
    prefetch_all: bool,
    /// Bandwidth limit of the background whole-image fetch, bytes/s (0 = unlimited).
    #[arg(long)]
    prefetch_bytes_per_sec: Option<u64>,
    /// Write the order in which files are first read to FILE (for `image convert --prefetch`).
    #[arg(long)]
    record_access: Option<PathBuf>,
    /// Threads serving reads.
    #[arg(long)]
    read_threads: Option<usize>,
    /// Bytes of verified chunks kept in memory.
    #[arg(long)]
    memory_cache_bytes: Option<u64>,
    /// Let other users read the mount.
    #[arg(long)]
    allow_other: bool,
}

impl MountArgs {
    fn into_config(self) -> anyhow::Result<FsConfig> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<FsConfig>(&text)
                    .with_context(|| format!("{}: not a valid fs config", path.display()))?
            }
            None => FsConfig::default(),
        };
        c.source = self.source;
        c.mountpoint = self.mountpoint;
        set(&mut c.blob_dir, self.blob_dir.map(Some));
        set(&mut c.bootstrap_digest, self.bootstrap_digest.map(Some));
        set(&mut c.origin, self.origin.map(Some));
        set(&mut c.stats_file, self.stats_file.map(Some));
        set(&mut c.cache_dir, self.cache_dir);
        set(&mut c.cache_quota, self.cache_quota);
        set(&mut c.fetch_timeout_secs, self.fetch_timeout_secs);
        set(&mut c.max_request_bytes, self.max_request_bytes);
        set(&mut c.max_gap_bytes, self.max_gap_bytes);
        set(&mut c.fetch_ahead_bytes, self.fetch_ahead_bytes);
        set(&mut c.blob_ahead_bytes, self.blob_ahead_bytes);
        set(&mut c.prefetch_bytes_per_sec, self.prefetch_bytes_per_sec);
        set(&mut c.record_access, self.record_access.map(Some));
        set(&mut c.read_threads, self.read_threads);
        set(&mut c.memory_cache_bytes, self.memory_cache_bytes);
        c.plain_http.extend(self.plain_http);
        c.prefetch &= !self.no_prefetch;
        c.prefetch_all |= self.prefetch_all;
        c.allow_other |= self.allow_other;
        c.peer_socket = match (self.no_peer, self.peer_socket) {
            (true, _) => None,
            (false, Some(s)) => Some(s),
            (false, None) => c
                .peer_socket
                .take()
                .or_else(|| Some(PathBuf::from(DEFAULT_PEER_SOCKET))),
        };
        c.validate()?;
        Ok(c)
    }
}

fn set<T>(field: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *field = v;
    }
}

/// Runs one `shoal fs` subcommand.
pub fn run(cmd: FsCommand) -> anyhow::Result<()> {
    match cmd {
        FsCommand::Mount(args) => {
            let config = args.into_config()?;
            let mountpoint = config.mountpoint.clone();
            shoal_fs::run(config)
                .with_context(|| format!("serving the mount at {}", mountpoint.display()))
        }
        FsCommand::Umount { mountpoint } => shoal_fs::umount(&mountpoint)
            .with_context(|| format!("unmounting {}", mountpoint.display())),
    }
}
