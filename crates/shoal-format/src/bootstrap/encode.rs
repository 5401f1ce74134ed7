//! `ImageMeta` -> bootstrap bytes.
//!
//! The writer only converts; [`encode`] then runs the loader's validation over its own output, so
//! whatever `encode` accepts `Bootstrap::load` accepts too, and the rules live in one place.

use std::collections::HashMap;

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::layout::{
    BlobRecord, CheckpointRecord, ChunkRecord, DirentRecord, Header, InodeRecord, Section,
    SectionRef, SpanRecord, XattrRecord, CHECKPOINT_DEFLATE, CHECKPOINT_GZIP_MEMBER,
    CHECKPOINT_ZSTD_FRAME, CHECKSUM_OFFSET, ENCODING_RAW, ENCODING_SPAN, ENCODING_ZSTD, FLAG_SPANS,
    HEADER_SIZE, HEADER_SIZE_1_1, MAGIC, MAJOR, NO_WINDOW, SECTION_COUNT, SECTION_COUNT_1_0,
};
use crate::model::{CheckpointKind, ChunkEncoding, ImageMeta, Payload};
use crate::{Error, Result};

/// Encode `meta` as a bootstrap (docs/format.md, "Bootstrap"), after validating it completely.
///
/// The Merkle hashes are written as they are in `meta` (run `merkle::compute` first); the root
/// directory's hash becomes the header's root hash.
pub fn encode(meta: &ImageMeta) -> Result<Vec<u8>> {
    let bytes = write(meta)?;
    super::load::validate_bytes(&bytes).map_err(|e| match e {
        Error::InvalidBootstrap(msg) => Error::InvalidMeta(msg),
        other => other,
    })?;
    Ok(bytes)
}

