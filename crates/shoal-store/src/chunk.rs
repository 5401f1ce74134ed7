//! Chunks by BLAKE3: stored in packs (pack.rs) with their group hashes (groups.rs), flushed
//! before they are journaled, verified on every read, whole or in part.
//!
//! A whole read hashes the whole chunk. A part read (a random read of a few KiB) reads only the
//! 16 KiB groups that cover it and checks each against the chunk's group hashes, which were
//! themselves checked against the chunk's name when they were loaded and are kept in memory
//! (bounded by `StoreConfig::group_hash_cache_bytes`). Bad bytes or bad group hashes drop the
//! chunk, exactly as a failed whole read does.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::PutOutcome;
use crate::error::{Error, Result};
use crate::groups::{hashes_len, GroupHashes};
use crate::index::{Entry, EntryKey, PinGuard};
use crate::key::{Blake3Hash, MAX_CHUNK_SIZE};
use crate::ledger::{Counters, Ledger};
use crate::pack::ChunkLoc;
use crate::paths::{bytes_gone, lock, now_ms};

/// The chunk half of the store: operations on the ledger's chunk entries, and the memory cache
/// of verified group hashes.
pub(crate) struct Chunks {
    /// Group hashes checked against their chunk's name, by name. A name fixes the bytes, so an
    /// entry stays right whatever happens to the chunk on disk.
    groups: moka::sync::Cache<Blake3Hash, Arc<GroupHashes>>,
}

/// A chunk entry pinned for a read, and where its bytes lie.
struct Pinned {
    entry: Arc<Entry>,
    at: ChunkLoc,
    _pin: PinGuard,
}

impl Chunks {
    /// Keeps up to `cache_bytes` of group hashes in memory.
    pub fn new(cache_bytes: u64) -> Self {
        Chunks {
            groups: moka::sync::Cache::builder()
                .max_capacity(cache_bytes)
                .weigher(|_, g: &Arc<GroupHashes>| g.weight())
                .build(),
        }
    }

    /// Verifies `data` against `hash` and stores it with its group hashes (a no-op if held).
    pub fn put(&self, ledger: &Ledger, hash: &Blake3Hash, data: &[u8]) -> Result<PutOutcome> {
        check_size(hash, data.len())?;
        let key = EntryKey::Chunk(*hash);
        if let Some(e) = ledger.entry(&key) {
            e.touch();
            return Ok(PutOutcome::AlreadyHeld);
        }
        // One pass gives the check and the group hashes.
        let (name, groups) = GroupHashes::compute(data);
        if name != *hash {
            return Err(Error::HashMismatch {
                item: format!("chunk {hash}"),
            });
        }
        let stored = groups.as_ref().map(GroupHashes::encode).unwrap_or_default();
        let len = data.len() as u64;
        let reservation = ledger.reserve(len + stored.len() as u64)?;
        debug_assert_eq!(
            stored.len() as u64,
            groups.as_ref().map_or(0, |_| hashes_len(len))
        );
        let packs = &ledger.packs;
        let at = packs
            .reserve(len, groups.is_some())
            .map_err(|e| Error::io("open a chunk pack in", &ledger.paths.chunks, e))?;
        let path = packs.path(&at);
        ledger
            .on_full(&path, at.span(), "write", || {
                packs.write(hash, &at, data, &stored)
            })
            .inspect_err(|_| packs.free(hash, &at))?;
        if let Some(g) = groups {
            self.groups.insert(*hash, Arc::new(g));
        }
        let _stripe = lock(ledger.index.stripe(&key));
        if ledger.entry(&key).is_some() {
            packs.free(hash, &at);
            return Ok(PutOutcome::AlreadyHeld);
        }
        ledger.index.insert(Entry::chunk(*hash, at, now_ms()));
        reservation.commit();
        Ok(PutOutcome::Stored)
    }

    /// Pins a held chunk for a read; counts a miss when it is not held.
    fn pinned(&self, ledger: &Ledger, hash: &Blake3Hash) -> Result<Pinned> {
        let found = ledger.entry(&EntryKey::Chunk(*hash)).and_then(|entry| {
            let at = entry.at?;
            let pin = entry.pin()?;
            Some(Pinned {
                entry,
                at,
                _pin: pin,
            })
        });
        found.ok_or_else(|| {
            ledger.miss();
            Error::NotPresent {
                item: format!("chunk {hash}"),
            }
        })
    }

