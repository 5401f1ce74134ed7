//! Pieces of plain blobs whose piece table is not whole yet (docs/protocol.md, "Streamed piece
//! hashes"): the origin fetcher computes each piece's BLAKE3 as it arrives and publishes it; a
//! downloader fetches only pieces whose published hash it knows and checks each against it. The
//! store takes a blob only with its whole table, so until then verified pieces wait here and the
//! piece server serves them from here. Once the table is whole the store adopts them (below), or,
//! when it knows the blob already, they move in one by one and are verified again; the whole
//! blob's sha256 is checked as always before the blob counts as complete.
//!
//! Staged bytes live in one file per blob in the store's temp directory (piece i at offset
//! i * piece size; `shoal_store::StagedFile`), not in memory: a blob larger than the piece
//! memory budget stages whole, so peers keep pace with the seed's import instead of waiting for
//! its end. When the table is whole the store adopts the file as the blob's data file, without
//! copying a byte; a crash leaves nothing behind (the store empties its temp directory when it
//! opens). Every read of a staged piece is checked against its published hash again before
//! anyone gets the bytes. `staging_bytes` caps the staged bytes of all blobs together.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_proto::{Blake3Hash, Digest, HostId, TaskMeta};
use shoal_store::{AsyncStore, StagedFile};

/// (index, hash) of staged pieces: the hash each was checked against.
pub(crate) type StagedPieces = Vec<(u32, Blake3Hash)>;

/// Why a piece was not staged.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StageError {
    /// No hash is published for the piece yet (or the blob is not staged).
    NoHash,
    /// The bytes do not match the published hash.
    Mismatch,
    /// Staging is full (`staging_bytes`), or its file could not be written: wait for the table,
    /// or for pieces to move into the store.
    Full,
}

/// What is staged of one blob.
#[derive(Debug)]
struct Staged {
    meta: TaskMeta,
    hashes: Vec<Option<Blake3Hash>>,
    /// Pieces whose verified bytes are in `file`.
    pieces: BTreeSet<u32>,
    /// Created with the first piece.
    file: Option<Arc<StagedFile>>,
    publisher: Option<HostId>,
}

impl Staged {
    fn offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.meta.piece_size)
    }

    fn bytes(&self) -> u64 {
        self.pieces
            .iter()
            .filter_map(|i| self.meta.piece_len(*i))
            .map(u64::from)
            .sum()
    }
}

/// Staged pieces of every blob, shared by downloads and the piece server.
#[derive(Debug)]
pub(crate) struct Staging {
    blobs: Mutex<HashMap<Digest, Staged>>,
    store: AsyncStore,
    limit: u64,
    used: Mutex<u64>,
}

impl Staging {
    /// Staging in `store`'s staged files that keeps at most `limit` bytes of pieces.
    pub fn new(store: AsyncStore, limit: u64) -> Self {
        Staging {
            blobs: Mutex::new(HashMap::new()),
            store,
            limit,
            used: Mutex::new(0),
        }
    }

