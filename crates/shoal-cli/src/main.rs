//! The `shoal` binary: parses arguments and dispatches into the Shoal crates.

mod ca;
mod fs;
mod image;
mod registry;

use clap::{Parser, Subcommand};

/// Shoal: P2P container image distribution with lazily mounted, chunk-verified images.
#[derive(Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `shoal=debug`.
    #[arg(long, global = true, env = "SHOAL_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert, inspect, verify and unpack Shoal images.
    Image(image::ImageArgs),
    /// Create the cluster CA and issue node certificates.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Mount images lazily through FUSE, verifying every chunk.
    #[command(subcommand)]
    Fs(fs::FsCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One crypto provider (ring) for every TLS user in the process, installed before any.
    shoal_tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log)?)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
        Command::Ca(cmd) => ca::run(cmd),
        Command::Fs(cmd) => fs::run(cmd),
    }
}
