//! Chunks packed into append-only files. Chunks written one after another lie one after another
//! on disk, so reading them in that order (a file read front to back, a prefetch list) is one
//! file's sequential read with the disk's readahead; a file per chunk scattered them over the
//! disk (docs/benchmarks.md, issue 7).
//!
//! ```text
//! <root>/chunks/<id>.pack   chunk bytes, each at a 4 KiB-aligned offset (<id>: 8 hex digits),
//!                           its group hashes (groups.rs) right after its bytes
//! <root>/chunks/<id>.idx    journal of 48-byte records: chunk H stored at offset O, length L
//!                           (with or without group hashes); or the chunk at offset O dropped
//! ```
//!
//! A chunk's bytes and group hashes are flushed before the record that names them is appended,
//! and every read verifies them, so a crash leaves at worst bytes nobody names (freed with their
//! pack) or a record whose bytes fail verification at their first read (then dropped). Dropping
//! a chunk punches its range out of the pack, so the file system gets the space back at once,
//! and journals the drop; a pack with nothing live left is deleted.
//!
//! This module only places bytes: it neither verifies nor accounts them (chunk.rs does).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::groups::hashes_len;
use crate::key::{Blake3Hash, MAX_CHUNK_SIZE};
use crate::paths::{lock, mtime_ms, read_hashed, remove_if_exists, write_atomic};

/// Chunks start at multiples of this (the file system's block), so a dropped chunk's whole
/// range can be punched out.
const ALIGN: u64 = 4096;
/// A new pack is started once the current one would grow past this.
const PACK_MAX: u64 = 1 << 30;
/// Bytes per journal record: kind, 3 bytes zero, length (u32), offset (u64), hash.
const RECORD: usize = 48;
/// A chunk stored without group hashes (written before they existed, or a single group).
const ADD: u8 = 1;
const DROP: u8 = 2;
/// A chunk stored with its group hashes right after its bytes.
const ADD_GROUPS: u8 = 3;

/// Where a chunk's bytes lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkLoc {
    pub pack: u32,
    pub offset: u64,
    /// The chunk's length.
    pub len: u64,
    /// True when its group hashes follow its bytes (at `offset + len`).
    pub groups: bool,
}

impl ChunkLoc {
    /// Bytes of group hashes after the chunk's bytes.
    pub fn groups_len(&self) -> u64 {
        if self.groups {
            hashes_len(self.len)
        } else {
            0
        }
    }

    /// Bytes the chunk takes in its pack (its bytes and group hashes).
    pub fn span(&self) -> u64 {
        self.len + self.groups_len()
    }
}

/// A chunk named by a pack's journal, found when the store opened.
pub(crate) struct Found {
    pub hash: Blake3Hash,
    pub at: ChunkLoc,
    pub mtime_ms: u64,
}

struct Pack {
    data: File,
    journal: Mutex<File>,
}

/// An open pack and the bytes of live chunks in it.
struct Open {
    pack: Arc<Pack>,
    live: u64,
}

struct State {
    packs: HashMap<u32, Open>,
    /// The pack new chunks go to, and where the next one starts in it.
    active: u32,
    next: u64,
}

/// The chunk packs of one store.
pub(crate) struct Packs {
    dir: PathBuf,
    state: Mutex<State>,
}

fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

fn record(drop: bool, hash: &Blake3Hash, at: &ChunkLoc) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0] = match (drop, at.groups) {
        (true, _) => DROP,
        (false, true) => ADD_GROUPS,
        (false, false) => ADD,
    };
    r[4..8].copy_from_slice(&(at.len as u32).to_le_bytes());
    r[8..16].copy_from_slice(&at.offset.to_le_bytes());
    r[16..48].copy_from_slice(hash.as_bytes());
    r
}

