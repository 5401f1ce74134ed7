//! The driver of one task: gets a piece table, then fetches every wanted piece from parents (the
//! fastest holder of each piece, several at once) or from the origin, drops and reports parents
//! that fail, stall or send bad bytes, and completes the blob once every piece is held.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use shoal_proto::{
    DownloadFinished, FailureReason, ParentsReply, PieceReport, PieceSet, PiecesHeld,
    ReportPieceFailure, RequestParents, SchedulerReply, SchedulerRequest, TaskMeta,
};
use shoal_store::PieceLayout;

use super::swarm::SwarmEnd;
use super::task::Task;
use super::{add, register_task, source};
use crate::error::PeerError;

/// Contiguous pieces read with one origin Range GET.
const ORIGIN_RUN: usize = 16;
/// Origin Range GETs of one task at once.
const ORIGIN_CONCURRENCY: usize = 4;
/// How often a download waiting for a piece table asks the scheduler for it.
const TABLE_POLL: Duration = Duration::from_millis(200);
/// Whole-blob imports from the origin that may fail the sha256 per download: the same wrong
/// bytes are not fetched a third time.
const ORIGIN_MISMATCH_ATTEMPTS: usize = 2;
/// How long a failed import counts against that bound when no new download resets it.
const ORIGIN_MISMATCH_WINDOW: Duration = Duration::from_secs(60);

impl Task {
    /// Runs the download until every wanted piece is held; records failure for readers.
    pub(super) async fn drive(self: Arc<Self>) {
        let result = self.drive_inner().await;
        {
            let mut inner = self.lock();
            if let Err(e) = &result {
                tracing::warn!(blob = %self.blob, error = %e, "download failed");
                inner.failure = Some(e.to_string());
                // Staged pieces of a failed download are not kept.
                self.ctx.staging.remove(&self.blob);
            }
            inner.running = false;
        }
        if let Err(e) = result {
            self.ctx.report(SchedulerRequest::DownloadFailed(
                shoal_proto::DownloadFailed {
                    blob: self.blob,
                    reason: e
                        .to_string()
                        .chars()
                        .take(shoal_proto::MAX_TEXT_LEN)
                        .collect(),
                },
            ));
        }
        self.notify();
    }

    async fn drive_inner(self: &Arc<Self>) -> Result<(), PeerError> {
        let meta = self.resolve().await?;
        loop {
            let layout = self.lock().layout.clone();
            let Some(layout) = layout else {
                // A streaming round that got the table goes on with it; if it gave up, the
                // origin gets what no other peer can give.
                if let Some(SwarmEnd::BackToSource(why, pieces)) = self.obtain_table(&meta).await? {
                    let layout = self.lock().layout.clone();
                    if let Some(layout) = layout {
                        let _pin = self.ctx.store.pin_blob(&self.blob)?;
                        self.back_to_source(&layout, &why, pieces).await?;
                    }
                }
                continue;
            };
            let _pin = self.ctx.store.pin_blob(&self.blob)?;
            let missing = self.missing(&layout);
            if missing.is_empty() {
                // Staged pieces still moving into the store: wait for them to land.
                while self.ctx.staging.held(&self.blob).is_some() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                self.complete_if_whole(&meta, &layout).await?;
                let more = {
                    let inner = self.lock();
                    !self.missing_locked(&inner, &layout).is_empty()
                };
                if !more {
                    return Ok(());
                }
                continue;
            }
            let source_only = self.lock().source_only;
            let no_swarm = self.ctx.scheduler(&self.blob).is_none() && self.ctx.dht.is_none();
            if source_only || no_swarm {
                self.fetch_from_source(&layout, &missing).await?;
                continue;
            }
            if let SwarmEnd::BackToSource(why, pieces) = self.swarm(&meta).await? {
                self.back_to_source(&layout, &why, pieces).await?;
            }
        }
    }

    /// Fetches `pieces` (empty: every missing one) from the origin, those still missing: only
    /// what no other peer can give; the rest is left to the swarm's next round.
    async fn back_to_source(
        &self,
        layout: &PieceLayout,
        why: &str,
        pieces: Vec<u32>,
    ) -> Result<(), PeerError> {
        let missing = self.missing(layout);
        let pieces: Vec<u32> = match pieces.is_empty() {
            true => missing,
            false => pieces
                .into_iter()
                .filter(|i| missing.binary_search(i).is_ok())
                .collect(),
        };
        tracing::info!(blob = %self.blob, reason = %why, pieces = pieces.len(), "back to source");
        self.fetch_from_source(layout, &pieces).await
    }

    /// Wanted pieces not held, ascending.
    pub(super) fn missing(&self, layout: &PieceLayout) -> Vec<u32> {
        let inner = self.lock();
        self.missing_locked(&inner, layout)
    }

