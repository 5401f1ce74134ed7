//! A blob's metadata file: a checksummed header with the piece table, then an append-only journal.
//!
//! Layout (all integers little-endian; docs/store.md has the same table):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `SHOALBLB` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | piece size |
//! | 16 | 8 | blob size |
//! | 24 | 4 | piece count `n` |
//! | 28 | 4 | reserved, 0 |
//! | 32 | 32 | blob sha256 |
//! | 64 | 32·n | BLAKE3 of each piece |
//! | 64+32·n | 32 | BLAKE3 of all bytes before it (header check) |
//!
//! Then 16-byte records: kind (u8: 1 held, 2 dropped, 3 complete), 3 zero bytes, piece index (u32),
//! and the first 8 bytes of BLAKE3(header check ‖ first 8 record bytes). Replay stops at the first
//! record that does not check (a torn append), and the file is cut back to that point.

use crate::key::{Blake3Hash, Digest, PieceLayout};
use shoal_types::PieceSet;

const MAGIC: [u8; 8] = *b"SHOALBLB";
const VERSION: u32 = 1;
const FIXED_LEN: usize = 64;
const CHECK_LEN: usize = 32;
/// Size of one journal record.
pub(crate) const RECORD_LEN: usize = 16;

const _: () = assert!(FIXED_LEN == 8 + 4 + 4 + 8 + 4 + 4 + 32);
const _: () = assert!(RECORD_LEN == 1 + 3 + 4 + 8);

/// What a journal record says about the blob.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum RecordKind {
    /// The piece's bytes were written to the data file (verified again on every read).
    Held = 1,
    /// The piece failed verification and was given up.
    Dropped = 2,
    /// The whole blob matched its sha256.
    Complete = 3,
}

/// Length of the header (fixed part, piece table and header check) for `pieces` pieces.
pub(crate) fn header_len(pieces: u32) -> u64 {
    (FIXED_LEN + CHECK_LEN) as u64 + 32 * u64::from(pieces)
}

/// Encodes the header; returns the bytes and the header check that binds records to it.
pub(crate) fn encode_header(digest: &Digest, layout: &PieceLayout) -> (Vec<u8>, [u8; 32]) {
    let mut out = Vec::with_capacity(header_len(layout.piece_count()) as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&layout.piece_size().to_le_bytes());
    out.extend_from_slice(&layout.size().to_le_bytes());
    out.extend_from_slice(&layout.piece_count().to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(digest.as_bytes());
    for piece in layout.pieces() {
        out.extend_from_slice(piece.as_bytes());
    }
    let check = *blake3::hash(&out).as_bytes();
    out.extend_from_slice(&check);
    (out, check)
}

fn record_check(header_check: &[u8; 32], head: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(header_check);
    h.update(head);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// Encodes one journal record.
pub(crate) fn encode_record(
    header_check: &[u8; 32],
    kind: RecordKind,
    index: u32,
) -> [u8; RECORD_LEN] {
    let mut rec = [0u8; RECORD_LEN];
    rec[0] = kind as u8;
    rec[4..8].copy_from_slice(&index.to_le_bytes());
    let check = record_check(header_check, &rec[..8]);
    rec[8..].copy_from_slice(&check);
    rec
}

/// A whole metadata file: header plus one record per held piece and, if complete, a complete record.
pub(crate) fn encode_compact(
    digest: &Digest,
    layout: &PieceLayout,
    held: &PieceSet,
    complete: bool,
) -> Vec<u8> {
    let (mut out, check) = encode_header(digest, layout);
    for index in held.iter() {
        out.extend_from_slice(&encode_record(&check, RecordKind::Held, index));
    }
    if complete && held.is_complete() {
        out.extend_from_slice(&encode_record(&check, RecordKind::Complete, 0));
    }
    out
}

/// The state a metadata file describes after replaying its journal.
#[derive(Debug)]
pub(crate) struct Replayed {
    /// The blob's piece layout.
    pub layout: PieceLayout,
    /// Pieces whose last record says held.
    pub held: PieceSet,
    /// True when a complete record follows the last change and every piece is held.
    pub complete: bool,
    /// The header check, to append further records.
    pub check: [u8; 32],
    /// Length of the valid prefix (header plus good records); anything after is a torn append.
    pub valid_len: u64,
    /// How many good records were replayed.
    pub records: u64,
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)?
        .try_into()
        .ok()
        .map(u32::from_le_bytes)
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)?
        .try_into()
        .ok()
        .map(u64::from_le_bytes)
}

