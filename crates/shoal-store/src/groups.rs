//! A chunk's group hashes: the BLAKE3 chaining values of its 16 KiB groups, so that part of a
//! chunk can be checked against the chunk's name without hashing the rest (docs/store.md,
//! "Reading part of a chunk").
//!
//! BLAKE3 is itself a Merkle tree over 1 KiB chunks, and a 16 KiB group that starts at a
//! multiple of 16 KiB is one of its subtrees. So the chaining values of every group, merged up the
//! tree the way BLAKE3 merges them, give back the chunk's BLAKE3 hash: a list that reproduces the
//! name is exactly the list of the chunk's groups, and a group whose bytes hash to its entry is
//! exactly the chunk's bytes there. This is Bao's outboard with every interior node left out
//! but the lowest ones kept: a chunk (at most 64 MiB) has at most 4096 groups, so the whole list
//! is read and checked at once (one read of at most 128 KiB, one compression per group), and no
//! tree needs storing or walking. The arithmetic is the blake3 crate's `hazmat` module.
//!
//! A chunk of one group has no list: its name is the hash of its bytes.

use std::ops::Range;

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::key::Blake3Hash;

/// Bytes per group: 16 BLAKE3 chunks, a power of two.
pub(crate) const GROUP_LEN: u64 = 16 << 10;
/// Bytes per group hash.
const CV_LEN: usize = 32;

/// Groups in a chunk of `len` bytes (an empty chunk is one empty group).
pub(crate) fn group_count(len: u64) -> u64 {
    len.div_ceil(GROUP_LEN).max(1)
}

/// Bytes of group hashes kept for a chunk of `len` bytes: none for a single group.
pub(crate) fn hashes_len(len: u64) -> u64 {
    match group_count(len) {
        1 => 0,
        n => n * CV_LEN as u64,
    }
}

/// The verified group hashes of one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupHashes {
    len: u64,
    cvs: Vec<ChainingValue>,
}

/// The chaining value of group `index` (the bytes at `index * GROUP_LEN`) of a chunk of more
/// than one group.
fn group_cv(index: u64, bytes: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(index * GROUP_LEN)
        .update(bytes)
        .finalize_non_root()
}

/// The chaining value of the subtree of `len` bytes whose groups are `cvs` (not the root).
fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    match cvs {
        [one] => *one,
        _ => {
            // More than one group: the left subtree is a power of two of at least one group.
            let left = left_subtree_len(len);
            let k = ((left / GROUP_LEN) as usize).min(cvs.len());
            let (l, r) = cvs.split_at(k);
            merge_subtrees_non_root(&subtree(l, left), &subtree(r, len - left), Mode::Hash)
        }
    }
}

/// The BLAKE3 hash of a chunk of `len` bytes (more than one group) from its group hashes.
fn root(cvs: &[ChainingValue], len: u64) -> Blake3Hash {
    let left = left_subtree_len(len);
    let k = ((left / GROUP_LEN) as usize).min(cvs.len());
    let (l, r) = cvs.split_at(k);
    let root = merge_subtrees_root(&subtree(l, left), &subtree(r, len - left), Mode::Hash);
    Blake3Hash::from_bytes(*root.as_bytes())
}

impl GroupHashes {
    /// Hashes a whole chunk in one pass: its BLAKE3 hash (its name when the bytes are right) and,
    /// for more than one group, its group hashes.
    pub fn compute(data: &[u8]) -> (Blake3Hash, Option<GroupHashes>) {
        let len = data.len() as u64;
        if group_count(len) == 1 {
            return (Blake3Hash::of(data), None);
        }
        let cvs: Vec<ChainingValue> = data
            .chunks(GROUP_LEN as usize)
            .enumerate()
            .map(|(i, g)| group_cv(i as u64, g))
            .collect();
        (root(&cvs, len), Some(GroupHashes { len, cvs }))
    }

    /// Group hashes read back for a chunk of `len` bytes named `name`; `None` unless they are
    /// exactly the chunk's (right length, and merged they reproduce the name).
    pub fn decode(bytes: &[u8], len: u64, name: &Blake3Hash) -> Option<GroupHashes> {
        if group_count(len) < 2 || bytes.len() as u64 != hashes_len(len) {
            return None;
        }
        let cvs: Vec<ChainingValue> = bytes
            .chunks_exact(CV_LEN)
            .map(|c| c.try_into().unwrap_or([0; CV_LEN]))
            .collect();
        (root(&cvs, len) == *name).then_some(GroupHashes { len, cvs })
    }

    /// The stored form: the hashes one after another.
    pub fn encode(&self) -> Vec<u8> {
        self.cvs.concat()
    }