    fn blobs(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Staged>> {
        crate::sync::lock(&self.blobs)
    }

    /// Reserves `n` bytes of the limit; false when they do not fit.
    fn reserve(&self, n: u64) -> bool {
        let mut used = crate::sync::lock(&self.used);
        if *used + n > self.limit {
            return false;
        }
        *used += n;
        true
    }

    fn release(&self, n: u64) {
        let mut used = crate::sync::lock(&self.used);
        *used = used.saturating_sub(n);
    }

    #[cfg(test)]
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
            self.release(old.bytes());
        }
        blobs.insert(
            meta.blob,
            Staged {
                meta,
                hashes: vec![None; meta.piece_count() as usize],
                pieces: BTreeSet::new(),
                file: None,
                publisher: None,
            },
        );
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
                    if s.pieces.remove(&(i as u32)) {
                        freed += u64::from(s.meta.piece_len(i as u32).unwrap_or(0));
                    }
                    new += 1;
                }
                _ => {}
            }
        }
        drop(blobs);
        self.release(freed);
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

    /// The geometry and the hashes known so far, while at least one is known (what a holder
    /// answers a piece-table request with before its table is whole).
    pub fn known(&self, blob: &Digest) -> Option<(TaskMeta, Vec<Option<Blake3Hash>>)> {
        let blobs = self.blobs();
        let s = blobs.get(blob)?;
        s.hashes
            .iter()
            .any(Option::is_some)
            .then(|| (s.meta, s.hashes.clone()))
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
            .filter(|(i, h)| h.is_some() && !s.pieces.contains(&(*i as u32)))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Checks `bytes` against piece `index`'s published hash and stages them (blocking: hashes
    /// and writes the file).
    pub fn put(&self, blob: &Digest, index: u32, bytes: &[u8]) -> Result<bool, StageError> {
        let hash = {
            let blobs = self.blobs();
            let s = blobs.get(blob).ok_or(StageError::NoHash)?;
            if s.pieces.contains(&index) {
                return Ok(false);
            }
            s.hashes
                .get(index as usize)
                .copied()
                .flatten()
                .ok_or(StageError::NoHash)?
        };
        // Hashed outside the lock: the piece server reads staged pieces meanwhile.
        if blake3::hash(bytes).as_bytes() != &hash {
            return Err(StageError::Mismatch);
        }
        self.insert(blob, index, bytes, hash)
    }

    /// Stages a piece this node read from the origin itself, with the hash it computed; the
    /// hash is learnt even when the piece finds no room (it then reaches the store with the
    /// import).
    pub fn put_own(
        &self,
        blob: &Digest,
        index: u32,
        bytes: &[u8],
        hash: Blake3Hash,
    ) -> Result<bool, StageError> {
        {
            let mut blobs = self.blobs();
            let s = blobs.get_mut(blob).ok_or(StageError::NoHash)?;
            let slot = s.hashes.get_mut(index as usize).ok_or(StageError::NoHash)?;
            *slot = Some(hash);
        }
        self.insert(blob, index, bytes, hash)
    }

    /// Writes verified `bytes` of piece `index` (hash `hash`) to the blob's file and marks the
    /// piece staged, unless its hash changed meanwhile; `false` when it was staged already (the
    /// endgame's second copy), so that it is not counted twice.
    fn insert(
        &self,
        blob: &Digest,
        index: u32,
        bytes: &[u8],
        hash: Blake3Hash,
    ) -> Result<bool, StageError> {
        let n = bytes.len() as u64;
        let (file, offset) = {
            let mut blobs = self.blobs();
            let s = blobs.get_mut(blob).ok_or(StageError::NoHash)?;
            if s.pieces.contains(&index) {
                return Ok(false);
            }
            if s.meta.piece_len(index).map(u64::from) != Some(n) {
                return Err(StageError::Mismatch);
            }
            let file = match &s.file {
                Some(f) => Arc::clone(f),
                None => {
                    let f = Arc::new(self.store.store().staged_file().map_err(|e| {
                        tracing::warn!(error = %e, "staging file not created");
                        StageError::Full
                    })?);
                    s.file = Some(Arc::clone(&f));
                    f
                }
            };
            (file, s.offset(index))
        };
        if !self.reserve(n) {
            return Err(StageError::Full);
        }
        if let Err(e) = file.write_at(bytes, offset) {
            tracing::warn!(blob = %blob, piece = index, error = %e, "staged piece not written");
            self.release(n);
            return Err(StageError::Full);
        }
        let mut blobs = self.blobs();
        let kept = match blobs.get_mut(blob) {
            // The blob left staging meanwhile (its table is whole): the caller stores the piece.
            None => Err(StageError::NoHash),
            Some(s) if !s.file.as_ref().is_some_and(|f| Arc::ptr_eq(f, &file)) => {
                Err(StageError::NoHash)
            }
            Some(s) => Ok(
                s.hashes.get(index as usize).copied().flatten() == Some(hash)
                    && s.pieces.insert(index),
            ),
        };
        drop(blobs);
        if kept != Ok(true) {
            // Staged again meanwhile, or the blob or its hash changed: not counted twice.
            self.release(n);
        }
        kept
    }

    /// A staged piece and its hash, read back and checked against the hash (blocking); `None`
    /// when it is not staged or its bytes no longer match (then it is dropped).
    pub fn piece(&self, blob: &Digest, index: u32) -> Option<(Bytes, Blake3Hash)> {
        let (file, offset, len, hash) = {
            let blobs = self.blobs();
            let s = blobs.get(blob)?;
            if !s.pieces.contains(&index) {
                return None;
            }
            let hash = s.hashes.get(index as usize).copied().flatten()?;
            let len = s.meta.piece_len(index)?;
            (Arc::clone(s.file.as_ref()?), s.offset(index), len, hash)
        };
        let mut buf = vec![0u8; len as usize];
        let ok = file.read_at(&mut buf, offset).is_ok() && blake3::hash(&buf).as_bytes() == &hash;
        if !ok {
            tracing::warn!(blob = %blob, piece = index, "staged piece unreadable or changed: dropped");
            self.take(blob, index);
            return None;
        }
        Some((Bytes::from(buf), hash))
    }

    /// The staged file of `blob` and its staged pieces with the hashes they were checked
    /// against, for the store to adopt.
    pub fn file(&self, blob: &Digest) -> Option<(Arc<StagedFile>, StagedPieces)> {
        let blobs = self.blobs();
        let s = blobs.get(blob)?;
        let pieces = s
            .pieces
            .iter()
            .filter_map(|i| Some((*i, s.hashes.get(*i as usize).copied().flatten()?)))
            .collect();
        Some((Arc::clone(s.file.as_ref()?), pieces))
    }

    /// Indices of the staged pieces of `blob` and its piece count; `None` when not staged.
    pub fn held(&self, blob: &Digest) -> Option<(u32, Vec<u32>)> {
        let blobs = self.blobs();
        let s = blobs.get(blob)?;
        Some((s.meta.piece_count(), s.pieces.iter().copied().collect()))
    }

    /// The length of piece `index` of `blob` if it is staged.
    pub fn staged_len(&self, blob: &Digest, index: u32) -> Option<u32> {
        let blobs = self.blobs();
        let s = blobs.get(blob)?;
        s.pieces
            .contains(&index)
            .then(|| s.meta.piece_len(index))
            .flatten()
    }

    /// Whether piece `index` of `blob` is staged.
    #[cfg(test)]
    fn holds(&self, blob: &Digest, index: u32) -> bool {
        self.staged_len(blob, index).is_some()
    }

    /// Forgets one staged piece (it moved into the store, or it went bad).
    pub fn take(&self, blob: &Digest, index: u32) {
        let freed = self
            .blobs()
            .get_mut(blob)
            .and_then(|s| s.pieces.remove(&index).then(|| s.meta.piece_len(index)))
            .flatten();
        self.release(freed.map_or(0, u64::from));
    }

    /// Forgets everything staged of `blob` (its file goes with the last reader).
    pub fn remove(&self, blob: &Digest) {
        self.drain(blob);
    }

    /// Forgets everything staged of `blob` and returns what was staged (its file and pieces),
    /// so that pieces staged since the caller last looked can still move into the store.
    /// A piece whose write ends after this is not staged: its fetcher stores it instead.
    pub fn drain(&self, blob: &Digest) -> Option<(Arc<StagedFile>, StagedPieces)> {
        let s = self.blobs().remove(blob)?;
        self.release(s.bytes());
        let pieces = s
            .pieces
            .iter()
            .filter_map(|i| Some((*i, s.hashes.get(*i as usize).copied().flatten()?)))
            .collect();
        Some((s.file?, pieces))
    }
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

    fn piece(b: u8) -> Vec<u8> {
        vec![b; 65536]
    }

    fn hash(b: &[u8]) -> Blake3Hash {
        *blake3::hash(b).as_bytes()
    }

    fn staging(dir: &tempfile::TempDir, limit: u64) -> Staging {
        let cfg = shoal_store::StoreConfig::new(dir.path(), 1 << 30);
        let store = shoal_store::Store::open(cfg).unwrap();
        Staging::new(AsyncStore::new(store), limit)
    }

    #[test]
    fn pieces_are_staged_only_against_a_published_hash() {
        let dir = tempfile::tempdir().unwrap();
        let st = staging(&dir, 1 << 20);
        let m = meta();
        st.open(m);
        assert_eq!(st.put(&m.blob, 0, &piece(1)), Err(StageError::NoHash));
        let h0 = hash(&piece(1));
        assert_eq!(st.learn(&m.blob, 0, &[Some(h0), None], None), 1);
        assert_eq!(st.fetchable(&m.blob), vec![0]);
        assert_eq!(st.put(&m.blob, 0, &piece(2)), Err(StageError::Mismatch));
        assert_eq!(st.put(&m.blob, 0, &piece(1)), Ok(true));
        // The endgame's second copy of a staged piece is not new (not counted twice).
        assert_eq!(st.put(&m.blob, 0, &piece(1)), Ok(false));
        assert_eq!(st.piece(&m.blob, 0), Some((Bytes::from(piece(1)), h0)));
        assert_eq!(st.first_unknown(&m.blob), Some(1));
        // A changed hash drops the piece staged under the old one.
        let h2 = hash(&piece(2));
        st.learn(&m.blob, 0, &[Some(h2)], None);
        assert!(!st.holds(&m.blob, 0));
        assert_eq!(st.fetchable(&m.blob), vec![0]);
        assert_eq!(st.used(), 0);
    }

    #[test]
    fn staged_pieces_live_in_a_store_file_and_are_checked_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let st = staging(&dir, 1 << 30);
        let m = meta();
        st.open(m);
        let last = vec![7u8; 10];
        st.put_own(&m.blob, 3, &last, hash(&last)).unwrap();
        st.put_own(&m.blob, 1, &piece(5), hash(&piece(5))).unwrap();
        assert_eq!(st.held(&m.blob), Some((4, vec![1, 3])));
        assert_eq!(st.used(), 65536 + 10);
        assert_eq!(st.piece(&m.blob, 3).map(|p| p.0), Some(Bytes::from(last)));
        // A piece whose bytes changed on disk is dropped, never returned.
        let (file, pieces) = st.file(&m.blob).unwrap();
        assert_eq!(pieces, vec![(1, hash(&piece(5))), (3, hash(&[7u8; 10]))]);
        file.write_at(&[0xff], 65536 + 100).unwrap();
        assert_eq!(st.piece(&m.blob, 1), None);
        assert!(!st.holds(&m.blob, 1));
        assert_eq!(st.used(), 10);
        // A wrong length is refused.
        assert_eq!(
            st.put_own(&m.blob, 2, &piece(1)[..100], hash(&piece(1)[..100])),
            Err(StageError::Mismatch)
        );
        st.remove(&m.blob);
        assert!(st.held(&m.blob).is_none());
        assert_eq!(st.used(), 0);
        // The file goes with its last holder.
        drop(file);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn staging_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let st = staging(&dir, 65536 + 100);
        let m = meta();
        st.open(m);
        let own = |i: u32, b: u8| st.put_own(&m.blob, i, &piece(b), hash(&piece(b)));
        assert_eq!(own(0, 1), Ok(true));
        assert_eq!(own(1, 2), Err(StageError::Full));
        // The hash is learnt even when the bytes do not fit.
        assert_eq!(st.fetchable(&m.blob), vec![1]);
        st.take(&m.blob, 0);
        assert_eq!(own(1, 2), Ok(true));
        st.remove(&m.blob);
        assert!(st.held(&m.blob).is_none());
        assert_eq!(st.used(), 0);
    }
}
