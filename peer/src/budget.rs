//! The piece memory budget: one cap, for the whole peer, on the piece bytes held in memory at
//! once (`piece_memory_bytes`): pieces being received from parents or read from the origin
//! (downloads), pieces read from the store for local readers (the local API and the registry
//! proxy), and pieces read to upload. Without it memory grows with the number of downloads and
//! readers (docs/benchmarks.md, "Peer memory").
//!
//! Each kind has a share of the one budget, and all together never exceed it:
//! - downloads wait for room, and hold at most a quarter ([`DOWNLOAD_SHARE`]);
//! - local reads wait for room, and hold at most half ([`READ_SHARE`]);
//! - uploads never wait, and hold at most half ([`UPLOAD_SHARE`]): when there is no room they
//!   answer "busy", so two peers downloading from each other cannot end up each holding the
//!   budget while waiting for the other's upload. Whatever downloads and readers hold, uploads
//!   keep a quarter, so a peer busy downloading still passes pieces on (the swarm depends on it).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The share of the budget downloads may hold together.
pub const DOWNLOAD_SHARE: (u64, u64) = (1, 4);
/// The share local reads (local API, registry proxy) may hold together.
pub const READ_SHARE: (u64, u64) = (1, 2);
/// The share uploads may hold together.
pub const UPLOAD_SHARE: (u64, u64) = (1, 2);

/// Smallest budget accepted: one piece of the largest size per share.
pub const MIN_BUDGET: u64 = 4 * shoal_proto::MAX_PIECE_SIZE as u64;

/// Piece bytes in memory at once, shared by downloads, local reads and uploads.
#[derive(Debug, Clone)]
pub struct PieceBudget {
    /// Every piece buffer holds permits of this, one per byte.
    total: Arc<Semaphore>,
    /// Each kind's share, held as well.
    downloads: Share,
    reads: Share,
    uploads: Share,
    total_bytes: u64,
}

/// One kind's share of the budget.
#[derive(Debug, Clone)]
struct Share {
    permits: Arc<Semaphore>,
    bytes: u64,
}

impl Share {
    fn new(total: u64, (num, den): (u64, u64)) -> Self {
        let bytes = (total / den * num).max(u64::from(shoal_proto::MAX_PIECE_SIZE));
        Share {
            permits: Arc::new(Semaphore::new(bytes as usize)),
            bytes,
        }
    }
}

/// Room for one piece buffer; given back when dropped (after the buffer is freed).
#[derive(Debug)]
#[must_use = "the room is given back when the permit is dropped"]
pub struct BudgetPermit {
    _total: Option<OwnedSemaphorePermit>,
    _share: Option<OwnedSemaphorePermit>,
}

impl PieceBudget {
    /// A budget of `bytes` (raised to [`MIN_BUDGET`] so every piece fits each share).
    pub fn new(bytes: u64) -> Self {
        let total_bytes = bytes.clamp(MIN_BUDGET, Semaphore::MAX_PERMITS as u64);
        PieceBudget {
            total: Arc::new(Semaphore::new(total_bytes as usize)),
            downloads: Share::new(total_bytes, DOWNLOAD_SHARE),
            reads: Share::new(total_bytes, READ_SHARE),
            uploads: Share::new(total_bytes, UPLOAD_SHARE),
            total_bytes,
        }
    }

    /// The budget in bytes.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Piece bytes held now (downloads, reads and uploads).
    pub fn in_use(&self) -> u64 {
        self.total_bytes
            .saturating_sub(self.total.available_permits() as u64)
    }

    /// Waits for room for a piece buffer of `len` bytes that a download (from a parent or the
    /// origin) is about to fill. Requests are served in order, so a large piece is not starved
    /// by small ones.
    pub async fn download(&self, len: u64) -> BudgetPermit {
        self.wait(&self.downloads, len).await
    }

    /// Waits for room for `len` bytes read from the store for a local reader (the local API,
    /// the registry proxy), in order.
    pub async fn read(&self, len: u64) -> BudgetPermit {
        self.wait(&self.reads, len).await
    }

    async fn wait(&self, share: &Share, len: u64) -> BudgetPermit {
        // The semaphores are owned here and never closed, so acquiring cannot fail; were that
        // to change, an unaccounted buffer is the lesser evil than a failed download.
        let held = Arc::clone(&share.permits)
            .acquire_many_owned(permits(len, share.bytes))
            .await
            .ok();
        let total = Arc::clone(&self.total)
            .acquire_many_owned(permits(len, self.total_bytes))
            .await
            .ok();
        BudgetPermit {
            _total: total,
            _share: held,
        }
    }

    /// Room for a piece buffer of `len` bytes an upload (or the opportunistic whole-blob hash)
    /// is about to read, if there is room now.
    pub fn try_upload(&self, len: u64) -> Option<BudgetPermit> {
        let share = Arc::clone(&self.uploads.permits)
            .try_acquire_many_owned(permits(len, self.uploads.bytes))
            .ok()?;
        let total = Arc::clone(&self.total)
            .try_acquire_many_owned(permits(len, self.total_bytes))
            .ok()?;
        Some(BudgetPermit {
            _total: Some(total),
            _share: Some(share),
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
        let budget = PieceBudget::new(64 * MIB);
        let held = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..96u64 {
            let (budget, held, peak) = (budget.clone(), held.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let len = if i % 3 == 0 { 4 * MIB } else { MIB + i * 1000 };
                let permit = match i % 4 {
                    0 => match budget.try_upload(len) {
                        Some(p) => p,
                        None => return false,
                    },
                    1 => budget.read(len).await,
                    _ => budget.download(len).await,
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
        assert!(
            served >= 72,
            "every download and read finishes ({served} served)"
        );
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 64 * MIB, "peak {peak} bytes over a 64 MiB budget");
        assert!(
            peak > 24 * MIB,
            "the budget was used ({peak} bytes at most)"
        );
        assert_eq!(budget.in_use(), 0, "all room given back");
    }

    #[tokio::test]
    async fn each_kind_keeps_to_its_share_and_uploads_keep_a_quarter() {
        let budget = PieceBudget::new(256 * MIB);
        // Downloads take their quarter (64 MiB), then the next one waits...
        let mut held: Vec<_> = Vec::new();
        for _ in 0..16 {
            held.push(budget.download(4 * MIB).await);
        }
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.download(4 * MIB));
        assert!(waiting.await.is_err(), "a 17th download must wait");
        // ...local reads take their half (128 MiB), then wait too...
        for _ in 0..32 {
            held.push(budget.read(4 * MIB).await);
        }
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.read(4 * MIB));
        assert!(waiting.await.is_err(), "a read past its half must wait");
        // ...while uploads still get the last quarter, and then are refused ("busy").
        let ups: Vec<_> = (0..16).map(|_| budget.try_upload(4 * MIB)).collect();
        assert!(ups.iter().all(Option::is_some));
        assert!(budget.try_upload(4 * MIB).is_none());
        assert_eq!(budget.in_use(), 256 * MIB);
        drop(ups);
        held.clear();
        assert_eq!(budget.in_use(), 0);
        // Uploads alone stop at their half.
        let ups: Vec<_> = (0..32).map(|_| budget.try_upload(4 * MIB)).collect();
        assert!(ups.iter().all(Option::is_some));
        assert!(budget.try_upload(4 * MIB).is_none());
    }

    #[tokio::test]
    async fn attached_room_lives_as_long_as_the_bytes() {
        let budget = PieceBudget::new(64 * MIB);
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
        assert!(budget.try_upload(1).is_none());
        drop(p);
        assert!(budget.try_upload(MIN_BUDGET * 2).is_some());
    }
}
