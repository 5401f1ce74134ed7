//! What the snapshotter counts (prefix `shoal_snapshotter_`): its gRPC calls by operation and
//! outcome, their latency, and per lazily mounted image the bytes read, the bytes fetched by
//! source and the share of the image fetched — the answer to "is lazy loading working here?".
//! Per-image figures come from each mount's `stats.json` at scrape time, so they survive a
//! snapshotter restart.

use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::images::read_stats;

type Labels = Vec<(&'static str, String)>;

/// The snapshotter's counters.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    seconds: Family<Labels, Histogram, fn() -> Histogram>,
    images_dir: PathBuf,
}

impl Metrics {
    /// Counters for a snapshotter whose lazy images live in `images_dir`.
    pub fn new(images_dir: PathBuf) -> Self {
        Metrics {
            requests: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 18))
            }),
            images_dir,
        }
    }

    /// Counts one call of `op` that ended with `outcome` after `took`.
    pub fn observe(&self, op: &'static str, outcome: &'static str, took: Duration) {
        self.requests
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        self.seconds
            .get_or_create(&vec![("op", op.to_string())])
            .observe(took.as_secs_f64());
    }

    /// Adds every metric to `registry` (give it the `shoal_snapshotter` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "snapshots API calls by operation and outcome",
            self.requests.clone(),
        );
        registry.register(
            "request_seconds",
            "snapshots API call latency by operation",
            self.seconds.clone(),
        );
        registry.register_collector(Box::new(ImageCollector {
            dir: self.images_dir.clone(),
        }));
    }
}

/// Reads the per-image figures at scrape time.
#[derive(Debug)]
struct ImageCollector {
    dir: PathBuf,
}

impl Collector for ImageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read: Family<Labels, Counter> = Family::default();
        let fetched: Family<Labels, Counter> = Family::default();
        let ratio: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
        let images: Gauge = Gauge::default();
        // The layers of an image mounted through its Shoal index count as that image.
        let mut by_image: std::collections::BTreeMap<String, crate::MetricsSnapshot> =
            Default::default();
        for (info, s) in read_stats(&self.dir) {
            by_image.entry(info.reference).or_default().merge(&s);
        }
        for (reference, s) in by_image {
            images.inc();
            let image = || vec![("image", reference.clone())];
            read.get_or_create(&image()).inc_by(s.read_bytes);
            for (source, n) in [("peer", s.fetched_peer), ("origin", s.fetched_origin)] {
                let mut l = image();
                l.push(("source", source.to_string()));
                fetched.get_or_create(&l).inc_by(n);
            }
            ratio.get_or_create(&image()).set(s.image_fetched_ratio);
        }
        let m = encoder.encode_descriptor(
            "lazy_images",
            "Images mounted lazily for containers",
            None,
            images.metric_type(),
        )?;
        images.encode(m)?;
        let m = encoder.encode_descriptor(
            "image_read_bytes",
            "Bytes containers read from each lazily mounted image",
            None,
            read.metric_type(),
        )?;
        read.encode(m)?;
        let m = encoder.encode_descriptor(
            "image_fetched_bytes",
            "Stored bytes each lazily mounted image fetched, by source",
            None,
            fetched.metric_type(),
        )?;
        fetched.encode(m)?;
        let m = encoder.encode_descriptor(
            "image_fetched_ratio",
            "Share of each lazily mounted image's stored bytes fetched so far",
            None,
            ratio.metric_type(),
        )?;
        ratio.encode(m)
    }
}
