//! One blob's task: what is known of it (size, piece table), which pieces are wanted, the
//! driver's state, and the readers waiting for pieces as they arrive.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use shoal_api::TaskStatus;
use shoal_proto::{
    Digest, OriginRef, Parent, RegisterTask, SchedulerReply, SchedulerRequest, TaskMeta,
};
use shoal_store::{Blake3Hash, PieceLayout};
use tokio::sync::{watch, Notify};

use super::dht::HolderTable;
use super::{register_task, source, Ctx};
use crate::error::PeerError;

/// How often a reader retries a piece that vanished (evicted, or dropped as corrupt) before failing.
const READ_RETRIES: u32 = 3;

/// A stream of blob bytes, in order, as the pieces arrive.
pub type RangeStream = Pin<Box<dyn futures::Stream<Item = Result<Bytes, PeerError>> + Send>>;

#[derive(Debug, Default)]
pub(super) struct Inner {
    pub origin: Option<OriginRef>,
    pub meta: Option<TaskMeta>,
    pub layout: Option<Arc<PieceLayout>>,
    pub wanted: BTreeSet<u32>,
    pub want_all: bool,
    pub running: bool,
    pub failure: Option<String>,
    /// Fetch only from the origin (a seed ordered to by the scheduler).
    pub source_only: bool,
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub started: Option<Instant>,
    pub complete: bool,
    /// Parents pushed by the scheduler, for the driver to pick up.
    pub new_parents: Vec<Parent>,
    /// Who published the streamed piece hashes the layout was built from (reported if the
    /// blob then fails its sha256).
    pub table_from: Option<shoal_proto::HostId>,
    /// When whole-blob imports from the origin failed the blob's sha256 (driver.rs bounds the
    /// attempts per download with it; a client's new `fetch_all` starts over).
    pub origin_mismatches: Vec<Instant>,
}

/// A download of one blob, shared by all its readers.
pub struct Task {
    pub(super) ctx: Arc<Ctx>,
    pub(super) blob: Digest,
    pub(super) inner: Mutex<Inner>,
    resolving: tokio::sync::Mutex<()>,
    /// Bumped whenever a piece is stored or the driver stops: readers wait on it.
    pub(super) changed: watch::Sender<u64>,
    /// Wakes the driver when new pieces are wanted.
    pub(super) wake: Notify,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("blob", &self.blob)
            .finish_non_exhaustive()
    }
}

