//! Decoding a chunk's stored form, for every encoding, then the one check between any source and
//! a reader: exactly `size` bytes whose BLAKE3 is the chunk's name (docs/format.md, "Chunk
//! encodings").
//!
//! - raw: the stored bytes; zstd: one frame;
//! - span (`shoal image index`): bytes of a compressed layer starting at a checkpoint — a gzip
//!   member start, a deflate block boundary (primed with its leftover bits and its window, the
//!   window being a chunk itself), or a zstd frame start — decompressed, `skip` bytes dropped.

use std::io::{self, Read};

use crate::inflater::Inflater;
use crate::model::{Blake3, Checkpoint, CheckpointKind, ChunkEncoding};

/// Largest chunk a decoder produces (the largest chunk size).
const MAX_CHUNK: u32 = 16 << 20;
/// Bytes of a gzip trailer (CRC32 and size).
const GZIP_TRAILER: usize = 8;

/// Where a span chunk's decoding starts: its checkpoint and, for a deflate checkpoint, the
/// checkpoint's window (its own chunk, decoded and verified first).
#[derive(Debug, Clone, Copy)]
pub struct SpanStart<'a> {
    /// The chunk's checkpoint (`Bootstrap::checkpoint`).
    pub checkpoint: Checkpoint,
    /// The window bytes of a deflate checkpoint.
    pub window: Option<&'a [u8]>,
}

/// Decodes a chunk's stored form (`stored`, as read from its blob: `stored_size` bytes at
/// `offset`) and checks that it is `size` bytes whose BLAKE3 is `hash`. `span` is required for
/// span chunks and ignored otherwise.
pub fn decode(
    hash: &Blake3,
    size: u32,
    encoding: ChunkEncoding,
    span: Option<SpanStart<'_>>,
    stored: &[u8],
) -> Result<Vec<u8>, String> {
    let data = match encoding {
        ChunkEncoding::Raw => stored.to_vec(),
        ChunkEncoding::Zstd => {
            if size > MAX_CHUNK {
                return Err(format!("size {size} is over the largest chunk size"));
            }
            zstd::bulk::decompress(stored, size as usize).map_err(|e| format!("zstd: {e}"))?
        }
        ChunkEncoding::Span { skip, .. } => span_bytes(span, stored, skip, size)?,
    };
    check(hash, size, data)
}

/// [`decode`] for a stored form read from `stored` (at most `stored_size` bytes are read), so
/// that a long span need not be held in memory.
pub fn decode_read(
    hash: &Blake3,
    size: u32,
    encoding: ChunkEncoding,
    span: Option<SpanStart<'_>>,
    stored_size: u32,
    stored: impl Read,
) -> Result<Vec<u8>, String> {
    let mut stored = stored.take(u64::from(stored_size));
    match encoding {
        ChunkEncoding::Span { skip, .. } => {
            let data = span_bytes(span, &mut stored, skip, size)?;
            check(hash, size, data)
        }
        _ => {
            if stored_size > 2 * MAX_CHUNK {
                return Err(format!("stored size {stored_size} out of range"));
            }
            let mut bytes = Vec::with_capacity(stored_size as usize);
            stored
                .read_to_end(&mut bytes)
                .map_err(|e| format!("reading the stored form: {e}"))?;
            if bytes.len() != stored_size as usize {
                return Err(format!(
                    "stored form is {} bytes, expected {stored_size}",
                    bytes.len()
                ));
            }
            decode(hash, size, encoding, span, &bytes)
        }
    }
}

fn check(hash: &Blake3, size: u32, data: Vec<u8>) -> Result<Vec<u8>, String> {
    if data.len() != size as usize {
        return Err(format!(
            "decompressed to {} bytes, expected {size}",
            data.len()
        ));
    }
    if *blake3::hash(&data).as_bytes() != *hash {
        return Err("BLAKE3 of the content does not match the chunk's name".into());
    }
    Ok(data)
}

/// The `size` bytes `skip` bytes after a checkpoint, decompressed from `input` (the blob from
/// the checkpoint's `in_offset` on).
fn span_bytes(
    span: Option<SpanStart<'_>>,
    input: impl Read,
    skip: u64,
    size: u32,
) -> Result<Vec<u8>, String> {
    let span = span.ok_or("a span chunk needs its checkpoint to be decoded")?;
    if size > MAX_CHUNK {
        return Err(format!("size {size} is over the largest chunk size"));
    }
    match span.checkpoint.kind {
        CheckpointKind::ZstdFrame => zstd_span(input, skip, size),
        CheckpointKind::GzipMember => gzip_span(input, None, skip, size),
        CheckpointKind::Deflate { bits, .. } => {
            let window = span
                .window
                .ok_or("a deflate checkpoint needs its window to be decoded")?;
            gzip_span(input, Some((bits, window)), skip, size)
        }
    }
}

