//! Warm reads: a 1 GiB file read through a mount whose cache already holds every chunk, beside
//! the same file read natively; sequential (1 MiB reads) and random 4 KiB preads. "Cold page
//! cache" runs drop the kernel caches first (`/proc/sys/vm/drop_caches`), so both sides read
//! from disk (the mount from its chunk store, re-verifying every chunk); "hot" runs repeat with
//! the page cache kept (the mount uses keep_cache, so the kernel answers without the daemon).

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::Res;

/// Drops clean page cache, dentries and inodes.
pub fn drop_caches() -> Res<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3")?;
    Ok(())
}

/// Reads `path` to the end in 1 MiB reads; returns MiB/s.
pub fn seq_read(path: &Path) -> Res<(f64, u64)> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((total as f64 / (1 << 20) as f64 / secs, total))
}

/// CPU time this process (every thread: the reader, and the mount's daemon threads, which run
/// in this process) has used, in seconds.
pub fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Random 4 KiB-aligned preads of 4 KiB over the file (same seeded offsets for every caller),
/// at most `ops` or until `limit` passed; returns IOPS, reads done and CPU microseconds per
/// read (the whole process: for the mount, reader and daemon together; load on the machine
/// moves wall time much more than CPU time).
pub fn random_reads(path: &Path, ops: usize, limit: Duration, seed: u64) -> Res<(f64, usize, f64)> {
    let f = fs::File::open(path)?;
    let blocks = f.metadata()?.len() / 4096;
    if blocks == 0 {
        return Err("file too small for 4 KiB reads".into());
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    let cpu = cpu_secs();
    let mut done = 0;
    while done < ops && t.elapsed() < limit {
        let off = rng.u64(..blocks) * 4096;
        f.read_exact_at(&mut buf, off)?;
        done += 1;
    }
    let cpu_us = (cpu_secs() - cpu) * 1e6 / done.max(1) as f64;
    Ok((done as f64 / t.elapsed().as_secs_f64(), done, cpu_us))
}
