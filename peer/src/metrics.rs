//! The peer's Prometheus metrics, read at scrape time from the counters the peer keeps anyway
//! (downloads, uploads, store) plus the piece fetch latency histogram: bytes from peers vs the
//! origin (in all and per blob), proxy answers by status, origins refused by reason, piece
//! latency, cache usage and hit ratio, uploads, scheduler connection. `shoal peer` serves them on
//! `/metrics` (shoal-telemetry).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::Peer;

/// Time from asking a parent for a piece to the piece stored and verified, in seconds.
#[derive(Debug, Clone)]
pub struct PieceLatency(Histogram);

impl Default for PieceLatency {
    fn default() -> Self {
        // 1 ms .. ~32 s: a loopback piece to a stalled parent's timeout.
        PieceLatency(Histogram::new(exponential_buckets(0.001, 2.0, 16)))
    }
}

impl PieceLatency {
    /// Records one piece fetched from a parent.
    pub fn observe(&self, took: Duration) {
        self.0.observe(took.as_secs_f64());
    }
}

/// Registers the metrics of `peer` in `registry`; values are read at each scrape (a stopped
/// peer reports nothing).
pub fn register(registry: &mut Registry, peer: &Arc<Peer>) {
    registry.register(
        "shoal_peer_piece_fetch_seconds",
        "Time to fetch one piece from a parent, verified and stored",
        peer.downloader().stats().piece_latency.0.clone(),
    );
    if let Some(stats) = peer.proxy_stats() {
        registry.register(
            "shoal_proxy_requests",
            "Registry proxy answers, by route (blob, passthrough, invalid) and status class",
            stats.requests.clone(),
        );
        registry.register(
            "shoal_proxy_pinned_connections",
            "Upstream connections the registry proxy opened to pin to a client connection",
            stats.pinned_connections.clone(),
        );
    }
    registry.register_collector(Box::new(PeerCollector {
        peer: Arc::downgrade(peer),
    }));
}

