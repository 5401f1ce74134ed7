//! Compact piece bitsets: which pieces of a blob one peer holds.
//!
//! On the wire a bitmap is `ceil(n / 8)` bytes, piece `i` at byte `i / 8`, bit `i % 8` (least
//! significant first); bits past the last piece must be zero.

/// Words stored inline, without a heap allocation: blobs of up to 128 pieces (512 MiB in
/// 4 MiB pieces) cost no pointer chase when candidates are scanned.
const INLINE_WORDS: usize = 2;

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    Inline { words: [u64; INLINE_WORDS], len: u8 },
    Heap(Box<[u64]>),
}

/// A fixed-length set of piece indices, one bit per piece.
#[derive(Clone, PartialEq, Eq)]
pub struct PieceSet {
    repr: Repr,
}

impl std::fmt::Debug for PieceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PieceSet({} held)", self.count())
    }
}

fn words_for(pieces: u32) -> usize {
    (pieces as usize).div_ceil(64)
}

impl PieceSet {
    /// An empty set for a blob of `pieces` pieces.
    pub fn empty(pieces: u32) -> Self {
        let n = words_for(pieces);
        let repr = if n <= INLINE_WORDS {
            Repr::Inline {
                words: [0; INLINE_WORDS],
                len: n as u8,
            }
        } else {
            Repr::Heap(vec![0u64; n].into_boxed_slice())
        };
        Self { repr }
    }

    /// The raw 64-bit words, piece `i` at word `i / 64`, bit `i % 64`.
    #[inline]
    pub(crate) fn words(&self) -> &[u64] {
        match &self.repr {
            Repr::Inline { words, len } => &words[..*len as usize],
            Repr::Heap(w) => w,
        }
    }

    #[inline]
    fn words_mut(&mut self) -> &mut [u64] {
        match &mut self.repr {
            Repr::Inline { words, len } => &mut words[..*len as usize],
            Repr::Heap(w) => w,
        }
    }

    /// The set of all `pieces` pieces.
    pub fn full(pieces: u32) -> Self {
        let mut set = Self::empty(pieces);
        for (w, word) in set.words_mut().iter_mut().enumerate() {
            let first = w as u64 * 64;
            let left = u64::from(pieces) - first;
            *word = if left >= 64 {
                u64::MAX
            } else {
                (1u64 << left) - 1
            };
        }
        set
    }

    /// Parses a wire bitmap for a blob of `pieces` pieces.
    pub fn from_bitmap(bitmap: &[u8], pieces: u32) -> Result<Self, String> {
        let want = (pieces as usize).div_ceil(8);
        if bitmap.len() != want {
            return Err(format!(
                "piece bitmap is {} bytes, the blob's {pieces} pieces need {want}",
                bitmap.len()
            ));
        }
        let mut set = Self::empty(pieces);
        for (w, chunk) in bitmap.chunks(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            if let Some(word) = set.words_mut().get_mut(w) {
                *word = u64::from_le_bytes(bytes);
            }
        }
        if set != (Self::full(pieces).intersection(&set)) {
            return Err(format!(
                "piece bitmap sets bits past the blob's last piece ({pieces} pieces)"
            ));
        }
        Ok(set)
    }

    /// The wire bitmap of this set for a blob of `pieces` pieces.
    pub fn to_bitmap(&self, pieces: u32) -> Vec<u8> {
        let mut out: Vec<u8> = self.words().iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate((pieces as usize).div_ceil(8));
        out
    }

    fn intersection(&self, other: &PieceSet) -> PieceSet {
        let mut out = self.clone();
        for (a, b) in out.words_mut().iter_mut().zip(other.words()) {
            *a &= b;
        }
        out
    }

    /// Adds piece `i`; returns whether it was new. Indices past the end are ignored (callers
    /// check the range first).
    pub fn insert(&mut self, i: u32) -> bool {
        match self.words_mut().get_mut(i as usize / 64) {
            Some(word) => {
                let bit = 1u64 << (i % 64);
                let new = *word & bit == 0;
                *word |= bit;
                new
            }
            None => false,
        }
    }

    /// Removes piece `i`; returns whether it was held.
    pub fn remove(&mut self, i: u32) -> bool {
        match self.words_mut().get_mut(i as usize / 64) {
            Some(word) => {
                let bit = 1u64 << (i % 64);
                let held = *word & bit != 0;
                *word &= !bit;
                held
            }
            None => false,
        }
    }

    /// Whether piece `i` is held.
    pub fn contains(&self, i: u32) -> bool {
        self.words()
            .get(i as usize / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// How many pieces are held.
    pub fn count(&self) -> u32 {
        self.words().iter().map(|w| w.count_ones()).sum()
    }

    /// How many pieces this set holds that `lacking` does not: what this peer could give it.
    #[inline]
    pub fn count_missing_from(&self, lacking: &PieceSet) -> u32 {
        self.words()
            .iter()
            .zip(lacking.words())
            .map(|(a, b)| (a & !b).count_ones())
            .sum()
    }

    /// Adds every piece of `other` into `self`.
    pub fn union_with(&mut self, other: &PieceSet) {
        for (a, b) in self.words_mut().iter_mut().zip(other.words()) {
            *a |= b;
        }
    }

    /// Clears every piece.
    pub fn clear(&mut self) {
        self.words_mut().iter_mut().for_each(|w| *w = 0);
    }

    /// The held piece indices, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words().iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let tz = bits.trailing_zeros();
                bits &= bits - 1;
                Some(w as u32 * 64 + tz)
            })
        })
    }

    /// Heap bytes this set owns (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Inline { .. } => 0,
            Repr::Heap(w) => w.len() * 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_round_trip_and_bounds() {
        let mut set = PieceSet::empty(70);
        assert!(set.insert(0));
        assert!(set.insert(69));
        assert!(!set.insert(69));
        assert!(!set.insert(70 + 64)); // past the words: ignored
        assert!(set.insert(5) && set.remove(5) && !set.remove(5) && !set.remove(500));
        let bitmap = set.to_bitmap(70);
        assert_eq!(bitmap.len(), 9);
        assert_eq!(bitmap[0], 1);
        assert_eq!(bitmap[8], 0b10_0000);
        assert_eq!(PieceSet::from_bitmap(&bitmap, 70), Ok(set.clone()));
        assert!(PieceSet::from_bitmap(&bitmap[..8], 70).is_err());
        let mut stray = bitmap.clone();
        stray[8] |= 0b100_0000; // piece 70 does not exist
        assert!(PieceSet::from_bitmap(&stray, 70).is_err());
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 69]);
    }

    #[test]
    fn counts_what_one_peer_can_give_another() {
        let full = PieceSet::full(130);
        assert_eq!(full.count(), 130);
        let mut asker = PieceSet::empty(130);
        for i in 0..100 {
            asker.insert(i);
        }
        assert_eq!(full.count_missing_from(&asker), 30);
        assert_eq!(asker.count_missing_from(&full), 0);
        let mut union = PieceSet::empty(130);
        union.union_with(&asker);
        assert_eq!(union.count(), 100);
        union.clear();
        assert_eq!(union.count(), 0);
        assert_eq!(PieceSet::full(64).count(), 64);
        assert_eq!(PieceSet::full(0).count(), 0);
        // Inline and heap sets behave alike.
        let mut big = PieceSet::empty(1000);
        assert!(big.insert(999) && big.contains(999) && !big.contains(998));
        assert_eq!(big.heap_bytes(), 16 * 8);
        assert_eq!(PieceSet::empty(128).heap_bytes(), 0);
        assert_eq!(PieceSet::full(1000).count_missing_from(&big), 999);
    }
}
