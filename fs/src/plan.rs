//! What a load fetches: each missing chunk becomes a part — the stored form of a raw or zstd
//! chunk, or a span run: every chunk of the layer that decodes from one checkpoint
//! (docs/format.md, "Chunk encodings") — and parts of one blob that lie close together are
//! merged into one request (the gap between them bounded by `max_gap`, the request by
//! `max_request`; one part is never split, so a part larger than `max_request` is a request of
//! its own, read as a stream).
//!
//! A span run is decoded whole, from its checkpoint: a read of one chunk pays for the span's
//! compressed bytes anyway (the span ends where its last chunk's bytes came out), and every
//! other chunk of the span is verified and cached on the way, so a sequential read, or a read
//! of the next small file, does not inflate from the checkpoint again.

use std::collections::{BTreeMap, HashMap};

use shoal_format::bootstrap::{Bootstrap, ChunkView};
use shoal_format::model::{Checkpoint, CheckpointKind, ChunkEncoding};

/// The span runs of a bootstrap: per checkpoint, its chunks by distance from it.
pub(crate) struct Runs {
    /// Checkpoint index -> chunk-table indices, sorted by `skip`, none overlapping the one
    /// before it (an overlapping chunk is decoded in a run of its own).
    by_checkpoint: HashMap<u32, Vec<u32>>,
}

impl Runs {
    /// Indexes every span chunk of `boot` (none for a converted image).
    pub(crate) fn new(boot: &Bootstrap) -> Runs {
        let mut by: HashMap<u32, Vec<(u64, u32, u32)>> = HashMap::new();
        for i in 0..boot.chunk_count() {
            let Some(c) = boot.chunk(i) else { continue };
            if let ChunkEncoding::Span { checkpoint, skip } = c.encoding {
                by.entry(checkpoint).or_default().push((skip, c.size, i));
            }
        }
        let by_checkpoint = by
            .into_iter()
            .map(|(cp, mut chunks)| {
                chunks.sort_unstable();
                let mut run = Vec::with_capacity(chunks.len());
                let mut end = 0u64;
                for (skip, size, i) in chunks {
                    if skip >= end {
                        run.push(i);
                        end = skip.saturating_add(u64::from(size));
                    }
                }
                (cp, run)
            })
            .collect();
        Runs { by_checkpoint }
    }

    /// The run of checkpoint `checkpoint`.
    fn run(&self, boot: &Bootstrap, checkpoint: u32) -> Vec<ChunkView> {
        self.by_checkpoint
            .get(&checkpoint)
            .map(|r| r.iter().filter_map(|i| boot.chunk(*i)).collect())
            .unwrap_or_default()
    }
}

/// Chunks decoded from one checkpoint in one pass.
#[derive(Debug, Clone)]
pub(crate) struct SpanPart {
    /// The checkpoint's index.
    pub index: u32,
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The chunks decoded, sorted by `skip`.
    pub run: Vec<ChunkView>,
    /// The deflate checkpoint's window (a raw or zstd chunk of the side blob).
    pub window: Option<ChunkView>,
}

/// What a part holds.
#[derive(Debug, Clone)]
pub(crate) enum PartKind {
    /// A raw or zstd chunk.
    Plain(ChunkView),
    /// A span run.
    Span(SpanPart),
}

/// Bytes `start..end` of blob `blob` and how to decode them.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    pub blob: u32,
    pub start: u64,
    pub end: u64,
    pub kind: PartKind,
}

impl Part {
    /// The part of a raw or zstd chunk.
    pub(crate) fn plain(c: ChunkView) -> Part {
        Part {
            blob: c.blob,
            start: c.offset,
            end: c.offset + u64::from(c.stored_size),
            kind: PartKind::Plain(c),
        }
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.end - self.start
    }
}

/// One request to a source: bytes `start..end` of blob `blob`, covering `parts`.
#[derive(Debug)]
pub(crate) struct Request {
    pub blob: u32,
    pub start: u64,
    pub end: u64,
    pub parts: Vec<Part>,
}

/// Why a chunk cannot be planned (the bootstrap was validated, so only a bug gets here).
#[derive(Debug)]
pub(crate) struct PlanError {
    pub chunk: ChunkView,
    pub reason: &'static str,
}