    /// Drops a chunk whose stored bytes (or group hashes) failed verification.
    fn corrupt(&self, ledger: &Ledger, hash: &Blake3Hash, p: &Pinned, what: &str) -> Error {
        let pack = ledger.packs.path(&p.at);
        Counters::bump(&ledger.counters.corruptions);
        tracing::warn!(chunk = %hash, pack = %pack.display(), offset = p.at.offset, what, "stored chunk failed verification; dropped");
        ledger.remove_entry(&p.entry, true);
        Error::Corrupt {
            item: format!("chunk {hash}"),
            path: pack,
        }
    }

    /// Reads a whole chunk into `out` (resized to its length), verified against its name. Bad
    /// bytes drop the chunk and are [`Error::Corrupt`]; `out` then holds bytes not to be used.
    pub fn read_into(&self, ledger: &Ledger, hash: &Blake3Hash, out: &mut Vec<u8>) -> Result<()> {
        let p = self.pinned(ledger, hash)?;
        out.resize(p.at.len as usize, 0);
        let good = match ledger.packs.read_hashed(&p.at, out) {
            Ok(read) => read == *hash,
            Err(e) if bytes_gone(&e) => false,
            Err(e) => return Err(Error::io("read", ledger.packs.path(&p.at), e)),
        };
        if !good {
            return Err(self.corrupt(ledger, hash, &p, "bytes"));
        }
        self.read_groups_after(ledger, hash, &p);
        ledger.hit();
        p.entry.touch();
        Ok(())
    }

    /// After a whole read, reads the chunk's group hashes too, so that reading chunks one after
    /// another reads the pack without a gap: a skipped page between two chunks makes the
    /// kernel's readahead of the pack stop (sequential reads of the mount ran at two thirds of
    /// their speed; docs/benchmarks.md, issue 27). Kept in memory when they check; ones that do
    /// not are left for a part read to find (it drops the chunk).
    fn read_groups_after(&self, ledger: &Ledger, hash: &Blake3Hash, p: &Pinned) {
        let Ok(Some(stored)) = ledger.packs.read_groups(&p.at) else {
            return;
        };
        if !self.groups.contains_key(hash) {
            if let Some(g) = GroupHashes::decode(&stored, p.at.len, hash) {
                self.groups.insert(*hash, Arc::new(g));
            }
        }
    }

    /// Reads the bytes `range` of a chunk, checking only the 16 KiB groups that cover it. `out`
    /// is filled with those groups; the returned range is where `range` lies in it. Bad bytes
    /// or group hashes drop the chunk and are [`Error::Corrupt`] (`out` is then not to be used).
    pub fn read_part(
        &self,
        ledger: &Ledger,
        hash: &Blake3Hash,
        range: Range<u64>,
        out: &mut Vec<u8>,
    ) -> Result<Range<usize>> {
        let p = self.pinned(ledger, hash)?;
        if range.start > range.end || range.end > p.at.len {
            return Err(Error::OutOfRange {
                item: format!("bytes {}..{} of chunk {hash}", range.start, range.end),
                reason: format!("the chunk is {} bytes", p.at.len),
            });
        }
        let Some(groups) = self.group_hashes(ledger, hash, &p)? else {
            // One group, or stored before group hashes: the whole chunk is the unit.
            self.read_whole_for_part(ledger, hash, &p, out)?;
            return Ok(range.start as usize..range.end as usize);
        };
        let cover = groups.covering(range.start, range.end);
        let first = groups.span(cover.start).start;
        let last = groups
            .span(cover.end.saturating_sub(1).max(cover.start))
            .end;
        out.resize((last - first) as usize, 0);
        match ledger.packs.read_part(&p.at, first, out) {
            Ok(()) => {}
            Err(e) if bytes_gone(&e) => return Err(self.corrupt(ledger, hash, &p, "bytes")),
            Err(e) => return Err(Error::io("read", ledger.packs.path(&p.at), e)),
        }
        for g in cover {
            let span = groups.span(g);
            let bytes = out
                .get((span.start - first) as usize..(span.end - first) as usize)
                .unwrap_or_default();
            if !groups.check(g, bytes) {
                return Err(self.corrupt(ledger, hash, &p, "a group's bytes"));
            }
        }
        ledger.hit();
        p.entry.touch();
        Ok((range.start - first) as usize..(range.end - first) as usize)
    }

