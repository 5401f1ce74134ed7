//! Lazy filesystem benchmark (issue 7). Run as root:
//!
//! ```sh
//! cargo bench -p shoal-fs --bench lazy
//! ```
//!
//! 1. Cold start: an image of this machine's files (at least `LAZY_MB` MB, default 560: the
//!    Python stdlib, `/usr/bin`, the multiarch `/usr/lib` in sorted order) is pushed to a real
//!    docker-registry, plain (gzip layer) and converted by Shoal. A client host in a network
//!    namespace reaches it through a link capped at `LAZY_MBIT` Mbit/s (tbf, default 100) and a
//!    pass-through relay in an origin host. In the same run: `skopeo copy` + `umoci unpack` of
//!    the plain image, beside a lazy mount of the Shoal image from `docker://` that reads the
//!    startup list (`python-startup.list`: what `python3 -c 'import json, email, http.client,
//!    sqlite3'` opened, taken with `strace -e openat`), without and with the list as the image's
//!    prefetch list. Printed: times, lazy/full ratio, bytes fetched / bytes read.
//! 2. Warm reads: a 1 GiB file through a mount whose cache holds it, beside the native file:
//!    sequential MiB/s and random 4 KiB IOPS (and CPU per read), page cache dropped and hot;
//!    then the FUSE floor: random 4 KiB reads the daemon answers from memory.
//! 3. SQLite (sqlite.rs): indexed queries on a database of at least 200 MB in an image, page
//!    cache dropped, time on the mount / time on a native copy.
//!
//! Flags: `--no-cold`, `--no-warm`, `--no-sqlite`; `LAZY_SQLITE_MB`, `LAZY_SQLITE_QUERIES`,
//! `LAZY_SQLITE_PASSES` size the SQLite run; `LAZY_AHEAD` / `LAZY_BLOB_AHEAD` override the mount's
//! fetch-ahead windows (bytes), `LAZY_SWEEP=FILE:BLOB,...` compares several in one cold run,
//! `LAZY_REPEAT` repeats each lazy run. Files go under `SHOAL_BENCH_DIR` (or the temp dir).
//! Not root or a tool missing: prints `SKIP:` and exits 0.

mod cold;
mod image;
mod relay;
mod sqlite;
mod warm;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_chaos::{ChaosError, TestNet};
use shoal_format::build::Source;
use shoal_fs::{mount, FsConfig};

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

