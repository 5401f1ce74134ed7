//! Indexing one layer: its tar read once through [`super::stream`], every file cut into chunks
//! (BLAKE3 of the uncompressed bytes) whose place in the ORIGINAL blob is recorded — a byte range
//! of a plain tar, or a span from the checkpoint before it in a gzip or zstd layer — and the
//! layer's own tree kept apart from the image flattened so far (hardlinks to a lower layer's file
//! copy it up, as overlayfs does).

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

use super::overlay::{self, Listed};
use super::side::SideBlob;
use super::stream::{Compression, Decoder, Found, FoundKind, Hashing, Progress};
use super::{ChunkRec, Placement};
use crate::build::flatten::{split_path, Entry, EntryKind, FileChunks, NodeKind, Tree};
use crate::build::layer::TarReader;
use crate::error::{Error, Result};
use crate::model::{Blake3, BlobInfo};

/// A layer after reading: its overlay-form tree, blob and checkpoints.
pub(crate) struct ReadLayer {
    pub compression: Compression,
    pub tree: Tree,
    pub blob: BlobInfo,
    pub found: Vec<Found>,
    /// Uncompressed tar bytes.
    pub tar_bytes: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Chunks that could not be a range of the blob (sparse files), stored in the side blob.
    pub side_chunks: u64,
}

/// What reading one layer needs from the image-wide state.
pub(crate) struct LayerInput<'a> {
    /// This layer's index in the image.
    pub layer: u32,
    /// The layer's digest, for errors.
    pub name: &'a str,
    pub chunk_size: u32,
    pub span: u64,
    pub piece_size: u32,
    /// Every chunk of every layer so far, by sequence number.
    pub chunks: &'a mut Vec<ChunkRec>,
    /// The image flattened through the previous layer; this layer is applied to it.
    pub merged: &'a mut Tree,
    /// This layer's side blob (chunks that are not ranges of the layer, and windows).
    pub side: &'a mut SideBlob,
}

fn entry_err(name: &str, entry: &str, reason: impl Into<String>) -> Error {
    Error::BadEntry {
        layer: name.to_string(),
        entry: entry.to_string(),
        reason: reason.into(),
    }
}