    /// The chunk's verified group hashes: from memory, else read from its pack and checked
    /// against its name (a mismatch drops the chunk). `None` when it has none on disk.
    fn group_hashes(
        &self,
        ledger: &Ledger,
        hash: &Blake3Hash,
        p: &Pinned,
    ) -> Result<Option<Arc<GroupHashes>>> {
        if let Some(g) = self.groups.get(hash) {
            return Ok(Some(g));
        }
        let stored = match ledger.packs.read_groups(&p.at) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(e) if bytes_gone(&e) => return Err(self.corrupt(ledger, hash, p, "group hashes")),
            Err(e) => return Err(Error::io("read", ledger.packs.path(&p.at), e)),
        };
        match GroupHashes::decode(&stored, p.at.len, hash) {
            Some(g) => {
                let g = Arc::new(g);
                self.groups.insert(*hash, Arc::clone(&g));
                Ok(Some(g))
            }
            None => Err(self.corrupt(ledger, hash, p, "group hashes")),
        }
    }

    /// Reads and checks a whole chunk that has no stored group hashes; keeps the group hashes
    /// this computes in memory, so the next part read of it reads only its groups.
    fn read_whole_for_part(
        &self,
        ledger: &Ledger,
        hash: &Blake3Hash,
        p: &Pinned,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.resize(p.at.len as usize, 0);
        match ledger.packs.read_part(&p.at, 0, out) {
            Ok(()) => {}
            Err(e) if bytes_gone(&e) => return Err(self.corrupt(ledger, hash, p, "bytes")),
            Err(e) => return Err(Error::io("read", ledger.packs.path(&p.at), e)),
        }
        let (name, groups) = GroupHashes::compute(out);
        if name != *hash {
            return Err(self.corrupt(ledger, hash, p, "bytes"));
        }
        if let Some(g) = groups {
            self.groups.insert(*hash, Arc::new(g));
        }
        ledger.hit();
        p.entry.touch();
        Ok(())
    }
}

/// Where a held chunk lies: its pack file, offset and length (for tools and tests).
pub(crate) fn chunk_at(ledger: &Ledger, hash: &Blake3Hash) -> Option<(PathBuf, u64, u64)> {
    let at = ledger.entry(&EntryKey::Chunk(*hash))?.at?;
    Some((ledger.packs.path(&at), at.offset, at.len))
}

/// Starts reading the held ones of `hashes` into the page cache (a hint).
pub(crate) fn will_need(ledger: &Ledger, hashes: &[Blake3Hash]) {
    for h in hashes {
        if let Some(at) = ledger.entry(&EntryKey::Chunk(*h)).and_then(|e| e.at) {
            ledger.packs.will_need(&at);
        }
    }
}

/// Removes a chunk; fails with [`Error::Pinned`] while someone pins it.
pub(crate) fn remove(ledger: &Ledger, hash: &Blake3Hash) -> Result<()> {
    let Some(entry) = ledger.entry(&EntryKey::Chunk(*hash)) else {
        return Ok(());
    };
    match ledger.remove_entry(&entry, false) {
        None if entry.is_pinned() => Err(Error::Pinned {
            item: format!("chunk {hash}"),
        }),
        _ => Ok(()),
    }
}

/// Pins a chunk so eviction leaves it alone while the guard lives.
pub(crate) fn pin(ledger: &Ledger, hash: &Blake3Hash) -> Result<PinGuard> {
    ledger
        .entry(&EntryKey::Chunk(*hash))
        .and_then(|e| e.pin())
        .ok_or_else(|| Error::NotPresent {
            item: format!("chunk {hash}"),
        })
}

fn check_size(hash: &Blake3Hash, len: usize) -> Result<()> {
    if len as u64 > MAX_CHUNK_SIZE {
        return Err(Error::OutOfRange {
            item: format!("chunk {hash}"),
            reason: format!("{len} bytes is over the limit of {MAX_CHUNK_SIZE}"),
        });
    }
    Ok(())
}

/// Checks chunk bytes: size within [`MAX_CHUNK_SIZE`] and BLAKE3 equal to `hash`.
pub fn verify_chunk(hash: &Blake3Hash, data: &[u8]) -> Result<()> {
    check_size(hash, data.len())?;
    if Blake3Hash::of(data) != *hash {
        return Err(Error::HashMismatch {
            item: format!("chunk {hash}"),
        });
    }
    Ok(())
}
