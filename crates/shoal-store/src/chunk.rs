//! Chunks by BLAKE3: written to a temporary file, flushed, renamed into place; verified on every read.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};

use bytes::Bytes;

use crate::blob::PutOutcome;
use crate::error::{Error, Result};
use crate::index::{lock, now_ms, Entry, EntryKey, PinGuard};
use crate::key::Blake3Hash;
use crate::paths::sync_dir;
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
        let paths = &self.inner.paths;
        let (dir, dest, tmp) = (paths.chunk_dir(hash), paths.chunk(hash), paths.temp());
        fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        self.on_full(&dest, data.len() as u64, "write", || {
            let _ = fs::remove_file(&tmp);
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_data()
        })
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        let _stripe = lock(self.stripe(&key));
        if self.entry(&key).is_some() {
            let _ = fs::remove_file(&tmp);
            return Ok(PutOutcome::AlreadyHeld);
        }
        fs::rename(&tmp, &dest).map_err(|e| Error::io("rename into", &dest, e))?;
        sync_dir(&dir).map_err(|e| Error::io("sync", &dir, e))?;
        let entry = Entry::new(key, None, data.len() as u64, None, now_ms());
        self.inner.index.insert(key, entry);
        reservation.commit();
        Ok(PutOutcome::Stored)
    }

    /// Reads a chunk, verified against its hash. Bad bytes are dropped and reported as
    /// [`Error::Corrupt`], never returned.
    pub fn get_chunk(&self, hash: &Blake3Hash) -> Result<Bytes> {
        let key = EntryKey::Chunk(*hash);
        let item = || format!("chunk {hash}");
        let Some((entry, _pin)) = self.entry(&key).and_then(|e| e.pin().map(|p| (e, p))) else {
            self.miss();
            return Err(Error::NotPresent { item: item() });
        };
        let size = lock(&entry.state).bytes;
        let path = self.inner.paths.chunk(hash);
        let read = File::open(&path).and_then(|f| {
            let on_disk = f.metadata()?.len();
            let mut buf = Vec::with_capacity(size as usize);
            // Read one byte past the indexed size to notice a file that grew.
            f.take(size + 1).read_to_end(&mut buf)?;
            Ok((on_disk, buf))
        });
        let good = match &read {
            Ok((on_disk, buf)) => *on_disk == size && Blake3Hash::of(buf) == *hash,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(_) => false,
        };
        match read {
            Ok((_, buf)) if good => {
                self.hit();
                entry.touch();
                Ok(Bytes::from(buf))
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("read", &path, e)),
            _ => {
                Counters::bump(&self.inner.counters.corruptions);
                tracing::warn!(chunk = %hash, path = %path.display(), "stored chunk failed verification; dropped");
                self.remove_entry(&entry, true);
                Err(Error::Corrupt { item: item(), path })
            }
        }
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
