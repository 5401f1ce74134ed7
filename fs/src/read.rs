//! The read path: file offset -> chunks -> memory/disk cache (verified) -> else byte ranges of the
//! data blobs that hold the missing chunks (adjacent chunks merged into one request, the gap
//! between them bounded) from the peer, else the origin -> decompress -> BLAKE3 == chunk name ->
//! cache -> reply.
//!
//! A read of part of a chunk that is not in memory (a random read) takes only the 16 KiB groups
//! it covers from the disk cache, each checked against the chunk's group hashes (shoal-store,
//! docs/store.md "Reading part of a chunk"), and leaves the memory cache to whole chunks: a
//! random 4 KiB read neither hashes a whole chunk nor pushes a whole chunk out of memory.
//!
//! A chunk that fails verification is dropped, its source told, and it is fetched again straight
//! from the origin; a second failure is an I/O error. Wrong bytes never leave this module. Every
//! read ends by its deadline (`fetch_timeout_secs`), so an unreachable network means EIO, not a
//! hang; a chunk whose fetch just timed out fails at once for a few seconds, so the kernel's
//! retry of a failed read does not double the wait.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use shoal_format::bootstrap::{Bootstrap, ChunkView, InodeKind};
use shoal_store::{Blake3Hash, BufferPool, Store};
use shoal_types::Digest;

use crate::fetch::{ChunkSource, FetchError};
use crate::flight::Flights;
use crate::metrics::Metrics;
use crate::verify::decode_chunk;

/// Largest stored form of a chunk we accept (chunks are at most 16 MiB uncompressed).
const MAX_STORED: u32 = 32 << 20;

/// How long a chunk whose fetch just timed out fails at once (capped by the fetch timeout): the
/// kernel retries a failed 1 MiB readahead with a 4 KiB read of the same page, which must not
/// wait a second full timeout on a hung origin.
const RECENT_TIMEOUT_HOLD: Duration = Duration::from_secs(5);

/// A read of at most 1/this of a chunk that memory does not hold reads only its covering
/// groups from the disk cache; a larger one loads the whole chunk.
const PART_MAX_DIVISOR: u64 = 8;

/// Most chunks remembered as recently timed out (a bound on the map, not a tuning knob).
const RECENT_TIMEOUT_MAX: usize = 4096;

/// Why a read failed (the reader sees EIO).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The inode is not a regular file.
    #[error("inode {0} is not a regular file")]
    NotFile(u32),
    /// The bootstrap's chunk list does not cover the range (a bootstrap bug; it was validated).
    #[error("inode {ino}: no chunk {index} in its chunk list")]
    MissingChunk {
        /// The inode.
        ino: u32,
        /// The chunk position.
        index: u64,
    },
    /// The bytes did not arrive in time.
    #[error(
        "chunks of blob {blob} did not arrive within {secs} s (network down? origin unreachable?)"
    )]
    Timeout {
        /// The blob.
        blob: String,
        /// The deadline in seconds.
        secs: u64,
    },
    /// Every source failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The origin served bytes that do not match the chunk's name, twice.
    #[error("chunk {chunk} of blob {blob}: {reason}; refetched from the origin and it failed verification again")]
    Corrupt {
        /// The chunk hash (hex).
        chunk: String,
        /// The blob.
        blob: String,
        /// What was wrong.
        reason: String,
    },
}

/// Serves file bytes from the cache and the sources, verifying every chunk.
pub struct Reader {
    pub(crate) boot: Arc<Bootstrap>,
    store: Store,
    mem: moka::sync::Cache<[u8; 32], Bytes>,
    /// Buffers for chunks read from the disk cache, reused once the memory cache and the
    /// replies are done with them.
    bufs: Arc<BufferPool>,
    peer: Option<Arc<dyn ChunkSource>>,
    origin: Arc<dyn ChunkSource>,
    blobs: Vec<Digest>,
    rt: tokio::runtime::Handle,
    timeout: Duration,
    max_request: u64,
    max_gap: u64,
    inflight: Flights,
    /// Chunks whose fetch timed out lately, and until when a read of them fails at once.
    timed_out: std::sync::Mutex<HashMap<[u8; 32], Instant>>,
    /// Fetch-ahead loads running now, and whether the mount is closing.
    ahead: AheadWork,
    /// The mount's counters.
    pub metrics: Arc<Metrics>,
}

/// The fetch-ahead loads running now; unmount waits for them before stopping the runtime
/// (woken by the last one, not polling).
#[derive(Default)]
struct AheadWork {
    /// (loads running, closed: no new load starts).
    state: Mutex<(usize, bool)>,
    idle: Condvar,
}

