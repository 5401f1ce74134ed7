//! The read path of a blob range, for the local API and the registry proxy. When the store holds
//! every piece of the range, the pieces are read and verified ahead on the blocking pool, a few
//! at a time, so both cores work while the current piece is being sent; each read lands in a
//! buffer reused across the stream and goes to hyper as `Bytes` without a copy. Nothing is
//! yielded before its piece matched its BLAKE3 digest. A piece that vanished or failed
//! verification meanwhile sends the rest of the range through the blob's task, which fetches it
//! again. Otherwise the task streams the range as pieces arrive.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use shoal_proto::Digest;
use shoal_store::{AsyncStore, BlobReader, BufferPool, PieceLayout};

use crate::budget::PieceBudget;
use crate::download::{RangeStream, Task};
use crate::error::PeerError;

/// Bytes read ahead of the client per response (at least two reads). Read buffers of all
/// responses together (in flight, or queued until hyper has sent them) stay within the read
/// share of the peer's piece budget (budget.rs); a response's next read waits for room. Reads
/// take room in their response's order, so the read a response waits on always gets it once
/// earlier ones are sent.
const READ_AHEAD: u64 = 16 << 20;
/// One blocking read covers whole pieces adding up to at least this much.
const READ_BYTES: u64 = 4 << 20;

/// Bytes `start..end` of `task`'s blob: from the store with read-ahead when it holds them all,
/// else as the task delivers them (`streaming`: [`Task::read_streaming`], which tees a first
/// fetch from the origin; else [`Task::read_range`]).
pub(crate) async fn read(
    task: &Arc<Task>,
    store: &AsyncStore,
    blob: Digest,
    start: u64,
    end: u64,
    streaming: bool,
) -> Result<RangeStream, PeerError> {
    if let Some(held) = held(store, task.budget(), blob, start, end) {
        return Ok(with_task_fallback(held, Arc::clone(task), end));
    }
    if streaming {
        task.read_streaming(start, end).await
    } else {
        task.read_range(start, end)
    }
}

/// A failed read-ahead: where its bytes began and why.
type Failed = (u64, PeerError);

/// The range from the store, if it holds every covering piece now (memory only: no I/O yet).
fn held(
    store: &AsyncStore,
    budget: &PieceBudget,
    blob: Digest,
    start: u64,
    end: u64,
) -> Option<impl Stream<Item = Result<Bytes, Failed>> + Send + 'static> {
    let digest = blob;
    let status = store.blob_status(&digest)?;
    let layout = Arc::clone(&status.layout);
    if start >= end || end > layout.size() {
        return None;
    }
    let pieces = layout.pieces_for_range(start, end - start);
    if status.held.first_missing(pieces.clone()).is_some() {
        return None;
    }
    let reader = store.store().blob_reader(&digest).ok()?;
    if reader.layout() != &layout {
        return None;
    }
    let reads = plan(&layout, pieces);
    let per_read = reads.first().map_or(READ_BYTES, |r| span(&layout, r).1);
    let depth = (READ_AHEAD / per_read.max(1)).clamp(2, 16) as usize;
    // A response's buffers are reused once hyper has sent them: two reads' worth stay idle.
    let (reader, pool) = (Arc::new(reader), BufferPool::new(2 * per_read as usize));
    let (budget, span_of) = (budget.clone(), Arc::clone(&layout));
    let stream = futures::stream::iter(reads)
        .then(move |pieces| {
            let (budget, len) = (budget.clone(), span(&span_of, &pieces).1);
            async move { (pieces, budget.read(len).await) }
        })
        .map(move |(pieces, permit)| {
            let (reader, pool) = (Arc::clone(&reader), Arc::clone(&pool));
            async move {
                let (at, len) = span(reader.layout(), &pieces);
                // The client's share of this read: all of it but at the range's two ends.
                let from = start.saturating_sub(at) as usize;
                let to = (end.min(at + len) - at) as usize;
                let pos = at.max(start);
                let mut buf = pool.take(len as usize);
                let filled = tokio::task::spawn_blocking(move || {
                    read_pieces(&reader, pieces, at, &mut buf).map(|()| buf)
                })
                .await;
                match filled {
                    Ok(Ok(buf)) => Ok(pool.lend_with(buf, permit).slice(from..to)),
                    Ok(Err(e)) => Err((pos, e.into())),
                    Err(e) => Err((pos, PeerError::download(blob, format!("read task: {e}")))),
                }
            }
        })
        .buffered(depth);
    Some(stream)
}

