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
    let mut r = SpanReader::new(span, input)?;
    let mut out = Vec::new();
    r.next_chunk(skip, size, &mut out)?;
    Ok(out)
}

/// One chunk of a run decoded from one checkpoint: its name, size and distance from the
/// checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct RunChunk {
    /// The chunk's name (BLAKE3 of its bytes).
    pub hash: Blake3,
    /// Its size.
    pub size: u32,
    /// Uncompressed bytes from the checkpoint to its first byte.
    pub skip: u64,
}

/// Decodes several span chunks that start from the same checkpoint in one pass over `stored`
/// (the blob from the checkpoint's `in_offset` to the end of the last chunk's span), instead of
/// decompressing from the checkpoint once per chunk. `chunks` must be sorted by `skip` and not
/// overlap. Each chunk gets its own result (its bytes checked against its name); decoding stops
/// at the first chunk the stored form does not reach.
pub fn decode_run(
    span: SpanStart<'_>,
    stored: impl Read,
    chunks: &[RunChunk],
) -> Vec<Result<Vec<u8>, String>> {
    let mut out = Vec::with_capacity(chunks.len());
    decode_run_each(span, stored, chunks, |_, r| out.push(r));
    out
}

/// [`decode_run`] that hands each chunk's result to `each` (with its position in `chunks`, in
/// order) as soon as it is decoded, so that a long run (a whole single-frame layer) is never
/// held in memory at once.
pub fn decode_run_each(
    span: SpanStart<'_>,
    stored: impl Read,
    chunks: &[RunChunk],
    mut each: impl FnMut(usize, Result<Vec<u8>, String>),
) {
    let mut r = match SpanReader::new(span, stored) {
        Ok(r) => r,
        Err(e) => {
            for i in 0..chunks.len() {
                each(i, Err(e.clone()));
            }
            return;
        }
    };
    let mut failed: Option<String> = None;
    for (i, c) in chunks.iter().enumerate() {
        if let Some(e) = &failed {
            each(i, Err(e.clone()));
            continue;
        }
        if c.size > MAX_CHUNK || c.skip < r.pos {
            each(
                i,
                Err(format!(
                    "chunk at {} ({} bytes) is out of order or too large",
                    c.skip, c.size
                )),
            );
            continue;
        }
        let mut data = Vec::new();
        match r.next_chunk(c.skip, c.size, &mut data) {
            Ok(()) => each(i, check(&c.hash, c.size, data)),
            Err(e) => {
                failed = Some(e.clone());
                each(i, Err(e));
            }
        }
    }
}

/// The uncompressed stream of a layer from a checkpoint on, read from the blob bytes from the
/// checkpoint's `in_offset` on.
struct SpanReader<R> {
    input: R,
    inbuf: Vec<u8>,
    at: usize,
    len: usize,
    eof: bool,
    codec: Codec,
    /// Uncompressed bytes read so far.
    pos: u64,
}

enum Codec {
    /// A gzip or raw inflater; `trailer` bytes of a gzip trailer still to skip.
    Gzip {
        inf: Inflater,
        trailer: usize,
    },
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
}

impl<R: Read> SpanReader<R> {
    fn new(span: SpanStart<'_>, mut input: R) -> Result<Self, String> {
        let codec = match span.checkpoint.kind {
            CheckpointKind::ZstdFrame => Codec::Zstd(Box::new(
                zstd::stream::raw::Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?,
            )),
            CheckpointKind::GzipMember => Codec::Gzip {
                inf: Inflater::new(true)?,
                trailer: 0,
            },
            CheckpointKind::Deflate { bits, .. } => {
                let window = span
                    .window
                    .ok_or("a deflate checkpoint needs its window to be decoded")?;
                let mut inf = Inflater::new(false)?;
                if bits > 0 {
                    let mut first = [0u8; 1];
                    input
                        .read_exact(&mut first)
                        .map_err(|e| format!("reading the checkpoint's byte: {e}"))?;
                    inf.prime(bits, first[0])?;
                }
                inf.set_window(window)?;
                Codec::Gzip { inf, trailer: 0 }
            }
        };
        Ok(SpanReader {
            input,
            inbuf: vec![0u8; 64 << 10],
            at: 0,
            len: 0,
            eof: false,
            codec,
            pos: 0,
        })
    }