impl AheadWork {
    /// Counts a load in, unless the mount is closing.
    fn start(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.1 {
            return false;
        }
        st.0 += 1;
        true
    }

    /// Counts a load out; wakes a closer once none is left.
    fn end(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(1);
        if st.0 == 0 {
            self.idle.notify_all();
        }
    }

    /// Lets no new load start, then waits up to `wait` for the running ones.
    fn close(&self, wait: Duration) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = true;
        let _idle = self.idle.wait_timeout_while(st, wait, |st| st.0 > 0);
    }
}

/// What a [`Reader`] reads from and how.
pub struct ReaderParts {
    /// The verified bootstrap.
    pub boot: Arc<Bootstrap>,
    /// The verified-chunk cache.
    pub store: Store,
    /// The local peer, if any.
    pub peer: Option<Arc<dyn ChunkSource>>,
    /// The origin.
    pub origin: Arc<dyn ChunkSource>,
    /// Runtime the sources run on.
    pub rt: tokio::runtime::Handle,
    /// Deadline of one read.
    pub timeout: Duration,
    /// Largest merged request.
    pub max_request: u64,
    /// Largest gap inside a merged request.
    pub max_gap: u64,
    /// Bytes of verified chunks kept in memory.
    pub memory_cache_bytes: u64,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// What one request to a source returned, and from which source.
type Fetched = Result<(Bytes, Arc<dyn ChunkSource>), FetchError>;

/// One request to a source: a run of chunks of one blob.
struct Group {
    blob: u32,
    start: u64,
    end: u64,
    chunks: Vec<ChunkView>,
}

impl Reader {
    /// A reader over `parts`.
    pub fn new(parts: ReaderParts) -> Result<Self, crate::FsError> {
        let blobs: Vec<Digest> = parts
            .boot
            .blobs()
            .map(|b| Digest::from_bytes(b.digest))
            .collect();
        let mem = moka::sync::Cache::builder()
            .max_capacity(parts.memory_cache_bytes)
            .weigher(|_k: &[u8; 32], v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .build();
        Ok(Reader {
            boot: parts.boot,
            store: parts.store,
            mem,
            // Idle buffers up to half the memory cache: enough that a sequential read reuses
            // the ones the memory cache lets go (docs/benchmarks.md, issue 7).
            bufs: BufferPool::new((parts.memory_cache_bytes / 2) as usize),
            peer: parts.peer,
            origin: parts.origin,
            blobs,
            rt: parts.rt,
            timeout: parts.timeout,
            max_request: parts.max_request,
            max_gap: parts.max_gap,
            inflight: Flights::default(),
            timed_out: Default::default(),
            ahead: AheadWork::default(),
            metrics: parts.metrics,
        })
    }

    /// The bootstrap.
    pub fn bootstrap(&self) -> &Bootstrap {
        &self.boot
    }

    /// Bytes `offset..offset + size` of regular file `ino` (image inode index), short at EOF.
    /// A read inside one chunk is a slice of the cached chunk (no copy).
    pub fn read(&self, ino: u32, offset: u64, size: u32) -> Result<Bytes, ReadError> {
        let inode = self.boot.inode(ino).ok_or(ReadError::NotFile(ino))?;
        if inode.kind() != InodeKind::File {
            return Err(ReadError::NotFile(ino));
        }
        let file_size = inode.size();
        if offset >= file_size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = file_size.min(offset.saturating_add(u64::from(size)));
        let cs = u64::from(self.boot.chunk_size());
        let list = self
            .boot
            .file_chunks(ino)
            .map_err(|_| ReadError::NotFile(ino))?;
        let (k0, k1) = (offset / cs, (end - 1) / cs);
        let views = (k0..=k1)
            .map(|k| {
                usize::try_from(k)
                    .ok()
                    .and_then(|k| list.get(k))
                    .ok_or(ReadError::MissingChunk { ino, index: k })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Part of a chunk that is not in memory: only its covering groups, from the disk cache.
        let mut parts: Vec<Option<Bytes>> = (k0..=k1)
            .zip(&views)
            .map(|(k, c)| {
                let base = k * cs;
                let want = offset.max(base) - base..(end - base).min(u64::from(c.size));
                self.part(c, want)
            })
            .collect();
        let whole: Vec<ChunkView> = views
            .iter()
            .zip(&parts)
            .filter(|(_, p)| p.is_none())
            .map(|(c, _)| *c)
            .collect();
        let mut datas = self
            .load(&whole, Instant::now() + self.timeout)?
            .into_iter();
        for (k, part) in (k0..=k1).zip(parts.iter_mut()) {
            if part.is_some() {
                continue;
            }
            let data = datas.next().unwrap_or_default();
            let base = k * cs;
            let to = ((end - base) as usize).min(data.len());
            let from = ((offset.max(base) - base) as usize).min(to);
            *part = Some(data.slice(from..to));
        }
        let mut parts: Vec<Bytes> = parts.into_iter().flatten().collect();
        let out = match parts.len() {
            1 => parts.pop().unwrap_or_default(),
            _ => {
                let mut out = BytesMut::with_capacity((end - offset) as usize);
                for p in &parts {
                    out.extend_from_slice(p);
                }
                out.freeze()
            }
        };
        if (out.len() as u64) < end - offset {
            // A chunk shorter than the file says: never pad with invented bytes.
            return Err(ReadError::MissingChunk { ino, index: k1 });
        }
        self.metrics.read_bytes.inc_by(out.len() as u64);
        Ok(out)
    }

    /// A read answered at once, waiting on nothing but the local disk: part of one chunk, as a
    /// slice of it in memory or its covering groups from the disk cache (checked). `None`: the
    /// read needs [`Reader::read`] (a whole chunk, several, a fetch, or an error to report).
    /// The FUSE loop answers these in place, without handing them to a read thread.
    pub fn read_cached(&self, ino: u32, offset: u64, size: u32) -> Option<Bytes> {
        let inode = self.boot.inode(ino)?;
        if inode.kind() != InodeKind::File || offset >= inode.size() || size == 0 {
            return None;
        }
        let end = inode.size().min(offset.saturating_add(u64::from(size)));
        let cs = u64::from(self.boot.chunk_size());
        let k = offset / cs;
        if (end - 1) / cs != k {
            return None;
        }
        let c = self
            .boot
            .file_chunks(ino)
            .ok()?
            .get(usize::try_from(k).ok()?)?;
        let base = k * cs;
        let want = offset - base..end - base;
        if want.end > u64::from(c.size) {
            return None; // a chunk shorter than the file says: read() reports it
        }
        let out = self.part(&c, want)?;
        self.metrics.read_bytes.inc_by(out.len() as u64);
        Some(out)
    }

    /// Loads `chunks` ahead of the reads that will want them (ahead.rs picks them): the
    /// ones neither in memory nor being loaded already are read from the disk cache or fetched,
    /// verified either way. Failures only log: the read that wants the chunk tries again.
    pub fn load_ahead(&self, chunks: &[ChunkView]) {
        if self.ahead.start() {
            self.load_ahead_now(chunks);
            self.ahead.end();
        }
    }

    /// Stops fetch-ahead: none starts from now on; waits up to `wait` for running ones.
    pub fn close(&self, wait: Duration) {
        self.ahead.close(wait);
    }

    fn load_ahead_now(&self, chunks: &[ChunkView]) {
        let todo: Vec<ChunkView> = chunks
            .iter()
            .filter(|c| !self.mem.contains_key(&c.hash) && !self.inflight.busy(&c.hash))
            .copied()
            .collect();
        if todo.is_empty() {
            return;
        }
        let hashes: Vec<Blake3Hash> = todo
            .iter()
            .map(|c| Blake3Hash::from_bytes(c.hash))
            .collect();
        self.store.will_need_chunks(&hashes);
        if let Err(e) = self.load(&todo, Instant::now() + self.timeout) {
            tracing::debug!(error = %e, "fetch-ahead failed; the chunks are fetched when read");
        }
    }

    /// True when the chunk is in memory.
    pub(crate) fn in_memory(&self, c: &ChunkView) -> bool {
        self.mem.contains_key(&c.hash)
    }

    /// True when the chunk is in memory or in the disk cache.
    pub(crate) fn in_cache(&self, c: &ChunkView) -> bool {
        self.in_memory(c) || self.store.has_chunk(&Blake3Hash::from_bytes(c.hash))
    }

    /// Makes sure `chunks` are cached (prefetch), fetching what is missing.
    pub fn warm(&self, chunks: &[ChunkView]) -> Result<(), ReadError> {
        self.load(chunks, Instant::now() + self.timeout).map(|_| ())
    }

    /// Bytes `want` of chunk `c` when that is not the whole chunk: a slice of it in memory, else
    /// (for a small part) its covering groups from the disk cache, checked against its group
    /// hashes. `None` sends
    /// the read down the whole-chunk path (which waits for a load already running, fetches
    /// what no cache holds, and refetches a chunk the disk cache just dropped as corrupt).
    fn part(&self, c: &ChunkView, want: Range<u64>) -> Option<Bytes> {
        if want.start == 0 && want.end >= u64::from(c.size) {
            return None;
        }
        if let Some(b) = self.mem.get(&c.hash) {
            self.metrics.cache_hits.inc();
            let to = (want.end as usize).min(b.len());
            return Some(b.slice((want.start as usize).min(to)..to));
        }
        // A large part is a sequential stream's readahead (the kernel sends 256 KiB requests):
        // the whole chunk, kept in memory for the requests that follow, costs less than reading
        // it from the disk cache part by part (sequential reads ran at 0.25 of native instead
        // of 0.64 that way; docs/benchmarks.md, issue 27).
        if want.end - want.start > u64::from(c.size) / PART_MAX_DIVISOR
            || self.inflight.busy(&c.hash)
        {
            return None;
        }
        let mut buf = self.bufs.take(0);
        let hash = Blake3Hash::from_bytes(c.hash);
        match self.store.read_chunk_part(&hash, want, &mut buf) {
            Ok(at) => {
                self.metrics.cache_hits.inc();
                Some(self.bufs.lend(buf).slice(at))
            }
            Err(e) => {
                self.bufs.give_back(buf);
                if e.is_corrupt() {
                    self.metrics.verify_failed("cache");
                    tracing::warn!(chunk = %hex::encode(c.hash), error = %e, "cached chunk failed verification; refetching");
                } else if !e.is_not_present() {
                    tracing::warn!(chunk = %hex::encode(c.hash), error = %e, "chunk cache read failed; refetching");
                }
                None
            }
        }
    }

    fn cached(&self, c: &ChunkView) -> Option<Bytes> {
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
                if e.is_corrupt() {
                    self.metrics.verify_failed("cache");
                    tracing::warn!(chunk = %hex::encode(c.hash), error = %e, "cached chunk failed verification; refetching");
                } else if !e.is_not_present() {
                    tracing::warn!(chunk = %hex::encode(c.hash), error = %e, "chunk cache read failed; refetching");
                }
                None
            }
        }
    }

    /// The verified bytes of every chunk in `chunks`, in order.
    fn load(&self, chunks: &[ChunkView], deadline: Instant) -> Result<Vec<Bytes>, ReadError> {
        // Memory first; the disk cache only under the chunk's single-flight lock below, so
        // concurrent readers of one chunk (kernel readahead) read and verify it from disk once.
        let mut out: Vec<Option<Bytes>> = chunks.iter().map(|c| self.mem.get(&c.hash)).collect();
        let hits = out.iter().filter(|o| o.is_some()).count() as u64;
        self.metrics.cache_hits.inc_by(hits);
        if hits as usize == chunks.len() {
            return Ok(out.into_iter().flatten().collect());
        }
        let mut missing: Vec<ChunkView> = Vec::new();
        for (c, o) in chunks.iter().zip(&out) {
            if o.is_none() && !missing.iter().any(|m| m.hash == c.hash) {
                missing.push(*c);
            }
        }
        // Hash order: two loaders never wait for each other's flights crosswise.
        missing.sort_by_key(|c| c.hash);
        // Single flight: concurrent readers of one chunk (kernel readahead) fetch it once.
        let mut guards = Vec::with_capacity(missing.len());
        for c in &missing {
            match self.inflight.take(c.hash, deadline) {
                Some(g) => guards.push(g),
                None => {
                    return Err(ReadError::Timeout {
                        blob: self.blob_name(c.blob),
                        secs: self.timeout.as_secs(),
                    })
                }
            }
        }
        // In memory by now (another reader held the flight), or on disk (verified)?
        let mut ready = HashMap::new();
        let mut still = Vec::new();
        for c in &missing {
            match self.cached(c) {
                Some(b) => {
                    ready.insert(c.hash, b);
                }
                None => still.push(*c),
            }
        }
        self.metrics.cache_hits.inc_by(ready.len() as u64);
        // Checked under the flights: a reader that waited for a fetch which just timed out fails
        // now instead of starting another full wait on the same source.
        if let Some(c) = self.recently_timed_out(&still) {
            tracing::info!(chunk = %hex::encode(c.hash), blob = %self.blob_name(c.blob),
                "chunk fetch timed out moments ago; failing this read at once");
            return Err(ReadError::Timeout {
                blob: self.blob_name(c.blob),
                secs: self.timeout.as_secs(),
            });
        }
        let fetched = self.fetch(&still, deadline);
        if matches!(fetched, Err(ReadError::Timeout { .. })) {
            self.remember_timed_out(&still);
        }
        drop(guards);
        let mut fetched = fetched?;
        fetched.extend(ready);
        self.metrics.cache_misses.inc_by(still.len() as u64);
        for (c, o) in chunks.iter().zip(out.iter_mut()) {
            if o.is_none() {
                *o = fetched.get(&c.hash).cloned();
            }
        }
        out.into_iter()
            .zip(chunks)
            .map(|(o, c)| {
                o.ok_or_else(|| ReadError::Timeout {
                    blob: self.blob_name(c.blob),
                    secs: self.timeout.as_secs(),
                })
            })
            .collect()
    }

    /// The first of `chunks` whose fetch timed out less than the hold ago, if any.
    fn recently_timed_out(&self, chunks: &[ChunkView]) -> Option<ChunkView> {
        let map = self.timed_out.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        let now = Instant::now();
        chunks
            .iter()
            .find(|c| map.get(&c.hash).is_some_and(|until| *until > now))
            .copied()
    }

    /// Remembers that fetching `chunks` just timed out (bounded: expired entries go first, and
    /// when still full the map starts over, which only costs a retry a full wait).
    fn remember_timed_out(&self, chunks: &[ChunkView]) {
        let now = Instant::now();
        let until = now + self.timeout.min(RECENT_TIMEOUT_HOLD);
        let mut map = self.timed_out.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, u| *u > now);
        if map.len() + chunks.len() > RECENT_TIMEOUT_MAX {
            map.clear();
        }
        for c in chunks.iter().take(RECENT_TIMEOUT_MAX) {
            map.insert(c.hash, until);
        }
    }

