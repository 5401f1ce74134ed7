//! `shoal peer [--seed]`: the peer daemon (shoal-peer) with its metrics and health server
//! (shoal-telemetry). The config is one TOML file (`--config`, a `PeerConfig`); every field is
//! also a flag of the same name, and flags win over the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use shoal_peer::{Peer, PeerConfig};

/// Declares a clap struct with one optional flag per config field (`--field-name`), and
/// `apply`, which writes the given flags over a config. Scalars: `name: Type => set path` (or
/// `=> some path` for an `Option` field); lists: `name: Item => path` (repeat the flag or
/// separate values with commas).
macro_rules! config_flags {
    (
        $(#[$smeta:meta])*
        $vis:vis struct $name:ident => $cfg:ty {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty => $how:ident $($path:ident).+ ),* $(,)?
        }
        lists {
            $( $(#[$lmeta:meta])* $lfield:ident : $lty:ty => $($lpath:ident).+ ),* $(,)?
        }
    ) => {
        $(#[$smeta])*
        #[derive(clap::Args, Debug, Default, Clone)]
        $vis struct $name {
            $( $(#[$fmeta])* #[arg(long)] pub $field: Option<$ty>, )*
            $( $(#[$lmeta])* #[arg(long, value_delimiter = ',')] pub $lfield: Option<Vec<$lty>>, )*
        }

        impl $name {
            /// Writes every flag that was given over `cfg`.
            pub fn apply(self, cfg: &mut $cfg) {
                $( if let Some(v) = self.$field { config_flags!(@assign $how (cfg.$($path).+) v); } )*
                $( if let Some(v) = self.$lfield { cfg.$($lpath).+ = v; } )*
            }
        }
    };
    (@assign set ($place:expr) $v:ident) => { $place = $v };
    (@assign some ($place:expr) $v:ident) => { $place = Some($v) };
}
pub(crate) use config_flags;

config_flags! {
    /// Every `PeerConfig` field as a flag.
    pub struct PeerFlags => PeerConfig {
        /// This host's id; must equal its certificate's common name (default: read from tls.crt).
        host_id: String => set host_id,
        /// Data directory; the store lives in DATA_DIR/store [default: /var/lib/shoal].
        data_dir: PathBuf => set data_dir,
        /// Directory with tls.crt, tls.key and ca.crt [default: /etc/shoal/tls].
        tls_dir: PathBuf => set tls_dir,
        /// UDP address of the piece server (QUIC) [default: 0.0.0.0:4470].
        listen: std::net::SocketAddr => set listen,
        /// The scheduler's QUIC address (none: origin and DHT only).
        scheduler: std::net::SocketAddr => some scheduler,
        /// The scheduler certificate's name [default: shoal-scheduler].
        scheduler_name: String => set scheduler_name,
        /// `name:port` resolving to the schedulers (a headless Service).
        scheduler_dns: String => some scheduler_dns,
        /// How often `scheduler_dns` is resolved again, in seconds.
        scheduler_dns_refresh_secs: u64 => set scheduler_dns_refresh_secs,
        /// Join the peers' DHT to find holders when no scheduler answers (`--dht=false` to leave).
        #[arg(num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        dht: bool => set dht,
        /// `name:port` resolving to peers to join the DHT through.
        dht_bootstrap_dns: String => some dht_bootstrap_dns,
        /// Unix socket of the local API [default: /run/shoal/peer.sock].
        api_socket: PathBuf => set api_socket,
        /// TCP address of /metrics, /healthz and /readyz [default: 0.0.0.0:4490].
        metrics_listen: std::net::SocketAddr => set metrics_listen,
        /// Run as a seed: fetch from origin on the scheduler's order, keep more cache.
        #[arg(num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        seed: bool => set seed,
        /// Store quota in bytes [default: 20 GiB, 200 GiB for a seed].
        cache_bytes: u64 => some cache_bytes,
        /// Evict blobs unused for this many seconds (0: never).
        cache_ttl_secs: u64 => set cache_ttl_secs,
        /// Zone label (locality-aware parent selection).
        zone: String => some zone,
        /// Rack label.
        rack: String => some rack,
        /// Pieces served at once.
        upload_slots: u32 => set upload_slots,
        /// Upload rate limit in bytes per second (0: unlimited).
        upload_bytes_per_sec: u64 => set upload_bytes_per_sec,
        /// Pieces fetched at once per download.
        download_concurrency: usize => set download_concurrency,
        /// Piece bytes held in memory at once by the whole peer [default: 128 MiB].
        piece_memory_bytes: u64 => set piece_memory_bytes,
        /// Most piece requests in flight to one parent.
        per_parent_concurrency: usize => set per_parent_concurrency,
        /// A piece fetch that receives no byte for this long (ms) drops the parent.
        piece_timeout_ms: u64 => set piece_timeout_ms,
        /// An origin read that receives nothing for this long (ms) fails [default: 15000].
        origin_idle_timeout_ms: u64 => set origin_idle_timeout_ms,
        /// Bytes of verified pieces kept in memory while a plain blob's piece table is not
        /// whole yet [default: 256 MiB].
        staging_bytes: u64 => set staging_bytes,
        /// Connect timeout to parents and the scheduler (ms).
        connect_timeout_ms: u64 => set connect_timeout_ms,
        /// One scheduler request gives up after this long (ms).
        scheduler_timeout_ms: u64 => set scheduler_timeout_ms,
        /// How long to wait for a seed to publish a piece table before going to the origin (ms).
        piece_table_wait_ms: u64 => set piece_table_wait_ms,
        /// Piece size for blobs this peer fetches first from origin (power of two).
        piece_size: u32 => some piece_size,
        /// Serve the registry proxy for containerd.
        #[arg(num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        proxy_enabled: bool => set proxy.enabled,
        /// TCP address of the registry proxy [default: 127.0.0.1:4480].
        proxy_listen: std::net::SocketAddr => set proxy.listen,
        /// Registry for proxy requests that name none (e.g. registry-1.docker.io).
        proxy_default_upstream: String => some proxy.default_upstream,
        /// Serve the proxy over HTTPS with this node's certificate.
        #[arg(num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        proxy_tls: bool => set proxy.tls,
        /// Reuse a successful upstream permission check this long (s).
        proxy_authz_cache_secs: u64 => set proxy.authz_cache_secs,
        /// Connecting to the upstream registry gives up after this long (ms).
        proxy_upstream_connect_timeout_ms: u64 => set proxy.upstream_connect_timeout_ms,
        /// An upstream response silent this long fails (ms).
        proxy_upstream_read_timeout_ms: u64 => set proxy.upstream_read_timeout_ms,
        /// A client must send request headers within this long (ms).
        proxy_header_timeout_ms: u64 => set proxy.header_timeout_ms,
        /// Largest request body the proxy accepts (bytes).
        proxy_max_request_body: usize => set proxy.max_request_body,
        /// On shutdown, proxy requests in flight get this long to finish (ms).
        proxy_shutdown_grace_ms: u64 => set proxy.shutdown_grace_ms,
        /// Add `Server-Timing: upstream;dur=MS, proxy;dur=MS` to answers.
        #[arg(num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        proxy_server_timing: bool => set proxy.server_timing,
    }
    lists {
        /// Addresses announced for other peers to dial (default: the bound address).
        advertise: std::net::SocketAddr => advertise,
        /// Several schedulers' QUIC addresses (blobs are hashed over them).
        schedulers: std::net::SocketAddr => schedulers,
        /// Peers to join the DHT through.
        dht_bootstrap: std::net::SocketAddr => dht_bootstrap,
        /// Registries spoken to over plain HTTP (loopback always is).
        plain_http_registries: String => plain_http_registries,
        /// The only origins this node fetches from: registries as HOST[:PORT],
        /// s3://HOST[:PORT]/BUCKET, dir:/PATH [default: none].
        allowed_origins: String => allowed_origins,
    }
}

/// `shoal peer`: run the peer daemon (or a seed with `--seed`) until SIGINT/SIGTERM.
#[derive(Args, Debug)]
pub struct PeerArgs {
    /// TOML config file (the fields of `PeerConfig`); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    flags: PeerFlags,
}

/// The config from the file (if any) with the flags written over it; an empty host id is
/// taken from the certificate's common name.
pub fn effective_config(args: &PeerArgs) -> anyhow::Result<PeerConfig> {
    let mut cfg = match &args.config {
        Some(path) => PeerConfig::from_toml_file(path)?,
        None => PeerConfig::default(),
    };
    args.flags.clone().apply(&mut cfg);
    if cfg.host_id.is_empty() {
        cfg.host_id = certificate_name(&cfg.tls_dir).with_context(|| {
            format!(
                "no host_id given and none readable from {}/tls.crt (set --host-id)",
                cfg.tls_dir.display()
            )
        })?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The common name of the node certificate in `tls_dir`.
pub fn certificate_name(tls_dir: &Path) -> anyhow::Result<String> {
    let path = tls_dir.join(shoal_tls::TLS_CRT);
    let certs = shoal_tls::load_certs(&path)?;
    let leaf = certs
        .first()
        .with_context(|| format!("{} holds no certificate", path.display()))?;
    Ok(shoal_tls::identity_of(leaf)?.common_name)
}

/// Runs `shoal peer`.
pub fn run(args: PeerArgs) -> anyhow::Result<()> {
    let cfg = effective_config(&args)?;
    if args.print_config {
        print!("{}", toml::to_string(&cfg).context("printing the config")?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: PeerConfig) -> anyhow::Result<()> {
    let metrics_addr = cfg.metrics_listen;
    let with_scheduler =
        cfg.scheduler.is_some() || !cfg.schedulers.is_empty() || cfg.scheduler_dns.is_some();
    let peer = Arc::new(Peer::start(cfg).await.context("starting the peer")?);
    let mut registry = shoal_telemetry::Registry::default();
    shoal_peer::metrics::register(&mut registry, &peer);
    // Ready once registered with a scheduler (when one is configured): before that, every
    // download would go to the DHT or the origin.
    let weak = Arc::downgrade(&peer);
    let ready: shoal_telemetry::ReadyFn = Arc::new(move || {
        weak.upgrade()
            .is_some_and(|p| !with_scheduler || p.scheduler_connected())
    });
    let server = shoal_telemetry::serve(metrics_addr, registry, ready).await?;
    tracing::info!(metrics = %server.local_addr(), "peer running");
    crate::scheduler::wait_for_signal().await?;
    tracing::info!("peer shutting down");
    drop(server);
    match Arc::try_unwrap(peer) {
        Ok(peer) => peer.shutdown().await,
        Err(_) => tracing::warn!("peer still in use at shutdown; stopping without leaving"),
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::Command;

    /// Every key of a config serialised to TOML, nested tables as `table-key`, in flag spelling.
    pub(crate) fn config_keys(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = value {
            for (k, v) in t {
                let name = format!("{prefix}{}", k.replace('_', "-"));
                match v {
                    toml::Value::Table(_) => config_keys(v, &format!("{name}-"), out),
                    _ => out.push(name),
                }
            }
        }
    }

    pub(crate) fn missing_flags(cmd: &Command, value: &toml::Value) -> Vec<String> {
        let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
        let mut keys = Vec::new();
        config_keys(value, "", &mut keys);
        keys.retain(|k| !longs.contains(&k.as_str()));
        keys
    }

    #[test]
    fn every_config_field_has_a_flag() {
        let cfg = PeerConfig {
            scheduler: Some("127.0.0.1:1".parse().unwrap()),
            scheduler_dns: Some("s:1".into()),
            dht_bootstrap_dns: Some("p:1".into()),
            cache_bytes: Some(1),
            zone: Some("z".into()),
            rack: Some("r".into()),
            piece_size: Some(1 << 20),
            ..PeerConfig::default()
        };
        let mut cfg = cfg;
        cfg.proxy.default_upstream = Some("registry.example".into());
        let value = toml::Value::try_from(&cfg).unwrap();
        let cmd = PeerArgs::augment_args(Command::new("peer"));
        assert_eq!(missing_flags(&cmd, &value), Vec::<String>::new());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("peer.toml");
        std::fs::write(
            &file,
            "host_id = \"from-file\"\nupload_slots = 3\nzone = \"a\"\n",
        )
        .unwrap();
        let args = PeerArgs::augment_args(Command::new("peer")).get_matches_from([
            "peer",
            "--config",
            file.to_str().unwrap(),
            "--upload-slots",
            "9",
            "--seed",
            "--advertise",
            "10.0.0.1:4470,10.0.0.2:4470",
        ]);
        let args = <PeerArgs as clap::FromArgMatches>::from_arg_matches(&args).unwrap();
        let cfg = effective_config(&args).unwrap();
        assert_eq!(cfg.host_id, "from-file");
        assert_eq!(cfg.upload_slots, 9);
        assert_eq!(cfg.zone.as_deref(), Some("a"));
        assert!(cfg.seed);
        assert_eq!(cfg.advertise.len(), 2);
        assert_eq!(cfg.listen.port(), 4470, "design default");
        assert_eq!(cfg.metrics_listen.port(), 4490, "design default");
        std::fs::write(&file, "host_id = \"x\"\nbogus = 1\n").unwrap();
        let err = effective_config(&args).unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    }
}
