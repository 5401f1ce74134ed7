//! The `shoal` binary: parses arguments and dispatches into the Shoal crates.

mod ca;
mod containerd;
mod containerd_snapshotter;
mod fs;
mod get;
mod image;
mod image_pull;
mod index;
mod peer;
mod preheat;
mod registry;
mod scheduler;
mod snapshotter;
mod status;

use clap::{Parser, Subcommand};

/// Shoal gets container images onto many machines fast: nodes share image blobs with each other
/// instead of all pulling them from the registry, and containers start before their image is
/// downloaded.
///
/// On every node, `shoal peer` joins a swarm (coordinated by `shoal scheduler`, fed by
/// `shoal peer --seed`) and serves containerd's registry pulls from it through a local proxy;
/// `shoal snapshotter` lets containerd start containers on lazily mounted images, fetching only
/// the bytes a container reads. Every byte is checked against the image's digests.
/// Start with `shoal containerd-config` on a node; docs/operations.md has the rest.
#[derive(Parser)]
#[command(name = "shoal", version)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `shoal=debug`.
    #[arg(long, global = true, env = "SHOAL_LOG", default_value = "warn")]
    log: String,
    /// Log line format: `human` or `json` (one object per line).
    #[arg(long, global = true, env = "SHOAL_LOG_FORMAT", default_value = "human")]
    log_format: shoal_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant (the daemons' flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Convert, index, inspect, verify and unpack Shoal images.
    Image(image::ImageArgs),
    /// Create the cluster CA and issue node certificates.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Mount images lazily through FUSE, verifying every chunk.
    #[command(subcommand)]
    Fs(fs::FsCommand),
    /// Run the scheduler (QUIC service, metrics and health).
    Scheduler(scheduler::SchedulerArgs),
    /// Run the peer daemon (`--seed` on super-nodes).
    Peer(peer::PeerArgs),
    /// Fetch a blob through the local peer into a file.
    Get(get::GetArgs),
    /// Have seeds fetch every blob of an image ahead of time.
    Preheat(preheat::PreheatArgs),
    /// Print the local peer's state: scheduler connection, cache, tasks.
    Status(status::StatusArgs),
    /// Point containerd at the local peer's registry proxy (hosts.toml per registry), and at the
    /// `shoal` snapshotter with `--snapshotter`.
    ContainerdConfig(containerd::ContainerdConfigArgs),
    /// Run containerd's remote snapshotter: containers start on lazily mounted Shoal images.
    Snapshotter(snapshotter::SnapshotterArgs),
}

fn main() -> anyhow::Result<()> {
    pin_mmap_threshold();
    let cli = Cli::parse();
    // One crypto provider (ring) for every TLS user in the process, installed before any.
    shoal_tls::install_crypto_provider();
    shoal_telemetry::init_tracing(&cli.log, cli.log_format)?;
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
        Command::Ca(cmd) => ca::run(cmd),
        Command::Fs(cmd) => fs::run(cmd),
        Command::Scheduler(args) => scheduler::run(args),
        Command::Peer(args) => peer::run(args),
        Command::Get(args) => get::run(args),
        Command::Preheat(args) => preheat::run(args),
        Command::Status(args) => status::run(args),
        Command::ContainerdConfig(args) => containerd::run(args),
        Command::Snapshotter(args) => snapshotter::run(args),
    }
}

/// Pins glibc's mmap threshold. Left dynamic, glibc raises it past the size of the first large
/// buffer freed (a 4 MiB piece), after which every piece buffer comes from the malloc arenas
/// and stays resident after it is freed: the peer then held 100 to 160 MB more than the pieces
/// in flight (docs/benchmarks.md, "Peer memory"). Pinning it also stops the raising.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn pin_mmap_threshold() {
    /// Buffers from this size up are mmap'd, and so go back to the OS when freed.
    const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only changes allocator tuning; it is called first thing in main, before
    // any other thread exists, and a refused value (return 0) just leaves glibc's default.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    if ok == 0 {
        eprintln!("warning: could not pin the allocator's mmap threshold; memory may stay high");
    }
}

/// Other allocators (musl, other systems) do not keep freed large buffers this way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn pin_mmap_threshold() {}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn help_opens_with_what_shoal_does_for_its_user() {
        super::Cli::command().debug_assert();
        let help = super::Cli::command().render_help().to_string();
        assert!(
            help.starts_with("Shoal gets container images onto many machines fast"),
            "{help}"
        );
        assert!(help.contains("snapshotter"), "{help}");
    }
}