    fn missing_locked(&self, inner: &super::task::Inner, layout: &PieceLayout) -> Vec<u32> {
        let held = self.ctx.store.blob_status(&self.blob).map(|s| s.held);
        // Staged pieces still moving into the store (task.rs, `move_staged`) are held too.
        let staged: std::collections::HashSet<u32> = self
            .ctx
            .staging
            .held(&self.blob)
            .map(|(_, p)| p.into_iter().collect())
            .unwrap_or_default();
        let has = |i: u32| held.as_ref().is_some_and(|h| h.contains(i)) || staged.contains(&i);
        if inner.want_all {
            (0..layout.piece_count()).filter(|i| !has(*i)).collect()
        } else {
            inner
                .wanted
                .iter()
                .copied()
                .filter(|i| *i < layout.piece_count() && !has(*i))
                .collect()
        }
    }

    /// Marks the blob complete once every piece is held (the store checks its sha256).
    async fn complete_if_whole(
        &self,
        meta: &TaskMeta,
        layout: &PieceLayout,
    ) -> Result<(), PeerError> {
        let sd = self.blob;
        let Some(status) = self.ctx.store.blob_status(&sd) else {
            return Ok(());
        };
        if status.complete || status.held.held() < layout.piece_count() {
            self.lock().complete = status.complete;
            return Ok(());
        }
        // The store checks the sha256 through a piece-sized buffer: room for it (budget.rs).
        let room = self
            .ctx
            .transport
            .budget()
            .download(u64::from(layout.piece_size()))
            .await;
        let completed = self.ctx.store.complete_blob(sd).await;
        drop(room);
        match completed {
            Ok(()) => {}
            Err(e) if matches!(e.root(), shoal_store::Error::BlobDigestMismatch { .. }) => {
                // The store dropped the blob: its piece table was wrong. Whoever published it
                // is reported, and the blob is fetched again straight from the origin.
                let from = {
                    let mut inner = self.lock();
                    inner.layout = None;
                    inner.source_only = true;
                    inner.table_from.take()
                };
                tracing::warn!(blob = %self.blob, publisher = ?from, "blob failed its sha256: refetching it from the origin");
                if let Some(parent) = from {
                    self.ctx
                        .report(SchedulerRequest::ReportPieceFailure(ReportPieceFailure {
                        blob: self.blob,
                        parent,
                        piece: None,
                        reason: FailureReason::Corrupt,
                        detail:
                            "the whole blob failed its sha256 with the piece hashes it published"
                                .into(),
                    }));
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let (peers, origin, started) = {
            let mut inner = self.lock();
            inner.complete = true;
            (
                inner.bytes_from_peers,
                inner.bytes_from_origin,
                inner.started,
            )
        };
        tracing::info!(blob = %self.blob, size = meta.size, from_peers = peers, from_origin = origin, "blob complete and verified");
        self.ctx
            .report(SchedulerRequest::DownloadFinished(DownloadFinished {
                blob: self.blob,
                bytes_from_peers: peers,
                bytes_from_origin: origin,
                elapsed_ms: started.map_or(0, |s| s.elapsed().as_millis() as u64),
            }));
        self.notify();
        Ok(())
    }

    /// Gets a piece table: from the scheduler once someone published one, else by importing
    /// the blob from the origin (and publishing the table it yields). A swarm round that
    /// fetched pieces as their hashes streamed in goes on once the table is whole: how it
    /// ended then is returned.
    async fn obtain_table(
        self: &Arc<Self>,
        meta: &TaskMeta,
    ) -> Result<Option<SwarmEnd>, PeerError> {
        let source_only = self.lock().source_only;
        if !source_only {
            if let Some(s) = self.ctx.scheduler(&self.blob) {
                let wanted = PieceSet::full(meta.piece_count());
                let ask = SchedulerRequest::RequestParents(RequestParents {
                    blob: self.blob,
                    wanted,
                    exclude: Vec::new(),
                });
                let wait = match s.request(&ask).await {
                    Ok(SchedulerReply::Parents(ParentsReply::BackToSource { .. })) => false,
                    Ok(SchedulerReply::Parents(_)) => true,
                    Ok(SchedulerReply::Error(e)) if e.code == shoal_proto::ErrorCode::Refused => {
                        return Err(super::refused_by_scheduler(&self.blob, &e));
                    }
                    Ok(other) => {
                        tracing::warn!(blob = %self.blob, reply = ?other, "unexpected scheduler answer");
                        false
                    }
                    Err(_) => false,
                };
                let streamed = s.version() >= shoal_proto::PIECE_HASHES_VERSION;
                if wait && streamed {
                    // Fetch pieces as their hashes are published, until the table is whole.
                    self.ctx.staging.open(*meta);
                    let end = self.swarm(meta).await?;
                    if self.lock().layout.is_some() {
                        return Ok(Some(end));
                    }
                    if let SwarmEnd::BackToSource(why, _) = end {
                        tracing::info!(blob = %self.blob, reason = %why, "no piece table from the swarm");
                    }
                } else if wait && self.wait_for_table(meta).await? {
                    return Ok(None);
                }
            }
            // No scheduler (or it lost the table): a DHT holder may have one, whole or still
            // coming in; with part of it, pieces are fetched as their hashes become known.
            if self.ctx.scheduler(&self.blob).is_none() && self.table_from_dht(meta).await? {
                if self.lock().layout.is_some() {
                    return Ok(None);
                }
                let end = self.swarm(meta).await?;
                if self.lock().layout.is_some() {
                    return Ok(Some(end));
                }
                if let SwarmEnd::BackToSource(why, _) = end {
                    tracing::info!(blob = %self.blob, reason = %why, "no piece table from the DHT's holders");
                }
            }
        }
        self.import(meta).await.map(|()| None)
    }

    /// Polls the scheduler for a published piece table; false when it did not come in time.
    async fn wait_for_table(&self, meta: &TaskMeta) -> Result<bool, PeerError> {
        let deadline = Instant::now() + Duration::from_millis(self.ctx.config.piece_table_wait_ms);
        while Instant::now() < deadline {
            let Some(s) = self.ctx.scheduler(&self.blob) else {
                return Ok(false);
            };
            let origin = self.lock().origin.clone();
            let req = SchedulerRequest::RegisterTask(register_task(*meta, None, None, origin));
            match s.request(&req).await {
                Ok(SchedulerReply::Task(info)) => {
                    if let Some(table) = info.piece_table {
                        self.adopt_table(meta, table).await?;
                        return Ok(true);
                    }
                }
                Ok(SchedulerReply::Error(e)) if e.code == shoal_proto::ErrorCode::Refused => {
                    return Err(super::refused_by_scheduler(&self.blob, &e));
                }
                _ => return Ok(false),
            }
            tokio::time::sleep(TABLE_POLL).await;
        }
        Ok(false)
    }

    /// Imports the whole blob from the origin; the store computes and checks its piece table.
    /// Meanwhile each piece is hashed, staged and its hash published as soon as it arrives, so
    /// other peers can fetch it from here at once (docs/protocol.md, "Streamed piece hashes").
    async fn import(&self, meta: &TaskMeta) -> Result<(), PeerError> {
        let origin = self.lock().origin.clone().ok_or_else(|| {
            PeerError::download(self.blob, "no piece table and no origin to build one from")
        })?;
        let o = self.ctx.origins.get(&origin)?;
        let mismatches = {
            let mut inner = self.lock();
            inner
                .origin_mismatches
                .retain(|t| t.elapsed() < ORIGIN_MISMATCH_WINDOW);
            inner.origin_mismatches.len()
        };
        if mismatches >= ORIGIN_MISMATCH_ATTEMPTS {
            return Err(origin_mismatch(&self.blob, &origin.reference, mismatches));
        }
        tracing::info!(blob = %self.blob, origin = %origin.reference, "fetching the whole blob from origin to build its piece table");
        let staging = &self.ctx.staging;
        staging.open(*meta);
        let mut publish = HashPublisher::new(self.blob);
        let mut on_piece = |index: u32, bytes: Bytes| {
            let hash = *blake3::hash(&bytes).as_bytes();
            let staged = staging.put_own(&self.blob, index, &bytes, hash).is_ok();
            publish.add(index, hash, staged);
            if staged {
                self.ctx.held_news.gained(&self.blob);
            }
            if publish.due() {
                publish.flush(&self.ctx);
            }
        };
        let watch = source::ImportWatch {
            label: &origin.reference,
            idle: self.ctx.config.origin_idle_timeout(),
            on_piece: &mut on_piece,
        };
        let imported = source::import(
            &self.ctx.store,
            o.as_ref(),
            &self.blob,
            meta.piece_size,
            watch,
        )
        .await;
        publish.flush(&self.ctx);
        let layout = match imported {
            Ok(l) => Arc::new(l),
            Err(e) => {
                staging.remove(&self.blob);
                if matches!(&e, PeerError::Store(s) if matches!(s.root(), shoal_store::Error::BlobDigestMismatch { .. }))
                {
                    let mut inner = self.lock();
                    inner.origin_mismatches.push(Instant::now());
                    let n = inner.origin_mismatches.len();
                    drop(inner);
                    return Err(origin_mismatch(&self.blob, &origin.reference, n));
                }
                return Err(e);
            }
        };
        add(&self.ctx.stats.bytes_from_origin, meta.size);
        {
            let mut inner = self.lock();
            inner.bytes_from_origin += meta.size;
            inner.layout = Some(Arc::clone(&layout));
            inner.complete = true;
        }
        // The store serves every piece now.
        staging.remove(&self.blob);
        self.notify();
        let table = layout.pieces().iter().map(|h| *h.as_bytes()).collect();
        let held = PieceSet::full(layout.piece_count());
        // Publishing the table lets every other peer verify pieces of this blob.
        self.ctx
            .report(SchedulerRequest::RegisterTask(register_task(
                *meta,
                Some(table),
                Some(held),
                Some(origin),
            )));
        Ok(())
    }

    /// Fetches `missing` pieces from the origin, contiguous runs per Range GET, each piece
    /// verified as the store takes it.
    async fn fetch_from_source(
        &self,
        layout: &PieceLayout,
        missing: &[u32],
    ) -> Result<(), PeerError> {
        let origin = self.lock().origin.clone().ok_or_else(|| {
            PeerError::download(self.blob, "no parent could serve it and no origin is known")
        })?;
        let o = self.ctx.origins.get(&origin)?;
        let idle = self.ctx.config.origin_idle_timeout();
        let label = origin.reference.as_str();
        let mut runs: Vec<Vec<u32>> = Vec::new();
        for &i in missing {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|l| l + 1 == i) && run.len() < ORIGIN_RUN => {
                    run.push(i)
                }
                _ => runs.push(vec![i]),
            }
        }
        let sd = self.blob;
        let jobs = runs.into_iter().map(|run| {
            let o = Arc::clone(&o);
            async move {
                let first = run.first().copied().unwrap_or(0);
                let lens: Vec<u64> = run.iter().filter_map(|i| layout.piece_len(*i)).collect();
                let start = layout.piece_offset(first);
                source::read_pieces(
                    (o.as_ref(), label, idle),
                    &self.blob,
                    start,
                    first,
                    &lens,
                    self.ctx.transport.budget(),
                    |index, bytes: Bytes| async move {
                        let n = bytes.len() as u64;
                        self.ctx.store.put_piece(sd, index, bytes).await?;
                        add(&self.ctx.stats.bytes_from_origin, n);
                        self.lock().bytes_from_origin += n;
                        self.notify();
                        self.ctx.report(held_added(self.blob, vec![index]));
                        Ok(())
                    },
                )
                .await
            }
        });
        let results: Vec<Result<(), PeerError>> = futures::stream::iter(jobs)
            .buffer_unordered(ORIGIN_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// The error of a blob whose bytes from the origin failed its sha256 `n` times.
fn origin_mismatch(blob: &shoal_proto::Digest, origin: &str, n: usize) -> PeerError {
    PeerError::download(
        blob,
        format!("the origin's bytes do not match the digest: origin {origin} served blob {blob} with a different sha256 ({n} whole-blob attempt(s) failed, at most {ORIGIN_MISMATCH_ATTEMPTS} per download; fix or re-push the blob at the origin)"),
    )
}

/// Batches the hashes and held pieces an import yields into scheduler reports.
struct HashPublisher {
    blob: shoal_proto::Digest,
    first: u32,
    hashes: Vec<[u8; 32]>,
    held: Vec<u32>,
    since: Instant,
}

impl HashPublisher {
    /// Most pieces per report, and the longest a hash waits to be sent.
    const BATCH: usize = 4;
    const EVERY: Duration = Duration::from_millis(100);

    fn new(blob: shoal_proto::Digest) -> Self {
        HashPublisher {
            blob,
            first: 0,
            hashes: Vec::new(),
            held: Vec::new(),
            since: Instant::now(),
        }
    }

    fn add(&mut self, index: u32, hash: [u8; 32], staged: bool) {
        if self.hashes.is_empty() {
            self.first = index;
            self.since = Instant::now();
        }
        self.hashes.push(hash);
        if staged {
            self.held.push(index);
        }
    }

    fn due(&self) -> bool {
        self.hashes.len() >= Self::BATCH
            || self.hashes.len() >= shoal_proto::MAX_HASHES_PER_MESSAGE
            || (!self.hashes.is_empty() && self.since.elapsed() >= Self::EVERY)
    }

    fn flush(&mut self, ctx: &super::Ctx) {
        if !self.hashes.is_empty() {
            let hashes = std::mem::take(&mut self.hashes);
            ctx.report_hashes(self.blob, self.first, hashes);
        }
        if !self.held.is_empty() {
            ctx.report(held_added(self.blob, std::mem::take(&mut self.held)));
        }
    }
}

pub(super) fn held_added(blob: shoal_proto::Digest, pieces: Vec<u32>) -> SchedulerRequest {
    SchedulerRequest::PiecesHeld(PiecesHeld {
        blob,
        pieces: PieceReport::Added(pieces),
    })
}