    fn blob_name(&self, blob: u32) -> String {
        self.blobs
            .get(blob as usize)
            .map_or_else(|| format!("#{blob}"), |d| d.to_string())
    }

    /// Runs of chunks of one blob, each one request: gaps at most `max_gap`, span at most
    /// `max_request` (a single larger chunk is its own request).
    fn plan(&self, chunks: &[ChunkView]) -> Vec<Group> {
        let mut sorted = chunks.to_vec();
        sorted.sort_by_key(|c| (c.blob, c.offset));
        let mut groups: Vec<Group> = Vec::new();
        for c in sorted {
            let end = c.offset + u64::from(c.stored_size);
            match groups.last_mut() {
                Some(g)
                    if g.blob == c.blob
                        && c.offset >= g.end
                        && c.offset - g.end <= self.max_gap
                        && end - g.start <= self.max_request =>
                {
                    g.end = end;
                    g.chunks.push(c);
                }
                _ => groups.push(Group {
                    blob: c.blob,
                    start: c.offset,
                    end,
                    chunks: vec![c],
                }),
            }
        }
        groups
    }

    /// Fetches, decompresses and verifies `chunks`; every verified chunk is cached.
    fn fetch(
        &self,
        chunks: &[ChunkView],
        deadline: Instant,
    ) -> Result<HashMap<[u8; 32], Bytes>, ReadError> {
        let mut done = HashMap::new();
        if chunks.is_empty() {
            return Ok(done);
        }
        if let Some(c) = chunks.iter().find(|c| c.stored_size > MAX_STORED) {
            return Err(ReadError::Corrupt {
                chunk: hex::encode(c.hash),
                blob: self.blob_name(c.blob),
                reason: format!("stored size {} is over the limit", c.stored_size),
            });
        }
        let groups = self.plan(chunks);
        let started = Instant::now();
        let results = self.run_until(deadline, &groups, |g| {
            self.fetch_range(g.blob, g.start, g.end, true)
        })?;
        let mut bad: Vec<ChunkView> = Vec::new();
        for (g, r) in groups.iter().zip(results) {
            let (bytes, src) = r?;
            for c in &g.chunks {
                let from = (c.offset - g.start) as usize;
                let stored = bytes
                    .get(from..from + c.stored_size as usize)
                    .unwrap_or_default();
                match decode_chunk(c, stored) {
                    Ok(data) => {
                        self.keep(c, &data);
                        done.insert(c.hash, data);
                    }
                    Err(reason) => {
                        self.metrics.verify_failed(src.kind().label());
                        src.report_bad(
                            &self.blobs[c.blob as usize],
                            c.offset,
                            c.offset + u64::from(c.stored_size),
                        );
                        tracing::warn!(chunk = %hex::encode(c.hash), blob = %self.blob_name(c.blob), source = %src.describe(), %reason,
                            "fetched chunk failed verification; dropped, refetching from the origin");
                        bad.push(*c);
                    }
                }
            }
        }
        if !bad.is_empty() {
            let groups: Vec<Group> = bad
                .iter()
                .map(|c| Group {
                    blob: c.blob,
                    start: c.offset,
                    end: c.offset + u64::from(c.stored_size),
                    chunks: vec![*c],
                })
                .collect();
            let results = self.run_until(deadline, &groups, |g| {
                self.fetch_range(g.blob, g.start, g.end, false)
            })?;
            for (c, r) in bad.iter().zip(results) {
                let (bytes, src) = r?;
                match decode_chunk(c, &bytes) {
                    Ok(data) => {
                        self.keep(c, &data);
                        done.insert(c.hash, data);
                    }
                    Err(reason) => {
                        self.metrics.verify_failed("origin");
                        src.report_bad(
                            &self.blobs[c.blob as usize],
                            c.offset,
                            c.offset + u64::from(c.stored_size),
                        );
                        tracing::error!(chunk = %hex::encode(c.hash), blob = %self.blob_name(c.blob), source = %src.describe(), %reason,
                            "chunk failed verification again after refetching from the origin: read fails with EIO");
                        return Err(ReadError::Corrupt {
                            chunk: hex::encode(c.hash),
                            blob: self.blob_name(c.blob),
                            reason,
                        });
                    }
                }
            }
        }
        self.metrics
            .fetch_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(done)
    }

