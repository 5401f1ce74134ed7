//! Cold start behind a capped link: the client host's link is limited by tbf; the registry is
//! reached through a pass-through relay listening in the origin host (relay.rs; its byte counter
//! is a second witness of what crossed the link).
//!
//! ```text
//!   client host (h1, tbf 100 Mbit/s) ──bridge── origin host (h0): relay :5000 ──► registry (loopback)
//!     skopeo copy + umoci unpack         or       shoal_fs::mount docker://10.77.0.1:5000/...
//! ```

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_chaos::Host;
use shoal_fs::{mount, FsConfig, MetricsSnapshot};

use crate::{check, Res};

/// What a lazy cold start measured.
pub struct LazyRun {
    /// Mount (manifest + bootstrap) until the mount answered.
    pub mount: Duration,
    /// Mount until the last file of the workload was read.
    pub total: Duration,
    /// Bytes the workload read (sum of the files' sizes).
    pub workload_bytes: u64,
    /// The mount's counters after the workload.
    pub metrics: MetricsSnapshot,
    /// Fetches (one per batch of missing chunks) and their mean time in seconds.
    pub fetches: (u64, f64),
    /// Body bytes the relay sent during this run (manifest, bootstrap and data).
    pub relay_bytes: u64,
    /// Files of the list missing in the image (should be none).
    pub missing: usize,
}

/// Pulls and unpacks the plain image from inside `client`; returns (copy, unpack) times.
pub fn full_pull(client: &Host, reference: &str, work: &Path) -> Res<(Duration, Duration)> {
    let layout = work.join("pulled");
    let bundle = work.join("bundle");
    let t = Instant::now();
    check(
        client
            .command("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:v1", layout.display())),
    )?;
    let copy = t.elapsed();
    let t = Instant::now();
    check(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&bundle),
    )?;
    let unpack = t.elapsed();
    let _ = fs::remove_dir_all(&layout);
    let _ = fs::remove_dir_all(&bundle);
    Ok((copy, unpack))
}

/// Reads every listed file under `root` to the end; returns (bytes, missing files).
pub fn read_list(root: &Path, list: &[String]) -> (u64, usize) {
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut missing) = (0, 0);
    for rel in list {
        match fs::File::open(root.join(rel)) {
            Ok(mut f) => loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => bytes += n as u64,
                    Err(e) => {
                        eprintln!("reading {rel}: {e}");
                        missing += 1;
                        break;
                    }
                }
            },
            Err(_) => missing += 1,
        }
    }
    (bytes, missing)
}

/// How one lazy run mounts.
#[derive(Clone, Copy)]
pub struct Variant {
    /// Fetch the image's prefetch list at mount.
    pub prefetch: bool,
    /// `fetch_ahead_bytes`, `blob_ahead_bytes`.
    pub ahead: (u64, u64),
}

/// Mounts `source` from inside `client` (every thread of the mount lives in its namespace),
/// reads the list, and unmounts.
pub fn lazy_run(
    client: &Host,
    relay: &crate::relay::Relay,
    source: String,
    plain_host: String,
    work: &Path,
    how: Variant,
    list: &[String],
) -> Res<LazyRun> {
    let Variant { prefetch, ahead } = how;
    let mnt = work.join("mnt");
    let cache = work.join("cache");
    let _ = fs::remove_dir_all(&cache);
    fs::create_dir_all(&mnt)?;
    let list = list.to_vec();
    let before = relay.bytes();
    let run = client.netns().run("lazy cold start", move || {
        let cfg = FsConfig {
            cache_dir: cache,
            plain_http: vec![plain_host],
            prefetch,
            fetch_timeout_secs: 120,
            fetch_ahead_bytes: ahead.0,
            blob_ahead_bytes: ahead.1,
            ..FsConfig::new(source, &mnt)
        };
        let t = Instant::now();
        let m = mount(cfg).map_err(std::io::Error::other)?;
        let mounted = t.elapsed();
        let (bytes, missing) = read_list(&mnt, &list);
        let total = t.elapsed();
        let metrics = m.metrics().snapshot();
        let fetches = fetch_stats(&m.metrics().encode());
        m.unmount().map_err(std::io::Error::other)?;
        Ok((mounted, total, bytes, missing, metrics, fetches))
    })?;
    let (mount, total, workload_bytes, missing, metrics, fetches) = run;
    Ok(LazyRun {
        mount,
        total,
        workload_bytes,
        metrics,
        fetches,
        relay_bytes: relay.bytes() - before,
        missing,
    })
}

/// A fresh directory under `base`.
pub fn fresh(base: &Path, name: &str) -> Res<PathBuf> {
    let p = base.join(name);
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p)?;
    Ok(p)
}

/// Count and mean of the mount's `chunk_fetch_seconds` histogram (Prometheus text).
fn fetch_stats(text: &str) -> (u64, f64) {
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let count = value("shoal_fs_chunk_fetch_seconds_count");
    let sum = value("shoal_fs_chunk_fetch_seconds_sum");
    (count as u64, if count > 0.0 { sum / count } else { 0.0 })
}
