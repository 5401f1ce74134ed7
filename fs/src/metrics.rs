//! What the filesystem counts (Prometheus, prometheus-client): bytes read, bytes fetched by source,
//! chunk fetch latency, cache hits and misses, verification failures, and how much of the image
//! has been fetched so far.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::fetch::SourceKind;

type Labels = Vec<(&'static str, String)>;

/// The counters of one mount.
pub struct Metrics {
    /// Bytes returned to readers.
    pub read_bytes: Counter,
    /// Stored bytes fetched, by source (`peer`, `origin`).
    pub fetched_bytes: Family<Labels, Counter>,
    /// Chunks read from the local cache (memory or disk).
    pub cache_hits: Counter,
    /// Chunks that had to be fetched.
    pub cache_misses: Counter,
    /// Chunks that failed verification, by source (`cache`, `peer`, `origin`).
    pub verify_failures: Family<Labels, Counter>,
    /// Reads that failed with EIO.
    pub read_errors: Counter,
    /// Seconds to fetch, decompress and verify one request's chunks.
    pub fetch_seconds: Histogram,
    /// Share of the image's stored bytes fetched so far, by image (root hash).
    pub image_fetched_ratio: Family<Labels, Gauge<f64, AtomicU64>>,
    image: String,
    fetched: Vec<AtomicBool>,
    fetched_stored: AtomicU64,
    total_stored: u64,
    /// Byte ranges of span blobs fetched so far (start -> end, disjoint), by blob: a span run
    /// covers many chunks and overlaps the next, so spans are counted by the bytes they cover.
    span_ranges: Mutex<BTreeMap<(u32, u64), u64>>,
}

/// Stored bytes of an image as [`Metrics`] counts them: every raw or zstd chunk once, and every
/// blob that span chunks are decoded from whole (an indexed layer's blob).
pub fn stored_bytes(boot: &shoal_format::bootstrap::Bootstrap) -> u64 {
    let mut span_blobs = HashSet::new();
    let mut total = 0u64;
    for c in (0..boot.chunk_count()).filter_map(|i| boot.chunk(i)) {
        match c.encoding {
            shoal_format::model::ChunkEncoding::Span { .. } => {
                span_blobs.insert(c.blob);
            }
            _ => total += u64::from(c.stored_size),
        }
    }
    total
        + span_blobs
            .into_iter()
            .filter_map(|b| boot.blob(b).map(|b| b.size))
            .sum::<u64>()
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Counters for an image named `image` with `chunks` unique chunks of `total_stored` bytes.
    pub fn new(image: String, chunks: usize, total_stored: u64) -> Self {
        Metrics {
            read_bytes: Counter::default(),
            fetched_bytes: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            verify_failures: Family::default(),
            read_errors: Counter::default(),
            fetch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            image_fetched_ratio: Family::default(),
            image,
            fetched: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            fetched_stored: AtomicU64::new(0),
            total_stored,
            span_ranges: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds every metric to `registry` (prefix them with `shoal_fs` through a sub-registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "read_bytes",
            "Bytes returned to readers",
            self.read_bytes.clone(),
        );
        registry.register(
            "fetched_bytes",
            "Stored bytes fetched, by source",
            self.fetched_bytes.clone(),
        );
        registry.register(
            "cache_hits",
            "Chunks served from the local cache",
            self.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Chunks that had to be fetched",
            self.cache_misses.clone(),
        );
        registry.register(
            "verify_failures",
            "Chunks that failed BLAKE3 verification, by source",
            self.verify_failures.clone(),
        );
        registry.register(
            "read_errors",
            "Reads answered with EIO",
            self.read_errors.clone(),
        );
        registry.register(
            "chunk_fetch_seconds",
            "Time to fetch, decompress and verify one request's chunks",
            self.fetch_seconds.clone(),
        );
        registry.register(
            "image_fetched_ratio",
            "Share of the image's stored bytes fetched so far",
            self.image_fetched_ratio.clone(),
        );
    }

    /// The metrics in the Prometheus text format, prefixed `shoal_fs_`.
    pub fn encode(&self) -> String {
        let mut registry = Registry::with_prefix("shoal_fs");
        self.register(&mut registry);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            tracing::warn!("encoding fs metrics failed");
        }
        out
    }

    pub(crate) fn fetched(&self, kind: SourceKind, bytes: u64) {
        self.fetched_bytes
            .get_or_create(&vec![("source", kind.label().to_string())])
            .inc_by(bytes);
    }

    pub(crate) fn verify_failed(&self, source: &str) {
        self.verify_failures
            .get_or_create(&vec![("source", source.to_string())])
            .inc();
    }

    /// Notes chunk `index` (of `stored` bytes) as fetched for the per-image ratio.
    pub(crate) fn chunk_fetched(&self, index: u32, stored: u64) {
        let first = self
            .fetched
            .get(index as usize)
            .is_some_and(|f| !f.swap(true, Ordering::Relaxed));
        if first {
            self.add_fetched(stored);
        }
    }

    /// Notes bytes `start..end` of span blob `blob` as fetched for the per-image ratio (each
    /// byte counted once however many span runs covered it).
    pub(crate) fn span_fetched(&self, blob: u32, start: u64, end: u64) {
        let added = {
            let mut map = self.span_ranges.lock().unwrap_or_else(|p| p.into_inner());
            add_range(&mut map, blob, start, end)
        };
        if added > 0 {
            self.add_fetched(added);
        }
    }

    fn add_fetched(&self, stored: u64) {
        let done = self.fetched_stored.fetch_add(stored, Ordering::Relaxed) + stored;
        let ratio = if self.total_stored == 0 {
            1.0
        } else {
            done as f64 / self.total_stored as f64
        };
        self.image_fetched_ratio
            .get_or_create(&vec![("image", self.image.clone())])
            .set(ratio);
    }

    /// Stored bytes of the whole image (every chunk once).
    pub fn image_stored_bytes(&self) -> u64 {
        self.total_stored
    }

    /// Figures for tests and `shoal fs` status lines.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let by = |k: SourceKind| {
            self.fetched_bytes
                .get_or_create(&vec![("source", k.label().to_string())])
                .get()
        };
        let hits = self.cache_hits.get();
        let misses = self.cache_misses.get();
        MetricsSnapshot {
            read_bytes: self.read_bytes.get(),
            fetched_peer: by(SourceKind::Peer),
            fetched_origin: by(SourceKind::Origin),
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            verify_failures: ["cache", "peer", "origin"]
                .iter()
                .map(|s| {
                    self.verify_failures
                        .get_or_create(&vec![("source", s.to_string())])
                        .get()
                })
                .sum(),
            read_errors: self.read_errors.get(),
            image_fetched_ratio: if self.total_stored == 0 {
                1.0
            } else {
                self.fetched_stored.load(Ordering::Relaxed) as f64 / self.total_stored as f64
            },
            image_stored_bytes: self.total_stored,
        }
    }
}