    fn keep(&self, c: &ChunkView, data: &Bytes) {
        self.metrics
            .chunk_fetched(c.index, u64::from(c.stored_size));
        self.mem.insert(c.hash, data.clone());
        // The disk write (fsync) runs off the reply path; the bytes are already verified.
        let (store, hash, data) = (
            self.store.clone(),
            Blake3Hash::from_bytes(c.hash),
            data.clone(),
        );
        self.rt.spawn_blocking(move || {
            if let Err(e) = store.put_chunk(&hash, &data) {
                tracing::warn!(chunk = %hash, error = %e, "could not cache chunk; serving it uncached");
            }
        });
    }

    /// Runs one fetch per group concurrently on the runtime, all bounded by `deadline`.
    fn run_until<'a, F, Fut>(
        &'a self,
        deadline: Instant,
        groups: &'a [Group],
        f: F,
    ) -> Result<Vec<Fetched>, ReadError>
    where
        F: Fn(&'a Group) -> Fut,
        Fut: std::future::Future<Output = Fetched> + 'a,
    {
        let all = futures::future::join_all(groups.iter().map(f));
        let until = tokio::time::Instant::from_std(deadline);
        self.rt
            .block_on(async { tokio::time::timeout_at(until, all).await })
            .map_err(|_| {
                let blob = groups.first().map_or(0, |g| g.blob);
                tracing::warn!(blob = %self.blob_name(blob), secs = self.timeout.as_secs(), "read timed out waiting for chunks");
                ReadError::Timeout {
                    blob: self.blob_name(blob),
                    secs: self.timeout.as_secs(),
                }
            })
    }

    /// Bytes `start..end` of blob `blob`: from the peer when `via_peer` and one is configured
    /// (falling back to the origin on any error), else from the origin.
    async fn fetch_range(&self, blob: u32, start: u64, end: u64, via_peer: bool) -> Fetched {
        let digest = self.blobs.get(blob as usize).ok_or_else(|| FetchError {
            source_name: "bootstrap".into(),
            blob: format!("#{blob}"),
            start,
            end,
            reason: "chunk refers to a blob the image does not list".into(),
            refused: false,
        })?;
        if let Some(peer) = self.peer.as_ref().filter(|_| via_peer) {
            match peer.read_range(digest, start, end).await {
                Ok(b) => {
                    self.metrics.fetched(peer.kind(), b.len() as u64);
                    return Ok((b, Arc::clone(peer)));
                }
                Err(e) if e.refused => return Err(e),
                Err(e) => {
                    tracing::info!(error = %e, "peer could not serve the range; reading from the origin")
                }
            }
        }
        let b = self.origin.read_range(digest, start, end).await?;
        self.metrics.fetched(self.origin.kind(), b.len() as u64);
        Ok((b, Arc::clone(&self.origin)))
    }
}