/// Cuts `pieces` into runs of whole pieces of at least [`READ_BYTES`] (the last may be less).
fn plan(layout: &PieceLayout, pieces: Range<u32>) -> Vec<Range<u32>> {
    let per = (READ_BYTES / u64::from(layout.piece_size()).max(1)).max(1) as u32;
    let mut out = Vec::with_capacity(pieces.len().div_ceil(per as usize));
    let mut first = pieces.start;
    while first < pieces.end {
        let last = first.saturating_add(per).min(pieces.end);
        out.push(first..last);
        first = last;
    }
    out
}

/// Blob offset and length of a run of pieces.
fn span(layout: &PieceLayout, pieces: &Range<u32>) -> (u64, u64) {
    let at = layout.piece_offset(pieces.start);
    let len = (pieces.start..pieces.end)
        .map(|i| layout.piece_len(i).unwrap_or(0))
        .sum();
    (at, len)
}

/// Reads a run of pieces, each verified, into `buf` (the run's length, starting at blob offset `at`).
fn read_pieces(
    reader: &BlobReader,
    pieces: Range<u32>,
    at: u64,
    buf: &mut [u8],
) -> Result<(), shoal_store::Error> {
    let layout = Arc::clone(reader.layout());
    for i in pieces {
        let off = (layout.piece_offset(i) - at) as usize;
        let len = layout.piece_len(i).unwrap_or(0) as usize;
        let out = buf
            .get_mut(off..off + len)
            .ok_or_else(|| shoal_store::Error::OutOfRange {
                item: format!("piece {i}"),
                reason: "outside the read buffer".into(),
            })?;
        reader.read_piece_into(i, out)?;
    }
    Ok(())
}

/// The store's stream, then, if a read fails, the rest of the range through the task.
fn with_task_fallback(
    held: impl Stream<Item = Result<Bytes, Failed>> + Send + 'static,
    task: Arc<Task>,
    end: u64,
) -> RangeStream {
    enum Src<S> {
        Held(std::pin::Pin<Box<S>>),
        Task(RangeStream),
    }
    let stream = futures::stream::unfold(Some(Src::Held(Box::pin(held))), move |src| {
        let task = Arc::clone(&task);
        async move {
            match src? {
                Src::Held(mut s) => match s.next().await {
                    Some(Ok(b)) => Some((Ok(b), Some(Src::Held(s)))),
                    None => None,
                    Some(Err((pos, e))) => {
                        tracing::info!(blob = %task.blob(), at = pos, error = %e, "cached read failed; rest through the swarm");
                        match task.read_range(pos, end) {
                            Ok(mut t) => match t.next().await {
                                Some(item) => {
                                    let go_on = item.is_ok();
                                    Some((item, go_on.then_some(Src::Task(t))))
                                }
                                None => None,
                            },
                            Err(e) => Some((Err(e), None)),
                        }
                    }
                },
                Src::Task(mut t) => match t.next().await {
                    Some(item) => {
                        let go_on = item.is_ok();
                        Some((item, go_on.then_some(Src::Task(t))))
                    }
                    None => None,
                },
            }
        }
    });
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::Digest as BlobDigest;
    use shoal_store::Blake3Hash;

    #[test]
    fn plans_whole_piece_runs() {
        let hashes = |n| vec![Blake3Hash::from_bytes([0; 32]); n];
        let d = BlobDigest::from_bytes([1; 32]);
        let small = PieceLayout::new(&d, (1 << 20) + 5, 64 << 10, hashes(17)).unwrap();
        let runs = plan(&small, 0..17);
        assert_eq!(runs, vec![0..17]);
        assert_eq!(span(&small, &runs[0]), (0, (1 << 20) + 5));
        let big = PieceLayout::new(&d, 10 << 20, 4 << 20, hashes(3)).unwrap();
        let runs = plan(&big, 1..3);
        assert_eq!(runs, vec![1..2, 2..3]);
        assert_eq!(span(&big, &runs[1]), (8 << 20, 2 << 20));
    }
}
