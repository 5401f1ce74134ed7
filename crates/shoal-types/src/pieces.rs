//! Which pieces of one blob are held: a fixed-length bitset.
//!
//! One type for the wire (a peer's held set, a download's wanted set), the store (what is on
//! disk) and the scheduler (what each peer holds). On the wire it is `count` (varint) then
//! `ceil(count / 8)` bytes, piece `i` at byte `i / 8`, bit `i % 8`, least significant first;
//! bits past the last piece are zero (docs/protocol.md, "Piece sets").

use std::fmt;
use std::ops::Range;

use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::IdError;

/// Words held inline, without a heap allocation: blobs of up to 128 pieces cost no pointer
/// chase when the scheduler scans candidates.
const INLINE_WORDS: usize = 2;
const INLINE_PIECES: u32 = (INLINE_WORDS * 64) as u32;

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    /// `len` ≤ 128 pieces; words past `len` stay zero.
    Inline { len: u8, words: [u64; INLINE_WORDS] },
    /// More pieces: `ceil(len / 64)` words.
    Heap { len: u32, words: Box<[u64]> },
}

/// A set of piece indices of one blob of [`len`](PieceSet::len) pieces, one bit per piece.
///
/// `len` is how many pieces the blob has; [`held`](PieceSet::held) how many of them are in
/// the set. (There is no `count` or `is_empty`: both were read both ways.)
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PieceSet {
    repr: Repr,
}

// The scheduler keeps one set per peer and blob: keep it three words.
const _: () = assert!(std::mem::size_of::<PieceSet>() == 24);

impl fmt::Debug for PieceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PieceSet({}/{} held)", self.held(), self.len())
    }
}

fn words_for(len: u32) -> usize {
    (len as usize).div_ceil(64)
}

#[allow(clippy::len_without_is_empty)] // `is_empty` would be read two ways: see `held`.
impl PieceSet {
    /// An empty set for a blob of `len` pieces.
    pub fn empty(len: u32) -> Self {
        let repr = if len <= INLINE_PIECES {
            Repr::Inline {
                len: len as u8,
                words: [0; INLINE_WORDS],
            }
        } else {
            Repr::Heap {
                len,
                words: vec![0u64; words_for(len)].into_boxed_slice(),
            }
        };
        PieceSet { repr }
    }

    /// The set of all `len` pieces.
    pub fn full(len: u32) -> Self {
        let mut set = Self::empty(len);
        for (w, word) in set.words_mut().iter_mut().enumerate() {
            let left = u64::from(len) - w as u64 * 64;
            *word = if left >= 64 {
                u64::MAX
            } else {
                (1u64 << left) - 1
            };
        }
        set
    }

    /// How many pieces the blob has (held or not).
    #[inline]
    pub fn len(&self) -> u32 {
        match &self.repr {
            Repr::Inline { len, .. } => u32::from(*len),
            Repr::Heap { len, .. } => *len,
        }
    }

    /// How many pieces are held.
    pub fn held(&self) -> u32 {
        self.words().iter().map(|w| w.count_ones()).sum()
    }

    /// True when every piece is held (also for a blob of no pieces).
    pub fn is_complete(&self) -> bool {
        self.held() == self.len()
    }

    /// The raw 64-bit words: piece `i` at word `i / 64`, bit `i % 64`.
    #[inline]
    pub fn words(&self) -> &[u64] {
        match &self.repr {
            Repr::Inline { len, words } => &words[..words_for(u32::from(*len))],
            Repr::Heap { words, .. } => words,
        }
    }

    #[inline]
    fn words_mut(&mut self) -> &mut [u64] {
        match &mut self.repr {
            Repr::Inline { len, words } => &mut words[..words_for(u32::from(*len))],
            Repr::Heap { words, .. } => words,
        }
    }

    /// Whether piece `index` is held (false past the end).
    #[inline]
    pub fn contains(&self, index: u32) -> bool {
        index < self.len()
            && self
                .words()
                .get(index as usize / 64)
                .is_some_and(|w| w & (1u64 << (index % 64)) != 0)
    }