    /// Bytes of memory the list takes (the cache's weight).
    pub fn weight(&self) -> u32 {
        u32::try_from(self.cvs.len() * CV_LEN).unwrap_or(u32::MAX)
    }

    /// The groups that cover bytes `from..to` of the chunk (`to` at most the chunk's length).
    pub fn covering(&self, from: u64, to: u64) -> Range<u64> {
        let to = to.min(self.len);
        let first = from.min(to) / GROUP_LEN;
        first..to.div_ceil(GROUP_LEN).max(first)
    }

    /// Where group `index` lies in the chunk.
    pub fn span(&self, index: u64) -> Range<u64> {
        let start = (index * GROUP_LEN).min(self.len);
        start..(start + GROUP_LEN).min(self.len)
    }

    /// True when `bytes` are exactly group `index` of the chunk.
    pub fn check(&self, index: u64, bytes: &[u8]) -> bool {
        let want = self.cvs.get(index as usize);
        let span = self.span(index);
        want.is_some()
            && bytes.len() as u64 == span.end - span.start
            && !bytes.is_empty()
            && Some(&group_cv(index, bytes)) == want
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    #[test]
    fn group_hashes_reproduce_blake3_at_every_shape() {
        let g = GROUP_LEN as usize;
        for len in [
            0,
            1,
            g - 1,
            g,
            g + 1,
            2 * g,
            3 * g - 5,
            5 * g,
            (1 << 20) - 1,
            1 << 20,
            (1 << 20) + 3000,
            (3 << 20) + g + 17,
        ] {
            let d = data(len);
            let (name, groups) = GroupHashes::compute(&d);
            assert_eq!(name, Blake3Hash::of(&d), "len {len}");
            assert_eq!(groups.is_some(), len > g, "len {len}");
            let Some(groups) = groups else { continue };
            let stored = groups.encode();
            assert_eq!(stored.len() as u64, hashes_len(len as u64));
            let back = GroupHashes::decode(&stored, len as u64, &name).expect("decodes");
            assert_eq!(back, groups);
            for i in 0..group_count(len as u64) {
                let s = back.span(i);
                assert!(back.check(i, &d[s.start as usize..s.end as usize]));
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let len = (1 << 20) + 100;
        let d = data(len);
        let (name, groups) = GroupHashes::compute(&d);
        let groups = groups.expect("several groups");
        let stored = groups.encode();
        for at in [0, 31, 32, stored.len() / 2, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[at] ^= 1;
            assert!(GroupHashes::decode(&bad, len as u64, &name).is_none());
        }
        assert!(GroupHashes::decode(&stored[1..], len as u64, &name).is_none());
        assert!(GroupHashes::decode(&stored, len as u64 + GROUP_LEN, &name).is_none());
        // A wrong length with the same number of groups keeps the tree's shape, so the list
        // decodes; but the last group then never checks (its length is in its hash).
        let longer = GroupHashes::decode(&stored, len as u64 + 1, &name).expect("same shape");
        let last = group_count(len as u64) - 1;
        let mut tail = d[longer.span(last).start as usize..].to_vec();
        tail.push(0);
        assert!(!longer.check(last, &tail));
        let mut other = name;
        other = Blake3Hash::from_bytes({
            let mut b = *other.as_bytes();
            b[0] ^= 1;
            b
        });
        assert!(GroupHashes::decode(&stored, len as u64, &other).is_none());
        // A group with a flipped byte, or cut short, or checked at the wrong index.
        let s = groups.span(3);
        let mut g3 = d[s.start as usize..s.end as usize].to_vec();
        assert!(groups.check(3, &g3));
        assert!(!groups.check(4, &g3));
        g3[100] ^= 1;
        assert!(!groups.check(3, &g3));
        assert!(!groups.check(3, &g3[..10]));
        assert!(!groups.check(10_000, &g3));
    }

    #[test]
    fn covering_groups() {
        let groups = GroupHashes::compute(&data(5 * GROUP_LEN as usize - 10))
            .1
            .expect("groups");
        assert_eq!(groups.covering(0, 1), 0..1);
        assert_eq!(groups.covering(GROUP_LEN - 1, GROUP_LEN + 1), 0..2);
        assert_eq!(groups.covering(GROUP_LEN, 2 * GROUP_LEN), 1..2);
        assert_eq!(groups.covering(4 * GROUP_LEN, 9 * GROUP_LEN), 4..5);
        assert_eq!(groups.span(4), 4 * GROUP_LEN..5 * GROUP_LEN - 10);
    }
}
