//! `shoal image`: convert, inspect, verify, unpack.

use clap::Subcommand;

/// The `shoal image` subcommands.
#[derive(Subcommand)]
pub enum ImageCommand {}

/// Runs one `shoal image` subcommand.
pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {}
}