fn parse(r: &[u8], pack: u32) -> Option<(u8, Blake3Hash, ChunkLoc)> {
    let len = u64::from(u32::from_le_bytes(r.get(4..8)?.try_into().ok()?));
    let offset = u64::from_le_bytes(r.get(8..16)?.try_into().ok()?);
    let hash: [u8; 32] = r.get(16..48)?.try_into().ok()?;
    let kind = *r.first()?;
    let sane = matches!(kind, ADD | DROP | ADD_GROUPS)
        && r.get(1..4) == Some(&[0, 0, 0][..])
        && offset % ALIGN == 0
        && len <= MAX_CHUNK_SIZE
        && (kind != ADD_GROUPS || hashes_len(len) > 0);
    sane.then(|| {
        let at = ChunkLoc {
            pack,
            offset,
            len,
            groups: kind == ADD_GROUPS,
        };
        (kind, Blake3Hash::from_bytes(hash), at)
    })
}

impl Pack {
    fn open(data: &Path, journal: &Path) -> io::Result<Pack> {
        let mut opts = OpenOptions::new();
        opts.read(true).create(true).truncate(false);
        Ok(Pack {
            data: opts.clone().write(true).open(data)?,
            journal: Mutex::new(opts.append(true).open(journal)?),
        })
    }

    fn append(&self, rec: &[u8; RECORD]) -> io::Result<()> {
        lock(&self.journal).write_all(rec)
    }
}

