//! The load figures a heartbeat carries: bytes per second uploaded and downloaded over the last
//! interval, from the upload and download byte counters. The scheduler weighs a parent's spare
//! uplink with them (scheduler/src/host.rs, `spare_uplink`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::download::DownloadStats;
use crate::upload::UploadStats;

/// Rates are measured over at least this long; a heartbeat sooner (several schedulers) gets the
/// last figures again.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// Upload and download rates of the whole peer.
pub(crate) struct LoadMeter {
    upload: Arc<UploadStats>,
    download: Arc<DownloadStats>,
    last: Mutex<Sample>,
}

/// The counters at the start of the current window, and the rates of the last one.
struct Sample {
    at: Instant,
    uploaded: u64,
    downloaded: u64,
    rates: (u64, u64),
}

impl LoadMeter {
    pub fn new(upload: Arc<UploadStats>, download: Arc<DownloadStats>) -> Self {
        let meter = LoadMeter {
            upload,
            download,
            last: Mutex::new(Sample {
                at: Instant::now(),
                uploaded: 0,
                downloaded: 0,
                rates: (0, 0),
            }),
        };
        let (up, down) = meter.counters();
        if let Ok(mut s) = meter.last.lock() {
            (s.uploaded, s.downloaded) = (up, down);
        }
        meter
    }

    fn counters(&self) -> (u64, u64) {
        let up = self.upload.bytes.load(Relaxed);
        let down = self.download.bytes_from_peers.load(Relaxed)
            + self.download.bytes_from_origin.load(Relaxed);
        (up, down)
    }

    /// (upload, download) bytes per second since the previous call (at least [`MIN_WINDOW`]).
    pub fn rates(&self) -> (u64, u64) {
        let (up, down) = self.counters();
        let mut s = crate::sync::lock(&self.last);
        let elapsed = s.at.elapsed();
        if elapsed >= MIN_WINDOW {
            let per_sec = |now: u64, then: u64| {
                (now.saturating_sub(then) as f64 / elapsed.as_secs_f64()) as u64
            };
            s.rates = (per_sec(up, s.uploaded), per_sec(down, s.downloaded));
            (s.at, s.uploaded, s.downloaded) = (Instant::now(), up, down);
        }
        s.rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_the_window_since_the_last_heartbeat() {
        let (up, down) = (
            Arc::new(UploadStats::default()),
            Arc::<DownloadStats>::default(),
        );
        let meter = LoadMeter::new(Arc::clone(&up), Arc::clone(&down));
        up.bytes.fetch_add(5 << 20, Relaxed);
        down.bytes_from_peers.fetch_add(3 << 20, Relaxed);
        down.bytes_from_origin.fetch_add(1 << 20, Relaxed);
        // Too soon: the last figures (none yet).
        assert_eq!(meter.rates(), (0, 0));
        if let Ok(mut s) = meter.last.lock() {
            s.at -= Duration::from_secs(2);
        }
        let (u, d) = meter.rates();
        assert!((2 << 20..=(5 << 19) + 1).contains(&u), "{u}");
        assert!((1 << 20..=(2 << 20) + 1).contains(&d), "{d}");
        // Nothing moved since: the next window says so.
        if let Ok(mut s) = meter.last.lock() {
            s.at -= Duration::from_secs(2);
        }
        assert_eq!(meter.rates(), (0, 0));
    }
}