    /// Drops bytes up to `skip` from the checkpoint, then reads the next `size` into `out`.
    fn next_chunk(&mut self, skip: u64, size: u32, out: &mut Vec<u8>) -> Result<(), String> {
        let gap = skip - self.pos.min(skip);
        let dropped =
            io::copy(&mut (&mut *self).take(gap), &mut io::sink()).map_err(|e| e.to_string())?;
        if dropped != gap {
            return Err(format!(
                "the stored form ends {} bytes after its checkpoint, before the chunk",
                self.pos
            ));
        }
        out.resize(size as usize, 0);
        let mut got = 0;
        while got < out.len() {
            match self.read(&mut out[got..]) {
                Ok(0) => {
                    return Err(format!(
                    "the stored form ends {} bytes after its checkpoint, before the chunk's end",
                    self.pos
                ))
                }
                Ok(n) => got += n,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.at < self.len || self.eof {
            return Ok(());
        }
        self.at = 0;
        self.len = 0;
        loop {
            match self.input.read(&mut self.inbuf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.len = n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            return Ok(());
        }
    }
}

fn bad_data(e: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.into())
}

impl<R: Read> Read for SpanReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.fill()?;
            let input = &self.inbuf[self.at..self.len];
            let (consumed, produced, end) = match &mut self.codec {
                Codec::Gzip { inf, trailer } if *trailer > 0 => {
                    // The trailer of a member a raw inflater read to its end; the next member
                    // (a gzip header) follows it.
                    if input.is_empty() {
                        return Ok(0);
                    }
                    let n = (*trailer).min(input.len());
                    *trailer -= n;
                    if *trailer == 0 {
                        inf.reset(true).map_err(bad_data)?;
                    }
                    (n, 0, false)
                }
                Codec::Gzip { inf, trailer } => {
                    let step = inf.inflate(input, buf, false).map_err(bad_data)?;
                    if step.end {
                        if inf.is_gzip() {
                            inf.reset(true).map_err(bad_data)?;
                        } else {
                            *trailer = GZIP_TRAILER;
                        }
                    }
                    (step.consumed, step.produced, step.end)
                }
                Codec::Zstd(d) => {
                    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                    let mut src = InBuffer::around(input);
                    let mut dst = OutBuffer::around(&mut *buf);
                    d.run(&mut src, &mut dst)
                        .map_err(|e| bad_data(format!("zstd: {e}")))?;
                    (src.pos(), dst.pos(), false)
                }
            };
            self.at += consumed;
            self.pos += produced as u64;
            if produced > 0 {
                return Ok(produced);
            }
            if consumed == 0 && !end && self.at == self.len && self.eof {
                return Ok(0);
            }
            if consumed == 0 && !end && self.at < self.len {
                return Err(bad_data("the decoder made no progress"));
            }
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

    fn zstd_span(input: &[u8], skip: u64, size: u32) -> Result<Vec<u8>, String> {
        let span = SpanStart {
            checkpoint: Checkpoint {
                blob: 0,
                in_offset: 0,
                out_offset: 0,
                kind: CheckpointKind::ZstdFrame,
            },
            window: None,
        };
        span_bytes(Some(span), input, skip, size)
    }

    #[test]
    fn a_run_of_chunks_decodes_in_one_pass() {
        use std::io::Write;
        let data: Vec<u8> = (0..500_000u32)
            .flat_map(|i| (i % 1000).to_le_bytes())
            .collect();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&data).unwrap();
        let gz = e.finish().unwrap();
        let span = SpanStart {
            checkpoint: Checkpoint {
                blob: 0,
                in_offset: 0,
                out_offset: 0,
                kind: CheckpointKind::GzipMember,
            },
            window: None,
        };
        let run: Vec<RunChunk> = [(10u64, 100u32), (5_000, 70_000), (900_000, 65_536)]
            .iter()
            .map(|&(skip, size)| RunChunk {
                hash: *blake3::hash(&data[skip as usize..(skip + u64::from(size)) as usize])
                    .as_bytes(),
                size,
                skip,
            })
            .collect();
        let got = decode_run(span, &gz[..], &run);
        for (r, c) in got.iter().zip(&run) {
            let want = &data[c.skip as usize..(c.skip + u64::from(c.size)) as usize];
            assert_eq!(r.as_deref().unwrap(), want);
        }
        let mut bad = run.clone();
        bad[1].hash[0] ^= 1;
        let got = decode_run(span, &gz[..], &bad);
        assert!(got[0].is_ok() && got[1].is_err() && got[2].is_ok());
        let got = decode_run(span, &gz[..gz.len() / 4], &run);
        assert!(got[0].is_ok() && got[2].is_err());
    }
}