    /// Adds piece `index`; returns whether it was new. An index past the end is not added
    /// (false): callers that take indices from outside check them with [`PieceSet::len`].
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= self.len() {
            return false;
        }
        match self.words_mut().get_mut(index as usize / 64) {
            Some(word) => {
                let bit = 1u64 << (index % 64);
                let new = *word & bit == 0;
                *word |= bit;
                new
            }
            None => false,
        }
    }

    /// Removes piece `index`; returns whether it was held.
    pub fn remove(&mut self, index: u32) -> bool {
        match self.words_mut().get_mut(index as usize / 64) {
            Some(word) => {
                let bit = 1u64 << (index % 64);
                let held = *word & bit != 0;
                *word &= !bit;
                held
            }
            None => false,
        }
    }

    /// Removes every piece.
    pub fn clear(&mut self) {
        self.words_mut().iter_mut().for_each(|w| *w = 0);
    }

    /// The held indices, ascending.
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

    /// The indices not held, ascending.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len()).filter(|i| !self.contains(*i))
    }

    /// The first index in `range` that is not held (indices past the end count as missing).
    pub fn first_missing(&self, range: Range<u32>) -> Option<u32> {
        range.into_iter().find(|i| !self.contains(*i))
    }

    /// How many pieces both sets hold (what a parent holds of what a child wants).
    pub fn count_common(&self, other: &PieceSet) -> u32 {
        self.words()
            .iter()
            .zip(other.words())
            .map(|(a, b)| (a & b).count_ones())
            .sum()
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

    /// Adds every piece of `other` (a set of the same blob; pieces past this set's end are not
    /// added).
    pub fn union_with(&mut self, other: &PieceSet) {
        let len = self.len();
        for (a, b) in self.words_mut().iter_mut().zip(other.words()) {
            *a |= b;
        }
        self.clear_tail(len);
    }

    fn clear_tail(&mut self, len: u32) {
        let tail = len % 64;
        if let (true, Some(last)) = (tail != 0, self.words_mut().last_mut()) {
            *last &= (1u64 << tail) - 1;
        }
    }

    /// Checks that this set describes a blob of `len` pieces.
    pub fn check_len(&self, len: u32) -> Result<(), IdError> {
        if self.len() != len {
            return Err(IdError::new(
                "piece set",
                format!("set covers {} pieces but the blob has {len}", self.len()),
            ));
        }
        Ok(())
    }

    /// Parses a wire bitmap (`ceil(len / 8)` bytes, no bits past the last piece).
    pub fn from_bitmap(bitmap: &[u8], len: u32) -> Result<Self, IdError> {
        let want = (len as usize).div_ceil(8);
        if bitmap.len() != want {
            return Err(IdError::new(
                "piece set",
                format!(
                    "bitmap of {} bytes does not fit {len} pieces ({want} bytes)",
                    bitmap.len()
                ),
            ));
        }
        let mut set = Self::empty(len);
        for (word, chunk) in set.words_mut().iter_mut().zip(bitmap.chunks(8)) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(bytes);
        }
        let tail = len % 64;
        let stray = tail != 0 && set.words().last().is_some_and(|w| w >> tail != 0);
        if stray {
            return Err(IdError::new(
                "piece set",
                format!("bits set past the last piece ({len} pieces)"),
            ));
        }
        Ok(set)
    }

    /// The wire bitmap: `ceil(len / 8)` bytes.
    pub fn to_bitmap(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words().iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate((self.len() as usize).div_ceil(8));
        out
    }

    /// Heap bytes this set owns (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Inline { .. } => 0,
            Repr::Heap { words, .. } => words.len() * 8,
        }
    }
}

/// The bitmap's bytes as a serde sequence of `u8` (what `Vec<u8>` serializes as), without
/// building the vector.
struct Bitmap<'a>(&'a PieceSet);

impl Serialize for Bitmap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let n = (self.0.len() as usize).div_ceil(8);
        let mut seq = serializer.serialize_seq(Some(n))?;
        let bytes = self.0.words().iter().flat_map(|w| w.to_le_bytes());
        for b in bytes.take(n) {
            seq.serialize_element(&b)?;
        }
        seq.end()
    }
}

impl Serialize for PieceSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("PieceSet", 2)?;
        s.serialize_field("count", &self.len())?;
        s.serialize_field("bits", &Bitmap(self))?;
        s.end()
    }
}

/// The wire form as decoded, before its bitmap is checked against its count.
#[derive(Deserialize)]
#[serde(rename = "PieceSet")]
struct Wire {
    count: u32,
    bits: Vec<u8>,
}

