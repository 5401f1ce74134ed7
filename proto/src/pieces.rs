//! Pieces of a blob: the geometry of a task (size, piece size, count) and the limit on piece sets.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{Blake3Hash, Digest, PieceSet, ProtoError, MAX_PIECES, MAX_PIECE_SIZE, MIN_PIECE_SIZE};

/// Piece size used when nothing else decides: 256 KiB (as in converted images), doubled for
/// blobs too large for [`MAX_PIECES`] pieces (above 16 GiB). Small pieces pipeline better: a
/// piece is passed on only once it is whole, and a parent's uplink and a child's downlink each
/// carry many pieces at once, so each hop delays a piece by several piece times
/// (docs/benchmarks.md, "Swarm fan-out", round 7).
pub fn default_piece_size(blob_size: u64) -> u32 {
    let mut size: u32 = 256 << 10;
    while size < MAX_PIECE_SIZE && blob_size.div_ceil(u64::from(size)) > u64::from(MAX_PIECES) {
        size *= 2;
    }
    size
}

/// The geometry of one blob task: which blob, how big, how it is cut into pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMeta {
    /// The blob's OCI digest; one task per blob.
    pub blob: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Piece size in bytes: a power of two from [`MIN_PIECE_SIZE`] to [`MAX_PIECE_SIZE`]; the
    /// last piece may be shorter.
    pub piece_size: u32,
}

impl TaskMeta {
    /// Checks the piece size and that the blob has at most [`MAX_PIECES`] pieces.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if !self.piece_size.is_power_of_two()
            || !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&self.piece_size)
        {
            return Err(ProtoError::invalid(
                "piece size",
                format!(
                    "{} bytes for blob {} is not a power of two from {MIN_PIECE_SIZE} to {MAX_PIECE_SIZE}",
                    self.piece_size, self.blob
                ),
            ));
        }
        let count = self.size.div_ceil(u64::from(self.piece_size));
        if count > u64::from(MAX_PIECES) {
            return Err(ProtoError::invalid(
                "blob size",
                format!(
                    "blob {} of {} bytes has {count} pieces of {} bytes; the limit is {MAX_PIECES}: use larger pieces",
                    self.blob, self.size, self.piece_size
                ),
            ));
        }
        Ok(())
    }

    /// Number of pieces (0 for an empty blob). Saturates for an unvalidated, absurd geometry.
    pub fn piece_count(&self) -> u32 {
        let count = self.size.div_ceil(u64::from(self.piece_size.max(1)));
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Byte range of piece `index` inside the blob, or `None` past the end.
    pub fn piece_range(&self, index: u32) -> Option<Range<u64>> {
        if index >= self.piece_count() {
            return None;
        }
        let start = u64::from(index) * u64::from(self.piece_size);
        let end = (start + u64::from(self.piece_size)).min(self.size);
        Some(start..end)
    }

    /// Length in bytes of piece `index`, or `None` past the end.
    pub fn piece_len(&self, index: u32) -> Option<u32> {
        self.piece_range(index)
            .and_then(|r| u32::try_from(r.end - r.start).ok())
    }

    /// The pieces that cover a byte range of the blob (clamped to the blob).
    pub fn pieces_for_range(&self, bytes: Range<u64>) -> Range<u32> {
        let end = bytes.end.min(self.size);
        if bytes.start >= end {
            return 0..0;
        }
        let ps = u64::from(self.piece_size.max(1));
        let first = u32::try_from(bytes.start / ps).unwrap_or(u32::MAX);
        let last = u32::try_from(end.div_ceil(ps)).unwrap_or(u32::MAX);
        first..last
    }

    /// Checks a piece table (one BLAKE3 hash per piece) against this geometry.
    pub fn validate_piece_table(&self, table: &[Blake3Hash]) -> Result<(), ProtoError> {
        self.check_table_len("piece table", table.len())
    }

    /// Checks that a table named `what` has one entry per piece of this geometry.
    pub fn check_table_len(&self, what: &'static str, len: usize) -> Result<(), ProtoError> {
        if len as u64 != u64::from(self.piece_count()) {
            return Err(ProtoError::invalid(
                what,
                format!(
                    "blob {} has {} pieces but the table lists {len}",
                    self.blob,
                    self.piece_count(),
                ),
            ));
        }
        Ok(())
    }
}

/// Checks a piece set decoded from the wire against the protocol's limit of [`MAX_PIECES`]
/// pieces per blob (its bitmap was checked against its count when it was decoded).
pub fn check_piece_set(set: &PieceSet) -> Result<(), ProtoError> {
    if set.len() > MAX_PIECES {
        return Err(ProtoError::invalid(
            "piece set",
            format!("{} pieces exceeds the limit of {MAX_PIECES}", set.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64, piece_size: u32) -> TaskMeta {
        TaskMeta {
            blob: Digest::from_bytes([7; 32]),
            size,
            piece_size,
        }
    }

    #[test]
    fn geometry() {
        let m = meta(10 * 65536 + 5, 65536);
        m.validate().unwrap();
        assert_eq!(m.piece_count(), 11);
        assert_eq!(m.piece_len(10), Some(5));
        assert_eq!(m.piece_len(11), None);
        assert_eq!(m.piece_range(1), Some(65536..131072));
        assert_eq!(m.pieces_for_range(65536..65537), 1..2);
        assert_eq!(m.pieces_for_range(0..u64::MAX), 0..11);
        assert_eq!(m.pieces_for_range(5..5), 0..0);
        assert_eq!(meta(0, 65536).piece_count(), 0);
    }

    #[test]
    fn geometry_errors() {
        assert!(meta(10, 1000).validate().is_err());
        assert!(meta(10, 32 * 1024).validate().is_err());
        assert!(meta(10, 32 << 20).validate().is_err());
        let too_many = meta(u64::from(MAX_PIECES) * 65536 + 1, 65536);
        assert!(matches!(
            too_many.validate(),
            Err(ProtoError::Invalid {
                field: "blob size",
                ..
            })
        ));
        assert!(meta(3, 65536).validate_piece_table(&[]).is_err());
        assert!(meta(3, 65536).validate_piece_table(&[[0; 32]]).is_ok());
    }

    #[test]
    fn default_piece_size_keeps_the_piece_limit() {
        assert_eq!(default_piece_size(1), 256 << 10);
        assert_eq!(default_piece_size(16 << 30), 256 << 10);
        assert_eq!(default_piece_size((16 << 30) + 1), 512 << 10);
        let big = 1u64 << 40;
        let ps = default_piece_size(big);
        meta(big, ps).validate().unwrap();
    }

    #[test]
    fn piece_sets_within_the_limit() {
        assert!(check_piece_set(&PieceSet::full(MAX_PIECES)).is_ok());
        assert!(check_piece_set(&PieceSet::empty(MAX_PIECES + 1)).is_err());
    }
}
