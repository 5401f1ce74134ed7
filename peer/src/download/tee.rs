//! The first fetch of a blob nobody has a piece table for, streamed: the origin's bytes go to
//! the reader as they arrive (a plain mirror's pass-through) while the store imports the same
//! bytes, computes the piece table and checks the sha256. Only after the sha256 matched is the
//! blob marked complete and its table published; the reader's last chunk is held back until
//! then, so a blob that fails verification never reaches a reader whole (its stream ends with
//! an error instead). Other readers of the blob meanwhile wait for the verified store copy.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use shoal_proto::{
    OriginRef, ParentsReply, PieceSet, RequestParents, SchedulerReply, SchedulerRequest, TaskMeta,
};
use shoal_store::PieceLayout;
use tokio::sync::mpsc;

use super::source::{ChannelReader, IMPORT_QUEUE};
use super::task::{RangeStream, Task};
use super::{add, register_task};
use crate::convert::origin_digest;
use crate::error::PeerError;

/// Chunks queued between the import and a reader of the teed stream.
const TEE_QUEUE: usize = 16;

impl Task {
    /// Bytes `start..end` of the blob, streamed at once even when this is the blob's very first
    /// fetch: when no piece table is known, nothing is cached and no download runs (and the
    /// scheduler, if any, sends us to the origin), the origin's bytes are teed to the reader and
    /// into the store's import. Otherwise the same as [`Task::read_range`].
    pub async fn read_streaming(
        self: &Arc<Self>,
        start: u64,
        end: u64,
    ) -> Result<RangeStream, PeerError> {
        let (meta, origin) = {
            let inner = self.lock();
            (inner.meta, inner.origin.clone())
        };
        let (Some(meta), Some(origin)) = (meta, origin) else {
            return self.read_range(start, end);
        };
        if start > end || end > meta.size || !self.claim_import(&meta).await {
            return self.read_range(start, end);
        }
        let (tx, mut rx) = mpsc::channel(TEE_QUEUE);
        let task = Arc::clone(self);
        tokio::spawn(async move { task.tee(meta, origin, start, end, tx).await });
        Ok(Box::pin(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }

    /// Takes the first origin fetch for a streaming reader; false when someone else fetches
    /// (a download runs, a table is known, or the scheduler has parents or a seed for it).
    async fn claim_import(self: &Arc<Self>, meta: &TaskMeta) -> bool {
        {
            let mut inner = self.lock();
            let cached = self.ctx.store.blob_status(&self.blob).is_some();
            if cached
                || inner.layout.is_some()
                || inner.complete
                || inner.running
                || inner.source_only
            {
                return false;
            }
            // Marked running so other readers wait instead of starting a second import.
            inner.running = true;
            inner.failure = None;
            inner.started.get_or_insert_with(Instant::now);
        }
        let Some(s) = self.ctx.scheduler(&self.blob) else {
            return true;
        };
        let wanted = PieceSet::full(meta.piece_count());
        let ask = SchedulerRequest::RequestParents(RequestParents {
            blob: self.blob,
            wanted,
            exclude: Vec::new(),
        });
        match s.request(&ask).await {
            // Someone holds pieces or a seed is on its way: the driver waits for their table.
            Ok(SchedulerReply::Parents(ParentsReply::Parents(_)))
            | Ok(SchedulerReply::Parents(ParentsReply::WaitForSeed { .. })) => {
                self.release();
                false
            }
            // A refused task: the driver asks again and fails with the scheduler's reason.
            Ok(SchedulerReply::Error(e)) if e.code == shoal_proto::ErrorCode::Refused => {
                self.release();
                false
            }
            _ => true,
        }
    }

    /// Gives up the claim; the driver takes over for readers that want pieces meanwhile.
    fn release(self: &Arc<Self>) {
        let wanted = {
            let mut inner = self.lock();
            inner.running = false;
            inner.want_all || !inner.wanted.is_empty()
        };
        if wanted {
            self.start();
        }
        self.notify();
    }

    /// Streams the origin's blob into the store's import and bytes `start..end` of it to `tx`.
    async fn tee(
        self: Arc<Self>,
        meta: TaskMeta,
        origin: OriginRef,
        start: u64,
        end: u64,
        tx: mpsc::Sender<Result<Bytes, PeerError>>,
    ) {
        tracing::info!(blob = %self.blob, origin = %origin.reference, "first fetch: streaming from origin while importing");
        let result = self.tee_inner(&meta, &origin, start, end, &tx).await;
        match result {
            Ok((layout, last)) => {
                self.imported(&meta, origin, layout);
                if let Some(last) = last {
                    let _ = tx.send(Ok(last)).await;
                }
            }
            Err(e) => {
                tracing::warn!(blob = %self.blob, error = %e, "streamed first fetch failed");
                // Recorded for the task status, which clients read when their stream breaks.
                self.lock().failure = Some(e.to_string());
                let _ = tx.send(Err(e)).await;
                self.release();
            }
        }
    }

    /// Runs import and pump together; returns the verified layout and the held-back last chunk.
    async fn tee_inner(
        &self,
        meta: &TaskMeta,
        origin: &OriginRef,
        start: u64,
        end: u64,
        tx: &mpsc::Sender<Result<Bytes, PeerError>>,
    ) -> Result<(PieceLayout, Option<Bytes>), PeerError> {
        let o = self.ctx.origins.get(origin)?;
        let (label, idle) = (
            origin.reference.as_str(),
            self.ctx.config.origin_idle_timeout(),
        );
        let blob = self.blob;
        let digest = origin_digest(&blob)?;
        let read = shoal_origin::Origin::read(o.as_ref(), &digest);
        let mut stream = match tokio::time::timeout(idle, read).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(PeerError::download(blob, format!("origin {label}: {e}"))),
            Err(_) => return Err(super::source::silent(&blob, label, idle, "the blob")),
        };
        let (itx, irx) = mpsc::channel::<std::io::Result<Bytes>>(IMPORT_QUEUE);
        let import =
            self.ctx
                .store
                .import_blob(self.blob, meta.piece_size, ChannelReader::new(irx));
        let pump = async move {
            let mut pos = 0u64;
            let mut held: Option<Bytes> = None;
            let mut reader_gone = false;
            loop {
                let chunk = match tokio::time::timeout(idle, stream.next()).await {
                    Ok(Some(Ok(c))) => c,
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        let _ = itx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return Err(PeerError::download(blob, format!("origin {label}: {e}")));
                    }
                    Err(_) => {
                        let e = super::source::silent(&blob, label, idle, "the blob");
                        let _ = itx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return Err(e);
                    }
                };
                let at = pos;
                pos += chunk.len() as u64;
                let share = slice_of(&chunk, at, start, end);
                if itx.send(Ok(chunk)).await.is_err() {
                    break; // the import stopped (its error is reported below)
                }
                if let Some(share) = share {
                    if let Some(prev) = held.replace(share) {
                        // A reader that went away does not stop the import: the blob is cached anyway.
                        reader_gone = reader_gone || tx.send(Ok(prev)).await.is_err();
                    }
                }
            }
            Ok(held)
        };
        let (layout, held) = tokio::join!(import, pump);
        let layout = layout?;
        Ok((layout, held?))
    }

