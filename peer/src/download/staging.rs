//! Pieces of plain blobs whose piece table is not whole yet (docs/protocol.md, "Streamed piece
//! hashes"): the origin fetcher computes each piece's BLAKE3 as it arrives and publishes it; a
//! downloader fetches only pieces whose published hash it knows and checks each against it. The
//! store takes a blob only with its whole table, so until then verified pieces wait here, in
//! memory, and the piece server serves them from here. Once the table is whole they move into
//! the store, which verifies them again; the whole blob's sha256 is checked as always before
//! the blob counts as complete.
//!
//! Staged bytes count against the peer's piece memory budget (budget.rs), capped further by
//! `staging_bytes`. A piece fetched from a parent keeps the room it was fetched with; a piece
//! this node reads from the origin only tries for room and, finding none, is not staged: its
//! hash is published all the same, and it reaches the store with the import.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use shoal_proto::{Blake3Hash, Digest, HostId, TaskMeta};

use crate::budget::PieceBudget;

/// Why a piece was not staged.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StageError {
    /// No hash is published for the piece yet (or the blob is not staged).
    NoHash,
    /// The bytes do not match the published hash.
    Mismatch,
    /// Staging (`staging_bytes`) or the piece memory budget is full: wait for the table, or
    /// for pieces to move into the store.
    Full,
}

/// What is staged of one blob.
#[derive(Debug)]
struct Staged {
    meta: TaskMeta,
    hashes: Vec<Option<Blake3Hash>>,
    pieces: BTreeMap<u32, Bytes>,
    publisher: Option<HostId>,
}

/// Staged pieces of every blob, shared by downloads and the piece server.
#[derive(Debug)]
pub(crate) struct Staging {
    blobs: Mutex<HashMap<Digest, Staged>>,
    limit: u64,
    used: Mutex<u64>,
    /// The peer's piece memory budget, once the downloader is built.
    budget: OnceLock<PieceBudget>,
}

impl Staging {
    /// Staging that keeps at most `limit` bytes of pieces.
    pub fn new(limit: u64) -> Self {
        Staging {
            blobs: Mutex::new(HashMap::new()),
            limit,
            used: Mutex::new(0),
            budget: OnceLock::new(),
        }
    }

    /// Counts staged pieces against `budget` from now on (set once, by the downloader).
    pub fn use_budget(&self, budget: PieceBudget) {
        let _ = self.budget.set(budget);
    }

