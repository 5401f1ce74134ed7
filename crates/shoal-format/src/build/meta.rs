//! Turns the flattened tree into an [`ImageMeta`]: inodes in depth-first order (a directory, then
//! its children by name), hardlinks sharing an inode, and chunk indices in first-use order.

use std::collections::HashMap;

use super::chunker::Spill;
use super::flatten::{NodeKind, Tree};
use crate::error::{Error, Result};
use crate::model::{
    Blake3, ChunkEncoding, ChunkInfo, DirEntry, FileData, ImageMeta, Inode, InodeIndex, Payload,
};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;

/// The metadata with placeholder chunk locations, and what is needed to place chunks.
pub(crate) struct Draft {
    /// Blobs and chunk locations are filled in by the caller.
    pub meta: ImageMeta,
    /// Tree node -> inode index.
    pub inode_of: HashMap<usize, InodeIndex>,
}

/// Builds the draft metadata of `tree` with chunk hashes from `spill`.
pub(crate) fn draft(tree: &Tree, spill: &Spill, chunk_size: u32) -> Result<Draft> {
    draft_with(
        tree,
        |seq| {
            let i = usize::try_from(seq).ok()?;
            spill
                .seq_hashes
                .get(i)
                .copied()
                .zip(spill.seq_sizes.get(i).copied())
        },
        chunk_size,
    )
}

/// Builds the draft metadata of `tree`; `chunk(seq)` gives the hash and size of chunk `seq`.
pub(crate) fn draft_with(
    tree: &Tree,
    chunk: impl Fn(u64) -> Option<(Blake3, u32)>,
    chunk_size: u32,
) -> Result<Draft> {
    // Pass 1: number inodes in depth-first preorder; a hardlinked node keeps its first number.
    let mut order: Vec<usize> = Vec::new();
    let mut inode_of: HashMap<usize, InodeIndex> = HashMap::new();
    let mut nlink: HashMap<usize, u32> = HashMap::new();
    let mut stack = vec![0usize];
    while let Some(n) = stack.pop() {
        *nlink.entry(n).or_insert(0) += 1;
        if inode_of.contains_key(&n) {
            continue;
        }
        let idx = InodeIndex::try_from(order.len())
            .map_err(|_| Error::BadOption("too many inodes".into()))?;
        inode_of.insert(n, idx);
        order.push(n);
        if let NodeKind::Dir(d) = &tree.nodes[n].kind {
            stack.extend(d.values().rev().map(|l| l.node));
        }
    }
    // Pass 2: inodes and chunk table.
    let mut chunk_index: HashMap<Blake3, u32> = HashMap::new();
    let mut chunks: Vec<ChunkInfo> = Vec::new();
    let mut inodes = Vec::with_capacity(order.len());
    for &n in &order {
        let node = &tree.nodes[n];
        let (fmt, payload, links) = match &node.kind {
            NodeKind::Dir(d) => {
                let subdirs = d
                    .values()
                    .filter(|l| matches!(tree.nodes[l.node].kind, NodeKind::Dir(_)))
                    .count();
                let entries = d
                    .iter()
                    .map(|(name, l)| DirEntry {
                        name: name.clone(),
                        inode: inode_of[&l.node],
                    })
                    .collect();
                (S_IFDIR, Payload::Dir(entries), 2 + subdirs as u32)
            }
            NodeKind::File(fc) => {
                let mut idxs = Vec::with_capacity(fc.seqs.len());
                let mut total = 0u64;
                for (i, &seq) in fc.seqs.iter().enumerate() {
                    let (hash, size) = chunk(seq).ok_or_else(|| {
                        Error::BadOption(format!("chunk {seq} missing from the pipeline"))
                    })?;
                    let (hash, size) = (&hash, &size);
                    if i + 1 < fc.seqs.len() && *size != chunk_size {
                        return Err(Error::BadOption(
                            "a chunk other than the last is short".into(),
                        ));
                    }
                    total += u64::from(*size);
                    let next = chunks.len() as u32;
                    let idx = *chunk_index.entry(*hash).or_insert_with(|| {
                        chunks.push(ChunkInfo {
                            hash: *hash,
                            blob: 0,
                            offset: 0,
                            stored_size: 0,
                            size: *size,
                            encoding: ChunkEncoding::Raw,
                        });
                        next
                    });
                    idxs.push(idx);
                }
                if total != fc.size {
                    return Err(Error::BadOption(format!(
                        "file chunks sum to {total}, file is {}",
                        fc.size
                    )));
                }
                (
                    S_IFREG,
                    Payload::File(FileData {
                        size: fc.size,
                        chunks: idxs,
                    }),
                    nlink[&n],
                )
            }
            NodeKind::Symlink(t) => (S_IFLNK, Payload::Symlink(t.clone()), nlink[&n]),
            NodeKind::Char(d) => (S_IFCHR, Payload::Device(*d), nlink[&n]),
            NodeKind::Block(d) => (S_IFBLK, Payload::Device(*d), nlink[&n]),
            NodeKind::Fifo => (S_IFIFO, Payload::Special, nlink[&n]),
        };
        inodes.push(Inode {
            mode: fmt | (node.attr.mode & 0o7777),
            uid: node.attr.uid,
            gid: node.attr.gid,
            mtime: node.attr.mtime,
            mtime_nsec: node.attr.mtime_nsec,
            nlink: links,
            xattrs: node.attr.xattrs.clone(),
            payload,
            hash: [0; 32],
        });
    }
    let meta = ImageMeta {
        chunk_size,
        blobs: Vec::new(),
        chunks,
        inodes,
        prefetch: Vec::new(),
        checkpoints: Vec::new(),
    };
    Ok(Draft { meta, inode_of })
}