/// The parts that load `chunks` (the raw and zstd ones each on their own, the span ones in the
/// runs of their checkpoints); `needs_window(w)` says whether a deflate window still has to be
/// fetched (it is then loaded in the same requests, and decoded before the spans).
pub(crate) fn parts(
    boot: &Bootstrap,
    runs: &Runs,
    chunks: &[ChunkView],
    needs_window: impl Fn(&ChunkView) -> bool,
) -> Result<Vec<Part>, PlanError> {
    let mut out = Vec::new();
    let mut spans: BTreeMap<u32, Vec<ChunkView>> = BTreeMap::new();
    for c in chunks {
        match c.encoding {
            ChunkEncoding::Span { checkpoint, .. } => spans.entry(checkpoint).or_default().push(*c),
            _ => out.push(Part::plain(*c)),
        }
    }
    let mut windows: Vec<u32> = Vec::new();
    for (index, wanted) in spans {
        let Some(checkpoint) = boot.checkpoint(index) else {
            return Err(PlanError {
                chunk: wanted[0],
                reason: "its checkpoint is not in the bootstrap",
            });
        };
        let window = match checkpoint.kind {
            CheckpointKind::Deflate { window, .. } => {
                let w = boot.chunk(window).ok_or(PlanError {
                    chunk: wanted[0],
                    reason: "its checkpoint's window is not in the bootstrap",
                })?;
                if matches!(w.encoding, ChunkEncoding::Span { .. }) {
                    return Err(PlanError {
                        chunk: wanted[0],
                        reason: "its checkpoint's window is a span",
                    });
                }
                if !windows.contains(&window) && needs_window(&w) {
                    windows.push(window);
                    out.push(Part::plain(w));
                }
                Some(w)
            }
            _ => None,
        };
        let run = runs.run(boot, index);
        let mut span = |run: Vec<ChunkView>| {
            let end = run
                .iter()
                .map(|c| c.offset + u64::from(c.stored_size))
                .max()
                .unwrap_or(checkpoint.in_offset);
            out.push(Part {
                blob: checkpoint.blob,
                start: checkpoint.in_offset,
                end,
                kind: PartKind::Span(SpanPart {
                    index,
                    checkpoint,
                    run,
                    window,
                }),
            });
        };
        // A chunk the run left out (it overlaps another) is decoded on its own.
        let (inside, outside): (Vec<ChunkView>, Vec<ChunkView>) = wanted
            .into_iter()
            .partition(|c| run.iter().any(|r| r.index == c.index));
        if !inside.is_empty() {
            span(run);
        }
        for c in outside {
            span(vec![c]);
        }
    }
    Ok(out)
}

/// Merges `parts` into requests: same blob, sorted by offset, the next part starting at most
/// `max_gap` after the request's end, the request at most `max_request` long (a single part
/// may be longer).
pub(crate) fn requests(mut parts: Vec<Part>, max_gap: u64, max_request: u64) -> Vec<Request> {
    parts.sort_by_key(|p| (p.blob, p.start, p.end));
    let mut out: Vec<Request> = Vec::new();
    for p in parts {
        match out.last_mut() {
            Some(r)
                if r.blob == p.blob
                    && p.start <= r.end.saturating_add(max_gap)
                    && r.end.max(p.end) - r.start <= max_request =>
            {
                r.end = r.end.max(p.end);
                r.parts.push(p);
            }
            _ => out.push(Request {
                blob: p.blob,
                start: p.start,
                end: p.end,
                parts: vec![p],
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(blob: u32, offset: u64, stored: u32, index: u32) -> Part {
        Part::plain(ChunkView {
            index,
            hash: [index as u8; 32],
            blob,
            offset,
            stored_size: stored,
            size: stored,
            encoding: ChunkEncoding::Raw,
        })
    }

    #[test]
    fn near_parts_merge_and_large_ones_stay_whole() {
        let parts = vec![
            plain(0, 100, 10, 1),
            plain(0, 0, 50, 0),
            plain(0, 60, 20, 2),
            plain(1, 0, 10, 3),
            plain(0, 1000, 5000, 4),
        ];
        let r = requests(parts, 32, 1024);
        let spans: Vec<(u32, u64, u64, usize)> = r
            .iter()
            .map(|r| (r.blob, r.start, r.end, r.parts.len()))
            .collect();
        assert_eq!(
            spans,
            vec![(0, 0, 110, 3), (0, 1000, 6000, 1), (1, 0, 10, 1)]
        );
    }

    #[test]
    fn overlapping_parts_share_a_request() {
        // Two span runs whose ranges overlap (a chunk of the first crosses the second's
        // checkpoint): one request for the union.
        let mut a = plain(0, 0, 300, 0);
        a.end = 300;
        let mut b = plain(0, 200, 300, 1);
        b.end = 500;
        let r = requests(vec![b, a], 0, 1024);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].start, r[0].end), (0, 500));
    }
}