#[derive(Debug)]
struct PeerCollector {
    peer: Weak<Peer>,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for PeerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(peer) = self.peer.upgrade() else {
            return Ok(());
        };
        let d = peer.downloader().stats();
        {
            let mut m = e.encode_descriptor(
                "shoal_peer_download_bytes",
                "Blob bytes received, by source (other peers or the origin)",
                None,
                MetricType::Counter,
            )?;
            for (source, v) in [
                ("peer", d.bytes_from_peers.load(Relaxed)),
                ("origin", d.bytes_from_origin.load(Relaxed)),
            ] {
                ConstCounter::new(v).encode(m.encode_family(&[("source", source)])?)?;
            }
        }
        {
            // Per blob, for the tasks this peer still knows (at most the downloader's task
            // table, so the series stay bounded).
            let mut m = e.encode_descriptor(
                "shoal_peer_task_bytes",
                "Bytes of one blob received, by source (other peers or the origin)",
                None,
                MetricType::Counter,
            )?;
            for t in peer.downloader().statuses() {
                for (source, v) in [
                    ("peer", t.bytes_from_peers),
                    ("origin", t.bytes_from_origin),
                ] {
                    if v > 0 {
                        let blob = t.blob.to_string();
                        let labels = [("blob", blob.as_str()), ("source", source)];
                        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }
        {
            let mut m = e.encode_descriptor(
                "shoal_peer_origin_refusals",
                "Requests refused by allowed_origins, by reason (not_allowed: an origin not listed; \
                 loopback, link_local: a request sent on to an unlisted such address)",
                None,
                MetricType::Counter,
            )?;
            for (reason, v) in peer.allowed_origins().refusals() {
                ConstCounter::new(v).encode(m.encode_family(&[("reason", reason.label())])?)?;
            }
        }
        counter(
            &mut e,
            "shoal_peer_parents_dropped",
            "Parents dropped for failing, stalling or sending bad bytes",
            d.parents_dropped.load(Relaxed),
        )?;
        counter(
            &mut e,
            "shoal_peer_corrupt_pieces",
            "Pieces from parents that failed BLAKE3 verification",
            d.corrupt_pieces.load(Relaxed),
        )?;
        let u = peer.upload_stats();
        counter(
            &mut e,
            "shoal_peer_upload_pieces",
            "Pieces served to other peers",
            u.pieces.load(Relaxed),
        )?;
        counter(
            &mut e,
            "shoal_peer_upload_bytes",
            "Piece bytes served to other peers",
            u.bytes.load(Relaxed),
        )?;
        counter(
            &mut e,
            "shoal_peer_upload_busy",
            "Piece requests answered busy (every upload slot in use, or piece memory full)",
            u.busy.load(Relaxed),
        )?;
        counter(
            &mut e,
            "shoal_peer_upload_resend_refused",
            "Piece requests a seed refused because it had just sent the piece to another peer",
            u.resend_refused.load(Relaxed),
        )?;
        let budget = peer.transport.budget();
        gauge(
            &mut e,
            "shoal_peer_piece_memory_bytes",
            "Piece bytes held in memory now (downloads, origin reads, uploads)",
            as_i64(budget.in_use()),
        )?;
        gauge(
            &mut e,
            "shoal_peer_piece_memory_budget_bytes",
            "The cap on piece bytes in memory (piece_memory_bytes)",
            as_i64(budget.bytes()),
        )?;
        counter(
            &mut e,
            "shoal_peer_connections_refused",
            "Peer connections refused (bad certificate or Hello)",
            u.refused.load(Relaxed),
        )?;
        counter(
            &mut e,
            "shoal_peer_api_connections",
            "Connections the local API accepted (clients keep theirs between requests)",
            peer.api_connections(),
        )?;
        let s = peer.store().stats();
        gauge(
            &mut e,
            "shoal_peer_cache_used_bytes",
            "Bytes the store uses",
            as_i64(s.used_bytes),
        )?;
        gauge(
            &mut e,
            "shoal_peer_cache_quota_bytes",
            "The store's high watermark",
            as_i64(s.high_watermark),
        )?;
        gauge(
            &mut e,
            "shoal_peer_cache_blobs",
            "Blobs in the store, partial or complete",
            as_i64(s.blobs),
        )?;
        gauge(
            &mut e,
            "shoal_peer_cache_complete_blobs",
            "Blobs in the store whose sha256 was verified",
            as_i64(s.complete_blobs),
        )?;
        gauge(
            &mut e,
            "shoal_peer_cache_pieces",
            "Pieces in the store",
            as_i64(s.pieces),
        )?;
        counter(
            &mut e,
            "shoal_peer_cache_hits",
            "Store reads answered from the store",
            s.hits,
        )?;
        counter(
            &mut e,
            "shoal_peer_cache_misses",
            "Store reads of things not in the store",
            s.misses,
        )?;
        counter(
            &mut e,
            "shoal_peer_cache_evictions",
            "Store entries evicted (LRU or TTL)",
            s.evictions,
        )?;
        counter(
            &mut e,
            "shoal_peer_cache_corruptions",
            "Stored items that failed verification and were dropped",
            s.corruptions,
        )?;
        let lookups = s.hits + s.misses;
        let ratio = if lookups == 0 {
            0.0
        } else {
            s.hits as f64 / lookups as f64
        };
        ConstGauge::new(ratio).encode(e.encode_descriptor(
            "shoal_peer_cache_hit_ratio",
            "Share of store reads answered from the store since start",
            None,
            MetricType::Gauge,
        )?)?;
        gauge(
            &mut e,
            "shoal_peer_tasks",
            "Downloads this peer knows (running or finished)",
            as_i64(peer.downloader().statuses().len() as u64),
        )?;
        gauge(
            &mut e,
            "shoal_peer_scheduler_connected",
            "1 while a scheduler connection is registered",
            i64::from(peer.scheduler_connected()),
        )?;
        Ok(())
    }
}
