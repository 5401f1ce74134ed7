//! Fetch-ahead: which chunks a sequential read will want next, so that they are loaded in the
//! background (read.rs `load_ahead`: disk cache, else fetched; verified either way) while the
//! reader is busy with the current ones.
//!
//! - The following chunks of the same file, up to `fetch_ahead_bytes` of stored bytes: a file
//!   read from its start is fetched in a few merged requests that overlap with the reads, and a
//!   file in the disk cache is read and verified on another core ahead of the kernel's readahead.
//! - When a read that missed the caches reaches a file's end, the chunks that follow that file in
//!   its data blob, up to `blob_ahead_bytes` (Nydus's `amplify_io`): the image builder lays out
//!   files in tree order, so the next small files a program opens (modules of one package, a
//!   directory of libraries) often arrive in the same request instead of one round trip each.
//!
//! Only reads that continue the previous read of their file (or start at offset 0) trigger
//! fetch-ahead: random reads stay as cheap as they were.

use std::sync::Mutex;

use shoal_format::bootstrap::{Bootstrap, ChunkView};

use crate::read::Reader;

/// Inodes whose last read end is remembered (by inode number modulo this).
const SLOTS: usize = 256;
/// Most chunks one read looks ahead within its file.
const MAX_FILE_CHUNKS: usize = 16;
/// Most chunks one read looks ahead in blob order.
const MAX_BLOB_CHUNKS: usize = 64;

/// How far to look ahead.
#[derive(Debug, Clone, Copy)]
pub struct AheadConfig {
    /// Stored bytes of the same file loaded ahead of a sequential read (0: off).
    pub file_bytes: u64,
    /// Stored bytes that follow a file in its blob, fetched when a cold read reaches the file's
    /// end (0: off).
    pub blob_bytes: u64,
}

/// Picks the chunks to load ahead of each read.
pub struct Ahead {
    config: AheadConfig,
    /// Chunk-table indices in (blob, offset) order.
    order: Vec<u32>,
    /// Position of each chunk-table index in `order`.
    rank: Vec<u32>,
    /// (inode, end of its last read), by inode modulo [`SLOTS`].
    last: Mutex<Vec<(u32, u64)>>,
}

impl Ahead {
    /// An empty plan over `boot`'s chunk table.
    pub fn new(boot: &Bootstrap, config: AheadConfig) -> Self {
        let mut chunks: Vec<ChunkView> = if config.blob_bytes > 0 {
            (0..boot.chunk_count())
                .filter_map(|i| boot.chunk(i))
                .collect()
        } else {
            Vec::new()
        };
        chunks.sort_by_key(|c| (c.blob, c.offset));
        let mut rank = vec![u32::MAX; chunks.len()];
        for (pos, c) in chunks.iter().enumerate() {
            if let Some(r) = rank.get_mut(c.index as usize) {
                *r = pos as u32;
            }
        }
        Ahead {
            config,
            order: chunks.iter().map(|c| c.index).collect(),
            rank,
            last: Mutex::new(vec![(u32::MAX, 0); SLOTS]),
        }
    }

    /// Records a read of `offset..end` of `ino` and tells whether it continues the previous
    /// read of that file (within two chunks either way: kernel readahead requests arrive out
    /// of order) or starts at the beginning.
    fn sequential(&self, ino: u32, offset: u64, end: u64, chunk: u64) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = last.get_mut(ino as usize % SLOTS) else {
            return false;
        };
        let near = slot.0 == ino
            && offset <= slot.1.saturating_add(2 * chunk)
            && offset.saturating_add(2 * chunk) >= slot.1;
        *slot = (ino, if near { end.max(slot.1) } else { end });
        offset == 0 || near
    }

    /// The chunks to load in the background after a read of `size` bytes at `offset` of
    /// regular file `ino`; call it before the read (it looks at what is cached).
    pub fn plan(&self, reader: &Reader, ino: u32, offset: u64, size: u32) -> Vec<ChunkView> {
        let mut out = Vec::new();
        if self.config.file_bytes == 0 && self.config.blob_bytes == 0 {
            return out;
        }
        let boot = reader.bootstrap();
        let Some(file_size) = boot.inode(ino).map(|i| i.size()) else {
            return out;
        };
        let Ok(list) = boot.file_chunks(ino) else {
            return out;
        };
        let cs = u64::from(boot.chunk_size());
        if offset >= file_size || size == 0 || cs == 0 {
            return out;
        }
        let end = file_size.min(offset.saturating_add(u64::from(size)));
        if !self.sequential(ino, offset, end, cs) {
            return out;
        }
        let (k0, k1) = ((offset / cs) as usize, ((end - 1) / cs) as usize);
        // Following chunks of the file, counted by position so the window slides with the reads.
        let mut bytes = 0u64;
        let mut next = k1 + 1;
        while next < list.len() && next <= k1 + MAX_FILE_CHUNKS {
            let Some(c) = list.get(next) else { break };
            bytes += u64::from(c.stored_size);
            if bytes > self.config.file_bytes && next > k1 + 1 {
                break;
            }
            if self.config.file_bytes > 0 && !reader.in_memory(&c) {
                out.push(c);
            }
            next += 1;
        }
        // Reached the end of the file on a cold read: the blob's next chunks.
        let cold = || (k0..=k1).any(|k| list.get(k).is_some_and(|c| !reader.in_cache(&c)));
        if self.config.blob_bytes > 0 && next >= list.len() && cold() {
            if let Some(last) = list.get(list.len().wrapping_sub(1)) {
                self.blob_next(reader, boot, &last, &mut out);
            }
        }
        out
    }

    /// Chunks after `last` in its blob, up to `blob_bytes`, that no cache holds.
    fn blob_next(
        &self,
        reader: &Reader,
        boot: &Bootstrap,
        last: &ChunkView,
        out: &mut Vec<ChunkView>,
    ) {
        let Some(&pos) = self.rank.get(last.index as usize) else {
            return;
        };
        let mut bytes = 0u64;
        let from = pos as usize + 1;
        for &i in self.order.iter().skip(from).take(MAX_BLOB_CHUNKS) {
            let Some(c) = boot.chunk(i) else { break };
            bytes += u64::from(c.stored_size);
            if c.blob != last.blob || bytes > self.config.blob_bytes {
                break;
            }
            if !reader.in_cache(&c) && !out.iter().any(|o| o.index == c.index) {
                out.push(c);
            }
        }
    }
}
