//! `shoal snapshotter`: containerd's remote snapshotter (a proxy plugin on a unix socket) that
//! starts containers on lazily mounted Shoal images (shoal-fs's `snapshotter`). The config is one
//! TOML file (`--config`, a `SnapshotterConfig`); every field is also a flag, and flags win.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use shoal_fs::snapshotter::SnapshotterConfig;

use crate::peer::config_flags;

config_flags! {
    /// Every `SnapshotterConfig` field as a flag.
    pub struct SnapshotterFlags => SnapshotterConfig {
        /// The unix socket containerd dials [default: /run/shoal/snapshotter.sock].
        socket: PathBuf => set socket,
        /// State, snapshots and lazy mounts [default:
        /// /var/lib/containerd/io.containerd.snapshotter.v1.shoal, where containerd's CRI
        /// measures image-fs usage].
        root: PathBuf => set root,
        /// The local peer's API socket [default: /run/shoal/peer.sock].
        peer_socket: PathBuf => some peer_socket,
        /// A docker config.json with registry credentials for fetches that bypass the peer.
        docker_config: PathBuf => some docker_config,
        /// TCP address of /metrics, /healthz and /readyz [default: 0.0.0.0:4491].
        metrics_addr: std::net::SocketAddr => some metrics_addr,
        /// The `shoal` binary serving each lazy mount [default: this binary].
        shoal_binary: PathBuf => some shoal_binary,
        /// Longest wait for a lazy mount to come up, seconds [default: 60].
        mount_timeout_secs: u64 => set mount_timeout_secs,
        /// Bytes each lazily mounted image may cache [default: 10 GiB].
        image_cache_quota: u64 => set image_cache_quota,
        /// Longest wait of an uncached read in a lazy mount, seconds [default: 20].
        fetch_timeout_secs: u64 => set fetch_timeout_secs,
        /// Fetch each image's prefetch list once mounted (`--prefetch=false` to turn off).
        #[arg(num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        prefetch: bool => set prefetch,
        /// Log filter of the mount processes [default: info].
        mount_log: String => set mount_log,
        /// Mount the layers of plain images that have a Shoal index lazily (`--indexes=false`:
        /// always unpack plain images).
        #[arg(num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        indexes: bool => set indexes,
        /// How long "no Shoal index" is remembered per image manifest, seconds [default: 60].
        no_index_cache_secs: u64 => set no_index_cache_secs,
    }
    lists {
        /// Registry hosts spoken to over plain HTTP (loopback always is); comma-separated.
        plain_http: String => plain_http,
    }
}

/// `shoal snapshotter`: serve containerd until SIGINT/SIGTERM.
#[derive(Args, Debug)]
pub struct SnapshotterArgs {
    /// TOML config file (the fields of `SnapshotterConfig`); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Fetch from the origin only, never through a local peer.
    #[arg(long)]
    no_peer: bool,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    flags: SnapshotterFlags,
}

/// The config from the file (if any) with the flags written over it.
pub fn effective_config(args: &SnapshotterArgs) -> anyhow::Result<SnapshotterConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<SnapshotterConfig>(&text)
                .with_context(|| format!("{}: not a valid snapshotter config", path.display()))?
        }
        None => SnapshotterConfig::default(),
    };
    args.flags.clone().apply(&mut cfg);
    if args.no_peer {
        cfg.peer_socket = None;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Runs `shoal snapshotter`.
pub fn run(args: SnapshotterArgs) -> anyhow::Result<()> {
    let cfg = effective_config(&args)?;
    if args.print_config {
        print!("{}", toml::to_string(&cfg).context("printing the config")?);
        return Ok(());
    }
    let socket = cfg.socket.clone();
    shoal_fs::snapshotter::run(cfg)
        .with_context(|| format!("serving the snapshotter on {}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SnapshotterArgs,
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "root = \"/a\"\nfetch_timeout_secs = 7\nprefetch = true\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            file.to_str().unwrap(),
            "--root",
            "/b",
            "--prefetch=false",
            "--plain-http",
            "reg1:5000,reg2",
        ]);
        let cfg = effective_config(&cli.args).unwrap();
        assert_eq!(cfg.root, PathBuf::from("/b"));
        assert_eq!(cfg.fetch_timeout_secs, 7);
        assert!(!cfg.prefetch);
        assert_eq!(cfg.plain_http, ["reg1:5000", "reg2"]);
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "sockett = \"/x\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", bad.to_str().unwrap()]);
        assert!(effective_config(&cli.args).is_err());
    }
}