/// Decodes and replays a metadata file; `Err` names why the header is unusable.
pub(crate) fn decode(digest: &Digest, bytes: &[u8]) -> Result<Replayed, String> {
    if bytes.get(..8) != Some(&MAGIC[..]) {
        return Err("bad magic".into());
    }
    let version = le_u32(bytes, 8).ok_or("short header")?;
    if version != VERSION {
        return Err(format!("unsupported version {version}"));
    }
    let piece_size = le_u32(bytes, 12).ok_or("short header")?;
    let size = le_u64(bytes, 16).ok_or("short header")?;
    let count = le_u32(bytes, 24).ok_or("short header")?;
    if bytes.get(32..64) != Some(&digest.as_bytes()[..]) {
        return Err("digest does not match the file name".into());
    }
    let table_end = FIXED_LEN + 32 * count as usize;
    let hlen = header_len(count) as usize;
    let header = bytes.get(..table_end).ok_or("short piece table")?;
    let stored_check = bytes.get(table_end..hlen).ok_or("short header check")?;
    let check = *blake3::hash(header).as_bytes();
    if stored_check != check {
        return Err("header check mismatch".into());
    }
    let pieces = header[FIXED_LEN..]
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            Blake3Hash::from_bytes(h)
        })
        .collect();
    let layout = PieceLayout::new(digest, size, piece_size, pieces).map_err(|e| e.to_string())?;
    let mut held = PieceSet::empty(count);
    let mut complete = false;
    let mut records = 0u64;
    for rec in bytes[hlen..].chunks_exact(RECORD_LEN) {
        if rec[8..] != record_check(&check, &rec[..8]) || rec[1..4] != [0, 0, 0] {
            break;
        }
        let index = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
        match rec[0] {
            1 if index < count => {
                held.insert(index);
            }
            2 if index < count => {
                held.remove(index);
                complete = false;
            }
            3 => complete = held.is_complete(),
            _ => break,
        }
        records += 1;
    }
    Ok(Replayed {
        layout,
        held,
        complete,
        check,
        valid_len: hlen as u64 + records * RECORD_LEN as u64,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Digest, PieceLayout) {
        let data = vec![3u8; 20_000];
        let d = Digest::of(&data);
        let l = PieceLayout::compute(&d, &data, 4096).expect("layout");
        (d, l)
    }

    #[test]
    fn replay_stops_at_torn_record() {
        let (d, l) = sample();
        let (mut file, check) = encode_header(&d, &l);
        let hlen = file.len() as u64;
        file.extend_from_slice(&encode_record(&check, RecordKind::Held, 1));
        file.extend_from_slice(&encode_record(&check, RecordKind::Held, 3));
        let good = file.len() as u64;
        let torn = encode_record(&check, RecordKind::Held, 4);
        file.extend_from_slice(&torn[..9]);
        let r = decode(&d, &file).expect("decode");
        assert_eq!(r.held.iter().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(r.valid_len, good);
        assert_eq!(r.records, 2);
        // A flipped bit in a record ends the replay there.
        let mut bad = file.clone();
        bad[hlen as usize + 17] ^= 1;
        let r = decode(&d, &bad).expect("decode");
        assert_eq!(r.held.iter().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn header_damage_and_wrong_name_are_refused() {
        let (d, l) = sample();
        let (file, _) = encode_header(&d, &l);
        let mut bad = file.clone();
        bad[70] ^= 0xff;
        assert!(decode(&d, &bad).is_err());
        assert!(decode(&Digest::of(b"other"), &file).is_err());
        assert!(decode(&d, &file[..50]).is_err());
    }

    #[test]
    fn complete_needs_all_pieces_and_is_cleared_by_a_drop() {
        let (d, l) = sample();
        let mut held = PieceSet::empty(l.piece_count());
        for i in 0..l.piece_count() {
            held.insert(i);
        }
        let mut file = encode_compact(&d, &l, &held, true);
        assert!(decode(&d, &file).expect("decode").complete);
        let check = decode(&d, &file).expect("decode").check;
        file.extend_from_slice(&encode_record(&check, RecordKind::Dropped, 2));
        let r = decode(&d, &file).expect("decode");
        assert!(!r.complete);
        assert!(!r.held.contains(2));
    }
}