    /// Records a verified import: layout, completion, counters, and the published table.
    fn imported(&self, meta: &TaskMeta, origin: OriginRef, layout: PieceLayout) {
        let layout = Arc::new(layout);
        add(&self.ctx.stats.bytes_from_origin, meta.size);
        {
            let mut inner = self.lock();
            inner.bytes_from_origin += meta.size;
            inner.layout = Some(Arc::clone(&layout));
            inner.complete = true;
            inner.running = false;
        }
        self.notify();
        let table = layout.pieces().iter().map(|h| *h.as_bytes()).collect();
        let held = PieceSet::full(layout.piece_count());
        // Publishing the table lets every other peer fetch and verify pieces of this blob.
        self.ctx
            .report(SchedulerRequest::RegisterTask(register_task(
                *meta,
                Some(table),
                Some(held),
                Some(origin),
            )));
    }
}

/// The part of `chunk` (at blob offset `at`) inside `start..end`, if any.
fn slice_of(chunk: &Bytes, at: u64, start: u64, end: u64) -> Option<Bytes> {
    let from = start.max(at);
    let to = end.min(at + chunk.len() as u64);
    (from < to).then(|| chunk.slice((from - at) as usize..(to - at) as usize))
}

#[cfg(test)]
mod tests {
    use super::slice_of;
    use bytes::Bytes;

    #[test]
    fn slices() {
        let c = Bytes::from_static(b"0123456789");
        assert_eq!(slice_of(&c, 100, 0, 1000).unwrap(), c);
        assert_eq!(
            slice_of(&c, 100, 103, 105).unwrap(),
            Bytes::from_static(b"34")
        );
        assert_eq!(
            slice_of(&c, 100, 108, 200).unwrap(),
            Bytes::from_static(b"89")
        );
        assert!(slice_of(&c, 100, 110, 200).is_none());
        assert!(slice_of(&c, 100, 0, 100).is_none());
        assert!(slice_of(&c, 100, 105, 105).is_none());
    }
}
