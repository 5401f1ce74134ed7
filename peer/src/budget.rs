//! The piece memory budget: one cap, for the whole peer, on the piece bytes held in memory at
//! once (pieces being received from parents, read from the origin, or read from the store to
//! upload). Without it memory grows with the number of concurrent downloads (docs/benchmarks.md,
//! "Peer memory").
//!
//! Downloads wait for room; uploads never wait: when the budget is full they answer "busy", so
//! two peers downloading from each other cannot end up each holding the whole budget while
//! waiting for the other's upload. Downloads may hold at most [`DOWNLOAD_SHARE`] of the budget,
//! so a peer busy downloading can still serve the pieces it holds to others.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The share of the budget downloads may hold together (half): the rest is always there for
/// uploads, so a peer busy downloading still passes pieces on (the swarm depends on it).
pub const DOWNLOAD_SHARE: (u64, u64) = (1, 2);

/// Smallest budget accepted: one piece of the largest size.
pub const MIN_BUDGET: u64 = shoal_proto::MAX_PIECE_SIZE as u64;

/// Piece bytes in memory at once, shared by downloads, origin reads and uploads.
#[derive(Debug, Clone)]
pub struct PieceBudget {
    /// Every piece buffer (download or upload) holds permits of this, one per byte.
    total: Arc<Semaphore>,
    /// Downloads hold permits of this as well, so they leave room for uploads.
    downloads: Arc<Semaphore>,
    total_bytes: u64,
    download_bytes: u64,
}

/// Room for one piece buffer; given back when dropped (after the buffer is freed).
#[derive(Debug)]
#[must_use = "the room is given back when the permit is dropped"]
pub struct BudgetPermit {
    _total: Option<OwnedSemaphorePermit>,
    _download: Option<OwnedSemaphorePermit>,
}

impl PieceBudget {
    /// A budget of `bytes` (raised to [`MIN_BUDGET`] so every piece fits).
    pub fn new(bytes: u64) -> Self {
        let total_bytes = bytes.clamp(MIN_BUDGET, Semaphore::MAX_PERMITS as u64);
        let (num, den) = DOWNLOAD_SHARE;
        let download_bytes = (total_bytes / den * num).max(MIN_BUDGET);
        PieceBudget {
            total: Arc::new(Semaphore::new(total_bytes as usize)),
            downloads: Arc::new(Semaphore::new(download_bytes as usize)),
            total_bytes,
            download_bytes,
        }
    }

    /// The budget in bytes.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Piece bytes held now (downloads and uploads).
    pub fn in_use(&self) -> u64 {
        self.total_bytes
            .saturating_sub(self.total.available_permits() as u64)
    }

    /// Waits for room for a piece buffer of `len` bytes that a download (from a parent or the
    /// origin) is about to fill. Requests are served in order, so a large piece is not starved
    /// by small ones.
    pub async fn download(&self, len: u64) -> BudgetPermit {
        // The semaphores are owned here and never closed, so acquiring cannot fail; were that
        // to change, an unaccounted buffer is the lesser evil than a failed download.
        let download = Arc::clone(&self.downloads)
            .acquire_many_owned(permits(len, self.download_bytes))
            .await
            .ok();
        let total = Arc::clone(&self.total)
            .acquire_many_owned(permits(len, self.total_bytes))
            .await
            .ok();
        BudgetPermit {
            _total: total,
            _download: download,
        }
    }

    /// Room for a piece buffer of `len` bytes an upload (or the whole-blob hash) is about to
    /// read, if there is room now.
    pub fn try_read(&self, len: u64) -> Option<BudgetPermit> {
        let t = Arc::clone(&self.total)
            .try_acquire_many_owned(permits(len, self.total_bytes))
            .ok()?;
        Some(BudgetPermit {
            _total: Some(t),
            _download: None,
        })
    }
}

impl BudgetPermit {
    /// Ties this room to `bytes`: it is given back when the last handle to them is dropped
    /// (after the store took the piece, say), wherever that happens.
    pub fn attach(self, bytes: Bytes) -> Bytes {
        Bytes::from_owner(Budgeted {
            bytes,
            _permit: self,
        })
    }
}

/// Piece bytes and the room they hold.
struct Budgeted {
    bytes: Bytes,
    _permit: BudgetPermit,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Permits for `len` bytes; a buffer larger than the whole pool takes all of it (and waits
/// until it is alone) rather than never fitting.
fn permits(len: u64, pool: u64) -> u32 {
    u32::try_from(len.clamp(1, pool)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn bounds_bytes_in_flight() {
        let budget = PieceBudget::new(32 * MIB);
        let held = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (budget, held, peak) = (budget.clone(), held.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let len = if i % 3 == 0 { 4 * MIB } else { MIB + i * 1000 };
                let upload = i % 4 == 0;
                let permit = if upload {
                    match budget.try_read(len) {
                        Some(p) => p,
                        None => return false,
                    }
                } else {
                    budget.download(len).await
                };
                let now = held.fetch_add(len, Ordering::SeqCst) + len;
                peak.fetch_max(now, Ordering::SeqCst);
                let buf = vec![1u8; len as usize];
                tokio::time::sleep(Duration::from_millis(5)).await;
                assert_eq!(buf.len() as u64, len);
                held.fetch_sub(len, Ordering::SeqCst);
                drop(permit);
                true
            }));
        }
        let mut served = 0;
        for t in tasks {
            if t.await.unwrap() {
                served += 1;
            }
        }
        assert!(served >= 48, "every download finishes ({served} served)");
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 32 * MIB, "peak {peak} bytes over a 32 MiB budget");
        assert!(
            peak > 16 * MIB,
            "the budget was used ({peak} bytes at most)"
        );
        assert_eq!(budget.in_use(), 0, "all room given back");
    }

    #[tokio::test]
    async fn downloads_leave_room_for_uploads() {
        let budget = PieceBudget::new(64 * MIB);
        let mut held = Vec::new();
        // Downloads take their share (32 MiB), then the next one waits...
        for _ in 0..8 {
            held.push(budget.download(4 * MIB).await);
        }
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.download(4 * MIB));
        assert!(waiting.await.is_err(), "a 9th download must wait");
        // ...while uploads still get the rest, and then are refused ("busy"), not queued.
        let ups: Vec<_> = (0..8).map(|_| budget.try_read(4 * MIB)).collect();
        assert!(ups.iter().all(Option::is_some));
        assert!(budget.try_read(4 * MIB).is_none());
        assert_eq!(budget.in_use(), 64 * MIB);
        drop(ups);
        held.clear();
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn attached_room_lives_as_long_as_the_bytes() {
        let budget = PieceBudget::new(16 * MIB);
        let piece = budget
            .download(8 * MIB)
            .await
            .attach(Bytes::from(vec![7u8; 8 << 20]));
        let half = piece.slice(..MIB as usize);
        drop(piece);
        assert_eq!(budget.in_use(), 8 * MIB, "a slice still holds the buffer");
        assert_eq!(half.len() as u64, MIB);
        drop(half);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_piece_larger_than_the_budget_still_goes_alone() {
        let budget = PieceBudget::new(1);
        assert_eq!(budget.bytes(), MIN_BUDGET);
        let p = budget.download(MIN_BUDGET * 2).await;
        assert!(budget.try_read(1).is_none());
        drop(p);
        assert!(budget.try_read(MIN_BUDGET * 2).is_some());
    }
}
