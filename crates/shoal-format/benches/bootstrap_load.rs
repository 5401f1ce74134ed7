//! Bootstrap load time and memory for a synthetic 100,000-inode image (docs/benchmarks.md,
//! "Bootstrap load (issue 2)"): 10,000 directories, 88,500 files of 1-3 chunks (70/20/10 %, one
//! chunk in ten shared), 1,500 symlinks, xattrs on one inode in twenty.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use shoal_format::bootstrap::{encode, Bootstrap};
use shoal_format::merkle;
use shoal_format::model::*;

/// Counts live and peak heap bytes so the bench can report what a loaded view costs.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const DIRS: u32 = 10_000;
const FILES: u32 = 88_500;
const SYMLINKS: u32 = 1_500;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn node(mode: u32, payload: Payload) -> Inode {
    Inode {
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        nlink: 1,
        xattrs: Vec::new(),
        payload,
        hash: [0; 32],
    }
}

fn synthetic() -> ImageMeta {
    let mut rng = Rng(0x5eed);
    let cs = 1u32 << 20;
    let mut inodes = vec![node(0o040_755, Payload::Dir(Vec::new()))];
    let mut entries: Vec<Vec<DirEntry>> = vec![Vec::new()];
    let mut chunks: Vec<ChunkInfo> = Vec::new();
    let mut blob_size = 0u64;
    let add = |inodes: &mut Vec<Inode>,
               entries: &mut Vec<Vec<DirEntry>>,
               parent: u32,
               name: String,
               inode: Inode| {
        let ino = inodes.len() as u32;
        entries[parent as usize].push(DirEntry {
            name: name.into_bytes(),
            inode: ino,
        });
        inodes.push(inode);
        entries.push(Vec::new());
        ino
    };
    let mut dirs = vec![0u32];
    for i in 1..DIRS {
        // Parents among recent directories: a deep, bushy tree like a rootfs.
        let parent = dirs[dirs.len() - 1 - rng.below(dirs.len().min(200) as u64) as usize];
        let ino = add(
            &mut inodes,
            &mut entries,
            parent,
            format!("dir{i}"),
            node(0o040_755, Payload::Dir(Vec::new())),
        );
        dirs.push(ino);
    }
    for i in 0..FILES {
        let parent = dirs[rng.below(dirs.len() as u64) as usize];
        let n: u32 = match rng.below(10) {
            0..=6 => 1,
            7 | 8 => 2,
            _ => 3,
        };
        let tail = 1 + rng.below(u64::from(cs)) as u32;
        let mut list = Vec::new();
        for k in 0..n {
            let size = if k + 1 < n { cs } else { tail };
            let shared = (rng.below(10) == 0 && !chunks.is_empty())
                .then(|| chunks.iter().rposition(|c| c.size == size))
                .flatten();
            let index = shared.unwrap_or_else(|| {
                let stored = size / 3 + 1;
                chunks.push(ChunkInfo {
                    hash: *blake3::hash(&(chunks.len() as u64).to_le_bytes()).as_bytes(),
                    blob: 0,
                    offset: blob_size,
                    stored_size: stored,
                    size,
                    encoding: ChunkEncoding::Zstd,
                });
                blob_size += u64::from(stored);
                chunks.len() - 1
            });
            list.push(index as u32);
        }
        let size = u64::from(n - 1) * u64::from(cs) + u64::from(tail);
        let mut file = node(0o100_644, Payload::File(FileData { size, chunks: list }));
        if rng.below(20) == 0 {
            file.xattrs = vec![(
                b"security.capability".to_vec(),
                vec![1, 0, 0, 2, 0, 0x20, 0, 0],
            )];
        }
        add(
            &mut inodes,
            &mut entries,
            parent,
            format!("lib{}.so.{}", i, i % 7),
            file,
        );
    }
    for i in 0..SYMLINKS {
        let parent = dirs[rng.below(dirs.len() as u64) as usize];
        let target = format!("../lib/x86_64-linux-gnu/lib{i}.so.{}", i % 7).into_bytes();
        add(
            &mut inodes,
            &mut entries,
            parent,
            format!("link{i}"),
            node(0o120_777, Payload::Symlink(target)),
        );
    }
    for (ino, mut list) in entries.into_iter().enumerate() {
        if let Payload::Dir(_) = inodes[ino].payload {
            list.sort_by(|a, b| a.name.cmp(&b.name));
            let subdirs = list
                .iter()
                .filter(|e| matches!(inodes[e.inode as usize].payload, Payload::Dir(_)))
                .count() as u32;
            inodes[ino].nlink = 2 + subdirs;
            inodes[ino].payload = Payload::Dir(list);
        }
    }
    let piece_size = 4u32 << 20;
    let pieces = (0..blob_size.div_ceil(u64::from(piece_size)))
        .map(|p| *blake3::hash(&p.to_le_bytes()).as_bytes())
        .collect();
    let mut meta = ImageMeta {
        chunk_size: cs,
        blobs: vec![BlobInfo {
            digest: [1; 32],
            size: blob_size,
            piece_size,
            pieces,
        }],
        chunks,
        inodes,
        prefetch: (1..1000).collect(),
        checkpoints: Vec::new(),
    };
    merkle::compute(&mut meta).expect("synthetic image is well formed");
    meta
}

fn bench(c: &mut Criterion) {
    let t = Instant::now();
    let meta = synthetic();
    let built = t.elapsed();
    let t = Instant::now();
    let bytes = encode(&meta).expect("encode");
    let encoded = t.elapsed();
    let n = meta.inodes.len();
    drop(meta);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bootstrap");
    std::fs::write(&path, &bytes).expect("write bootstrap");

    // One measured load outside criterion for the memory figures.
    let copy = bytes.clone();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let t = Instant::now();
    let bs = Bootstrap::load(copy).expect("load");
    let first_load = t.elapsed();
    let retained = LIVE.load(Ordering::Relaxed) - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    drop(bs);
    let before = LIVE.load(Ordering::Relaxed);
    let bs = Bootstrap::open(&path).expect("open");
    let mmap_heap = LIVE.load(Ordering::Relaxed) - before;
    drop(bs);
    println!(
        "bootstrap_load: {n} inodes, {} bytes encoded = {:.1} bytes/inode",
        bytes.len(),
        bytes.len() as f64 / n as f64
    );
    println!("bootstrap_load: load(Vec) heap beyond the bytes: retained {retained} B ({:.3} B/inode), peak during validation {peak} B ({:.2} B/inode)", retained as f64 / n as f64, peak as f64 / n as f64);
    println!(
        "bootstrap_load: open(mmap) heap retained {mmap_heap} B ({:.3} B/inode)",
        mmap_heap as f64 / n as f64
    );
    println!(
        "bootstrap_load: first load {first_load:?}; synthetic build {built:?}; encode {encoded:?}"
    );

    let mut g = c.benchmark_group("bootstrap_100k");
    g.sample_size(20);
    g.bench_function("load_vec_validated", |b| {
        b.iter_batched(
            || bytes.clone(),
            |v| Bootstrap::load(v).expect("load"),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("open_mmap_validated", |b| {
        b.iter(|| Bootstrap::open(&path).expect("open"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