/// Reads layer blob `src` once (checking nothing against its digest: the caller compares).
pub(crate) fn read_layer(src: impl Read, input: LayerInput<'_>) -> Result<ReadLayer> {
    let name = input.name;
    let io_err = |e: io::Error| entry_err(name, "", e.to_string());
    let progress = Rc::new(RefCell::new(Progress::default()));
    let (compression, decoder) = Decoder::new(
        Hashing::new(src, input.piece_size),
        input.span,
        Rc::clone(&progress),
    )
    .map_err(io_err)?;
    let mut tar = TarReader::new(decoder);
    let mut tree = Tree::new();
    let mut listed = Listed::default();
    let (mut files, mut file_bytes, mut side_chunks) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    while let Some(te) = tar
        .next_entry()
        .map_err(|e| entry_err(name, "(after the last good entry)", e.to_string()))?
    {
        let entry_name = String::from_utf8_lossy(&te.entry.path).into_owned();
        let bad = |reason: String| entry_err(name, &entry_name, reason);
        let comps = split_path(&te.entry.path).map_err(bad)?;
        let file = if te.entry.kind == EntryKind::File {
            files += 1;
            file_bytes += te.size;
            let sparse = te.sparse.is_some();
            let size = te.size;
            let mut seqs = Vec::new();
            let mut data = tar.data(&te);
            let mut left = size;
            while left > 0 {
                let n = left.min(u64::from(input.chunk_size)) as usize;
                let (start, cp) = {
                    let p = progress.borrow();
                    (p.out_pos, p.found.len().checked_sub(1))
                };
                buf.resize(n, 0);
                data.read_exact(&mut buf)
                    .map_err(|e| bad(format!("reading content: {e}")))?;
                left -= n as u64;
                let hash: Blake3 = *blake3::hash(&buf).as_bytes();
                let end_in = progress.borrow().in_pos;
                let place = if sparse {
                    // Holes are not in the tar: the chunk is stored beside the layer.
                    side_chunks += 1;
                    input.side.add(&hash, &buf)?
                } else {
                    match (compression, cp) {
                        (Compression::None, _) => Placement::Range {
                            layer: input.layer,
                            offset: start,
                        },
                        (_, Some(cp)) => Placement::Span {
                            layer: input.layer,
                            checkpoint: cp as u32,
                            end_in,
                            skip: start - progress.borrow().found[cp].out_offset,
                        },
                        (_, None) => {
                            return Err(bad("compressed data before the first checkpoint".into()))
                        }
                    }
                };
                seqs.push(input.chunks.len() as u64);
                input.chunks.push(ChunkRec {
                    hash,
                    size: n as u32,
                    place,
                });
            }
            Some(FileChunks { size, seqs })
        } else {
            None
        };
        if let EntryKind::Hardlink(target) = &te.entry.kind {
            copy_up(&mut tree, input.merged, target, input.layer).map_err(bad)?;
        }
        if te.entry.kind == EntryKind::Dir {
            listed.dir(&comps);
        }
        tree.apply(te.entry.clone(), file.clone(), input.layer, false)
            .map_err(bad)?;
        input
            .merged
            .apply(te.entry, file, input.layer, true)
            .map_err(bad)?;
    }
    let tar_bytes = tar.consumed;
    // The rest of the stream (tar padding, gzip trailers) is read and checked too.
    let mut decoder = tar.inner;
    io::copy(&mut decoder, &mut io::sink()).map_err(io_err)?;
    let blob = decoder.source().finish().map_err(io_err)?;
    let (whiteouts, opaque_dirs) = overlay::to_overlay_form(&mut tree, input.merged, &listed)
        .map_err(|r| entry_err(name, "", r))?;
    let total_out = progress.borrow().out_pos;
    let mut found = std::mem::take(&mut progress.borrow_mut().found);
    // Starts at the very end serve no chunk.
    while found
        .last()
        .is_some_and(|f| f.out_offset >= total_out || f.in_offset >= blob.size)
    {
        found.pop();
    }
    Ok(ReadLayer {
        compression,
        tree,
        blob,
        found,
        tar_bytes,
        files,
        file_bytes,
        whiteouts,
        opaque_dirs,
        side_chunks,
    })
}

/// A hardlink to a file this layer does not hold: the file is copied into the layer first (with
/// its content's chunks, which stay where they are), as overlayfs copies it up.
fn copy_up(layer: &mut Tree, merged: &mut Tree, target: &[u8], id: u32) -> Result<(), String> {
    if layer.lookup(target)?.is_some() {
        return Ok(());
    }
    let Some(node) = merged.lookup(target)? else {
        return Ok(()); // `apply` names the missing target.
    };
    let n = &merged.nodes[node];
    let (kind, file) = match &n.kind {
        NodeKind::File(f) => (EntryKind::File, Some(f.clone())),
        NodeKind::Symlink(t) => (EntryKind::Symlink(t.clone()), None),
        NodeKind::Char(d) => (EntryKind::Char(*d), None),
        NodeKind::Block(d) => (EntryKind::Block(*d), None),
        NodeKind::Fifo => (EntryKind::Fifo, None),
        NodeKind::Dir(_) => return Err("hardlink to a directory".into()),
    };
    let entry = Entry {
        path: target.to_vec(),
        kind,
        attr: n.attr.clone(),
    };
    layer.apply(entry, file, id, false)
}

/// The layer's found checkpoints with a flag for those the layer's span chunks start at.
pub(crate) fn used_checkpoints(chunks: &[ChunkRec], layer: u32, found: usize) -> Vec<bool> {
    let mut used = vec![false; found];
    for c in chunks {
        if let Placement::Span {
            layer: l,
            checkpoint,
            ..
        } = c.place
        {
            if l == layer {
                if let Some(u) = used.get_mut(checkpoint as usize) {
                    *u = true;
                }
            }
        }
    }
    used
}

/// A deflate checkpoint's window.
pub(crate) fn window_of(f: &Found) -> Option<&[u8]> {
    match &f.kind {
        FoundKind::Deflate { window, .. } => Some(window),
        _ => None,
    }
}
