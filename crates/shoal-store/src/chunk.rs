//! Chunks by BLAKE3: packed into append-only files (pack.rs), flushed before they are journaled;
//! verified on every read.

use std::path::PathBuf;

use bytes::Bytes;

use crate::blob::PutOutcome;
use crate::error::{Error, Result};
use crate::index::{lock, now_ms, Entry, EntryKey, PinGuard};
use crate::key::Blake3Hash;
use crate::pack::ChunkLoc;
use crate::paths::bytes_gone;
use crate::store::{Counters, Store};

/// Largest chunk the store accepts (64 MiB; image chunks are at most 16 MiB).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

impl Store {
    /// Verifies `data` against `hash` and stores it (a no-op if already held).
    pub fn put_chunk(&self, hash: &Blake3Hash, data: &[u8]) -> Result<PutOutcome> {
        verify_chunk(hash, data)?;
        self.put_chunk_verified(hash, data)
    }

    /// Stores chunk bytes already checked by [`verify_chunk`].
    pub(crate) fn put_chunk_verified(&self, hash: &Blake3Hash, data: &[u8]) -> Result<PutOutcome> {
        let key = EntryKey::Chunk(*hash);
        if let Some(e) = self.entry(&key) {
            e.touch();
            return Ok(PutOutcome::AlreadyHeld);
        }
        let reservation = self.reserve(data.len() as u64)?;
        let packs = &self.inner.packs;
        let at = packs
            .reserve(data.len() as u64)
            .map_err(|e| Error::io("open a chunk pack in", &self.inner.paths.chunks, e))?;
        let path = packs.path(&at);
        self.on_full(&path, at.len, "write", || packs.write(hash, &at, data))
            .inspect_err(|_| packs.free(hash, &at))?;
        let _stripe = lock(self.stripe(&key));
        if self.entry(&key).is_some() {
            packs.free(hash, &at);
            return Ok(PutOutcome::AlreadyHeld);
        }
        self.inner
            .index
            .insert(key, Entry::chunk(*hash, at, now_ms()));
        reservation.commit();
        Ok(PutOutcome::Stored)
    }

    /// Reads a chunk, verified against its hash. Bad bytes are dropped and reported as
    /// [`Error::Corrupt`], never returned.
    pub fn get_chunk(&self, hash: &Blake3Hash) -> Result<Bytes> {
        let mut buf = Vec::new();
        self.read_chunk_into(hash, &mut buf)?;
        Ok(Bytes::from(buf))
    }

    /// [`Store::get_chunk`] into `out` (resized to the chunk's length): a caller that reuses its
    /// buffers reads without faulting in fresh memory for every chunk. On an error `out` holds
    /// bytes that must not be used.
    pub fn read_chunk_into(&self, hash: &Blake3Hash, out: &mut Vec<u8>) -> Result<()> {
        let key = EntryKey::Chunk(*hash);
        let item = || format!("chunk {hash}");
        let pinned = self.entry(&key).and_then(|e| {
            let at = e.at?;
            e.pin().map(|p| (e, p, at))
        });
        let Some((entry, _pin, at)) = pinned else {
            self.miss();
            return Err(Error::NotPresent { item: item() });
        };
        let pack = self.inner.packs.path(&at);
        out.resize(at.len as usize, 0);
        let good = match self.inner.packs.read_hashed(&at, out) {
            Ok(read) => read == *hash,
            Err(e) if bytes_gone(&e) => false,
            Err(e) => return Err(Error::io("read", &pack, e)),
        };
        if good {
            self.hit();
            entry.touch();
            return Ok(());
        }
        Counters::bump(&self.inner.counters.corruptions);
        tracing::warn!(chunk = %hash, pack = %pack.display(), offset = at.offset, "stored chunk failed verification; dropped");
        self.remove_entry(&entry, true);
        Err(Error::Corrupt {
            item: item(),
            path: pack,
        })
    }

    /// Starts reading the held ones of `hashes` from the disk in the background, so that their
    /// reads that follow find them in the page cache (a read-ahead of chunks that are read in
    /// order; packs keep such chunks next to each other, so the disk sees one long read).
    pub fn will_need_chunks(&self, hashes: &[Blake3Hash]) {
        for at in hashes.iter().filter_map(|h| self.chunk_loc(h)) {
            self.inner.packs.will_need(&at);
        }
    }

    /// Where a chunk's bytes lie on disk: its pack file, offset and length (for tools and tests).
    pub fn chunk_at(&self, hash: &Blake3Hash) -> Option<(PathBuf, u64, u64)> {
        let at = self.chunk_loc(hash)?;
        Some((self.inner.packs.path(&at), at.offset, at.len))
    }

    fn chunk_loc(&self, hash: &Blake3Hash) -> Option<ChunkLoc> {
        self.entry(&EntryKey::Chunk(*hash))?.at
    }

    /// True when the chunk is indexed (its bytes are verified when read).
    pub fn has_chunk(&self, hash: &Blake3Hash) -> bool {
        self.entry(&EntryKey::Chunk(*hash)).is_some()
    }

    /// Removes a chunk; fails with [`Error::Pinned`] while someone pins it.
    pub fn remove_chunk(&self, hash: &Blake3Hash) -> Result<()> {
        let Some(entry) = self.entry(&EntryKey::Chunk(*hash)) else {
            return Ok(());
        };
        match self.remove_entry(&entry, false) {
            None if entry.is_pinned() => Err(Error::Pinned {
                item: format!("chunk {hash}"),
            }),
            _ => Ok(()),
        }
    }

    /// Pins a chunk so eviction leaves it alone while the guard lives.
    pub fn pin_chunk(&self, hash: &Blake3Hash) -> Result<PinGuard> {
        self.entry(&EntryKey::Chunk(*hash))
            .and_then(|e| e.pin())
            .ok_or_else(|| Error::NotPresent {
                item: format!("chunk {hash}"),
            })
    }
}

/// Checks chunk bytes: size within [`MAX_CHUNK_SIZE`] and BLAKE3 equal to `hash`.
pub fn verify_chunk(hash: &Blake3Hash, data: &[u8]) -> Result<()> {
    if data.len() as u64 > MAX_CHUNK_SIZE {
        return Err(Error::OutOfRange {
            item: format!("chunk {hash}"),
            reason: format!("{} bytes is over the limit of {MAX_CHUNK_SIZE}", data.len()),
        });
    }
    if Blake3Hash::of(data) != *hash {
        return Err(Error::HashMismatch {
            item: format!("chunk {hash}"),
        });
    }
    Ok(())
}
