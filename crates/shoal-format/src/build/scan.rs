//! A layer check that writes nothing: one tar layer (plain, gzip or zstd) through the same reader
//! and flattening rules as `convert`, with file content cut into chunks and BLAKE3-hashed in
//! memory instead of compressed into a spill file. The tar-layer fuzz target runs this, thousands
//! of times faster than a full conversion into an OCI layout.

use std::collections::HashSet;
use std::io::Read;

use super::chunker::ChunkSink;
use super::flatten::{FileChunks, NodeKind, Tree};
use super::source::apply_tar;
use crate::error::{Error, Result};
use crate::model::Blake3;

/// What a layer holds, as `convert` would see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerScan {
    /// Uncompressed tar bytes read.
    pub bytes_in: u64,
    /// Nodes of the flattened tree (the root included; hardlinks share a node).
    pub nodes: u64,
    /// Regular files in the tree.
    pub files: u64,
    /// Bytes of regular file content read from the layer.
    pub file_bytes: u64,
    /// Chunks cut from that content.
    pub chunks: u64,
    /// Distinct chunks among them (by BLAKE3).
    pub unique_chunks: u64,
}

/// Hashes chunks in memory; keeps only the set of distinct hashes.
struct HashSink {
    chunk_size: usize,
    next_seq: u64,
    bytes: u64,
    unique: HashSet<Blake3>,
    buf: Vec<u8>,
}

impl ChunkSink for HashSink {
    fn add_file(&mut self, r: &mut dyn Read, size: u64, what: &str) -> Result<FileChunks> {
        let mut left = size;
        let mut seqs = Vec::new();
        while left > 0 {
            let n = usize::try_from(left).map_or(self.chunk_size, |l| l.min(self.chunk_size));
            // One buffer of at most one chunk, reused: a huge declared size costs no memory.
            self.buf.resize(n, 0);
            r.read_exact(&mut self.buf).map_err(|e| Error::Io {
                op: "reading content of",
                path: what.into(),
                source: e,
            })?;
            left -= n as u64;
            self.bytes += n as u64;
            self.unique.insert(*blake3::hash(&self.buf).as_bytes());
            seqs.push(self.next_seq);
            self.next_seq += 1;
        }
        Ok(FileChunks { size, seqs })
    }
}

/// Reads one layer from `r` (named `name` in errors), validates every entry and flattens it,
/// hashing file content in `chunk_size` chunks (a power of two from 64 KiB to 16 MiB). Bad input
/// gives the same error `convert` would; nothing is written anywhere.
pub fn scan_layer<R: Read>(r: R, name: &str, chunk_size: u32) -> Result<LayerScan> {
    if !chunk_size.is_power_of_two() || !(64 << 10..=16 << 20).contains(&chunk_size) {
        return Err(Error::BadOption(format!(
            "chunk size {chunk_size} is not a power of two from 64 KiB to 16 MiB"
        )));
    }
    let mut tree = Tree::new();
    let mut sink = HashSink {
        chunk_size: chunk_size as usize,
        next_seq: 0,
        bytes: 0,
        unique: HashSet::new(),
        buf: Vec::new(),
    };
    let bytes_in = apply_tar(r, name, 0, &mut tree, &mut sink)?;
    let files = tree
        .nodes
        .iter()
        .filter(|n| matches!(n.kind, NodeKind::File(_)))
        .count() as u64;
    Ok(LayerScan {
        bytes_in,
        nodes: tree.nodes.len() as u64,
        files,
        file_bytes: sink.bytes,
        chunks: sink.next_seq,
        unique_chunks: sink.unique.len() as u64,
    })
}