impl Packs {
    fn data_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:08x}.pack"))
    }

    fn journal_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:08x}.idx"))
    }

    /// The pack file that holds `at`.
    pub fn path(&self, at: &ChunkLoc) -> PathBuf {
        self.data_path(at.pack)
    }

    /// Opens the packs in `dir`: replays every journal (compacting long ones), deletes packs
    /// with nothing live and files that are not packs (chunk files of the earlier layout too:
    /// the cache refills), and returns the chunks found. Bytes are not read here.
    pub fn open(dir: &Path) -> io::Result<(Packs, Vec<Found>)> {
        let mut packs = Packs {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                packs: HashMap::new(),
                active: 0,
                next: 0,
            }),
        };
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name
                .strip_suffix(".pack")
                .or_else(|| name.strip_suffix(".idx"))
                .filter(|h| h.len() == 8)
                .and_then(|h| u32::from_str_radix(h, 16).ok());
            match id {
                Some(id) if name.ends_with(".pack") => ids.push(id),
                Some(_) => {}
                None if path.is_dir() => {
                    tracing::info!(path = %path.display(), "store: dropping chunk files of the earlier one-file-per-chunk layout");
                    if let Err(e) = fs::remove_dir_all(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "store recovery: could not remove the old chunk files");
                    }
                }
                None => {
                    tracing::warn!(path = %path.display(), "store recovery: removing a file that is not a chunk pack");
                    if let Err(e) = remove_if_exists(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "store recovery: could not remove the file");
                    }
                }
            }
        }
        ids.sort_unstable();
        let mut found = Vec::new();
        let mut seen = HashSet::new();
        for &id in &ids {
            found.extend(packs.recover(id, &mut seen)?);
        }
        // Orphan journals (their pack is gone) go too.
        for entry in fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(h) = name.strip_suffix(".idx") {
                let has_pack = u32::from_str_radix(h, 16)
                    .is_ok_and(|id| lock(&packs.state).packs.contains_key(&id));
                if !has_pack {
                    remove_if_exists(&entry.path())?;
                }
            }
        }
        let st = packs.state.get_mut().unwrap_or_else(|e| e.into_inner());
        // New chunks go after the newest live pack's last byte, or into a new pack.
        let newest = st.packs.keys().max().copied();
        let reuse = newest.and_then(|id| {
            let len = st.packs.get(&id)?.pack.data.metadata().ok()?.len();
            (len < PACK_MAX).then_some((id, align_up(len)))
        });
        (st.active, st.next) = match (reuse, newest) {
            (Some(at), _) => at,
            (None, Some(id)) => (id.wrapping_add(1), 0),
            (None, None) => (1, 0),
        };
        Ok((packs, found))
    }

    /// Replays pack `id`'s journal; keeps the pack if anything in it is live.
    fn recover(&mut self, id: u32, seen: &mut HashSet<Blake3Hash>) -> io::Result<Vec<Found>> {
        let (data_path, journal_path) = (self.data_path(id), self.journal_path(id));
        let drop_pack = |why: &str| -> io::Result<Vec<Found>> {
            tracing::info!(pack = %data_path.display(), why, "store recovery: removing chunk pack");
            remove_if_exists(&journal_path)?;
            remove_if_exists(&data_path)?;
            Ok(Vec::new())
        };
        let data_meta = fs::metadata(&data_path)?;
        let data_len = data_meta.len();
        let mtime_ms = mtime_ms(&data_meta);
        let mut bytes = Vec::new();
        match File::open(&journal_path) {
            Ok(f) => {
                // A journal names at most one record per 4 KiB of pack, plus drops.
                let limit = (data_len / ALIGN + 1) * 2 * RECORD as u64 + 4096;
                f.take(limit).read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return drop_pack("no journal"),
            Err(e) => return Err(e),
        }
        let records = bytes.len() / RECORD;
        let mut by_offset: HashMap<u64, (Blake3Hash, ChunkLoc)> = HashMap::new();
        for r in bytes.chunks_exact(RECORD) {
            match parse(r, id) {
                Some((ADD | ADD_GROUPS, hash, at)) => {
                    by_offset.insert(at.offset, (hash, at));
                }
                Some((_, hash, at))
                    if by_offset.get(&at.offset).is_some_and(|(h, _)| *h == hash) =>
                {
                    by_offset.remove(&at.offset);
                }
                Some(_) | None => {}
            }
        }
        let mut live: Vec<(Blake3Hash, ChunkLoc)> = by_offset
            .into_values()
            .filter(|(_, at)| at.offset + at.span() <= data_len)
            .filter(|(h, _)| seen.insert(*h))
            .collect();
        if live.is_empty() {
            return drop_pack("nothing live in it");
        }
        live.sort_unstable_by_key(|(_, at)| at.offset);
        if records > 2 * live.len() + 64 || bytes.len() % RECORD != 0 {
            let compact: Vec<u8> = live
                .iter()
                .flat_map(|(h, at)| record(false, h, at))
                .collect();
            let tmp = self.dir.join(format!("{id:08x}.idx.tmp"));
            write_atomic(&tmp, &journal_path, &compact)?;
        }
        let pack = Pack::open(&data_path, &journal_path)?;
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let bytes = live.iter().map(|(_, at)| at.span()).sum();
        st.packs.insert(
            id,
            Open {
                pack: Arc::new(pack),
                live: bytes,
            },
        );
        Ok(live
            .into_iter()
            .map(|(hash, at)| Found { hash, at, mtime_ms })
            .collect())
    }

    /// Room for a chunk of `len` bytes, and its group hashes when `groups`, in the active pack
    /// (a new pack if it is full).
    pub fn reserve(&self, len: u64, groups: bool) -> io::Result<ChunkLoc> {
        let groups = groups && hashes_len(len) > 0;
        let span = len + if groups { hashes_len(len) } else { 0 };
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.next > 0 && st.next + span > PACK_MAX {
            st.active = st.active.wrapping_add(1);
            st.next = 0;
        }
        let id = st.active;
        let open = match st.packs.entry(id) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Open {
                pack: Arc::new(Pack::open(&self.data_path(id), &self.journal_path(id))?),
                live: 0,
            }),
        };
        open.live += span;
        let at = ChunkLoc {
            pack: id,
            offset: st.next,
            len,
            groups,
        };
        // An empty chunk still takes a slot of its own: punching it out must not touch the next.
        st.next = align_up(st.next + span.max(1));
        Ok(at)
    }

    fn pack(&self, id: u32) -> io::Result<Arc<Pack>> {
        lock(&self.state)
            .packs
            .get(&id)
            .map(|o| Arc::clone(&o.pack))
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    /// Writes a chunk's bytes and group hashes (`groups`: `at.groups_len()` bytes) at `at` (from
    /// [`Packs::reserve`]), flushes them, then journals them.
    pub fn write(
        &self,
        hash: &Blake3Hash,
        at: &ChunkLoc,
        data: &[u8],
        groups: &[u8],
    ) -> io::Result<()> {
        if data.len() as u64 != at.len || groups.len() as u64 != at.groups_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "chunk or group hashes of the wrong length for the reserved range",
            ));
        }
        let pack = self.pack(at.pack)?;
        pack.data.write_all_at(data, at.offset)?;
        pack.data.write_all_at(groups, at.offset + at.len)?;
        pack.data.sync_data()?;
        pack.append(&record(false, hash, at))
    }

    /// Asks the kernel to start reading `at` into the page cache now (a hint; errors ignored).
    pub fn will_need(&self, at: &ChunkLoc) {
        if let (Ok(pack), Some(len)) = (self.pack(at.pack), std::num::NonZeroU64::new(at.len)) {
            let _ = rustix::fs::fadvise(
                &pack.data,
                at.offset,
                Some(len),
                rustix::fs::Advice::WillNeed,
            );
        }
    }

    /// Reads the bytes at `at` into `buf` (exactly `at.len` long) and returns their hash.
    pub fn read_hashed(&self, at: &ChunkLoc, buf: &mut [u8]) -> io::Result<Blake3Hash> {
        read_hashed(&self.pack(at.pack)?.data, at.offset, buf)
    }

    /// Reads bytes `from..from + buf.len()` of the chunk at `at` (unverified: the caller checks
    /// them). A range past the chunk's end is an `UnexpectedEof`.
    pub fn read_part(&self, at: &ChunkLoc, from: u64, buf: &mut [u8]) -> io::Result<()> {
        if from + buf.len() as u64 > at.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pack(at.pack)?
            .data
            .read_exact_at(buf, at.offset + from)
    }

    /// Reads the chunk's stored group hashes (unverified), if it has any.
    pub fn read_groups(&self, at: &ChunkLoc) -> io::Result<Option<Vec<u8>>> {
        if !at.groups {
            return Ok(None);
        }
        let mut buf = vec![0u8; at.groups_len() as usize];
        self.pack(at.pack)?
            .data
            .read_exact_at(&mut buf, at.offset + at.len)?;
        Ok(Some(buf))
    }

    /// Gives `at` back: punches it out of its pack and journals the drop; deletes a pack that
    /// holds nothing live any more (unless new chunks go to it).
    pub fn free(&self, hash: &Blake3Hash, at: &ChunkLoc) {
        let Ok(pack) = self.pack(at.pack) else { return };
        let span = align_up(at.span()).max(ALIGN);
        let punched = rustix::fs::fallocate(
            &pack.data,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            at.offset,
            span,
        );
        if let Err(e) = punched {
            tracing::debug!(pack = at.pack, error = %e, "could not punch a dropped chunk out of its pack");
        }
        if let Err(e) = pack.append(&record(true, hash, at)) {
            tracing::warn!(pack = at.pack, error = %e, "could not journal a dropped chunk; its bytes fail verification if read");
        }
        let mut st = lock(&self.state);
        let active = st.active;
        let Some(open) = st.packs.get_mut(&at.pack) else {
            return;
        };
        open.live = open.live.saturating_sub(at.span());
        if open.live == 0 && at.pack != active {
            st.packs.remove(&at.pack);
            drop(st);
            for path in [self.journal_path(at.pack), self.data_path(at.pack)] {
                if let Err(e) = remove_if_exists(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove an empty chunk pack");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let h = Blake3Hash::of(b"x");
        let at = ChunkLoc {
            pack: 3,
            offset: 8192,
            len: 77,
            groups: false,
        };
        let r = record(false, &h, &at);
        assert_eq!(parse(&r, 3), Some((ADD, h, at)));
        let with = ChunkLoc {
            len: 1 << 20,
            groups: true,
            ..at
        };
        assert_eq!(
            parse(&record(false, &h, &with), 3),
            Some((ADD_GROUPS, h, with))
        );
        assert_eq!(with.span(), (1 << 20) + 64 * 32);
        // A chunk of one group has no group hashes to name.
        let mut bad = record(false, &h, &with);
        bad[4..8].copy_from_slice(&77u32.to_le_bytes());
        assert_eq!(parse(&bad, 3), None);
        let mut bad = r;
        bad[8] = 1; // not aligned
        assert_eq!(parse(&bad, 3), None);
        let mut bad = r;
        bad[0] = 9;
        assert_eq!(parse(&bad, 3), None);
        assert_eq!(parse(&r[..40], 3), None);
    }
}
