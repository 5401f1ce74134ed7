//! Cold start through containerd's CRI (issue 21, "Benchmark"). Run as root:
//!
//! ```sh
//! cargo bench -p shoal-cli --bench cri_cold
//! ```
//!
//! The image: this machine's files, at least `CRI_MB` MB (default 560), built by the lazy fs
//! bench's image builder (fs/benches/lazy/image.rs, shared with it) and pushed to a real
//! docker-registry. containerd runs in the client host of a chaos test net, whose link is capped
//! at `CRI_MBIT` Mbit/s (tbf, default 100); the registry is reached through a TCP relay in the
//! origin host (its byte counter is what crossed the link).
//!
//! ```text
//!  client host (h1, tbf) : containerd + CRI + runc ──link──► origin host (h0): relay :5000 ──► registry
//! ```
//!
//! Each round starts a fresh containerd (nothing cached), runs a host-network pod (sandbox image
//! pulled, not timed), then times PullImage -> CreateContainer -> StartContainer -> exit of the
//! startup workload (`busybox sha256sum` of the 70 files Python's startup opens,
//! fs/benches/lazy/python-startup.list; checked against the files' sha256), then a second
//! container of the same image: the start with the image already local. Printed per round and
//! as medians: cold time (pull, then start-to-exit), local start, bytes over the link, the
//! physical limit (workload bytes ÷ link rate + local start) and containerd's peak RSS.
//!
//! Variants (`CRI_VARIANTS`, comma-separated; default all three): `overlayfs`, containerd's
//! snapshotter pulling the plain OCI image (gzip layer), the baseline; `shoal`, the same files
//! converted, started on Shoal's snapshotter through a peer on the client host; `index` (or
//! `index@1M`, `index@512K`: the span), the plain image itself with a Shoal index made with
//! the converted image's prefetch list, started on Shoal's snapshotter the same way
//! (variant.rs). The push prints `shoal image convert`'s and
//! `shoal image index`'s throughput on the same tar.
//! A lazy round also prints what its mounts read and fetched and each Shoal process's peak RSS.
//!
//! Environment: `CRI_ROUNDS` (3), `CRI_TMPFS=1` (containerd's root on tmpfs; default the disk,
//! as on a node), `SHOAL_BENCH_DIR` (where the image and containerd's roots go; temp dir).
//! Not root or a tool missing: prints `SKIP:` and exits 0.

#[allow(dead_code)]
#[path = "../../../../fs/benches/lazy/image.rs"]
mod image;
#[allow(dead_code)]
#[path = "../../../../fs/benches/lazy/relay.rs"]
mod relay;
mod round;
mod variant;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use shoal_chaos::{ChaosError, TestNet};

use crate::round::Round;
use crate::variant::{Images, Variant};

/// Errors of the bench: reported and fatal.
pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Runs `cmd`, failing with its stderr when it does not succeed.
pub fn check(cmd: &mut Command) -> Res<()> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn env_u64(key: &str, default: u64) -> Res<u64> {
    match std::env::var(key) {
        Ok(v) => Ok(v
            .parse()
            .map_err(|_| format!("{key}={v} is not a number"))?),
        Err(_) => Ok(default),
    }
}

/// Why the bench cannot run here, if it cannot.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, tc, containerd, runc)".into());
    }
    let tools = [
        "docker-registry",
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "unshare",
        "nsenter",
        "tar",
    ];
    if let Err(e) = shoal_testkit::need_binaries(&tools) {
        return Some(e);
    }
    if !Path::new(shoal_testkit::BUSYBOX).exists() {
        return Some(format!("needs {} (busybox-static)", shoal_testkit::BUSYBOX));
    }
    match shoal_chaos::require_root_tools() {
        Err(ChaosError::Missing(r)) => Some(r),
        _ => None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(a) = args.iter().find(|a| a.as_str() != "--bench") {
        eprintln!("cri_cold: unknown argument {a}");
        std::process::exit(2);
    }
    if let Some(reason) = missing() {
        println!("SKIP: CRI cold-start benchmark {reason}");
        return;
    }
    if let Err(e) = run() {
        eprintln!("CRI cold-start benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let mbit = env_u64("CRI_MBIT", 100)?;
    let min_mb = env_u64("CRI_MB", 560)?;
    let rounds = env_u64("CRI_ROUNDS", 3)?;
    let tmpfs = std::env::var("CRI_TMPFS").is_ok_and(|v| v == "1");
    let variants = Variant::from_env()?;
    let base = std::env::var_os("SHOAL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("shoal-cri-bench-")
        .tempdir_in(&base)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {} cores, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let t = Instant::now();
    let layer = image::build_layer(work.path(), min_mb * 1_000_000)?;
    println!(
        "image: {} entries, {:.1} MB of files (tar {:.1} s)",
        layer.entries,
        layer.file_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let workload = round::Workload::startup()?;
    println!(
        "workload: sha256sum of {} files, {:.2} MiB",
        workload.files.len(),
        workload.bytes as f64 / (1 << 20) as f64
    );

    let rt = tokio::runtime::Runtime::new()?;
    let reg = rt.block_on(shoal_testkit::Registry::start(Default::default()))?;
    let net = TestNet::create("cri", 2)?;
    net.set_bandwidth(1, Some(mbit * 1_000_000))?;
    let relay = {
        let _enter = rt.enter();
        relay::Relay::start(net.host(0).tcp_listener(5000)?, &reg.url())?
    };
    let origin = format!("{}:5000", net.host(0).addr());
    let t = Instant::now();
    let images = rt.block_on(Images::push(&reg, &layer, work.path(), &origin, &variants))?;
    let _ = std::fs::remove_file(&layer.tar);
    println!(
        "pushed in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        images.describe()
    );
    println!(
        "link: client host capped at {mbit} Mbit/s (tbf, both directions); {} at {origin}; containerd root on {}",
        relay.kind(),
        if tmpfs { "tmpfs" } else { "disk" }
    );

    let mut results: Vec<(Variant, Vec<Round>)> = Vec::new();
    for v in &variants {
        let mut rs = Vec::new();
        for i in 0..rounds {
            let r = rt.block_on(round::run(*v, &images, &net, &relay, &workload, tmpfs))?;
            println!("{} round {}: {}", v.name(), i + 1, r.line(mbit, &workload));
            rs.push(r);
        }
        results.push((*v, rs));
    }
    for (v, rs) in &results {
        println!(
            "{} median of {rounds}: {}",
            v.name(),
            round::summary(rs, mbit, &workload)
        );
        if *v == Variant::Overlayfs {
            println!("targets: {}", round::targets(rs, mbit, &workload));
        }
    }
    let of = |want: Variant| results.iter().find(|(v, _)| *v == want).map(|(_, rs)| rs);
    if let (Some(base), Some(lazy)) = (of(Variant::Overlayfs), of(Variant::Shoal)) {
        println!("{}", round::compare(base, lazy, mbit, &workload));
    }
    for (v, rs) in results
        .iter()
        .filter(|(v, _)| matches!(v, Variant::Index { .. }))
    {
        println!(
            "{}",
            round::compare_index(&v.name(), rs, of(Variant::Overlayfs), of(Variant::Shoal))
        );
    }
    drop(relay);
    drop(net);
    Ok(())
}
