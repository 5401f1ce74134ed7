//! Downloads: one [`Task`] per blob digest, shared by every reader of that blob.
//!
//! Data path: a reader asks for bytes X..Y of blob B ([`Downloader::open`] then
//! [`Task::read_range`]) -> the task learns the blob's size and piece table (store, scheduler,
//! origin) -> the pieces covering X..Y become wanted -> the driver (driver.rs) fetches each wanted
//! piece from the parent fastest for it now (parents.rs), or from the origin (source.rs) -> every
//! piece is verified against the piece table as the store takes it -> readers waiting on that
//! piece are woken and stream it out. A whole blob is checked against its sha256 before it is
//! marked complete.

mod dht;
mod driver;
mod parents;
mod progress;
mod source;
mod staging;
mod swarm;
mod task;
mod tee;
mod watches;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use shoal_proto::{
    Digest, HostId, OriginRef, PiecesUpdate, RegisterTask, SchedulerRequest, TaskMeta,
};
use shoal_store::AsyncStore;

use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::scheduler_client::SchedulerClient;
use crate::scheduler_ring::SchedulerRing;
use crate::transport::Transport;

use shoal_api::TaskStatus;
pub(crate) use source::Origins;
pub(crate) use staging::Staging;
pub use task::{RangeStream, Task};

/// Most tasks remembered; beyond it finished tasks are forgotten (the store keeps their bytes).
const MAX_TASKS: usize = 4096;

/// Byte counters of all downloads.
#[derive(Debug, Default, Serialize)]
pub struct DownloadStats {
    /// Piece bytes received from other peers.
    pub bytes_from_peers: AtomicU64,
    /// Bytes received from origins.
    pub bytes_from_origin: AtomicU64,
    /// Parents dropped (failed, stalled or corrupt).
    pub parents_dropped: AtomicU64,
    /// Pieces from parents that failed verification.
    pub corrupt_pieces: AtomicU64,
    /// Time to fetch a piece from a parent (served on `/metrics`).
    #[serde(skip)]
    pub piece_latency: crate::metrics::PieceLatency,
}

/// What every download shares.
pub(crate) struct Ctx {
    pub store: AsyncStore,
    pub transport: Arc<Transport>,
    pub sched: Option<Arc<SchedulerRing>>,
    pub dht: Option<Arc<crate::discovery::Discovery>>,
    pub origins: Origins,
    pub config: PeerConfig,
    pub me: HostId,
    pub stats: Arc<DownloadStats>,
    /// Verified pieces of blobs whose piece table is not whole yet (staging.rs).
    pub staging: Arc<Staging>,
    /// Wakes the piece server's held-set watchers when a blob gains pieces.
    pub held_news: Arc<crate::held_news::HeldNews>,
}

impl Ctx {
    /// The connected scheduler that owns `blob` now (scheduler_ring.rs), if any.
    pub fn scheduler(&self, blob: &Digest) -> Option<Arc<SchedulerClient>> {
        self.sched.as_ref().and_then(|r| r.for_blob(blob))
    }

    /// Sends a request to the scheduler owning its blob in the background (reports need no
    /// answer); requests about no blob go to any connected scheduler.
    pub fn report(&self, req: SchedulerRequest) {
        // Held pieces are also what the DHT publishes: one provider record per blob, from its
        // first verified piece here, staged or stored (a holder found through the DHT is asked
        // for the table, or the hashes it knows while its table is not whole).
        if let Some(d) = &self.dht {
            match &req {
                SchedulerRequest::PiecesHeld(h) if added_any(&h.pieces) => d.provide(h.blob),
                SchedulerRequest::RegisterTask(t)
                    if t.held.as_ref().is_some_and(|h| h.held() > 0) =>
                {
                    d.provide(t.task.blob)
                }
                _ => {}
            }
        }
        let target = match request_blob(&req) {
            Some(blob) => self.scheduler(&blob),
            None => self.sched.as_ref().and_then(|r| r.any()),
        };
        if let Some(s) = target {
            tokio::spawn(async move {
                if let Err(e) = s.request(&req).await {
                    tracing::debug!(error = %e, "scheduler report failed");
                }
            });
        }
    }

