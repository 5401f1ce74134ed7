//! Store throughput beside plain file I/O on the same disk, and lookup latency on hits.
//!
//! `cargo bench -p shoal-store` prints the figures docs/benchmarks.md quotes. Files go under
//! `$SHOAL_BENCH_DIR` if set, else the system temp dir; both sides of each ratio use the same disk
//! and the same write sizes, and flush to disk at the same granularity (one fdatasync per piece).

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

#[path = "../tests/common/suite.rs"]
#[allow(dead_code)]
mod suite;
use shoal_store::{Blake3Hash, PieceLayout, Store, StoreConfig};
use shoal_types::Digest;
use suite::test_bytes;

const PIECE: usize = 4 << 20;
const PIECES: usize = 64;
const CHUNK: usize = 1 << 20;
const CHUNKS: usize = 64;
const REPS: usize = 3;

fn mib_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64()
}

fn best(mut f: impl FnMut(usize) -> Duration) -> Duration {
    (0..REPS).map(&mut f).min().unwrap_or_default()
}

fn store_at(root: &Path) -> Store {
    Store::open(StoreConfig::new(root, 64 << 30)).expect("open store")
}

fn main() {
    let base = std::env::var_os("SHOAL_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(&base).expect("bench dir");
    let total = PIECE * PIECES;
    let data = test_bytes(42, total);
    let digest = Digest::of(&data);
    let layout = PieceLayout::compute(&digest, &data, PIECE as u32).expect("layout");
    println!(
        "store bench: {PIECES} pieces of {} MiB, {CHUNKS} chunks of {} MiB, best of {REPS}",
        PIECE >> 20,
        CHUNK >> 20
    );

    // Pieces: plain pwrite + fdatasync per piece, vs put_piece (verify, pwrite, fdatasync, journal).
    // The two alternate within each repetition so both see the same page-cache and writeback state.
    let plain_path = dir.path().join("plain.data");
    let (mut plain_w, mut store_w) = (Duration::MAX, Duration::MAX);
    for _ in 0..REPS {
        let _ = std::fs::remove_file(&plain_path);
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&plain_path)
            .expect("plain file");
        let t = Instant::now();
        for (i, p) in data.chunks(PIECE).enumerate() {
            f.write_all_at(p, (i * PIECE) as u64).expect("write");
            f.sync_data().expect("sync");
        }
        plain_w = plain_w.min(t.elapsed());
        let root = dir.path().join("store-w");
        let _ = std::fs::remove_dir_all(&root);
        let s = store_at(&root);
        let t = Instant::now();
        s.ensure_blob(&digest, &layout).expect("ensure");
        for (i, p) in data.chunks(PIECE).enumerate() {
            s.put_piece(&digest, i as u32, p).expect("put");
        }
        store_w = store_w.min(t.elapsed());
    }
    // Reads (page cache warm on both sides): plain pread vs read_piece (which verifies BLAKE3).
    let plain_r = best(|_| {
        let f = File::open(&plain_path).expect("plain file");
        let mut buf = vec![0u8; PIECE];
        let t = Instant::now();
        for i in 0..PIECES {
            f.read_exact_at(&mut buf, (i * PIECE) as u64).expect("read");
            black_box(&buf);
        }
        t.elapsed()
    });
    let s = store_at(&dir.path().join("store-w"));
    let store_r = best(|_| {
        let t = Instant::now();
        for i in 0..PIECES {
            black_box(s.read_piece(&digest, i as u32).expect("read"));
        }
        t.elapsed()
    });
    let t = Instant::now();
    s.complete_blob(&digest).expect("complete");
    let complete = t.elapsed();
    drop(s);

    // Chunks: plain write + fdatasync of a new file, vs put_chunk (temp file, fsync, rename, dir fsync).
    let chunks: Vec<Vec<u8>> = (0..CHUNKS as u64)
        .map(|i| test_bytes(1000 + i, CHUNK))
        .collect();
    let hashes: Vec<Blake3Hash> = chunks.iter().map(|c| Blake3Hash::of(c)).collect();
    let plain_cw = best(|rep| {
        let d = dir.path().join(format!("plain-chunks{rep}"));
        std::fs::create_dir_all(&d).expect("dir");
        let t = Instant::now();
        for (i, c) in chunks.iter().enumerate() {
            let mut f = File::create(d.join(i.to_string())).expect("create");
            f.write_all(c).expect("write");
            f.sync_data().expect("sync");
        }
        t.elapsed()
    });
    let store_cw = best(|rep| {
        let s = store_at(&dir.path().join(format!("store-c{rep}")));
        let t = Instant::now();
        for (h, c) in hashes.iter().zip(&chunks) {
            s.put_chunk(h, c).expect("put chunk");
        }
        t.elapsed()
    });
    let plain_cr = best(|_| {
        let d = dir.path().join("plain-chunks0");
        let t = Instant::now();
        for i in 0..CHUNKS {
            black_box(std::fs::read(d.join(i.to_string())).expect("read"));
        }
        t.elapsed()
    });
    let s = store_at(&dir.path().join("store-c0"));
    let store_cr = best(|_| {
        let t = Instant::now();
        for h in &hashes {
            black_box(s.get_chunk(h).expect("get"));
        }
        t.elapsed()
    });

    let row = |what: &str, bytes: usize, plain: Duration, store: Duration| {
        let (p, st) = (mib_s(bytes, plain), mib_s(bytes, store));
        println!(
            "{what:<28} plain {p:>9.1} MiB/s   store {st:>9.1} MiB/s   store/plain {:.2}",
            st / p
        );
    };
    row("piece write (4 MiB, fsync)", total, plain_w, store_w);
    row("piece read (4 MiB, warm)", total, plain_r, store_r);
    row(
        "chunk write (1 MiB, fsync)",
        CHUNK * CHUNKS,
        plain_cw,
        store_cw,
    );
    row(
        "chunk read (1 MiB, warm)",
        CHUNK * CHUNKS,
        plain_cr,
        store_cr,
    );
    println!(
        "complete_blob (sha256 of {} MiB): {:.1} MiB/s",
        total >> 20,
        mib_s(total, complete)
    );

    // Lookup latency on hits: the index alone, a 4 KiB chunk read, a 4 KiB piece read.
    let small = test_bytes(7, 4096);
    let small_hash = Blake3Hash::of(&small);
    s.put_chunk(&small_hash, &small).expect("small chunk");
    let sd = Digest::of(&small);
    s.ensure_blob(
        &sd,
        &PieceLayout::compute(&sd, &small, 4096).expect("layout"),
    )
    .expect("ensure");
    s.put_piece(&sd, 0, &small).expect("small piece");
    let latency = |what: &str, f: &dyn Fn()| {
        let mut samples: Vec<Duration> = (0..20_000)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        samples.sort();
        let at =
            |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_nanos() as f64 / 1000.0;
        println!(
            "{what:<28} p50 {:>7.2} us   p99 {:>7.2} us",
            at(0.5),
            at(0.99)
        );
    };
    latency("hit: has_chunk (index)", &|| {
        assert!(s.has_chunk(black_box(&small_hash)))
    });
    latency("hit: get_chunk 4 KiB", &|| {
        black_box(s.get_chunk(&small_hash).expect("hit"));
    });
    latency("hit: read_piece 4 KiB", &|| {
        black_box(s.read_piece(&sd, 0).expect("hit"));
    });
}