/// Write the bytes without validating the structure (tests use it to build hostile bootstraps).
pub(crate) fn write(meta: &ImageMeta) -> Result<Vec<u8>> {
    let root = meta.inodes.first().ok_or_else(|| {
        Error::InvalidMeta("the image has no inodes (inode 0 must be the root directory)".into())
    })?;
    let mut strings = Strings::default();
    let mut inodes = Vec::with_capacity(meta.inodes.len());
    let mut dirents = Vec::new();
    let mut xattrs = Vec::new();
    let mut file_chunks: Vec<U32> = Vec::new();
    for (ino, inode) in meta.inodes.iter().enumerate() {
        let mut rec = InodeRecord::new_zeroed();
        rec.hash = inode.hash;
        rec.mode = inode.mode.into();
        rec.uid = inode.uid.into();
        rec.gid = inode.gid.into();
        rec.nlink = inode.nlink.into();
        rec.mtime = I64::new(inode.mtime);
        rec.mtime_nsec = inode.mtime_nsec.into();
        rec.xattr_start = count32(xattrs.len(), "xattrs")?.into();
        for (key, value) in &inode.xattrs {
            xattrs.push(XattrRecord {
                key_offset: strings.add(key)?.into(),
                value_offset: strings.add(value)?.into(),
                value_len: len32(value, ino, "xattr value")?.into(),
                key_len: len16(key, ino, "xattr name")?,
                reserved: U16::ZERO,
            });
        }
        match &inode.payload {
            Payload::Dir(entries) => {
                rec.data_start = count32(dirents.len(), "dirents")?.into();
                rec.data_count = count32(entries.len(), "dirents")?.into();
                for entry in entries {
                    dirents.push(DirentRecord {
                        name_offset: strings.add(&entry.name)?.into(),
                        inode: entry.inode.into(),
                        name_len: len16(&entry.name, ino, "name")?,
                        reserved: U16::ZERO,
                    });
                }
            }
            Payload::File(data) => {
                rec.data_start = count32(file_chunks.len(), "file chunks")?.into();
                rec.data_count = count32(data.chunks.len(), "file chunks")?.into();
                rec.size = data.size.into();
                file_chunks.extend(data.chunks.iter().map(|&c| U32::new(c)));
            }
            Payload::Symlink(target) => {
                rec.data_start = strings.add(target)?.into();
                rec.size = U64::new(target.len() as u64);
            }
            Payload::Device(rdev) => rec.size = (*rdev).into(),
            Payload::Special => {}
        }
        inodes.push(rec);
    }
    let mut chunks = Vec::with_capacity(meta.chunks.len());
    let mut spans = Vec::new();
    let has_spans = meta
        .chunks
        .iter()
        .any(|c| matches!(c.encoding, ChunkEncoding::Span { .. }));
    for (i, c) in meta.chunks.iter().enumerate() {
        let blob = u16::try_from(c.blob).map_err(|_| {
            Error::InvalidMeta(format!("chunk {i}: blob index {} is over 65535", c.blob))
        })?;
        let (encoding, span) = match c.encoding {
            ChunkEncoding::Raw => (ENCODING_RAW, (0, 0)),
            ChunkEncoding::Zstd => (ENCODING_ZSTD, (0, 0)),
            ChunkEncoding::Span { checkpoint, skip } => (ENCODING_SPAN, (checkpoint, skip)),
        };
        chunks.push(ChunkRecord {
            hash: c.hash,
            offset: c.offset.into(),
            stored_size: c.stored_size.into(),
            size: c.size.into(),
            blob: blob.into(),
            encoding,
            reserved: 0,
        });
        if has_spans {
            spans.push(SpanRecord {
                checkpoint: span.0.into(),
                reserved: U32::ZERO,
                skip: span.1.into(),
            });
        }
    }
    let mut checkpoints = Vec::with_capacity(meta.checkpoints.len());
    for (i, cp) in meta.checkpoints.iter().enumerate() {
        let blob = u16::try_from(cp.blob).map_err(|_| {
            Error::InvalidMeta(format!(
                "checkpoint {i}: blob index {} is over 65535",
                cp.blob
            ))
        })?;
        let (kind, bits, window) = match cp.kind {
            CheckpointKind::GzipMember => (CHECKPOINT_GZIP_MEMBER, 0, NO_WINDOW),
            CheckpointKind::Deflate { bits, window } => (CHECKPOINT_DEFLATE, bits, window),
            CheckpointKind::ZstdFrame => (CHECKPOINT_ZSTD_FRAME, 0, NO_WINDOW),
        };
        checkpoints.push(CheckpointRecord {
            in_offset: cp.in_offset.into(),
            out_offset: cp.out_offset.into(),
            window: window.into(),
            blob: blob.into(),
            kind,
            bits,
        });
    }
    let mut blobs = Vec::with_capacity(meta.blobs.len());
    let mut pieces: Vec<[u8; 32]> = Vec::new();
    for b in &meta.blobs {
        blobs.push(BlobRecord {
            digest: b.digest,
            size: b.size.into(),
            piece_size: b.piece_size.into(),
            piece_start: count32(pieces.len(), "pieces")?.into(),
            piece_count: count32(b.pieces.len(), "pieces")?.into(),
            reserved: U32::ZERO,
        });
        pieces.extend_from_slice(&b.pieces);
    }
    let prefetch: Vec<U32> = meta.prefetch.iter().map(|&i| U32::new(i)).collect();

    let bodies: [(&[u8], usize); SECTION_COUNT] = [
        (inodes.as_bytes(), inodes.len()),
        (dirents.as_bytes(), dirents.len()),
        (xattrs.as_bytes(), xattrs.len()),
        (chunks.as_bytes(), chunks.len()),
        (file_chunks.as_bytes(), file_chunks.len()),
        (blobs.as_bytes(), blobs.len()),
        (pieces.as_bytes(), pieces.len()),
        (prefetch.as_bytes(), prefetch.len()),
        (&strings.bytes, strings.bytes.len()),
        (checkpoints.as_bytes(), checkpoints.len()),
        (spans.as_bytes(), spans.len()),
    ];
    // The lowest version that expresses the image: 1.0 unless there are checkpoints or spans.
    let v1_1 = !checkpoints.is_empty() || !spans.is_empty();
    let (minor, header_size, sections) = if v1_1 {
        (1u16, HEADER_SIZE_1_1, SECTION_COUNT)
    } else {
        (0u16, HEADER_SIZE, SECTION_COUNT_1_0)
    };
    let total: usize = header_size
        + bodies[..sections]
            .iter()
            .map(|(b, _)| b.len())
            .sum::<usize>();
    let mut header = Header::new_zeroed();
    header.magic = MAGIC;
    header.major = MAJOR.into();
    header.minor = minor.into();
    header.header_size = U32::new(header_size as u32);
    header.flags = U64::new(if v1_1 { FLAG_SPANS } else { 0 });
    header.total_size = U64::new(total as u64);
    header.chunk_size = meta.chunk_size.into();
    header.root_hash = root.hash;
    let mut refs = [SectionRef {
        offset: U64::ZERO,
        count: U64::ZERO,
    }; SECTION_COUNT];
    let mut out = vec![0u8; header_size];
    out.reserve(total - header_size);
    for (section, (body, count)) in Section::ALL.iter().zip(bodies).take(sections) {
        refs[*section as usize] = SectionRef {
            offset: U64::new(out.len() as u64),
            count: U64::new(count as u64),
        };
        out.extend_from_slice(body);
    }
    header.sections.copy_from_slice(&refs[..SECTION_COUNT_1_0]);
    if v1_1 {
        out[HEADER_SIZE..HEADER_SIZE_1_1].copy_from_slice(refs[SECTION_COUNT_1_0..].as_bytes());
    }
    out[..HEADER_SIZE].copy_from_slice(header.as_bytes());
    seal(&mut out);
    Ok(out)
}