    /// Sends streamed piece hashes to the scheduler owning `blob`, if it speaks a protocol
    /// version that has them (docs/protocol.md, "Streamed piece hashes").
    pub fn report_hashes(&self, blob: Digest, first: u32, hashes: Vec<[u8; 32]>) {
        let Some(s) = self.scheduler(&blob) else {
            return;
        };
        if s.version() < shoal_proto::PIECE_HASHES_VERSION || hashes.is_empty() {
            return;
        }
        let req = SchedulerRequest::PieceHashes(shoal_proto::PieceHashes {
            blob,
            first,
            hashes,
        });
        tokio::spawn(async move {
            if let Err(e) = s.request(&req).await {
                tracing::debug!(error = %e, "publishing piece hashes failed");
            }
        });
    }

    pub fn piece_size_for(&self, size: u64) -> u32 {
        self.config
            .piece_size
            .unwrap_or_else(|| shoal_proto::default_piece_size(size))
    }
}

/// All downloads of this peer.
pub struct Downloader {
    ctx: Arc<Ctx>,
    tasks: Mutex<HashMap<Digest, Arc<Task>>>,
}

impl std::fmt::Debug for Downloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloader").finish_non_exhaustive()
    }
}

impl Downloader {
    pub(crate) fn new(ctx: Ctx) -> Self {
        Downloader {
            ctx: Arc::new(ctx),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// Byte counters of all downloads.
    pub fn stats(&self) -> &DownloadStats {
        &self.ctx.stats
    }

    /// The origins this peer may fetch from.
    pub fn allowed_origins(&self) -> &Arc<shoal_origin::AllowedOrigins> {
        self.ctx.origins.allowed()
    }

    /// This node's id, seed mode, scheduler addresses configured, and schedulers connected now
    /// (local API `GET /status`).
    pub(crate) fn node(&self) -> (String, bool, Vec<std::net::SocketAddr>, usize) {
        let c = &self.ctx.config;
        let addrs = self
            .ctx
            .sched
            .as_ref()
            .map(|r| r.addresses())
            .unwrap_or_default();
        let connected = self.ctx.sched.as_ref().map_or(0, |r| r.connected());
        (c.host_id.clone(), c.seed, addrs, connected)
    }

    fn task(&self, blob: Digest, origin: Option<OriginRef>) -> Arc<Task> {
        let mut tasks = crate::sync::lock(&self.tasks);
        if let Some(t) = tasks.get(&blob) {
            if let Some(o) = origin {
                t.set_origin(o);
            }
            return Arc::clone(t);
        }
        if tasks.len() >= MAX_TASKS {
            tasks.retain(|_, t| t.is_busy());
        }
        let t = Task::new(Arc::clone(&self.ctx), blob, origin);
        tasks.insert(blob, Arc::clone(&t));
        t
    }

    /// The task of `blob`, with its size and piece geometry known (from the store, the
    /// scheduler, or a HEAD at `origin`). Nothing is fetched until a range or the whole blob is
    /// asked for. `origin` is needed for a blob that is not cached here.
    pub async fn open(
        &self,
        blob: Digest,
        origin: Option<OriginRef>,
    ) -> Result<Arc<Task>, PeerError> {
        // An origin outside allowed_origins never becomes a task's (nor replaces one).
        if let Some(o) = &origin {
            self.ctx.origins.check(o)?;
        }
        let task = self.task(blob, origin);
        task.resolve().await?;
        Ok(task)
    }

    /// Fetches the whole blob (a seed's back-to-source on the scheduler's order when
    /// `source_only`); returns when it is complete and verified.
    pub(crate) fn fetch_for_scheduler(&self, meta: TaskMeta, origin: OriginRef) -> Arc<Task> {
        let task = self.task(meta.blob, Some(origin));
        task.set_source_only(meta);
        task.demand_all();
        task
    }

    /// Status of every task this peer knows.
    pub fn statuses(&self) -> Vec<TaskStatus> {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        tasks.iter().map(|t| t.status()).collect()
    }

    /// Status of one task, if known.
    pub fn status(&self, blob: &Digest) -> Option<TaskStatus> {
        let t = self.tasks.lock().ok()?.get(blob).cloned()?;
        Some(t.status())
    }

    /// Hands new parents from the scheduler to the running download of their blob.
    pub(crate) fn pieces_update(&self, update: PiecesUpdate) {
        let t = self
            .tasks
            .lock()
            .ok()
            .and_then(|t| t.get(&update.blob).cloned());
        if let Some(t) = t {
            t.add_parents(update.parents);
        }
    }

    /// Tells the schedulers about pieces the store dropped since the last call (evicted for
    /// space or age, or removed as corrupt), so that they stop naming this peer as a holder and
    /// send downloaders to someone who has them rather than to the origin. `last` is the held
    /// set seen at the previous call, per blob; tasks running now are left to their download.
    pub(crate) fn report_dropped_pieces(&self, last: &mut HashMap<Digest, shoal_proto::PieceSet>) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        let mut seen = HashMap::with_capacity(tasks.len());
        for t in tasks {
            if t.is_busy() {
                continue;
            }
            let status = t.status();
            let Some(count) = status.pieces else { continue };
            let now = self
                .ctx
                .store
                .blob_status(&t.blob)
                .map(|s| s.held)
                .unwrap_or_else(|| shoal_proto::PieceSet::empty(count));
            // What the scheduler was last told: the set seen before, or all of a finished blob.
            let before = last.remove(&t.blob).or_else(|| {
                status.complete.then(|| {
                    let mut all = shoal_proto::PieceSet::empty(count);
                    (0..count).for_each(|i| {
                        all.insert(i);
                    });
                    all
                })
            });
            if let Some(before) = before {
                let dropped: Vec<u32> = before.iter().filter(|&i| !now.contains(i)).collect();
                if !dropped.is_empty() {
                    tracing::info!(blob = %t.blob, pieces = dropped.len(), "pieces no longer held; telling the scheduler");
                    self.ctx
                        .report(SchedulerRequest::PiecesHeld(shoal_proto::PiecesHeld {
                            blob: t.blob,
                            pieces: shoal_proto::PieceReport::Removed(dropped),
                        }));
                }
            }
            seen.insert(t.blob, now);
        }
        *last = seen;
    }

    /// Runs [`Downloader::report_dropped_pieces`] every `every` until the peer stops.
    pub(crate) fn spawn_dropped_piece_reports(
        self: &Arc<Self>,
        every: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last = HashMap::new();
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match this.upgrade() {
                    Some(d) => d.report_dropped_pieces(&mut last),
                    None => return,
                }
            }
        })
    }

    /// Tells a (restarted) scheduler about every task again: geometry, piece table, held pieces.
    pub(crate) fn announce_all(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        for t in tasks {
            if let Some(req) = t.announcement() {
                self.ctx.report(SchedulerRequest::RegisterTask(req));
            }
        }
    }
}

