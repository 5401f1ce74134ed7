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

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use shoal_format::bootstrap::{Bootstrap, ChunkView, InodeKind};
use shoal_format::model::ChunkEncoding;
use shoal_origin::Digest;
use shoal_store::{Blake3Hash, BufferPool, Store};

use crate::fetch::{ChunkSource, FetchError};
use crate::flight::Flights;
use crate::metrics::Metrics;
use crate::plan::{self, Part, PartKind, Request, Runs, SpanPart};
use crate::verify::{decode_chunk, decode_span_run};

/// Largest stored form of a raw or zstd chunk we accept (chunks are at most 16 MiB
/// uncompressed; a span's stored form is read as a stream instead).
const MAX_STORED: u32 = 32 << 20;

/// Verified chunks waiting for their disk-cache write at most; beyond it the writes of a span
/// run's other chunks happen on the reading thread (a whole single-frame layer is many chunks).
const MAX_PENDING_WRITES: u64 = 64 << 20;

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
    /// Span runs by checkpoint (indexed layers).
    runs: Runs,
    /// Bytes of the memory cache (a span run larger than a quarter of it goes to disk only).
    memory_cache_bytes: u64,
    /// Bytes of verified chunks handed to the disk cache and not written yet.
    pending_writes: Arc<AtomicU64>,
    /// Per blob: its piece table was offered to the peer (before its first range from there).
    offered: Vec<tokio::sync::OnceCell<()>>,
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

