//! Loading the chunks no cache holds: the requests plan.rs makes of them, fetched through the
//! sources (the local peer, handed each blob's piece table first, else the origin), decoded and
//! checked against their BLAKE3 (verify.rs), and cached. Bytes that fail are reported to their
//! source and fetched once more from the origin; failing again is an error, never wrong bytes.
//! Span runs (indexed layers) are decoded whole, one flight per run; one longer than a request
//! is read as a stream of requests while it is decoded.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_format::bootstrap::{Bootstrap, ChunkView};
use shoal_format::model::ChunkEncoding;
use shoal_types::Digest;

use crate::cache::ChunkCache;
use crate::error::ReadError;
use crate::fetch::{ChunkSource, FetchError};
use crate::flight::Flights;
use crate::metrics::Metrics;
use crate::plan::{self, Part, PartKind, Request, Runs, SpanPart};
use crate::verify::{decode_chunk, decode_span_run};

/// Largest stored form of a raw or zstd chunk we accept (chunks are at most 16 MiB
/// uncompressed; a span's stored form is read as a stream instead).
const MAX_STORED: u32 = 32 << 20;

/// What one request to a source returned, and from which source.
type Fetched = Result<(Bytes, Arc<dyn ChunkSource>), FetchError>;

/// Fetches, decodes and verifies chunks for a [`crate::read::Reader`].
pub(crate) struct Loader {
    boot: Arc<Bootstrap>,
    cache: Arc<ChunkCache>,
    peer: Option<Arc<dyn ChunkSource>>,
    origin: Arc<dyn ChunkSource>,
    blobs: Vec<Digest>,
    rt: tokio::runtime::Handle,
    pub(crate) timeout: Duration,
    max_request: u64,
    max_gap: u64,
    /// Span runs by checkpoint (indexed layers).
    runs: Runs,
    /// One flight per span run being loaded.
    run_flights: Flights,
    /// Per blob: its piece table was offered to the peer (before its first range from there).
    offered: Vec<tokio::sync::OnceCell<()>>,
    metrics: Arc<Metrics>,
}

/// What a [`Loader`] reads from and how.
pub(crate) struct LoaderParts {
    pub boot: Arc<Bootstrap>,
    pub cache: Arc<ChunkCache>,
    pub peer: Option<Arc<dyn ChunkSource>>,
    pub origin: Arc<dyn ChunkSource>,
    pub rt: tokio::runtime::Handle,
    pub timeout: Duration,
    pub max_request: u64,
    pub max_gap: u64,
    pub metrics: Arc<Metrics>,
}

impl Loader {
    /// A loader over `parts`.
    pub(crate) fn new(parts: LoaderParts) -> Result<Self, crate::FsError> {
        let blobs: Vec<Digest> = parts
            .boot
            .blobs()
            .map(|b| Digest::from_bytes(b.digest))
            .collect();
        let runs = Runs::new(&parts.boot);
        let offered = (0..parts.boot.blob_count())
            .map(|_| tokio::sync::OnceCell::new())
            .collect();
        Ok(Loader {
            boot: parts.boot,
            cache: parts.cache,
            peer: parts.peer,
            origin: parts.origin,
            blobs,
            rt: parts.rt,
            timeout: parts.timeout,
            max_request: parts.max_request,
            max_gap: parts.max_gap,
            runs,
            run_flights: Flights::default(),
            offered,
            metrics: parts.metrics,
        })
    }

    /// `sha256:<hex>` of blob `blob`, for messages.
    pub(crate) fn blob_name(&self, blob: u32) -> String {
        self.blobs
            .get(blob as usize)
            .map_or_else(|| format!("#{blob}"), |d| d.to_string())
    }

    /// Fetches, decompresses and verifies `chunks` (and, for span chunks, the other chunks of
    /// their runs, which go to the cache); every verified chunk is cached. Bytes that fail
    /// verification are reported to their source and fetched again from the origin; failing
    /// again is [`ReadError::Corrupt`].
    pub(crate) fn fetch(
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
        let mut parts = plan::parts(&self.boot, &self.runs, chunks, |w| !self.cache.in_cache(w))
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
            match self.run_flights.take(k, deadline) {
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
            match self.cache.cached(c) {
                Some(b) => found.push((c.hash, b)),
                None => return false,
            }
        }
        done.extend(found);
        true
    }

    /// A deflate window's verified bytes: fetched in this load, or from the caches.
    fn window(&self, w: &ChunkView, windows: &HashMap<u32, Bytes>) -> Option<Bytes> {
        windows
            .get(&w.index)
            .cloned()
            .or_else(|| self.cache.cached(w))
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
        let in_memory = self.cache.fits_in_memory(total);
        let mut failed: Option<String> = None;
        decode_span_run(s, window.as_deref(), stored, |c, r| match r {
            Ok(data) if wanted.contains(&c.hash) => {
                self.keep(c, &data);
                done.insert(c.hash, data);
            }
            Ok(data) => self.cache.keep_other(c, data, in_memory),
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

    /// Caches a verified chunk someone asked for, counted for the image's fetched share.
    fn keep(&self, c: &ChunkView, data: &Bytes) {
        if !is_span(c) {
            // Span bytes are counted by range (one span holds many chunks).
            self.metrics
                .chunk_fetched(c.index, u64::from(c.stored_size));
        }
        self.cache.keep(c, data);
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
    reader: &'r Loader,
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
