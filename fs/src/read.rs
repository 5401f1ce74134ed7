//! The read path: file offset -> chunks -> memory/disk cache (verified, cache.rs) -> else one
//! flight per missing chunk, and load.rs fetches byte ranges of the blobs that hold them (from
//! the peer, else the origin) -> decompress -> BLAKE3 == chunk name -> cache -> reply.
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
use shoal_store::Store;

use crate::cache::ChunkCache;
pub use crate::error::ReadError;
use crate::fetch::ChunkSource;
use crate::flight::Flights;
use crate::load::{Loader, LoaderParts};
use crate::metrics::Metrics;

/// How long a chunk whose fetch just timed out fails at once (capped by the fetch timeout): the
/// kernel retries a failed 1 MiB readahead with a 4 KiB read of the same page, which must not
/// wait a second full timeout on a hung origin.
const RECENT_TIMEOUT_HOLD: Duration = Duration::from_secs(5);

/// A read of at most 1/this of a chunk that memory does not hold reads only its covering
/// groups from the disk cache; a larger one loads the whole chunk.
const PART_MAX_DIVISOR: u64 = 8;

/// Most chunks remembered as recently timed out (a bound on the map, not a tuning knob).
const RECENT_TIMEOUT_MAX: usize = 4096;

/// Serves file bytes from the cache and the sources, verifying every chunk.
pub struct Reader {
    pub(crate) boot: Arc<Bootstrap>,
    cache: Arc<ChunkCache>,
    loader: Loader,
    /// One flight per chunk being loaded.
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

impl Reader {
    /// A reader over `parts`.
    pub fn new(parts: ReaderParts) -> Result<Self, crate::FsError> {
        let cache = Arc::new(ChunkCache::new(
            parts.store,
            parts.memory_cache_bytes,
            parts.rt.clone(),
            Arc::clone(&parts.metrics),
        ));
        let loader = Loader::new(LoaderParts {
            boot: Arc::clone(&parts.boot),
            cache: Arc::clone(&cache),
            peer: parts.peer,
            origin: parts.origin,
            rt: parts.rt,
            timeout: parts.timeout,
            max_request: parts.max_request,
            max_gap: parts.max_gap,
            metrics: Arc::clone(&parts.metrics),
        })?;
        Ok(Reader {
            boot: parts.boot,
            cache,
            loader,
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
            .load(&whole, Instant::now() + self.loader.timeout)?
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
            .filter(|c| !self.cache.in_memory(c) && !self.inflight.busy(&c.hash))
            .copied()
            .collect();
        if todo.is_empty() {
            return;
        }
        self.cache.will_need(&todo);
        if let Err(e) = self.load(&todo, Instant::now() + self.loader.timeout) {
            tracing::debug!(error = %e, "fetch-ahead failed; the chunks are fetched when read");
        }
    }

    /// True when the chunk is in memory.
    pub(crate) fn in_memory(&self, c: &ChunkView) -> bool {
        self.cache.in_memory(c)
    }

    /// True when the chunk is in memory or in the disk cache.
    pub(crate) fn in_cache(&self, c: &ChunkView) -> bool {
        self.cache.in_cache(c)
    }

    /// Makes sure `chunks` are cached (prefetch), fetching what is missing.
    pub fn warm(&self, chunks: &[ChunkView]) -> Result<(), ReadError> {
        self.load(chunks, Instant::now() + self.loader.timeout)
            .map(|_| ())
    }

    /// Bytes `want` of chunk `c` when that is not the whole chunk: a slice of it in memory, else
    /// (for a small part) its covering groups from the disk cache, checked against its group
    /// hashes. `None` sends the read down the whole-chunk path (which waits for a load already
    /// running, fetches what no cache holds, and refetches a chunk the disk cache just dropped
    /// as corrupt).
    fn part(&self, c: &ChunkView, want: Range<u64>) -> Option<Bytes> {
        if want.start == 0 && want.end >= u64::from(c.size) {
            return None;
        }
        if let Some(b) = self.cache.memory(&c.hash) {
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
        let got = self.cache.disk_part(c, want)?;
        self.metrics.cache_hits.inc();
        Some(got)
    }

    /// The verified bytes of every chunk in `chunks`, in order.
    fn load(&self, chunks: &[ChunkView], deadline: Instant) -> Result<Vec<Bytes>, ReadError> {
        // Memory first; the disk cache only under the chunk's single-flight lock below, so
        // concurrent readers of one chunk (kernel readahead) read and verify it from disk once.
        let mut out: Vec<Option<Bytes>> =
            chunks.iter().map(|c| self.cache.memory(&c.hash)).collect();
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
                        blob: self.loader.blob_name(c.blob),
                        secs: self.loader.timeout.as_secs(),
                    })
                }
            }
        }
        // In memory by now (another reader held the flight), or on disk (verified)?
        let mut ready = HashMap::new();
        let mut still = Vec::new();
        for c in &missing {
            match self.cache.cached(c) {
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
            tracing::info!(chunk = %hex::encode(c.hash), blob = %self.loader.blob_name(c.blob),
                "chunk fetch timed out moments ago; failing this read at once");
            return Err(ReadError::Timeout {
                blob: self.loader.blob_name(c.blob),
                secs: self.loader.timeout.as_secs(),
            });
        }
        let fetched = self.loader.fetch(&still, deadline);
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
                    blob: self.loader.blob_name(c.blob),
                    secs: self.loader.timeout.as_secs(),
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
        let until = now + self.loader.timeout.min(RECENT_TIMEOUT_HOLD);
        let mut map = self.timed_out.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, u| *u > now);
        if map.len() + chunks.len() > RECENT_TIMEOUT_MAX {
            map.clear();
        }
        for c in chunks.iter().take(RECENT_TIMEOUT_MAX) {
            map.insert(c.hash, until);
        }
    }
}
