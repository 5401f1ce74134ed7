//! Names from outside, validated before they touch a path: BLAKE3 hashes and piece layouts (blob
//! digests are `shoal_types::Digest`, validated when parsed).
//!
//! Every file name in the store is the lowercase hex of 32 validated bytes, so no key can name a path
//! outside the store's root.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

pub(crate) use shoal_types::Digest;

use crate::error::{Error, Result};

/// Smallest accepted piece size (4 KiB).
pub const MIN_PIECE_SIZE: u32 = 4 << 10;
/// Largest accepted piece size (64 MiB).
pub const MAX_PIECE_SIZE: u32 = 64 << 20;
/// Most pieces one blob may have (keeps a piece table at most 32 MiB).
pub const MAX_PIECES: u32 = 1 << 20;
/// Largest chunk the store accepts (64 MiB; image chunks are at most 16 MiB).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

fn parse_hex32(input: &str) -> Result<[u8; 32]> {
    let refuse = |reason| Error::InvalidKey {
        input: input.chars().take(100).collect(),
        reason,
    };
    if input.len() != 64 {
        return Err(refuse("expected 64 hex digits"));
    }
    if !input
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(refuse("expected lowercase hex digits"));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(input, &mut out).map_err(|_| refuse("expected hex digits"))?;
    Ok(out)
}

/// A BLAKE3 hash: a chunk's name, or a piece's digest from a piece table.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Blake3Hash([u8; 32]);

impl Blake3Hash {
    /// Parses 64 lowercase hex digits.
    pub fn parse(input: &str) -> Result<Self> {
        parse_hex32(input).map(Blake3Hash)
    }

    /// Wraps raw BLAKE3 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Blake3Hash(bytes)
    }

    /// The BLAKE3 hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Blake3Hash(*blake3::hash(data).as_bytes())
    }

    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits: the chunk's file name in the store.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Blake3Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.hex())
    }
}

impl fmt::Debug for Blake3Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Blake3Hash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Blake3Hash::parse(s.strip_prefix("blake3:").unwrap_or(s))
    }
}

/// One cacheable item: a piece of a blob, or a chunk. Used by `get_or_fetch`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Item {
    /// Piece `index` of a blob.
    Piece(Digest, u32),
    /// A chunk named by the BLAKE3 of its bytes.
    Chunk(Blake3Hash),
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Piece(blob, index) => write!(f, "piece {index} of {blob}"),
            Item::Chunk(hash) => write!(f, "chunk {hash}"),
        }
    }
}

/// How a blob is cut into pieces, with each piece's trusted BLAKE3 digest.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PieceLayout {
    size: u64,
    piece_size: u32,
    pieces: Vec<Blake3Hash>,
}

impl PieceLayout {
    /// A checked layout: `piece_size` a power of two in range, one hash per piece.
    pub fn new(blob: &Digest, size: u64, piece_size: u32, pieces: Vec<Blake3Hash>) -> Result<Self> {
        let refuse = |reason: String| Error::InvalidLayout {
            blob: blob.to_string(),
            reason,
        };
        if !piece_size.is_power_of_two() || !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&piece_size)
        {
            return Err(refuse(format!(
                "piece size {piece_size} is not a power of two from {MIN_PIECE_SIZE} to {MAX_PIECE_SIZE}"
            )));
        }
        let count = size.div_ceil(u64::from(piece_size));
        if count > u64::from(MAX_PIECES) {
            return Err(refuse(format!(
                "{count} pieces is over the limit of {MAX_PIECES}"
            )));
        }
        if pieces.len() as u64 != count {
            return Err(refuse(format!(
                "size {size} with piece size {piece_size} needs {count} piece digests, got {}",
                pieces.len()
            )));
        }
        Ok(PieceLayout {
            size,
            piece_size,
            pieces,
        })
    }

    /// Computes the layout of `data` (what a seed does for a blob fetched from origin).
    pub fn compute(blob: &Digest, data: &[u8], piece_size: u32) -> Result<Self> {
        let step = usize::try_from(piece_size).unwrap_or(usize::MAX).max(1);
        let pieces = data.chunks(step).map(Blake3Hash::of).collect();
        PieceLayout::new(blob, data.len() as u64, piece_size, pieces)
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The piece size in bytes (the last piece may be shorter).
    pub fn piece_size(&self) -> u32 {
        self.piece_size
    }

    /// How many pieces the blob has.
    pub fn piece_count(&self) -> u32 {
        // Bounded by MAX_PIECES in `new`.
        self.pieces.len() as u32
    }

    /// The trusted digests, in piece order.
    pub fn pieces(&self) -> &[Blake3Hash] {
        &self.pieces
    }

    /// The digest of piece `index`, if it exists.
    pub fn piece_hash(&self, index: u32) -> Option<&Blake3Hash> {
        self.pieces.get(index as usize)
    }

    /// Byte offset of piece `index` in the blob.
    pub fn piece_offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.piece_size)
    }

    /// Length of piece `index`, or `None` when there is no such piece.
    pub fn piece_len(&self, index: u32) -> Option<u64> {
        if index >= self.piece_count() {
            return None;
        }
        let start = self.piece_offset(index);
        Some((self.size - start).min(u64::from(self.piece_size)))
    }

    /// The pieces that cover `offset..offset+len` (empty for an empty range).
    pub fn pieces_for_range(&self, offset: u64, len: u64) -> Range<u32> {
        if len == 0 {
            return 0..0;
        }
        let ps = u64::from(self.piece_size);
        let first = offset / ps;
        let last = (offset + len - 1) / ps;
        (first as u32)..(last as u32 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_validated() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(Digest::parse(&good).map(|d| d.to_string()).ok(), Some(good));
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:00",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("sha256:{}/", "ab".repeat(32)),
            &format!("sha256:{}", "ab".repeat(31)),
            "",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Blake3Hash::parse(&"0".repeat(63)).is_err());
        assert!(Blake3Hash::parse(&"g".repeat(64)).is_err());
    }

    #[test]
    fn layout_checks_counts_and_ranges() {
        let d = Digest::of(b"x");
        let data = vec![7u8; 10_000];
        let l = PieceLayout::compute(&d, &data, 4096).expect("layout");
        assert_eq!(l.piece_count(), 3);
        assert_eq!(l.piece_len(2), Some(10_000 - 8192));
        assert_eq!(l.piece_len(3), None);
        assert_eq!(l.pieces_for_range(4095, 2), 0..2);
        assert_eq!(l.pieces_for_range(8192, 1), 2..3);
        assert!(PieceLayout::new(&d, 10_000, 4096, vec![]).is_err());
        assert!(PieceLayout::new(&d, 10, 3000, vec![Blake3Hash::of(b"")]).is_err());
    }
}
