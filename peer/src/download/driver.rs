//! The driver of one task: gets a piece table, then fetches every wanted piece from parents (the
//! fastest holder of each piece, several at once) or from the origin, drops and reports parents
//! that fail, stall or send bad bytes, and completes the blob once every piece is held.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use shoal_proto::{
    DownloadFinished, ParentsReply, PieceReport, PieceSet, PiecesHeld, RequestParents,
    SchedulerReply, SchedulerRequest, TaskMeta,
};
use shoal_store::PieceLayout;

use super::swarm::SwarmEnd;
use super::task::Task;
use super::{add, register_task, source};
use crate::convert::store_digest;
use crate::error::PeerError;

/// Contiguous pieces read with one origin Range GET.
const ORIGIN_RUN: usize = 16;
/// Origin Range GETs of one task at once.
const ORIGIN_CONCURRENCY: usize = 4;
/// How often a download waiting for a piece table asks the scheduler for it.
const TABLE_POLL: Duration = Duration::from_millis(200);

impl Task {
    /// Runs the download until every wanted piece is held; records failure for readers.
    pub(super) async fn drive(self: Arc<Self>) {
        let result = self.drive_inner().await;
        {
            let mut inner = self.lock();
            if let Err(e) = &result {
                tracing::warn!(blob = %self.blob, error = %e, "download failed");
                inner.failure = Some(e.to_string());
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
                self.obtain_table(&meta).await?;
                continue;
            };
            let _pin = self.ctx.store.pin_blob(&store_digest(&self.blob))?;
            let missing = self.missing(&layout);
            if missing.is_empty() {
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
            match self.swarm(&layout).await? {
                SwarmEnd::Done => {}
                SwarmEnd::BackToSource(why) => {
                    tracing::info!(blob = %self.blob, reason = %why, "back to source");
                    let missing = self.missing(&layout);
                    self.fetch_from_source(&layout, &missing).await?;
                }
            }
        }
    }

    /// Wanted pieces not held, ascending.
    pub(super) fn missing(&self, layout: &PieceLayout) -> Vec<u32> {
        let inner = self.lock();
        self.missing_locked(&inner, layout)
    }

    fn missing_locked(&self, inner: &super::task::Inner, layout: &PieceLayout) -> Vec<u32> {
        let held = self
            .ctx
            .store
            .blob_status(&store_digest(&self.blob))
            .map(|s| s.held);
        let has = |i: u32| held.as_ref().is_some_and(|h| h.contains(i));
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
        let sd = store_digest(&self.blob);
        let Some(status) = self.ctx.store.blob_status(&sd) else {
            return Ok(());
        };
        if status.complete || status.held.count() < layout.piece_count() {
            self.lock().complete = status.complete;
            return Ok(());
        }
        self.ctx.store.complete_blob(sd).await?;
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
    /// the blob from the origin (and publishing the table it yields).
    async fn obtain_table(self: &Arc<Self>, meta: &TaskMeta) -> Result<(), PeerError> {
        let source_only = self.lock().source_only;
        if !source_only {
            if let Some(s) = self.ctx.scheduler(&self.blob) {
                let wanted = PieceSet::full(meta.piece_count())?;
                let ask = SchedulerRequest::RequestParents(RequestParents {
                    blob: self.blob,
                    wanted,
                    exclude: Vec::new(),
                });
                let wait = match s.request(&ask).await {
                    Ok(SchedulerReply::Parents(ParentsReply::BackToSource { .. })) => false,
                    Ok(SchedulerReply::Parents(_)) => true,
                    Ok(other) => {
                        tracing::warn!(blob = %self.blob, reply = ?other, "unexpected scheduler answer");
                        false
                    }
                    Err(_) => false,
                };
                if wait && self.wait_for_table(meta).await? {
                    return Ok(());
                }
            }
            // No scheduler (or it lost the table): a DHT holder may have one.
            if self.ctx.scheduler(&self.blob).is_none()
                && self.adopt_table_from_holders(meta).await?
            {
                return Ok(());
            }
        }
        self.import(meta).await
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
                _ => return Ok(false),
            }
            tokio::time::sleep(TABLE_POLL).await;
        }
        Ok(false)
    }

    /// Imports the whole blob from the origin; the store computes and checks its piece table.
    async fn import(&self, meta: &TaskMeta) -> Result<(), PeerError> {
        let origin = self.lock().origin.clone().ok_or_else(|| {
            PeerError::download(self.blob, "no piece table and no origin to build one from")
        })?;
        let o = self.ctx.origins.get(&origin)?;
        tracing::info!(blob = %self.blob, origin = %origin.reference, "fetching the whole blob from origin to build its piece table");
        let layout = Arc::new(
            source::import(&self.ctx.store, o.as_ref(), &self.blob, meta.piece_size).await?,
        );
        add(&self.ctx.stats.bytes_from_origin, meta.size);
        {
            let mut inner = self.lock();
            inner.bytes_from_origin += meta.size;
            inner.layout = Some(Arc::clone(&layout));
            inner.complete = true;
        }
        self.notify();
        let table = layout.pieces().iter().map(|h| *h.as_bytes()).collect();
        let held = PieceSet::full(layout.piece_count())?;
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
        let mut runs: Vec<Vec<u32>> = Vec::new();
        for &i in missing {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|l| l + 1 == i) && run.len() < ORIGIN_RUN => {
                    run.push(i)
                }
                _ => runs.push(vec![i]),
            }
        }
        let sd = store_digest(&self.blob);
        let jobs = runs.into_iter().map(|run| {
            let o = Arc::clone(&o);
            async move {
                let first = run.first().copied().unwrap_or(0);
                let lens: Vec<u64> = run.iter().filter_map(|i| layout.piece_len(*i)).collect();
                let start = layout.piece_offset(first);
                source::read_pieces(
                    o.as_ref(),
                    &self.blob,
                    start,
                    first,
                    &lens,
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

pub(super) fn held_added(blob: shoal_proto::Digest, pieces: Vec<u32>) -> SchedulerRequest {
    SchedulerRequest::PiecesHeld(PiecesHeld {
        blob,
        pieces: PieceReport::Added(pieces),
    })
}
