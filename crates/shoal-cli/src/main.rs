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

/// What `shoal -h` says first.
const ABOUT: &str =
    "Shoal: container images pulled from your own nodes instead of all from the registry, \
and started before they are downloaded.";

/// What `shoal --help` says first: what Shoal does for its user, then how a cluster runs it.
const LONG_ABOUT: &str = "\
Shoal: container images pulled from your own nodes instead of all from the registry, and started \
before they are downloaded.

Every node keeps the image layers it pulls and passes them on to the nodes that pull them next \
(peer to peer, over mutually authenticated QUIC), so a registry serves each layer about once \
however many nodes pull it. Containers start on lazily mounted images (`shoal snapshotter`, \
containerd's snapshotter for Kubernetes pods): once the image's small index is fetched, file \
data arrives as it is read. Every byte is checked against the image's digests before anything \
uses it.

A cluster runs one `shoal scheduler`, a few `shoal peer --seed` nodes near the registry, and \
`shoal peer` and `shoal snapshotter` on every node, with containerd pointed at them \
(`shoal containerd-config --snapshotter`).";

#[derive(Parser)]
#[command(name = "shoal", version, about = ABOUT, long_about = LONG_ABOUT)]
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