impl Task {
    pub(super) fn new(ctx: Arc<Ctx>, blob: Digest, origin: Option<OriginRef>) -> Arc<Self> {
        Arc::new(Task {
            ctx,
            blob,
            inner: Mutex::new(Inner {
                origin,
                ..Inner::default()
            }),
            resolving: tokio::sync::Mutex::new(()),
            changed: watch::channel(0).0,
            wake: Notify::new(),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    /// The blob.
    pub fn blob(&self) -> Digest {
        self.blob
    }

    /// The peer's piece memory budget (readers of the store take their room from it too).
    pub(crate) fn budget(&self) -> &crate::budget::PieceBudget {
        self.ctx.transport.budget()
    }

    /// Size of the blob (known after [`super::Downloader::open`]).
    pub fn size(&self) -> Option<u64> {
        self.lock().meta.map(|m| m.size)
    }

    pub(super) fn set_origin(&self, origin: OriginRef) {
        self.lock().origin = Some(origin);
    }

    pub(super) fn set_source_only(&self, meta: TaskMeta) {
        let mut inner = self.lock();
        inner.source_only = true;
        if inner.meta.is_none() {
            inner.meta = Some(meta);
        }
    }

    pub(super) fn is_busy(&self) -> bool {
        let inner = self.lock();
        inner.running
    }

    pub(super) fn add_parents(&self, parents: Vec<Parent>) {
        self.lock().new_parents.extend(parents);
        self.wake.notify_one();
    }

    /// Wakes readers and the piece server's held-set watchers; with the piece table known,
    /// hashes the stored pieces into the whole-blob sha256 as far as they go in order, so that
    /// completing the blob hashes only the rest.
    pub(super) fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        self.ctx.held_news.gained(&self.blob);
        let piece_size = {
            let inner = self.lock();
            inner
                .layout
                .as_ref()
                .filter(|_| !inner.complete)
                .map(|l| l.piece_size())
        };
        // It reads through a piece-sized buffer: only when the memory budget has room now.
        let room = piece_size.and_then(|n| self.ctx.transport.budget().try_upload(u64::from(n)));
        if let Some(room) = room {
            let (store, sd) = (self.ctx.store.clone(), self.blob);
            tokio::spawn(async move {
                if let Err(e) = store.digest_ahead(sd).await {
                    tracing::debug!(blob = %sd, error = %e, "hashing ahead stopped");
                }
                drop(room);
            });
        }
    }

    /// Learns the blob's size and piece geometry, and its piece table when someone has one.
    pub(super) async fn resolve(&self) -> Result<TaskMeta, PeerError> {
        let _one = self.resolving.lock().await;
        if let Some(m) = self.lock().meta {
            return Ok(m);
        }
        let sd = self.blob;
        if let Some(status) = self.ctx.store.blob_status(&sd) {
            let meta = TaskMeta {
                blob: self.blob,
                size: status.layout.size(),
                piece_size: status.layout.piece_size(),
            };
            let mut inner = self.lock();
            inner.meta = Some(meta);
            inner.layout = Some(status.layout);
            inner.complete = status.complete;
            return Ok(meta);
        }
        let origin = self.lock().origin.clone().ok_or_else(|| {
            PeerError::download(
                self.blob,
                "not cached here and no origin given (pass ?source=docker://HOST/REPO)",
            )
        })?;
        let o = self.ctx.origins.get(&origin)?;
        let idle = self.ctx.config.origin_idle_timeout();
        let size = source::stat(o.as_ref(), &self.blob, &origin.reference, idle).await?;
        let mut meta = TaskMeta {
            blob: self.blob,
            size,
            piece_size: self.ctx.piece_size_for(size),
        };
        meta.validate()?;
        let mut table = None;
        let mut answered = false;
        if let Some(s) = self.ctx.scheduler(&self.blob) {
            let req = SchedulerRequest::RegisterTask(register_task(meta, None, None, Some(origin)));
            match s.request(&req).await {
                Ok(SchedulerReply::Task(info))
                    if info.task.size == size && info.task.validate().is_ok() =>
                {
                    meta = info.task;
                    table = info.piece_table;
                    answered = true;
                }
                Ok(SchedulerReply::Error(e)) if e.code == shoal_proto::ErrorCode::Refused => {
                    return Err(super::refused_by_scheduler(&self.blob, &e));
                }
                Ok(other) => {
                    tracing::warn!(blob = %self.blob, reply = ?other, "scheduler did not take the task")
                }
                Err(e) => {
                    tracing::info!(blob = %self.blob, error = %e, "scheduler unreachable; going on without it")
                }
            }
        }
        if !answered {
            // No scheduler: a holder the DHT names may know the blob's geometry and table.
            match self.table_from_holders(|m| m.size == size).await? {
                Some(HolderTable::Whole(m, t)) => {
                    meta = m;
                    table = Some(t);
                }
                // A holder still importing it: its geometry; obtain_table follows its hashes.
                Some(HolderTable::Partial(m, ..)) => meta = m,
                None => {}
            }
        }
        self.lock().meta = Some(meta);
        if let Some(table) = table {
            self.adopt_table(&meta, table).await?;
        }
        Ok(meta)
    }

    /// Takes a published piece table: registers the layout with the store.
    pub(super) async fn adopt_table(
        &self,
        meta: &TaskMeta,
        table: Vec<[u8; 32]>,
    ) -> Result<(), PeerError> {
        self.install_layout(meta, table).await?;
        self.move_staged().await;
        Ok(())
    }

    /// Takes a piece table a local client has from trusted metadata (a Shoal bootstrap, the
    /// index of an unconverted layer), so that ranges are fetched piece by piece, each piece
    /// verified, instead of importing the whole blob first. `Ok(Err(why))`: not taken, because
    /// it disagrees with the blob's geometry or the table known already, or a download without
    /// a table runs (it computes one).
    pub async fn offer_table(
        &self,
        piece_size: u32,
        table: Vec<[u8; 32]>,
    ) -> Result<Result<(), String>, PeerError> {
        let meta = self.resolve().await?;
        {
            let inner = self.lock();
            if let Some(l) = &inner.layout {
                let same = l.piece_size() == piece_size
                    && l.pieces().len() == table.len()
                    && l.pieces()
                        .iter()
                        .zip(&table)
                        .all(|(a, b)| a.as_bytes() == b);
                return Ok(if same {
                    Ok(())
                } else {
                    Err(format!("{} has another piece table here", self.blob))
                });
            }
            if meta.piece_size != piece_size || meta.piece_count() as usize != table.len() {
                return Ok(Err(format!(
                    "{} is cut into {} pieces of {} bytes here, the table has {} of {piece_size}",
                    self.blob,
                    meta.piece_count(),
                    meta.piece_size,
                    table.len()
                )));
            }
            if inner.running {
                return Ok(Err(format!(
                    "{} is being fetched without a table already",
                    self.blob
                )));
            }
        }
        self.adopt_table(&meta, table).await?;
        tracing::info!(blob = %self.blob, "piece table taken from a local client");
        Ok(Ok(()))
    }

    /// Takes a table built from streamed hashes: registers it with the store, and moves any
    /// staged pieces the store did not adopt in the background while the download goes on
    /// (they count as held and are served from staging until they land).
    pub(super) async fn adopt_streamed(
        self: &Arc<Self>,
        meta: &TaskMeta,
        table: Vec<[u8; 32]>,
    ) -> Result<(), PeerError> {
        self.install_layout(meta, table).await?;
        tracing::info!(blob = %self.blob, "every piece hash known: piece table adopted");
        // With the table whole, this peer can give it to holders found through the DHT.
        if let Some(d) = &self.ctx.dht {
            d.provide(self.blob);
        }
        let this = Arc::clone(self);
        tokio::spawn(async move { this.move_staged().await });
        Ok(())
    }

    /// Registers the blob's layout with the store. The staging file becomes the blob's data
    /// file with every staged piece in it, no byte copied; failing that (nothing staged, or
    /// the store knows the blob already) the store takes the layout alone and the staged
    /// pieces are left for [`Task::move_staged`].
    async fn install_layout(&self, meta: &TaskMeta, table: Vec<[u8; 32]>) -> Result<(), PeerError> {
        let sd = self.blob;
        let pieces = table.into_iter().map(Blake3Hash::from_bytes).collect();
        let layout = Arc::new(PieceLayout::new(&sd, meta.size, meta.piece_size, pieces)?);
        let mut taken = std::collections::HashSet::new();
        let adopted = match self.ctx.staging.file(&self.blob) {
            Some((file, staged)) => {
                taken = staged.iter().map(|(i, _)| *i).collect();
                let held = staged
                    .into_iter()
                    .map(|(i, h)| (i, Blake3Hash::from_bytes(h)))
                    .collect();
                let adopt = self
                    .ctx
                    .store
                    .adopt_blob(sd, Arc::clone(&layout), file, held);
                adopt.await.unwrap_or_else(|e| {
                    tracing::warn!(blob = %self.blob, error = %e, "the store did not adopt the staged pieces; moving them");
                    false
                })
            }
            None => false,
        };
        if !adopted {
            self.ctx.store.ensure_blob(sd, Arc::clone(&layout)).await?;
        }
        self.lock().layout = Some(layout);
        if adopted {
            // Pieces staged after the store took the file move in too (not fetched twice).
            self.end_staging(&taken).await;
            self.notify();
        }
        Ok(())
    }

    /// Ends the blob's staging (the store has its table, so new pieces go there): pieces
    /// staged but not in `moved` are read back and stored, verified again by the store.
    async fn end_staging(&self, moved: &std::collections::HashSet<u32>) {
        let Some((file, pieces)) = self.ctx.staging.drain(&self.blob) else {
            return;
        };
        let Some(layout) = self.lock().layout.clone() else {
            return;
        };
        for (i, _) in pieces.into_iter().filter(|(i, _)| !moved.contains(i)) {
            let (Some(len), offset) = (layout.piece_len(i), layout.piece_offset(i)) else {
                continue;
            };
            let file = Arc::clone(&file);
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                file.read_at(&mut buf, offset).map(|()| Bytes::from(buf))
            })
            .await;
            let stored = match read {
                Ok(Ok(bytes)) => self
                    .ctx
                    .store
                    .put_piece(self.blob, i, bytes)
                    .await
                    .map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(format!("reading it back: {e}")),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = stored {
                tracing::warn!(blob = %self.blob, piece = i, error = %e, "staged piece not stored: fetched again");
            }
        }
    }

    /// Moves staged pieces into the store now that it has the whole table (it verifies each
    /// again: one staged under a hash the table contradicts is dropped).
    async fn move_staged(&self) {
        let staging = &self.ctx.staging;
        let Some((_, pieces)) = staging.held(&self.blob) else {
            return;
        };
        let sd = self.blob;
        let moves = pieces.into_iter().map(|i| async move {
            let (from, blob) = (Arc::clone(staging), self.blob);
            let piece = tokio::task::spawn_blocking(move || from.piece(&blob, i))
                .await
                .ok()
                .flatten();
            if let Some((bytes, _)) = piece {
                if let Err(e) = self.ctx.store.put_piece(sd, i, bytes).await {
                    tracing::warn!(blob = %self.blob, piece = i, error = %e, "staged piece not stored");
                }
            }
            staging.take(&self.blob, i);
        });
        futures::stream::iter(moves)
            .buffer_unordered(4)
            .for_each(|()| async {})
            .await;
        // Pieces staged while the others moved: moved too, not fetched again.
        self.end_staging(&std::collections::HashSet::new()).await;
        self.notify();
    }

    /// The announcement that tells a scheduler what this peer knows and holds of the blob.
    pub(super) fn announcement(&self) -> Option<RegisterTask> {
        let inner = self.lock();
        let meta = inner.meta?;
        let table = inner
            .layout
            .as_ref()
            .map(|l| l.pieces().iter().map(|h| *h.as_bytes()).collect());
        let held = self.ctx.store.blob_status(&self.blob).map(|s| s.held);
        Some(register_task(meta, table, held, inner.origin.clone()))
    }

    /// Wants every piece of the blob.
    pub(crate) fn demand_all(self: &Arc<Self>) {
        self.lock().want_all = true;
        self.start();
    }

    /// Wants `pieces`.
    pub(crate) fn demand(self: &Arc<Self>, pieces: std::ops::Range<u32>) {
        self.lock().wanted.extend(pieces);
        self.start();
    }

    pub(super) fn start(self: &Arc<Self>) {
        let spawn = {
            let mut inner = self.lock();
            let spawn = !inner.running;
            if spawn {
                inner.running = true;
                inner.failure = None;
                inner.started.get_or_insert_with(Instant::now);
            }
            spawn
        };
        if spawn {
            let this = Arc::clone(self);
            tokio::spawn(async move { this.drive().await });
        } else {
            self.wake.notify_one();
        }
    }

    fn holds(&self, index: u32) -> bool {
        self.ctx
            .store
            .blob_status(&self.blob)
            .is_some_and(|s| s.held.contains(index))
    }

    /// Waits until piece `index` is stored (asking for it again if no download runs).
    async fn wait_piece(self: &Arc<Self>, index: u32) -> Result<(), PeerError> {
        let mut rx = self.changed.subscribe();
        loop {
            if self.holds(index) {
                return Ok(());
            }
            let restart = {
                let inner = self.lock();
                if !inner.running {
                    if let Some(f) = &inner.failure {
                        return Err(PeerError::download(self.blob, f.clone()));
                    }
                }
                !inner.running
            };
            if restart {
                self.demand(index..index + 1);
            }
            if rx.changed().await.is_err() {
                return Err(PeerError::download(self.blob, "task dropped"));
            }
        }
    }

    /// Fetches the whole blob and waits until it is complete (sha256 checked).
    pub async fn fetch_all(self: &Arc<Self>) -> Result<(), PeerError> {
        self.resolve().await?;
        // A client's new download starts the origin-mismatch bound over; a seed's repeated
        // orders from the scheduler do not (its mismatches expire after a window, driver.rs).
        if !self.ctx.config.seed {
            self.lock().origin_mismatches.clear();
        }
        let mut rx = self.changed.subscribe();
        self.demand_all();
        loop {
            {
                let inner = self.lock();
                if inner.complete {
                    return Ok(());
                }
                if !inner.running {
                    if let Some(f) = &inner.failure {
                        return Err(PeerError::download(self.blob, f.clone()));
                    }
                }
            }
            if !self.lock().running {
                self.demand_all();
            }
            if rx.changed().await.is_err() {
                return Err(PeerError::download(self.blob, "task dropped"));
            }
        }
    }

    /// Bytes `start..end` of the blob as a stream that yields each piece's share as soon as
    /// that piece is stored and verified; only the pieces covering the range are fetched.
    pub fn read_range(self: &Arc<Self>, start: u64, end: u64) -> Result<RangeStream, PeerError> {
        let meta = self
            .lock()
            .meta
            .ok_or_else(|| PeerError::download(self.blob, "size unknown: open the task first"))?;
        if start > end || end > meta.size {
            return Err(PeerError::RangeNotSatisfiable {
                blob: self.blob.to_string(),
                start,
                end,
                size: meta.size,
            });
        }
        self.demand(meta.pieces_for_range(start..end));
        let ps = u64::from(meta.piece_size);
        let sd = self.blob;
        let stream =
            futures::stream::unfold((Arc::clone(self), start), move |(task, pos)| async move {
                if pos >= end {
                    return None;
                }
                let index = (pos / ps) as u32;
                let len = ((u64::from(index) + 1) * ps).min(end) - pos;
                let mut tries = 0;
                loop {
                    if let Err(e) = task.wait_piece(index).await {
                        return Some((Err(e), (task, end)));
                    }
                    // The store reads (and verifies) the whole piece: room for it, taken only
                    // once it is held, and kept until the reader has the bytes (budget.rs).
                    let whole = ps.min(meta.size - u64::from(index) * ps);
                    let room = task.ctx.transport.budget().download(whole).await;
                    match task.ctx.store.read_range(sd, pos, len).await {
                        Ok(bytes) => return Some((Ok(room.attach(bytes)), (task, pos + len))),
                        Err(e)
                            if (e.is_not_present() || e.is_corrupt()) && tries < READ_RETRIES =>
                        {
                            tries += 1
                        }
                        Err(e) => return Some((Err(e.into()), (task, end))),
                    }
                }
            });
        Ok(Box::pin(stream))
    }

    /// A snapshot for the local API.
    pub fn status(&self) -> TaskStatus {
        let held = self
            .ctx
            .store
            .blob_status(&self.blob)
            .map_or(0, |s| s.held.held());
        // Pieces staged while the piece table is not whole yet count as held too.
        let staged = self
            .ctx
            .staging
            .held(&self.blob)
            .map_or(0, |(_, p)| p.len() as u32);
        let held = held + staged;
        let inner = self.lock();
        TaskStatus {
            blob: self.blob,
            size: inner.meta.map(|m| m.size),
            piece_size: inner.meta.map(|m| m.piece_size),
            pieces: inner.meta.map(|m| m.piece_count()),
            held,
            complete: inner.complete,
            running: inner.running,
            bytes_from_peers: inner.bytes_from_peers,
            bytes_from_origin: inner.bytes_from_origin,
            error: inner.failure.clone(),
        }
    }
}