impl<'de> Deserialize<'de> for PieceSet {
    /// A bitmap that does not fit its count is refused here: a `PieceSet` is always whole.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let w = Wire::deserialize(deserializer)?;
        PieceSet::from_bitmap(&w.bits, w.count).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_and_held_are_two_things() {
        let mut s = PieceSet::empty(130);
        assert_eq!((s.len(), s.held()), (130, 0));
        assert!(s.insert(0) && s.insert(129) && s.insert(64));
        assert!(!s.insert(64) && !s.insert(130), "again, or past the end");
        assert_eq!((s.len(), s.held()), (130, 3));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(s.remove(64) && !s.remove(64) && !s.remove(500));
        assert_eq!(s.first_missing(0..3), Some(1));
        assert_eq!(s.missing().count(), 128);
        assert!(!s.is_complete());
        assert!(PieceSet::full(130).is_complete());
        assert!(PieceSet::empty(0).is_complete());
        assert!(!s.contains(u32::MAX));
    }

    #[test]
    fn counts_what_one_peer_can_give_another() {
        let full = PieceSet::full(130);
        let mut asker = PieceSet::empty(130);
        (0..100).for_each(|i| {
            asker.insert(i);
        });
        assert_eq!(full.count_missing_from(&asker), 30);
        assert_eq!(asker.count_missing_from(&full), 0);
        assert_eq!(full.count_common(&asker), 100);
        let mut union = PieceSet::empty(130);
        union.union_with(&asker);
        assert_eq!(union.held(), 100);
        union.clear();
        assert_eq!(union.held(), 0);
        assert_eq!(PieceSet::full(64).held(), 64);
        assert_eq!(PieceSet::full(0).held(), 0);
        let mut big = PieceSet::empty(1000);
        assert!(big.insert(999) && big.contains(999) && !big.contains(998));
        assert_eq!(big.heap_bytes(), 16 * 8);
        assert_eq!(PieceSet::empty(128).heap_bytes(), 0);
        assert_eq!(PieceSet::full(1000).count_missing_from(&big), 999);
        // A union with a longer set keeps this set's length.
        let mut short = PieceSet::empty(3);
        short.union_with(&PieceSet::full(64));
        assert_eq!((short.len(), short.held()), (3, 3));
    }

    #[test]
    fn bitmaps_round_trip_and_refuse_what_does_not_fit() {
        let mut set = PieceSet::empty(70);
        set.insert(0);
        set.insert(69);
        let bitmap = set.to_bitmap();
        assert_eq!(bitmap.len(), 9);
        assert_eq!(bitmap[0], 1);
        assert_eq!(bitmap[8], 0b10_0000);
        assert_eq!(PieceSet::from_bitmap(&bitmap, 70), Ok(set.clone()));
        assert!(PieceSet::from_bitmap(&bitmap[..8], 70).is_err());
        let mut stray = bitmap.clone();
        stray[8] |= 0b100_0000; // piece 70 does not exist
        assert!(PieceSet::from_bitmap(&stray, 70).is_err());
        assert!(set.check_len(70).is_ok() && set.check_len(71).is_err());
    }

    #[test]
    fn the_wire_form_is_count_then_bitmap() {
        let mut set = PieceSet::empty(13);
        set.insert(0);
        set.insert(12);
        let wire = postcard::to_allocvec(&set).unwrap();
        assert_eq!(wire, vec![13, 2, 0b1, 0b1_0000]);
        assert_eq!(postcard::from_bytes::<PieceSet>(&wire).unwrap(), set);
        // A bitmap too short for its count, or with bits past the end: refused.
        assert!(postcard::from_bytes::<PieceSet>(&[20, 1, 0]).is_err());
        assert!(postcard::from_bytes::<PieceSet>(&[3, 1, 0b1000]).is_err());
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, r#"{"count":13,"bits":[1,16]}"#);
        assert_eq!(serde_json::from_str::<PieceSet>(&json).unwrap(), set);
    }

    proptest::proptest! {
        /// Inline and heap sets behave alike, and the wire form round-trips.
        #[test]
        fn behaves_like_a_set_of_indices(len in 0u32..400, picks in proptest::collection::vec(0u32..420, 0..64)) {
            let mut set = PieceSet::empty(len);
            let mut model = std::collections::BTreeSet::new();
            for i in picks {
                let new = set.insert(i);
                proptest::prop_assert_eq!(new, i < len && model.insert(i));
            }
            proptest::prop_assert_eq!(set.held() as usize, model.len());
            proptest::prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            let back: PieceSet = postcard::from_bytes(&postcard::to_allocvec(&set).unwrap()).unwrap();
            proptest::prop_assert_eq!(back, set);
        }
    }
}