/// `cfg` with `LAZY_AHEAD` / `LAZY_BLOB_AHEAD` (bytes) as its fetch-ahead windows, when set.
pub fn ahead_from_env(cfg: FsConfig) -> Res<FsConfig> {
    Ok(FsConfig {
        fetch_ahead_bytes: env_u64("LAZY_AHEAD", cfg.fetch_ahead_bytes)?,
        blob_ahead_bytes: env_u64("LAZY_BLOB_AHEAD", cfg.blob_ahead_bytes)?,
        ..cfg
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Why the bench cannot run here, if it cannot.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, tc, FUSE, drop_caches)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("needs /dev/fuse".into());
    }
    let tools = [
        "docker-registry",
        "skopeo",
        "umoci",
        "tar",
        "fusermount3",
        "chroot",
    ];
    if let Err(e) = shoal_testkit::need_binaries(&tools) {
        return Some(e);
    }
    match shoal_chaos::require_root_tools() {
        Err(ChaosError::Missing(r)) => Some(r),
        _ => None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(reason) = missing() {
        println!("SKIP: lazy filesystem benchmark {reason}");
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("lazy benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Res<()> {
    for a in args {
        if !matches!(
            a.as_str(),
            "--bench" | "--no-cold" | "--no-warm" | "--no-sqlite"
        ) {
            return Err(format!("unknown argument {a}").into());
        }
    }
    let base = std::env::var_os("SHOAL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("shoal-lazy-bench-")
        .tempdir_in(base)?;
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {threads} cores, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if !args.iter().any(|a| a == "--no-cold") {
        cold_start(work.path())?;
    }
    if !args.iter().any(|a| a == "--no-warm") {
        warm_reads(work.path())?;
    }
    if !args.iter().any(|a| a == "--no-sqlite") {
        sqlite::run(work.path())?;
    }
    Ok(())
}

fn cold_start(work: &Path) -> Res<()> {
    let mbit = env_u64("LAZY_MBIT", 100)?;
    let min_mb = env_u64("LAZY_MB", 560)?;
    let list = image::startup_list();

    let t = Instant::now();
    let layer = image::build_layer(work, min_mb * 1_000_000)?;
    println!(
        "image: {} entries, {:.1} MB of files (tar {:.1} s)",
        layer.entries,
        layer.file_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let lazy_layout = work.join("shoal");
    let stored = image::convert_shoal(Source::Tar(layer.tar.clone()), &lazy_layout, &[])?;
    let pf_layout = work.join("shoal-prefetch");
    image::convert_shoal(Source::Tar(layer.tar.clone()), &pf_layout, &list)?;
    println!(
        "shoal images: {:.1} MB stored (two conversions {:.1} s)",
        stored as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Runtime::new()?;
    let reg = rt.block_on(shoal_testkit::Registry::start(Default::default()))?;
    let t = Instant::now();
    let gz = rt.block_on(image::push_plain(&reg, &layer, "bench/plain", "v1"))?;
    rt.block_on(image::push_layout(&reg, &lazy_layout, "bench/lazy", "v1"))?;
    rt.block_on(image::push_layout(
        &reg,
        &pf_layout,
        "bench/lazy-prefetch",
        "v1",
    ))?;
    println!(
        "plain image: gzip layer {:.1} MB; pushed all in {:.1} s",
        gz as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(&layer.tar);

    let net = TestNet::create("lazy", 2)?;
    net.set_bandwidth(1, Some(mbit * 1_000_000))?;
    let origin = net.host(0);
    let client = net.host(1);
    let relay = {
        let _enter = rt.enter();
        relay::Relay::start(origin.tcp_listener(5000)?, &reg.url())?
    };
    let host = format!("{}:5000", origin.addr());
    println!(
        "link: client host capped at {mbit} Mbit/s (tbf, both directions); {} at {host}",
        relay.kind()
    );

    let before = relay.bytes();
    let (copy, unpack) = cold::full_pull(client, &format!("{host}/bench/plain:v1"), work)?;
    let full = copy + unpack;
    println!(
        "full pull: skopeo copy {:.2} s + umoci unpack {:.2} s = {:.2} s ({:.1} MB over the link)",
        copy.as_secs_f64(),
        unpack.as_secs_f64(),
        full.as_secs_f64(),
        (relay.bytes() - before) as f64 / 1e6
    );

    // LAZY_SWEEP="FILE:BLOB,...": fetch-ahead windows (bytes) to compare; LAZY_REPEAT: runs each.
    let defaults = ahead_from_env(FsConfig::default())?;
    let sweep = match std::env::var("LAZY_SWEEP") {
        Ok(v) => v
            .split(',')
            .map(|p| {
                let (f, b) = p.split_once(':').ok_or("LAZY_SWEEP wants FILE:BLOB,...")?;
                Ok((f.trim().parse()?, b.trim().parse()?))
            })
            .collect::<Res<Vec<(u64, u64)>>>()?,
        Err(_) => vec![(defaults.fetch_ahead_bytes, defaults.blob_ahead_bytes)],
    };
    let repeat = env_u64("LAZY_REPEAT", 1)?;
    for (label, repo, prefetch) in [
        ("lazy", "bench/lazy", false),
        ("lazy + prefetch list", "bench/lazy-prefetch", true),
    ] {
        for &ahead in &sweep {
            for _ in 0..repeat {
                let r = cold::lazy_run(
                    client,
                    &relay,
                    format!("docker://{host}/{repo}:v1"),
                    host.clone(),
                    work,
                    cold::Variant { prefetch, ahead },
                    &list,
                )?;
                let fetched = r.metrics.fetched_origin + r.metrics.fetched_peer;
                println!(
                    "{label} (fetch-ahead {} KiB, blob-ahead {} KiB): mount {:.3} s, workload done {:.3} s = {:.2} % of full pull; \
                     {} files ({} missing), read {:.2} MiB (fs counted {:.2} MiB), \
                     chunks fetched {:.2} MiB (fetched/read {:.2}); over the link {:.2} MiB (link/read {:.2}); \
                     {} fetches, {:.1} ms mean",
                    ahead.0 >> 10,
                    ahead.1 >> 10,
                    r.mount.as_secs_f64(),
                    r.total.as_secs_f64(),
                    100.0 * r.total.as_secs_f64() / full.as_secs_f64(),
                    list.len(),
                    r.missing,
                    mib(r.workload_bytes),
                    mib(r.metrics.read_bytes),
                    mib(fetched),
                    fetched as f64 / r.metrics.read_bytes.max(1) as f64,
                    mib(r.relay_bytes),
                    r.relay_bytes as f64 / r.metrics.read_bytes.max(1) as f64,
                    r.fetches.0,
                    r.fetches.1 * 1e3,
                );
            }
        }
    }
    drop(relay);
    drop(net);
    Ok(())
}

fn warm_reads(work: &Path) -> Res<()> {
    let size: u64 = env_u64("LAZY_WARM_MIB", 1024)? << 20;
    let tree = cold::fresh(work, "warm-tree")?;
    let native = tree.join("big.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&native)?);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            rng.fill(&mut buf);
            f.write_all(&buf)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    let layout = work.join("warm-layout");
    let t = Instant::now();
    image::convert_shoal(Source::Dir(tree.clone()), &layout, &[])?;
    println!(
        "warm: {} MiB random file converted in {:.1} s",
        size >> 20,
        t.elapsed().as_secs_f64()
    );
    let mnt = cold::fresh(work, "warm-mnt")?;
    let cfg = ahead_from_env(FsConfig {
        cache_dir: work.join("warm-cache"),
        prefetch: false,
        ..FsConfig::new(format!("oci:{}", layout.display()), &mnt)
    })?;
    let m = mount(cfg.clone())?;
    let through = mnt.join("big.bin");
    let t = Instant::now();
    let (_, n) = warm::seq_read(&through)?;
    println!(
        "warm: first read through the mount (fills the cache from the layout) {:.1} s, {} MiB",
        t.elapsed().as_secs_f64(),
        n >> 20
    );

    let passes = env_u64("LAZY_WARM_PASSES", 3)?;
    let mut rows = Vec::new();
    for (label, drop) in [("page cache dropped", true), ("page cache hot", false)] {
        // Best of `LAZY_WARM_PASSES` (3), native and mount alternating: others share the cores.
        let (mut seq, mut iops) = (vec![0f64; 2], vec![(0f64, 0usize, 0f64); 2]);
        let (ops, limit) = if drop {
            (20_000, Duration::from_secs(8))
        } else {
            (200_000, Duration::from_secs(10))
        };
        for _ in 0..passes {
            for (i, p) in [&native, &through].into_iter().enumerate() {
                if drop {
                    warm::drop_caches()?;
                } else {
                    warm::seq_read(p)?;
                }
                seq[i] = seq[i].max(warm::seq_read(p)?.0);
                if drop {
                    warm::drop_caches()?;
                }
                let r = warm::random_reads(p, ops, limit, 11)?;
                if r.0 > iops[i].0 {
                    iops[i] = r;
                }
            }
        }
        rows.push((label, seq, iops));
    }
    for (label, seq, iops) in rows {
        println!(
            "warm seq read, {label}: native {:.1} MiB/s, mount {:.1} MiB/s, ratio {:.2}",
            seq[0],
            seq[1],
            seq[1] / seq[0]
        );
        println!(
            "warm random 4 KiB, {label}: native {:.0} IOPS ({} reads, {:.1} µs CPU each), mount {:.0} IOPS ({} reads, {:.1} µs CPU each), ratio {:.2}",
            iops[0].0,
            iops[0].1,
            iops[0].2,
            iops[1].0,
            iops[1].1,
            iops[1].2,
            iops[1].0 / iops[0].0
        );
    }
    let s = m.metrics().snapshot();
    println!(
        "warm mount counters: cache hits {}, misses {}, verify failures {}",
        s.cache_hits, s.cache_misses, s.verify_failures
    );
    m.unmount()?;
    fuse_floor(&cfg, &through, passes, size)?;
    Ok(())
}

/// What a FUSE request costs: random 4 KiB reads, page cache dropped, through a mount of the
/// same image whose memory cache holds every chunk, so the daemon answers each from memory
/// (no disk, no hash). The least any daemon behind this kernel's FUSE transport can do.
fn fuse_floor(cfg: &FsConfig, through: &Path, passes: u64, size: u64) -> Res<()> {
    let m = mount(FsConfig {
        memory_cache_bytes: size + (64 << 20),
        fetch_ahead_bytes: 0,
        ..cfg.clone()
    })?;
    warm::seq_read(through)?;
    let mut best = (0f64, 0usize, 0f64);
    for _ in 0..passes {
        warm::drop_caches()?;
        let r = warm::random_reads(through, 20_000, Duration::from_secs(8), 11)?;
        if r.0 > best.0 {
            best = r;
        }
    }
    println!(
        "warm random 4 KiB, page cache dropped, every chunk in the daemon's memory (FUSE floor): {:.0} IOPS ({} reads, {:.1} µs CPU each)",
        best.0, best.1, best.2
    );
    m.unmount()?;
    Ok(())
}