impl MetricsSnapshot {
    /// The figures of several filesystems of one mount (the layers of an indexed image) as one:
    /// counters added, ratios over the sums.
    pub fn sum(all: &[std::sync::Arc<Metrics>]) -> MetricsSnapshot {
        let mut out = MetricsSnapshot::default();
        for m in all {
            out.merge(&m.snapshot());
        }
        out
    }

    /// Adds `other`'s figures to these (counters added, ratios over the sums).
    pub fn merge(&mut self, other: &MetricsSnapshot) {
        let fetched_stored = self.image_fetched_ratio * self.image_stored_bytes as f64
            + other.image_fetched_ratio * other.image_stored_bytes as f64;
        self.read_bytes += other.read_bytes;
        self.fetched_peer += other.fetched_peer;
        self.fetched_origin += other.fetched_origin;
        self.cache_hits += other.cache_hits;
        self.cache_misses += other.cache_misses;
        self.verify_failures += other.verify_failures;
        self.read_errors += other.read_errors;
        self.image_stored_bytes += other.image_stored_bytes;
        let looked = self.cache_hits + self.cache_misses;
        self.cache_hit_ratio = if looked == 0 {
            0.0
        } else {
            self.cache_hits as f64 / looked as f64
        };
        self.image_fetched_ratio = if self.image_stored_bytes == 0 {
            1.0
        } else {
            fetched_stored / self.image_stored_bytes as f64
        };
    }
}

/// Adds `start..end` of `blob` to the disjoint ranges in `map`; returns how many bytes were new.
fn add_range(map: &mut BTreeMap<(u32, u64), u64>, blob: u32, start: u64, end: u64) -> u64 {
    if end <= start {
        return 0;
    }
    let (mut lo, mut hi) = (start, end);
    let mut covered = 0u64;
    // Every range of the blob that touches or overlaps start..end merges into it.
    let touching: Vec<(u64, u64)> = map
        .range((blob, 0)..(blob, end.saturating_add(1)))
        .filter(|(_, e)| **e >= start)
        .map(|((_, s), e)| (*s, *e))
        .collect();
    for (s, e) in touching {
        covered += e.min(end).saturating_sub(s.max(start));
        lo = lo.min(s);
        hi = hi.max(e);
        map.remove(&(blob, s));
    }
    map.insert((blob, lo), hi);
    (end - start) - covered
}

/// A copy of the main figures (also what a mount writes to its `stats_file`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MetricsSnapshot {
    /// Bytes returned to readers.
    pub read_bytes: u64,
    /// Stored bytes fetched from the peer.
    pub fetched_peer: u64,
    /// Stored bytes fetched from the origin.
    pub fetched_origin: u64,
    /// Chunks served from the cache.
    pub cache_hits: u64,
    /// Chunks fetched.
    pub cache_misses: u64,
    /// hits / (hits + misses).
    pub cache_hit_ratio: f64,
    /// Chunks that failed verification (any source).
    pub verify_failures: u64,
    /// Reads answered with EIO.
    pub read_errors: u64,
    /// Share of the image's stored bytes fetched.
    pub image_fetched_ratio: f64,
    /// Stored bytes of the whole image.
    pub image_stored_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_ranges_count_each_byte_once() {
        let mut m = BTreeMap::new();
        assert_eq!(add_range(&mut m, 0, 100, 200), 100);
        assert_eq!(add_range(&mut m, 0, 150, 250), 50);
        assert_eq!(add_range(&mut m, 0, 0, 50), 50);
        assert_eq!(add_range(&mut m, 0, 50, 100), 50);
        assert_eq!(add_range(&mut m, 0, 0, 250), 0);
        assert_eq!(add_range(&mut m, 1, 0, 250), 250);
        assert_eq!(m.len(), 2);
    }
}