fn added_any(report: &shoal_proto::PieceReport) -> bool {
    matches!(report, shoal_proto::PieceReport::Added(p) if !p.is_empty())
}

/// The blob a scheduler request is about, if any (it decides which scheduler gets it).
fn request_blob(req: &SchedulerRequest) -> Option<Digest> {
    match req {
        SchedulerRequest::RegisterTask(r) => Some(r.task.blob),
        SchedulerRequest::PiecesHeld(r) => Some(r.blob),
        SchedulerRequest::RequestParents(r) => Some(r.blob),
        SchedulerRequest::ReportPieceFailure(r) => Some(r.blob),
        SchedulerRequest::DownloadFinished(r) => Some(r.blob),
        SchedulerRequest::DownloadFailed(r) => Some(r.blob),
        SchedulerRequest::PieceHashes(r) => Some(r.blob),
        SchedulerRequest::GetPieceHashes { blob, .. } => Some(*blob),
        _ => None,
    }
}

/// The download error for a scheduler that refused a task (its origin is outside the
/// scheduler's or a seed's allowed_origins): final, the download is not tried elsewhere.
pub(crate) fn refused_by_scheduler(blob: &Digest, e: &shoal_proto::ErrorReply) -> PeerError {
    PeerError::NotAllowed(format!("the scheduler refused {blob}: {}", e.message))
}

/// Announcement of a task, with what is known of it.
pub(crate) fn register_task(
    meta: TaskMeta,
    table: Option<Vec<[u8; 32]>>,
    held: Option<shoal_proto::PieceSet>,
    origin: Option<OriginRef>,
) -> RegisterTask {
    RegisterTask {
        task: meta,
        piece_table: table,
        held,
        origin,
    }
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