    fn blobs(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Staged>> {
        match self.blobs.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn add_used(&self, delta: i64) {
        let mut used = match self.used.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *used = used.saturating_add_signed(delta);
    }

    fn used(&self) -> u64 {
        self.used.lock().map_or(0, |u| *u)
    }

    /// Starts staging `meta.blob` (no-op when it is staged already with the same geometry).
    pub fn open(&self, meta: TaskMeta) {
        let mut blobs = self.blobs();
        if blobs.get(&meta.blob).is_some_and(|s| s.meta == meta) {
            return;
        }
        if let Some(old) = blobs.remove(&meta.blob) {
            self.add_used(-(bytes_of(&old) as i64));
        }
        blobs.insert(
            meta.blob,
            Staged {
                meta,
                hashes: vec![None; meta.piece_count() as usize],
                pieces: BTreeMap::new(),
                publisher: None,
            },
        );
    }

    /// Whether `blob` is staged.
    pub fn contains(&self, blob: &Digest) -> bool {
        self.blobs().contains_key(blob)
    }

    /// Learns published hashes from `first` on. A hash that differs from the one known before
    /// replaces it (the scheduler's word changed: a new publisher) and drops the piece staged
    /// under the old one. Returns how many hashes were new.
    pub fn learn(
        &self,
        blob: &Digest,
        first: u32,
        hashes: &[Option<Blake3Hash>],
        publisher: Option<HostId>,
    ) -> usize {
        let mut blobs = self.blobs();
        let Some(s) = blobs.get_mut(blob) else {
            return 0;
        };
        if publisher.is_some() {
            s.publisher = publisher;
        }
        let mut new = 0;
        let mut freed = 0u64;
        for (k, h) in hashes.iter().enumerate() {
            let i = first as usize + k;
            let Some(slot) = s.hashes.get_mut(i) else {
                break;
            };
            match (*slot, h) {
                (None, Some(h)) => {
                    *slot = Some(*h);
                    new += 1;
                }
                (Some(old), Some(h)) if old != *h => {
                    *slot = Some(*h);
                    if let Some(b) = s.pieces.remove(&(i as u32)) {
                        freed += b.len() as u64;
                    }
                    new += 1;
                }
                _ => {}
            }
        }
        drop(blobs);
        self.add_used(-(freed as i64));
        new
    }

    /// The first piece whose hash is not known (where to ask the scheduler from).
    pub fn first_unknown(&self, blob: &Digest) -> Option<u32> {
        let blobs = self.blobs();
        let s = blobs.get(blob)?;
        s.hashes.iter().position(Option::is_none).map(|i| i as u32)
    }

    /// Every piece's hash, once all are known.
    pub fn table(&self, blob: &Digest) -> Option<Vec<Blake3Hash>> {
        let blobs = self.blobs();
        blobs.get(blob)?.hashes.iter().copied().collect()
    }

    /// Who published the hashes, if known.
    pub fn publisher(&self, blob: &Digest) -> Option<HostId> {
        self.blobs().get(blob).and_then(|s| s.publisher.clone())
    }

    /// Pieces with a known hash that are not staged: what a downloader can fetch now.
    pub fn fetchable(&self, blob: &Digest) -> Vec<u32> {
        let blobs = self.blobs();
        let Some(s) = blobs.get(blob) else {
            return Vec::new();
        };
        s.hashes
            .iter()
            .enumerate()
            .filter(|(i, h)| h.is_some() && !s.pieces.contains_key(&(*i as u32)))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Checks `bytes` against piece `index`'s published hash and stages them.
    pub fn put(&self, blob: &Digest, index: u32, bytes: Bytes) -> Result<(), StageError> {
        let hash = {
            let blobs = self.blobs();
            let s = blobs.get(blob).ok_or(StageError::NoHash)?;
            if s.pieces.contains_key(&index) {
                return Ok(());
            }
            s.hashes
                .get(index as usize)
                .copied()
                .flatten()
                .ok_or(StageError::NoHash)?
        };
        // Hashed outside the lock: the piece server reads staged pieces meanwhile.
        if blake3::hash(&bytes).as_bytes() != &hash {
            return Err(StageError::Mismatch);
        }
        // No copy: the fetched bytes keep the room they were fetched with (budget.rs), so the
        // staged piece counts against the budget until it moves into the store.
        self.insert(blob, index, Some(bytes), None)
    }

    /// Stages a piece this node read from the origin itself, with the hash it computed; the
    /// hash is learnt even when the piece finds no room. Room in the budget is only tried for:
    /// the import that calls this must never wait (budget.rs, [`PieceBudget::try_download`]).
    pub fn put_own(
        &self,
        blob: &Digest,
        index: u32,
        bytes: Bytes,
        hash: Blake3Hash,
    ) -> Result<(), StageError> {
        let room = self
            .budget
            .get()
            .map(|b| b.try_download(bytes.len() as u64));
        let bytes = match room {
            Some(Some(permit)) => permit.attach(bytes),
            Some(None) => {
                self.insert(blob, index, None, Some(hash))?;
                return Err(StageError::Full);
            }
            None => bytes,
        };
        self.insert(blob, index, Some(bytes), Some(hash))
    }

    /// Stages `bytes` (none: only learns `own`, the piece's hash).
    fn insert(
        &self,
        blob: &Digest,
        index: u32,
        bytes: Option<Bytes>,
        own: Option<Blake3Hash>,
    ) -> Result<(), StageError> {
        let mut blobs = self.blobs();
        let s = blobs.get_mut(blob).ok_or(StageError::NoHash)?;
        let Some(slot) = s.hashes.get_mut(index as usize) else {
            return Err(StageError::NoHash);
        };
        if let Some(h) = own {
            *slot = Some(h);
        }
        let Some(bytes) = bytes else {
            return Ok(());
        };
        let n = bytes.len() as u64;
        if s.pieces.contains_key(&index) {
            return Ok(());
        }
        if self.used() + n > self.limit {
            return Err(StageError::Full);
        }
        s.pieces.insert(index, bytes);
        drop(blobs);
        self.add_used(n as i64);
        Ok(())
    }

    /// A staged piece and its hash (for the piece server).
    pub fn piece(&self, blob: &Digest, index: u32) -> Option<(Bytes, Blake3Hash)> {
        let blobs = self.blobs();
        let s = blobs.get(blob)?;
        let bytes = s.pieces.get(&index)?.clone();
        let hash = s.hashes.get(index as usize).copied().flatten()?;
        Some((bytes, hash))
    }

    /// Indices of the staged pieces of `blob` and its piece count; `None` when not staged.
    pub fn held(&self, blob: &Digest) -> Option<(u32, Vec<u32>)> {
        let blobs = self.blobs();
        let s = blobs.get(blob)?;
        Some((s.meta.piece_count(), s.pieces.keys().copied().collect()))
    }

    /// Whether piece `index` of `blob` is staged.
    #[cfg(test)]
    pub fn holds(&self, blob: &Digest, index: u32) -> bool {
        self.blobs()
            .get(blob)
            .is_some_and(|s| s.pieces.contains_key(&index))
    }

    /// Removes one staged piece (it moved into the store); returns its bytes.
    pub fn take(&self, blob: &Digest, index: u32) -> Option<Bytes> {
        let b = self.blobs().get_mut(blob)?.pieces.remove(&index)?;
        self.add_used(-(b.len() as i64));
        Some(b)
    }

    /// Forgets everything staged of `blob`.
    pub fn remove(&self, blob: &Digest) {
        if let Some(s) = self.blobs().remove(blob) {
            self.add_used(-(bytes_of(&s) as i64));
        }
    }
}

fn bytes_of(s: &Staged) -> u64 {
    s.pieces.values().map(|b| b.len() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> TaskMeta {
        TaskMeta {
            blob: Digest::from_bytes([3; 32]),
            size: 3 * 65536 + 10,
            piece_size: 65536,
        }
    }

    fn piece(b: u8) -> Bytes {
        Bytes::from(vec![b; 65536])
    }

    #[test]
    fn pieces_are_staged_only_against_a_published_hash() {
        let st = Staging::new(1 << 20);
        let m = meta();
        st.open(m);
        assert_eq!(st.put(&m.blob, 0, piece(1)), Err(StageError::NoHash));
        let h0 = *blake3::hash(&piece(1)).as_bytes();
        assert_eq!(st.learn(&m.blob, 0, &[Some(h0), None], None), 1);
        assert_eq!(st.fetchable(&m.blob), vec![0]);
        assert_eq!(st.put(&m.blob, 0, piece(2)), Err(StageError::Mismatch));
        assert_eq!(st.put(&m.blob, 0, piece(1)), Ok(()));
        assert_eq!(st.piece(&m.blob, 0).map(|p| p.1), Some(h0));
        assert_eq!(st.first_unknown(&m.blob), Some(1));
        // A changed hash drops the piece staged under the old one.
        let h2 = *blake3::hash(&piece(2)).as_bytes();
        st.learn(&m.blob, 0, &[Some(h2)], None);
        assert!(!st.holds(&m.blob, 0));
        assert_eq!(st.fetchable(&m.blob), vec![0]);
    }

    #[test]
    fn staged_pieces_take_room_in_the_budget_without_waiting() {
        let budget = PieceBudget::new(32 << 20); // downloads may hold 16 MiB of it
        let st = Staging::new(1 << 30);
        st.use_budget(budget.clone());
        let m = meta();
        st.open(m);
        // Downloads hold all the room they may have but one piece's worth.
        let others = budget.try_download((16 << 20) - 65536);
        assert!(others.is_some());
        let own =
            |i: u32, b: u8| st.put_own(&m.blob, i, piece(b), *blake3::hash(&piece(b)).as_bytes());
        assert_eq!(own(0, 1), Ok(()));
        assert_eq!(budget.in_use(), 16 << 20);
        // No room left: not staged (and no wait), but its hash is known.
        assert_eq!(own(1, 2), Err(StageError::Full));
        assert!(!st.holds(&m.blob, 1));
        assert_eq!(st.fetchable(&m.blob), vec![1]);
        drop(others);
        assert_eq!(budget.in_use(), 65536, "the staged piece holds its room");
        assert_eq!(own(1, 2), Ok(()));
        // The room goes when the piece leaves staging (it moved into the store).
        let moved = st.take(&m.blob, 0);
        assert!(moved.is_some());
        drop(moved);
        st.remove(&m.blob);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn staging_is_bounded() {
        let st = Staging::new(65536 + 100);
        let m = meta();
        st.open(m);
        let own =
            |i: u32, b: u8| st.put_own(&m.blob, i, piece(b), *blake3::hash(&piece(b)).as_bytes());
        assert_eq!(own(0, 1), Ok(()));
        assert_eq!(own(1, 2), Err(StageError::Full));
        // The hash is learnt even when the bytes do not fit.
        assert_eq!(st.fetchable(&m.blob), vec![1]);
        assert!(st.take(&m.blob, 0).is_some());
        assert_eq!(own(1, 2), Ok(()));
        st.remove(&m.blob);
        assert!(!st.contains(&m.blob));
        assert_eq!(st.used(), 0);
    }
}
