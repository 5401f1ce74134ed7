//! Which pieces of a blob are held: a fixed-size bitmap.

/// A set of piece indices below a fixed count.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct PieceSet {
    words: Vec<u64>,
    len: u32,
    count: u32,
}

impl PieceSet {
    /// An empty set for a blob of `len` pieces.
    pub fn new(len: u32) -> Self {
        PieceSet {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
            count: 0,
        }
    }

    /// How many pieces the blob has (held or not).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True when the blob has no pieces at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many pieces are held.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// True when every piece is held.
    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    /// True when piece `index` is held.
    pub fn contains(&self, index: u32) -> bool {
        index < self.len
            && self
                .words
                .get((index / 64) as usize)
                .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Marks piece `index` held; returns false if it already was or is out of range.
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= self.len || self.contains(index) {
            return false;
        }
        if let Some(w) = self.words.get_mut((index / 64) as usize) {
            *w |= 1 << (index % 64);
            self.count += 1;
            return true;
        }
        false
    }

    /// Marks piece `index` not held; returns false if it was not held.
    pub fn remove(&mut self, index: u32) -> bool {
        if !self.contains(index) {
            return false;
        }
        if let Some(w) = self.words.get_mut((index / 64) as usize) {
            *w &= !(1 << (index % 64));
            self.count -= 1;
            return true;
        }
        false
    }

    /// The held indices in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|i| self.contains(*i))
    }

    /// The first index in `range` that is not held.
    pub fn first_missing(&self, range: std::ops::Range<u32>) -> Option<u32> {
        range.into_iter().find(|i| !self.contains(*i))
    }
}

#[cfg(test)]
mod tests {
    use super::PieceSet;

    #[test]
    fn insert_remove_count() {
        let mut s = PieceSet::new(130);
        assert!(s.insert(0) && s.insert(129) && s.insert(64));
        assert!(!s.insert(64) && !s.insert(130));
        assert_eq!(s.count(), 3);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(s.remove(64) && !s.remove(64));
        assert_eq!(s.first_missing(0..3), Some(1));
        assert!(!s.is_full());
    }
}