impl Reader {
    /// A reader over `parts`.
    pub fn new(parts: ReaderParts) -> Result<Self, crate::FsError> {
        let blobs = parts
            .boot
            .blobs()
            .map(|b| shoal_origin::parse_digest(&format!("sha256:{}", hex::encode(b.digest))))
            .collect::<Result<Vec<_>, _>>()?;
        let mem = moka::sync::Cache::builder()
            .max_capacity(parts.memory_cache_bytes)
            .weigher(|_k: &[u8; 32], v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .build();
        let runs = Runs::new(&parts.boot);
        let offered = (0..parts.boot.blob_count())
            .map(|_| tokio::sync::OnceCell::new())
            .collect();
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
            runs,
            memory_cache_bytes: parts.memory_cache_bytes,
            pending_writes: Arc::new(AtomicU64::new(0)),
            offered,
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

    /// Fetches, decompresses and verifies `chunks` (and, for span chunks, the other chunks of
    /// their runs, which go to the cache); every verified chunk is cached. Bytes that fail
    /// verification are reported to their source and fetched again from the origin; failing
    /// again is [`ReadError::Corrupt`].
    fn fetch(
        &self,
        chunks: &[ChunkView],
        deadline: Instant,
    ) -> Result<HashMap<[u8; 32], Bytes>, ReadError> {
        let mut done = HashMap::new();
        if chunks.is_empty() {
            return Ok(done);
        }
        if let Some(c) = chunks
            .iter()
            .find(|c| !is_span(c) && c.stored_size > MAX_STORED)
        {
            return Err(self.corrupt(
                c,
                format!("stored size {} is over the limit", c.stored_size),
            ));
        }
        let wanted: HashSet<[u8; 32]> = chunks.iter().map(|c| c.hash).collect();
        let mut parts = plan::parts(&self.boot, &self.runs, chunks, |w| !self.in_cache(w))
            .map_err(|e| self.corrupt(&e.chunk, e.reason.to_string()))?;
        // One flight per span run: readers of different chunks of one span (kernel readahead)
        // fetch and inflate it once; the others find their chunks in memory afterwards.
        let mut keys: Vec<[u8; 32]> = parts
            .iter()
            .filter_map(|p| match &p.kind {
                PartKind::Span(s) => Some(run_key(s.index)),
                PartKind::Plain(_) => None,
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut guards = Vec::with_capacity(keys.len());
        for k in keys {
            match self.inflight.take(k, deadline) {
                Some(g) => guards.push(g),
                None => {
                    return Err(ReadError::Timeout {
                        blob: self.blob_name(chunks[0].blob),
                        secs: self.timeout.as_secs(),
                    })
                }
            }
        }
        parts.retain(|p| match &p.kind {
            PartKind::Span(s) => !self.loaded_meanwhile(s, &wanted, &mut done),
            PartKind::Plain(_) => true,
        });
        // A window no remaining span needs (and nobody asked for) is not fetched.
        let needed: HashSet<u32> = parts
            .iter()
            .filter_map(|p| match &p.kind {
                PartKind::Span(s) => s.window.map(|w| w.index),
                PartKind::Plain(_) => None,
            })
            .collect();
        parts.retain(|p| match &p.kind {
            PartKind::Plain(c) => wanted.contains(&c.hash) || needed.contains(&c.index),
            PartKind::Span(_) => true,
        });
        let started = Instant::now();
        let (streamed, small): (Vec<Part>, Vec<Part>) =
            parts.into_iter().partition(|p| p.len() > self.max_request);
        let requests = plan::requests(small, self.max_gap, self.max_request);
        let results = self.run_until(deadline, &requests, |r| {
            self.fetch_range(r.blob, r.start, r.end, true)
        })?;
        let mut fetched = Vec::with_capacity(requests.len());
        for (r, res) in requests.iter().zip(results) {
            fetched.push((r, res?));
        }
        let mut windows: HashMap<u32, Bytes> = HashMap::new();
        let mut bad: Vec<Part> = Vec::new();
        // Raw and zstd chunks first: the windows the spans start from are among them.
        for (r, (bytes, src)) in &fetched {
            for p in &r.parts {
                let PartKind::Plain(c) = &p.kind else {
                    continue;
                };
                match decode_chunk(c, slice(bytes, r, p)) {
                    Ok(data) => {
                        self.keep(c, &data);
                        windows.insert(c.index, data.clone());
                        done.insert(c.hash, data);
                    }
                    Err(reason) => {
                        self.bad_bytes(src, p, &reason, "dropped, refetching from the origin");
                        bad.push(p.clone());
                    }
                }
            }
        }
        for (r, (bytes, src)) in &fetched {
            for p in &r.parts {
                let PartKind::Span(s) = &p.kind else { continue };
                if let Err(reason) =
                    self.decode_span(p, s, slice(bytes, r, p), &wanted, &windows, &mut done)
                {
                    self.bad_bytes(src, p, &reason, "dropped, refetching from the origin");
                    bad.push(p.clone());
                }
            }
        }
        for p in &streamed {
            if let Err((reason, src)) = self.stream_part(p, true, &wanted, &windows, &mut done)? {
                self.bad_bytes(&src, p, &reason, "dropped, refetching from the origin");
                bad.push(p.clone());
            }
        }
        if !bad.is_empty() {
            self.refetch(bad, deadline, &wanted, &mut windows, &mut done)?;
        }
        drop(guards);
        self.metrics
            .fetch_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(done)
    }

    /// The parts whose bytes failed verification, fetched again straight from the origin (the
    /// windows first); a second failure is [`ReadError::Corrupt`].
    fn refetch(
        &self,
        bad: Vec<Part>,
        deadline: Instant,
        wanted: &HashSet<[u8; 32]>,
        windows: &mut HashMap<u32, Bytes>,
        done: &mut HashMap<[u8; 32], Bytes>,
    ) -> Result<(), ReadError> {
        let (plain, spans): (Vec<Part>, Vec<Part>) = bad
            .into_iter()
            .partition(|p| matches!(p.kind, PartKind::Plain(_)));
        let requests: Vec<Request> = plain
            .into_iter()
            .map(|p| Request {
                blob: p.blob,
                start: p.start,
                end: p.end,
                parts: vec![p],
            })
            .collect();
        let results = self.run_until(deadline, &requests, |r| {
            self.fetch_range(r.blob, r.start, r.end, false)
        })?;
        for (r, res) in requests.iter().zip(results) {
            let (bytes, src) = res?;
            let Some(p) = r.parts.first() else { continue };
            let PartKind::Plain(c) = &p.kind else {
                continue;
            };
            match decode_chunk(c, &bytes) {
                Ok(data) => {
                    self.keep(c, &data);
                    windows.insert(c.index, data.clone());
                    done.insert(c.hash, data);
                }
                Err(reason) => {
                    self.bad_bytes(&src, p, &reason, "read fails with EIO");
                    return Err(self.corrupt(c, reason));
                }
            }
        }
        for p in &spans {
            let PartKind::Span(s) = &p.kind else { continue };
            // A window that could not be had from the cache or the first source: the origin's.
            if let Some(w) = s.window.filter(|w| self.window(w, windows).is_none()) {
                let (bytes, src) = self.fetch_one(w.blob, p_range(&w), false, deadline)?;
                match decode_chunk(&w, &bytes) {
                    Ok(data) => {
                        self.keep(&w, &data);
                        windows.insert(w.index, data);
                    }
                    Err(reason) => {
                        self.bad_bytes(&src, &Part::plain(w), &reason, "read fails with EIO");
                        return Err(self.corrupt(&w, reason));
                    }
                }
            }
            let failed = if p.len() > self.max_request {
                self.stream_part(p, false, wanted, windows, done)?
            } else {
                let (bytes, src) = self.fetch_one(p.blob, p.start..p.end, false, deadline)?;
                self.decode_span(p, s, &bytes[..], wanted, windows, done)
                    .map_err(|reason| (reason, src))
            };
            if let Err((reason, src)) = failed {
                self.bad_bytes(&src, p, &reason, "read fails with EIO");
                let c = s.run.first().copied().unwrap_or(ChunkView {
                    index: 0,
                    hash: [0; 32],
                    blob: p.blob,
                    offset: p.start,
                    stored_size: 0,
                    size: 0,
                    encoding: ChunkEncoding::Raw,
                });
                return Err(self.corrupt(&c, reason));
            }
        }
        Ok(())
    }

    /// After waiting for a span's flight: true when another reader loaded the wanted chunks of
    /// `s` meanwhile (they are put into `done`).
    fn loaded_meanwhile(
        &self,
        s: &SpanPart,
        wanted: &HashSet<[u8; 32]>,
        done: &mut HashMap<[u8; 32], Bytes>,
    ) -> bool {
        let mut found = Vec::new();
        for c in s.run.iter().filter(|c| wanted.contains(&c.hash)) {
            match self.cached(c) {
                Some(b) => found.push((c.hash, b)),
                None => return false,
            }
        }
        done.extend(found);
        true
    }

    /// A deflate window's verified bytes: fetched in this load, or from the caches.
    fn window(&self, w: &ChunkView, windows: &HashMap<u32, Bytes>) -> Option<Bytes> {
        windows.get(&w.index).cloned().or_else(|| self.cached(w))
    }

    /// Decodes span run `s` (part `p`) from `stored`: the wanted chunks go into `done`, the
    /// run's other chunks into the caches. `Err`: why a wanted chunk failed.
    fn decode_span(
        &self,
        p: &Part,
        s: &SpanPart,
        stored: impl Read,
        wanted: &HashSet<[u8; 32]>,
        windows: &HashMap<u32, Bytes>,
        done: &mut HashMap<[u8; 32], Bytes>,
    ) -> Result<(), String> {
        let window = match &s.window {
            Some(w) => Some(
                self.window(w, windows)
                    .ok_or("the checkpoint's window could not be loaded")?,
            ),
            None => None,
        };
        let total: u64 = s.run.iter().map(|c| u64::from(c.size)).sum();
        let in_memory = total <= self.memory_cache_bytes / 4;
        let mut failed: Option<String> = None;
        decode_span_run(s, window.as_deref(), stored, |c, r| match r {
            Ok(data) if wanted.contains(&c.hash) => {
                self.keep(c, &data);
                done.insert(c.hash, data);
            }
            Ok(data) => self.keep_other(c, data, in_memory),
            Err(e) => {
                if wanted.contains(&c.hash) && failed.is_none() {
                    failed = Some(e);
                }
            }
        });
        match failed {
            Some(e) => Err(e),
            None => {
                self.metrics.span_fetched(p.blob, p.start, p.end);
                Ok(())
            }
        }
    }

    /// Reads span part `p` (longer than one request) as a stream of requests in order, decoding
    /// as the bytes arrive; each request has its own deadline. `Ok(Err(..))`: the bytes failed
    /// verification (and from which source); `Err`: they could not be fetched.
    #[allow(clippy::type_complexity)]
    fn stream_part(
        &self,
        p: &Part,
        via_peer: bool,
        wanted: &HashSet<[u8; 32]>,
        windows: &HashMap<u32, Bytes>,
        done: &mut HashMap<[u8; 32], Bytes>,
    ) -> Result<Result<(), (String, Arc<dyn ChunkSource>)>, ReadError> {
        let PartKind::Span(s) = &p.kind else {
            return Ok(Ok(()));
        };
        tracing::info!(blob = %self.blob_name(p.blob), start = p.start, bytes = p.len(),
            "reading a span run larger than one request as a stream (a whole layer?)");
        let mut stream = Streamed {
            reader: self,
            blob: p.blob,
            pos: p.start,
            end: p.end,
            via_peer,
            buf: Bytes::new(),
            src: None,
            failed: None,
        };
        let decoded = self.decode_span(p, s, &mut stream, wanted, windows, done);
        if let Some(e) = stream.failed.take() {
            return Err(e);
        }
        let src = stream.src.unwrap_or_else(|| Arc::clone(&self.origin));
        Ok(decoded.map_err(|reason| (reason, src)))
    }

    /// Bytes `range` of blob `blob` from one source, by `deadline`.
    fn fetch_one(
        &self,
        blob: u32,
        range: Range<u64>,
        via_peer: bool,
        deadline: Instant,
    ) -> Fetched {
        let until = tokio::time::Instant::from_std(deadline);
        let fetch = self.fetch_range(blob, range.start, range.end, via_peer);
        self.rt
            .block_on(async { tokio::time::timeout_at(until, fetch).await })
            .map_err(|_| FetchError {
                source_name: "read".into(),
                blob: self.blob_name(blob),
                start: range.start,
                end: range.end,
                reason: format!("did not arrive within {} s", self.timeout.as_secs()),
                refused: false,
            })?
    }

    /// Counts, logs and reports bytes of `p` that failed verification.
    fn bad_bytes(&self, src: &Arc<dyn ChunkSource>, p: &Part, reason: &str, then: &str) {
        self.metrics.verify_failed(src.kind().label());
        if let Some(d) = self.blobs.get(p.blob as usize) {
            src.report_bad(d, p.start, p.end);
        }
        tracing::warn!(blob = %self.blob_name(p.blob), start = p.start, end = p.end,
            source = %src.describe(), %reason, "fetched bytes failed verification; {then}");
    }

    fn corrupt(&self, c: &ChunkView, reason: String) -> ReadError {
        ReadError::Corrupt {
            chunk: hex::encode(c.hash),
            blob: self.blob_name(c.blob),
            reason,
        }
    }

    fn keep(&self, c: &ChunkView, data: &Bytes) {
        if !is_span(c) {
            // Span bytes are counted by range (one span holds many chunks).
            self.metrics
                .chunk_fetched(c.index, u64::from(c.stored_size));
        }
        self.mem.insert(c.hash, data.clone());
        self.write_behind(c, data.clone());
    }

    /// Caches a chunk decoded on the way to the wanted ones (a span run's others): in memory
    /// when the run fits, on disk always; written on this thread when too much waits already.
    fn keep_other(&self, c: &ChunkView, data: Bytes, in_memory: bool) {
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

    /// Writes a verified chunk to the disk cache off the reply path (its fsync).
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

    /// Runs one fetch per request concurrently on the runtime, all bounded by `deadline`.
    fn run_until<'a, F, Fut>(
        &'a self,
        deadline: Instant,
        requests: &'a [Request],
        f: F,
    ) -> Result<Vec<Fetched>, ReadError>
    where
        F: Fn(&'a Request) -> Fut,
        Fut: std::future::Future<Output = Fetched> + 'a,
    {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let all = futures::future::join_all(requests.iter().map(f));
        let until = tokio::time::Instant::from_std(deadline);
        self.rt
            .block_on(async { tokio::time::timeout_at(until, all).await })
            .map_err(|_| {
                let blob = requests.first().map_or(0, |r| r.blob);
                tracing::warn!(blob = %self.blob_name(blob), secs = self.timeout.as_secs(), "read timed out waiting for chunks");
                ReadError::Timeout {
                    blob: self.blob_name(blob),
                    secs: self.timeout.as_secs(),
                }
            })
    }

    /// Gives the peer blob `blob`'s piece table from the bootstrap (once per blob, before its
    /// first range): a peer that knows it fetches only the pieces a range covers, each checked,
    /// where it would otherwise import the whole blob before serving any of it (a plain layer
    /// nobody has yet). A peer that cannot take it serves the range anyway.
    async fn offer_pieces(&self, peer: &Arc<dyn ChunkSource>, blob: u32, digest: &Digest) {
        let Some(b) = self.boot.blob(blob) else {
            return;
        };
        if let Err(e) = peer.offer_pieces(digest, b.piece_size, b.pieces).await {
            tracing::info!(error = %e, "the peer did not take the blob's piece table; it fetches the blob its own way");
        }
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
            if let Some(once) = self.offered.get(blob as usize) {
                once.get_or_init(|| self.offer_pieces(peer, blob, digest))
                    .await;
            }
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

/// True for a span chunk (decoded from a checkpoint of a compressed layer).
fn is_span(c: &ChunkView) -> bool {
    matches!(c.encoding, ChunkEncoding::Span { .. })
}

/// The flight key of checkpoint `index`'s run (never a chunk's BLAKE3 in practice: it hashes a
/// tag that no chunk content is).
fn run_key(index: u32) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"shoal-fs span run\0");
    h.update(&index.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Part `p`'s bytes within request `r`'s.
fn slice<'b>(bytes: &'b Bytes, r: &Request, p: &Part) -> &'b [u8] {
    let from = (p.start - r.start) as usize;
    let to = (p.end - r.start) as usize;
    bytes.get(from..to).unwrap_or_default()
}

/// The stored range of a raw or zstd chunk.
fn p_range(c: &ChunkView) -> Range<u64> {
    c.offset..c.offset + u64::from(c.stored_size)
}

/// A span part longer than one request, read as consecutive requests (each from the peer,
/// else the origin, with its own deadline) while it is decoded.
struct Streamed<'r> {
    reader: &'r Reader,
    blob: u32,
    pos: u64,
    end: u64,
    via_peer: bool,
    buf: Bytes,
    /// The source of the last request.
    src: Option<Arc<dyn ChunkSource>>,
    /// Why a request failed (the decoder then sees the stream end with an error).
    failed: Option<ReadError>,
}

impl Read for Streamed<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() && self.pos < self.end {
            let to = self.end.min(self.pos + self.reader.max_request);
            let deadline = Instant::now() + self.reader.timeout;
            match self
                .reader
                .fetch_one(self.blob, self.pos..to, self.via_peer, deadline)
            {
                Ok((b, src)) => {
                    self.buf = b;
                    self.pos = to;
                    self.src = Some(src);
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.failed = Some(ReadError::Fetch(e));
                    return Err(std::io::Error::other(msg));
                }
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}
