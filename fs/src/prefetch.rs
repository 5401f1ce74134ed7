//! Background fetching after mount: first the bootstrap's prefetch list (files the image's
//! startup reads, in order), then, when asked, every chunk of every blob in blob order under a
//! bandwidth limit. Both go through read.rs, so everything fetched is verified and cached.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shoal_format::bootstrap::{ChunkView, InodeKind};

use crate::read::Reader;

/// Chunks per background request batch.
const BATCH: usize = 16;
/// Batches fetched at once: the next one is on the wire while the last one is decompressed,
/// verified and stored (one at a time left the link idle for that long after every batch).
const BATCHES_IN_FLIGHT: usize = 2;

/// What to fetch in the background.
#[derive(Debug, Clone, Copy)]
pub struct PrefetchPlan {
    /// The bootstrap's prefetch list.
    pub listed: bool,
    /// Every blob to completion.
    pub all: bool,
    /// Limit of the whole-blob fetch in bytes per second (0 = none).
    pub bytes_per_sec: u64,
}

/// Starts the background fetch; it stops early when `stop` is set.
pub fn spawn(
    reader: Arc<Reader>,
    plan: PrefetchPlan,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("shoal-fs-prefetch".into())
        .spawn(move || run(&reader, plan, &stop))
}

fn run(reader: &Reader, plan: PrefetchPlan, stop: &AtomicBool) {
    let boot = reader.bootstrap();
    if plan.listed {
        let started = Instant::now();
        let mut files = 0;
        // The chunks of all listed files in list order, fetched in batches that span files:
        // one batch is several requests in flight at once (small files would otherwise cost a
        // round trip each).
        let mut chunks: Vec<ChunkView> = Vec::new();
        for ino in boot.prefetch() {
            if boot.inode(ino).is_none_or(|i| i.kind() != InodeKind::File) {
                continue;
            }
            let Ok(list) = boot.file_chunks(ino) else {
                continue;
            };
            chunks.extend(list.iter());
            files += 1;
        }
        warm(reader, &chunks, stop, 0, started);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        tracing::info!(
            files,
            secs = started.elapsed().as_secs_f64(),
            "prefetch list fetched"
        );
    }
    if plan.all {
        let mut chunks: Vec<ChunkView> = (0..boot.chunk_count())
            .filter_map(|i| boot.chunk(i))
            .collect();
        chunks.sort_by_key(|c| (c.blob, c.offset));
        let started = Instant::now();
        warm(reader, &chunks, stop, plan.bytes_per_sec, started);
        if !stop.load(Ordering::Relaxed) {
            tracing::info!(
                chunks = chunks.len(),
                secs = started.elapsed().as_secs_f64(),
                "whole image fetched"
            );
        }
    }
}

/// Fetches `chunks` in batches, [`BATCHES_IN_FLIGHT`] at once and taken in order; with a limit,
/// sleeps so that stored bytes / time stays under it.
fn warm(
    reader: &Reader,
    chunks: &[ChunkView],
    stop: &AtomicBool,
    bytes_per_sec: u64,
    started: Instant,
) {
    let batches: Vec<&[ChunkView]> = chunks.chunks(BATCH).collect();
    let next = AtomicUsize::new(0);
    let sent = AtomicU64::new(0);
    let worker = || {
        while !stop.load(Ordering::Relaxed) {
            let Some(batch) = batches.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            if let Err(e) = reader.warm(batch) {
                tracing::warn!(error = %e, "background fetch failed; the chunks will be fetched when read");
            }
            if bytes_per_sec > 0 {
                let bytes = batch.iter().map(|c| u64::from(c.stored_size)).sum::<u64>();
                let total = sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
                let due = started + Duration::from_secs_f64(total as f64 / bytes_per_sec as f64);
                while Instant::now() < due && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep((due - Instant::now()).min(Duration::from_millis(100)));
                }
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..BATCHES_IN_FLIGHT {
            s.spawn(worker);
        }
        worker();
    });
}