/// The checksum of a bootstrap: BLAKE3 of all bytes with the checksum field read as zeros.
pub(crate) fn checksum(bytes: &[u8]) -> [u8; 32] {
    let end = CHECKSUM_OFFSET + 32;
    let mut h = blake3::Hasher::new();
    h.update(bytes.get(..CHECKSUM_OFFSET).unwrap_or(bytes));
    h.update(&[0u8; 32]);
    if let Some(rest) = bytes.get(end..) {
        h.update(rest);
    }
    *h.finalize().as_bytes()
}

/// Recompute and store the checksum of `bytes` (a no-op on anything shorter than a header).
///
/// For tools and tests that edit a bootstrap in place; the result still has to pass validation.
pub fn seal(bytes: &mut [u8]) {
    if bytes.len() < HEADER_SIZE {
        return;
    }
    let sum = checksum(bytes);
    bytes[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 32].copy_from_slice(&sum);
}

/// The string heap, with identical strings stored once.
#[derive(Default)]
struct Strings {
    bytes: Vec<u8>,
    seen: HashMap<Vec<u8>, u32>,
}

impl Strings {
    fn add(&mut self, s: &[u8]) -> Result<u32> {
        if let Some(&off) = self.seen.get(s) {
            return Ok(off);
        }
        let off = count32(self.bytes.len(), "string heap bytes")?;
        self.bytes.extend_from_slice(s);
        count32(self.bytes.len(), "string heap bytes")?;
        self.seen.insert(s.to_vec(), off);
        Ok(off)
    }
}

fn count32(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| Error::InvalidMeta(format!("too many {what}: {n} is over the 2^32 limit")))
}

fn len16(s: &[u8], ino: usize, what: &str) -> Result<U16> {
    u16::try_from(s.len())
        .map(U16::new)
        .map_err(|_| Error::InvalidMeta(format!("inode {ino}: {what} is {} bytes long", s.len())))
}

fn len32(s: &[u8], ino: usize, what: &str) -> Result<u32> {
    u32::try_from(s.len())
        .map_err(|_| Error::InvalidMeta(format!("inode {ino}: {what} is {} bytes long", s.len())))
}