/// Decodes frames from `input` (which may stop in the middle of a frame, right after the block
/// holding the chunk's last byte): the raw decoder is driven directly so that what it has
/// decoded is flushed even when no input is left.
fn zstd_span(mut input: impl Read, skip: u64, size: u32) -> Result<Vec<u8>, String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?;
    let mut inbuf = vec![0u8; 64 << 10];
    let (mut pos, mut len, mut eof) = (0usize, 0usize, false);
    let mut scratch = vec![0u8; (64u64 << 10).min(skip).max(1) as usize];
    let mut out = vec![0u8; size as usize];
    let (mut skipped, mut got) = (0u64, 0usize);
    while got < out.len() {
        if pos == len && !eof {
            len = read_some(&mut input, &mut inbuf)?;
            pos = 0;
            eof = len == 0;
        }
        let mut src = InBuffer::around(&inbuf[pos..len]);
        let produced = if skipped < skip {
            let want = (skip - skipped).min(scratch.len() as u64) as usize;
            let mut dst = OutBuffer::around(&mut scratch[..want]);
            d.run(&mut src, &mut dst)
                .map_err(|e| format!("zstd: {e}"))?;
            skipped += dst.pos() as u64;
            dst.pos()
        } else {
            let mut dst = OutBuffer::around(&mut out[got..]);
            d.run(&mut src, &mut dst)
                .map_err(|e| format!("zstd: {e}"))?;
            got += dst.pos();
            dst.pos()
        };
        let consumed = src.pos();
        pos += consumed;
        if produced == 0 && consumed == 0 && eof {
            return Err(format!(
                "the stored form ends {} bytes after its checkpoint, before the chunk's end",
                skipped + got as u64
            ));
        }
    }
    Ok(out)
}

/// Inflates from a gzip member start (`deflate` None) or a deflate block boundary (leftover bits
/// and window); crosses into following gzip members as a gzip reader does.
fn gzip_span(
    mut input: impl Read,
    deflate: Option<(u8, &[u8])>,
    skip: u64,
    size: u32,
) -> Result<Vec<u8>, String> {
    let mut inf = Inflater::new(deflate.is_none())?;
    if let Some((bits, window)) = deflate {
        if bits > 0 {
            let mut first = [0u8; 1];
            input
                .read_exact(&mut first)
                .map_err(|e| format!("reading the checkpoint's byte: {e}"))?;
            inf.prime(bits, first[0])?;
        }
        inf.set_window(window)?;
    }
    let mut inbuf = vec![0u8; 64 << 10];
    let (mut pos, mut len) = (0usize, 0usize);
    let mut scratch = vec![0u8; (64u64 << 10).min(skip).max(1) as usize];
    let mut out = vec![0u8; size as usize];
    let (mut skipped, mut got) = (0u64, 0usize);
    let mut trailer = 0usize;
    while got < out.len() {
        if pos == len {
            len = read_some(&mut input, &mut inbuf)?;
            pos = 0;
            if len == 0 {
                return Err(format!(
                    "the stored form ends {} bytes after its checkpoint, before the chunk's end",
                    skipped + got as u64
                ));
            }
        }
        if trailer > 0 {
            // The 8-byte trailer of a member that a raw inflater read up to; the next member
            // starts after it.
            let n = trailer.min(len - pos);
            pos += n;
            trailer -= n;
            if trailer == 0 {
                inf.reset(true)?;
            }
            continue;
        }
        let step = if skipped < skip {
            let want = (skip - skipped).min(scratch.len() as u64) as usize;
            let step = inf.inflate(&inbuf[pos..len], &mut scratch[..want], false)?;
            skipped += step.produced as u64;
            step
        } else {
            let step = inf.inflate(&inbuf[pos..len], &mut out[got..], false)?;
            got += step.produced;
            step
        };
        pos += step.consumed;
        if step.end {
            if inf.is_gzip() {
                inf.reset(true)?;
            } else {
                trailer = GZIP_TRAILER;
            }
        } else if step.consumed == 0 && step.produced == 0 && pos < len {
            return Err("inflate made no progress".into());
        }
    }
    Ok(out)
}

fn read_some(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, String> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the stored form: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_span_from_a_frame_start() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7) as u8)
            .collect();
        let frames: Vec<Vec<u8>> = data
            .chunks(100_000)
            .map(|c| zstd::bulk::compress(c, 3).unwrap())
            .collect();
        let blob: Vec<u8> = frames.concat();
        let start = frames[0].len() + frames[1].len();
        let got = zstd_span(&blob[start..], 5_000, 1_000).unwrap();
        assert_eq!(got, data[205_000..206_000]);
        let got = zstd_span(&blob[..], 150_000, 1_000).unwrap();
        assert_eq!(got, data[150_000..151_000]);
        // A frame ending in zeros (an RLE block), cut before its last byte.
        let mut tail = data[..60_000].to_vec();
        tail.extend(vec![0u8; 1024]);
        let f = zstd::bulk::compress(&tail, 3).unwrap();
        // zstd decodes a block only once all of it is there (spans end at frame ends).
        assert_eq!(
            zstd_span(&f[..], 50_000, 1_000).unwrap(),
            tail[50_000..51_000]
        );
        assert!(zstd_span(&f[..f.len() - 1], 50_000, 1_000).is_err());
    }
}
