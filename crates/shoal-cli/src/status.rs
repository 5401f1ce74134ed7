//! `shoal status`: the local peer's state from its local API (`GET /status`): who it is, its
//! scheduler connection, cache usage and its downloads.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use shoal_api::{Client as ApiClient, NodeStatus};

/// `shoal status`: print the local peer's state.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The local peer's API socket.
    #[arg(long, env = "SHOAL_API_SOCKET", default_value = crate::get::DEFAULT_API_SOCKET)]
    api: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The report `shoal status` prints.
pub fn render(s: &NodeStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let role = if s.seed { "seed" } else { "peer" };
    let _ = writeln!(out, "host:       {} ({role})", s.host_id);
    let scheds: Vec<String> = s.schedulers.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(
        out,
        "scheduler:  {} of {} connected{}",
        s.schedulers_connected,
        s.schedulers.len(),
        if scheds.is_empty() {
            " (none configured: origin and DHT only)".to_string()
        } else {
            format!(" [{}]", scheds.join(", "))
        }
    );
    let c = &s.cache;
    let used_pct = if c.high_watermark == 0 {
        0.0
    } else {
        c.used_bytes as f64 * 100.0 / c.high_watermark as f64
    };
    let _ = writeln!(
        out,
        "cache:      {} of {} ({used_pct:.1}%), {} blobs ({} complete), {} pieces, {} corrupt dropped",
        mib(c.used_bytes),
        mib(c.high_watermark),
        c.blobs,
        c.complete_blobs,
        c.pieces,
        c.corruptions
    );
    let _ = writeln!(
        out,
        "received:   {} from peers, {} from origin",
        mib(c.bytes_from_peers),
        mib(c.bytes_from_origin)
    );
    let _ = writeln!(out, "tasks:      {}", s.tasks.len());
    for t in &s.tasks {
        let state = if t.complete {
            "complete"
        } else if t.running {
            "running"
        } else if t.error.is_some() {
            "failed"
        } else {
            "idle"
        };
        let pieces = t.pieces.map_or_else(|| "?".to_string(), |p| p.to_string());
        let _ = writeln!(
            out,
            "  {}  {state:8}  {}/{pieces} pieces  {} peers / {} origin{}",
            t.blob,
            t.held,
            mib(t.bytes_from_peers),
            mib(t.bytes_from_origin),
            t.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
    out
}

/// Runs `shoal status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    crate::get::check_peer_running(&args.api)?;
    let client = ApiClient::new(&args.api);
    let status = crate::registry::block_on(client.status())?
        .with_context(|| format!("asking the peer at {} for its status", args.api.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}
