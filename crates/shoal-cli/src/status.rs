//! `shoal status`: the local peer's state from its local API (`GET /status`): who it is, its
//! scheduler connection, cache usage and its downloads; and, on a node running `shoal
//! snapshotter`, what each lazily mounted image read and fetched (from the mounts' own stats, so
//! it answers whether the snapshotter runs or not).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use shoal_api::{Client as ApiClient, NodeStatus};
use shoal_fs::snapshotter::{read_stats, ImageInfo};

/// `shoal status`: print the local peer's state.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The local peer's API socket.
    #[arg(long, env = "SHOAL_API_SOCKET", default_value = crate::get::DEFAULT_API_SOCKET)]
    api: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
    /// The snapshotter's root, whose lazily mounted images are listed when it exists.
    #[arg(long, default_value = shoal_fs::snapshotter::DEFAULT_ROOT)]
    snapshotter_root: PathBuf,
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

/// One lazily mounted image in `shoal status --json`.
#[derive(serde::Serialize)]
struct LazyImageStatus {
    reference: String,
    bootstrap: String,
    #[serde(flatten)]
    stats: shoal_fs::MetricsSnapshot,
}

/// The lazy-image part of the report: is lazy loading working here?
pub fn render_images(images: &[(ImageInfo, shoal_fs::MetricsSnapshot)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "lazy images: {}", images.len());
    for (info, s) in images {
        let layer = info
            .layer
            .as_deref()
            .map(|l| format!(" (layer {})", l.get(..19).unwrap_or(l)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {}{layer}  read {}, fetched {} from peers / {} from origin, {:.1}% of {} fetched",
            info.reference,
            mib(s.read_bytes),
            mib(s.fetched_peer),
            mib(s.fetched_origin),
            100.0 * s.image_fetched_ratio,
            mib(s.image_stored_bytes)
        );
    }
    out
}

/// Runs `shoal status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let images = args
        .snapshotter_root
        .is_dir()
        .then(|| read_stats(&args.snapshotter_root.join("images")));
    let peer = crate::get::check_peer_running(&args.api).and_then(|()| {
        let client = ApiClient::new(&args.api);
        crate::registry::block_on(client.status())?
            .with_context(|| format!("asking the peer at {} for its status", args.api.display()))
    });
    if args.json {
        let images: Option<Vec<LazyImageStatus>> = images.map(|v| {
            v.into_iter()
                .map(|(i, stats)| LazyImageStatus {
                    reference: i.reference,
                    bootstrap: i.bootstrap,
                    stats,
                })
                .collect()
        });
        // The peer's status as its API gives it (scripts read its fields at the top level),
        // with the node's lazy images beside them.
        let mut doc = match &peer {
            Ok(status) => serde_json::to_value(status)?,
            Err(_) => serde_json::json!({}),
        };
        if let Some(fields) = doc.as_object_mut() {
            fields.insert("lazy_images".into(), serde_json::to_value(images)?);
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        if let Ok(status) = &peer {
            print!("{}", render(status));
        }
        if let Some(images) = &images {
            print!("{}", render_images(images));
        }
    }
    peer.map(|_| ())
}
