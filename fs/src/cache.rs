//! The mount's verified chunks: recent whole chunks in memory (moka, weighed by bytes), every
//! chunk on disk in the store (shoal-store, re-verified on every read). Writes to disk run off
//! the reply path; when too many wait, the chunks a span run brought along are written on the
//! caller's thread, so a whole layer decoded at once cannot pile up in memory.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use shoal_format::bootstrap::ChunkView;
use shoal_store::{Blake3Hash, BufferPool, Store};

use crate::metrics::Metrics;

/// Verified chunks waiting for their disk-cache write at most; beyond it the writes of a span
/// run's other chunks happen on the reading thread (a whole single-frame layer is many chunks).
const MAX_PENDING_WRITES: u64 = 64 << 20;

/// Memory and disk caches of verified chunks.
pub(crate) struct ChunkCache {
    store: Store,
    mem: moka::sync::Cache<[u8; 32], Bytes>,
    /// Buffers for chunks read from the disk cache, reused once the memory cache and the
    /// replies are done with them.
    bufs: Arc<BufferPool>,
    memory_bytes: u64,
    /// Bytes of verified chunks handed to the disk cache and not written yet.
    pending_writes: Arc<AtomicU64>,
    rt: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
}

impl ChunkCache {
    /// Caches over `store`, `memory_bytes` in memory; disk writes run on `rt`'s blocking pool.
    pub(crate) fn new(
        store: Store,
        memory_bytes: u64,
        rt: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mem = moka::sync::Cache::builder()
            .max_capacity(memory_bytes)
            .weigher(|_k: &[u8; 32], v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .build();
        ChunkCache {
            store,
            mem,
            // Idle buffers up to half the memory cache: enough that a sequential read reuses
            // the ones the memory cache lets go (docs/benchmarks.md, issue 7).
            bufs: BufferPool::new((memory_bytes / 2) as usize),
            memory_bytes,
            pending_writes: Arc::new(AtomicU64::new(0)),
            rt,
            metrics,
        }
    }

    /// The chunk, if memory holds it.
    pub(crate) fn memory(&self, hash: &[u8; 32]) -> Option<Bytes> {
        self.mem.get(hash)
    }

    /// True when the chunk is in memory.
    pub(crate) fn in_memory(&self, c: &ChunkView) -> bool {
        self.mem.contains_key(&c.hash)
    }

    /// True when the chunk is in memory or in the disk cache.
    pub(crate) fn in_cache(&self, c: &ChunkView) -> bool {
        self.in_memory(c) || self.store.has_chunk(&Blake3Hash::from_bytes(c.hash))
    }

    /// True when a run of `bytes` may go to memory as well as to disk (at most a quarter of it).
    pub(crate) fn fits_in_memory(&self, bytes: u64) -> bool {
        bytes <= self.memory_bytes / 4
    }

    /// Tells the disk cache these chunks are read soon (it reads their packs ahead).
    pub(crate) fn will_need(&self, chunks: &[ChunkView]) {
        let hashes: Vec<Blake3Hash> = chunks
            .iter()
            .map(|c| Blake3Hash::from_bytes(c.hash))
            .collect();
        self.store.will_need_chunks(&hashes);
    }

    /// Bytes `want` of chunk `c` from the disk cache: only the 16 KiB groups it covers, each
    /// checked against the chunk's group hashes. `None` when not there (or dropped as corrupt).
    pub(crate) fn disk_part(&self, c: &ChunkView, want: Range<u64>) -> Option<Bytes> {
        let mut buf = self.bufs.take(0);
        let hash = Blake3Hash::from_bytes(c.hash);
        match self.store.read_chunk_part(&hash, want, &mut buf) {
            Ok(at) => Some(self.bufs.lend(buf).slice(at)),
            Err(e) => {
                self.bufs.give_back(buf);
                self.failed_read(c, &e);
                None
            }
        }
    }

    /// The whole chunk from memory, else from the disk cache (verified; then kept in memory).
    pub(crate) fn cached(&self, c: &ChunkView) -> Option<Bytes> {
        if let Some(b) = self.mem.get(&c.hash) {
            return Some(b);
        }
        let mut buf = self.bufs.take(c.size as usize);
        match self
            .store
            .read_chunk_into(&Blake3Hash::from_bytes(c.hash), &mut buf)
        {
            Ok(()) if buf.len() == c.size as usize => {
                let b = self.bufs.lend(buf);
                self.mem.insert(c.hash, b.clone());
                Some(b)
            }
            Ok(()) => None,
            Err(e) => {
                self.failed_read(c, &e);
                None
            }
        }
    }

    fn failed_read(&self, c: &ChunkView, e: &shoal_store::Error) {
        if e.is_corrupt() {
            self.metrics.verify_failed("cache");
            tracing::warn!(chunk = %hex::encode(c.hash), error = %e, "cached chunk failed verification; refetching");
        } else if !e.is_not_present() {
            tracing::warn!(chunk = %hex::encode(c.hash), error = %e, "chunk cache read failed; refetching");
        }
    }

    /// Keeps a verified chunk in memory and writes it to disk off the reply path.
    pub(crate) fn keep(&self, c: &ChunkView, data: &Bytes) {
        self.mem.insert(c.hash, data.clone());
        self.write_behind(c, data.clone());
    }

    /// Keeps a chunk decoded on the way to the wanted ones (a span run's others): in memory
    /// when the run fits, on disk always; written on this thread when too much waits already.
    pub(crate) fn keep_other(&self, c: &ChunkView, data: Bytes, in_memory: bool) {
        if in_memory {
            self.mem.insert(c.hash, data.clone());
        }
        let len = data.len() as u64;
        if self.pending_writes.load(Ordering::Relaxed) + len > MAX_PENDING_WRITES {
            let hash = Blake3Hash::from_bytes(c.hash);
            if let Err(e) = self.store.put_chunk(&hash, &data) {
                tracing::warn!(chunk = %hash, error = %e, "could not cache chunk");
            }
            return;
        }
        self.write_behind(c, data);
    }

    /// Writes a verified chunk to the disk cache on the blocking pool (its fsync).
    fn write_behind(&self, c: &ChunkView, data: Bytes) {
        let len = data.len() as u64;
        self.pending_writes.fetch_add(len, Ordering::Relaxed);
        let (store, hash, pending) = (
            self.store.clone(),
            Blake3Hash::from_bytes(c.hash),
            Arc::clone(&self.pending_writes),
        );
        self.rt.spawn_blocking(move || {
            if let Err(e) = store.put_chunk(&hash, &data) {
                tracing::warn!(chunk = %hash, error = %e, "could not cache chunk; serving it uncached");
            }
            pending.fetch_sub(len, Ordering::Relaxed);
        });
    }
}
