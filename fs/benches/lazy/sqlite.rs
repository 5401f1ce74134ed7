//! The SQLite workload (issue 27): a database of at least `LAZY_SQLITE_MB` MB (default 220)
//! shipped in an image, read through a mount whose cache holds it, beside the same file read
//! natively. Each pass drops the page cache and runs a fixed set of indexed queries (point
//! lookups through two indexes and the rowid, short index ranges; `sqlite.py`), first on one
//! side then the other, alternating which goes first; the figure is time on the mount / time
//! on the native copy, and both sides must return the same rows.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use shoal_format::build::Source;
use shoal_fs::{mount, FsConfig};

use crate::{cold, env_u64, image, warm, Res};

const SCRIPT: &str = include_str!("sqlite.py");

/// Runs the script with the system Python; returns its stdout.
fn python(script: &Path, args: &[&str]) -> Res<String> {
    let out = Command::new("/usr/bin/python3")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("python3 {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("python3 {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One query run: (seconds, CPU seconds of the querying process and of this one, which runs
/// the mount's daemon threads; checksum of the rows).
fn queries(script: &Path, db: &Path, n: u64, seed: u64) -> Res<(f64, f64, String)> {
    let daemon = warm::cpu_secs();
    let out = python(
        script,
        &[
            "query",
            &db.to_string_lossy(),
            &n.to_string(),
            &seed.to_string(),
        ],
    )?;
    let daemon = warm::cpu_secs() - daemon;
    let mut it = out.split_whitespace();
    let secs: f64 = it.next().ok_or("no time from the query run")?.parse()?;
    let cpu: f64 = it.next().ok_or("no CPU time from the query run")?.parse()?;
    let sum = it.collect::<Vec<_>>().join(" ");
    Ok((secs, cpu + daemon, sum))
}

/// Builds the database, converts it into an image, mounts it, warms the mount's cache and
/// prints the mount / native ratio of the query runs.
pub fn run(work: &Path) -> Res<()> {
    let mb = env_u64("LAZY_SQLITE_MB", 220)?;
    let n = env_u64("LAZY_SQLITE_QUERIES", 4000)?;
    let passes = env_u64("LAZY_SQLITE_PASSES", 5)?;
    let script = work.join("sqlite.py");
    std::fs::write(&script, SCRIPT)?;
    let tree = cold::fresh(work, "sqlite-tree")?;
    let native = tree.join("app.db");
    let t = Instant::now();
    let rows = python(
        &script,
        &["build", &native.to_string_lossy(), &mb.to_string()],
    )?;
    let size = std::fs::metadata(&native)?.len();
    println!(
        "sqlite: {:.1} MB database, {} rows, built in {:.1} s",
        size as f64 / 1e6,
        rows.trim(),
        t.elapsed().as_secs_f64()
    );
    let layout = work.join("sqlite-layout");
    image::convert_shoal(Source::Dir(tree.clone()), &layout, &[])?;
    let mnt = cold::fresh(work, "sqlite-mnt")?;
    let cfg = crate::ahead_from_env(FsConfig {
        cache_dir: work.join("sqlite-cache"),
        prefetch: false,
        ..FsConfig::new(format!("oci:{}", layout.display()), &mnt)
    })?;
    let m = mount(cfg)?;
    let through = mnt.join("app.db");
    let t = Instant::now();
    warm::seq_read(&through)?;
    println!(
        "sqlite: first read through the mount (fills the cache) {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut ratios = Vec::new();
    for pass in 0..passes {
        let (mut secs, mut cpu) = ([0f64; 2], [0f64; 2]);
        let mut sums = [String::new(), String::new()];
        // Alternate which side goes first: the shared disk and cores drift.
        let order: [usize; 2] = if pass % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let db = if i == 0 { &native } else { &through };
            warm::drop_caches()?;
            (secs[i], cpu[i], sums[i]) = queries(&script, db, n, 100 + pass)?;
        }
        if sums[0] != sums[1] {
            return Err(format!(
                "sqlite: the mount answered differently: {} vs {}",
                sums[1], sums[0]
            )
            .into());
        }
        let ratio = secs[1] / secs[0];
        println!(
            "sqlite pass {pass}: {n} queries, page cache dropped: native {:.3} s ({:.0} µs CPU per query), mount {:.3} s ({:.0} µs CPU per query, with the daemon's), ratio {ratio:.2}",
            secs[0],
            cpu[0] * 1e6 / n as f64,
            secs[1],
            cpu[1] * 1e6 / n as f64
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "sqlite: mount / native, median of {} passes {median:.2} (min {:.2}, max {:.2}); target <= 1.5",
        ratios.len(),
        ratios[0],
        ratios[ratios.len() - 1]
    );
    let s = m.metrics().snapshot();
    println!(
        "sqlite mount counters: cache hits {}, misses {}, verify failures {}",
        s.cache_hits, s.cache_misses, s.verify_failures
    );
    m.unmount()?;
    Ok(())
}
