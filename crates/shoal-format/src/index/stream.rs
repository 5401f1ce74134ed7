//! Reading one layer blob once: the compressed bytes are hashed (sha256 and piece table) as they
//! are read, decompressed (plain tar, gzip or zstd, told apart by magic bytes) straight into the
//! tar reader's buffers, and the decoder's positions and checkpoints are recorded on the way —
//! deflate block boundaries every `span` compressed bytes with their 32 KiB window and leftover
//! bits (zlib's zran approach), gzip member starts and zstd frame starts.

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

use serde::Serialize;

use crate::build::PieceHasher;
use crate::inflater::Inflater;
use crate::model::BlobInfo;

/// Bytes of history a deflate checkpoint keeps.
const WINDOW: usize = 32 << 10;
/// Input buffer of the decoders.
const IN_BUF: usize = 256 << 10;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar stream: chunks are byte ranges of the blob.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

/// A checkpoint found while reading, before its window is stored.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub in_offset: u64,
    pub out_offset: u64,
    pub kind: FoundKind,
}

#[derive(Debug, Clone)]
pub(crate) enum FoundKind {
    GzipMember,
    Deflate { bits: u8, window: Vec<u8> },
    ZstdFrame,
}

/// Positions shared between the decoder and whoever reads the tar above it.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Compressed bytes the decoder consumed: everything before this offset is needed to have
    /// produced `out_pos` bytes.
    pub in_pos: u64,
    /// Uncompressed bytes handed to the reader.
    pub out_pos: u64,
    /// Checkpoints so far, by strictly increasing `out_offset`.
    pub found: Vec<Found>,
}

impl Progress {
    fn push(&mut self, f: Found) {
        // Two starts at one output offset (an empty member or frame, a skippable frame): keep
        // the later, which reads less.
        if self
            .found
            .last()
            .is_some_and(|l| l.out_offset == f.out_offset)
        {
            self.found.pop();
        }
        self.found.push(f);
    }
}

/// Hashes everything read from the blob: its digest, size and piece table.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Option<PieceHasher>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R, piece_size: u32) -> Self {
        Hashing {
            inner,
            hasher: Some(PieceHasher::new(piece_size)),
        }
    }

    /// Reads what is left of the blob and returns its digest, size and pieces.
    pub fn finish(&mut self) -> io::Result<BlobInfo> {
        io::copy(self, &mut io::sink())?;
        let h = self
            .hasher
            .take()
            .ok_or_else(|| io::Error::other("finished twice"))?;
        Ok(h.finish())
    }
}

/// The decompressed tar stream of one layer.
pub(crate) struct Decoder<R> {
    src: R,
    inbuf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
    state: State,
    progress: Rc<RefCell<Progress>>,
    /// Last 32 KiB of output of the current gzip member.
    history: Vec<u8>,
    member_out: u64,
    span: u64,
}

enum State {
    Plain,
    Gzip(Box<Inflater>),
    /// The trailing zero padding after the last gzip member.
    GzipPadding,
    Zstd(Box<zstd::stream::raw::Decoder<'static>>, bool),
    Done,
}

impl<R: Read> Decoder<R> {
    /// Sniffs the compression from the first bytes of `src` and starts decoding; `span` is the
    /// compressed distance between deflate checkpoints.
    pub fn new(
        mut src: R,
        span: u64,
        progress: Rc<RefCell<Progress>>,
    ) -> io::Result<(Compression, Self)> {
        let mut inbuf = vec![0u8; IN_BUF];
        let mut len = 0;
        while len < 4 {
            match src.read(&mut inbuf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let magic = &inbuf[..len];
        let (compression, state) = if magic.starts_with(&[0x1f, 0x8b]) {
            (
                Compression::Gzip,
                State::Gzip(Box::new(Inflater::new(true).map_err(io::Error::other)?)),
            )
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let d = zstd::stream::raw::Decoder::new()?;
            (Compression::Zstd, State::Zstd(Box::new(d), true))
        } else {
            (Compression::None, State::Plain)
        };
        {
            let mut p = progress.borrow_mut();
            match compression {
                Compression::Gzip => p.push(Found {
                    in_offset: 0,
                    out_offset: 0,
                    kind: FoundKind::GzipMember,
                }),
                Compression::Zstd => p.push(Found {
                    in_offset: 0,
                    out_offset: 0,
                    kind: FoundKind::ZstdFrame,
                }),
                Compression::None => {}
            }
        }
        Ok((
            compression,
            Decoder {
                src,
                inbuf,
                pos: 0,
                len,
                eof: false,
                state,
                progress,
                history: Vec::with_capacity(2 * WINDOW),
                member_out: 0,
                span,
            },
        ))
    }

    /// The source, to read whatever follows the compressed stream.
    pub fn source(&mut self) -> &mut R {
        &mut self.src
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.pos < self.len || self.eof {
            return Ok(());
        }
        self.pos = 0;
        self.len = 0;
        loop {
            match self.src.read(&mut self.inbuf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.len = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn consumed(&mut self, n: usize) {
        self.pos += n;
        self.progress.borrow_mut().in_pos += n as u64;
    }

    fn remember(&mut self, out: &[u8]) {
        if out.len() >= WINDOW {
            self.history.clear();
            self.history.extend_from_slice(&out[out.len() - WINDOW..]);
            return;
        }
        self.history.extend_from_slice(out);
        if self.history.len() > 2 * WINDOW {
            self.history.drain(..self.history.len() - WINDOW);
        }
    }

    fn read_gzip(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.fill()?;
            let State::Gzip(inf) = &mut self.state else {
                return Ok(0);
            };
            if self.pos == self.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "gzip stream ends inside a member",
                ));
            }
            let step = inf
                .inflate(&self.inbuf[self.pos..self.len], buf, true)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("gzip: {e}")))?;
            self.consumed(step.consumed);
            let out = &buf[..step.produced];
            self.remember_out(out);
            let (in_pos, out_pos) = {
                let p = self.progress.borrow();
                (p.in_pos, p.out_pos)
            };
            if step.end {
                self.end_member()?;
            } else if step.at_block && out_pos > self.member_out {
                let last_in = self
                    .progress
                    .borrow()
                    .found
                    .last()
                    .map_or(0, |f| f.in_offset);
                if in_pos.saturating_sub(last_in) >= self.span {
                    let keep = ((out_pos - self.member_out) as usize).min(WINDOW);
                    let window = self.history[self.history.len() - keep..].to_vec();
                    // The byte holding leftover bits is read first by a decoder from here.
                    let in_offset = in_pos - u64::from(step.bits > 0);
                    self.progress.borrow_mut().push(Found {
                        in_offset,
                        out_offset: out_pos,
                        kind: FoundKind::Deflate {
                            bits: step.bits,
                            window,
                        },
                    });
                }
            }
            if step.produced > 0 {
                return Ok(step.produced);
            }
            if buf.is_empty() {
                return Ok(0);
            }
            if step.consumed == 0 && !step.end && !step.at_block {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "gzip: inflate made no progress",
                ));
            }
        }
    }

    fn remember_out(&mut self, out: &[u8]) {
        self.progress.borrow_mut().out_pos += out.len() as u64;
        self.remember(out);
    }

    /// After a gzip member: another member, zero padding, or the end.
    fn end_member(&mut self) -> io::Result<()> {
        self.fill()?;
        if self.pos == self.len {
            self.state = State::Done;
            return Ok(());
        }
        if self.inbuf[self.pos] == 0 {
            self.state = State::GzipPadding;
            return Ok(());
        }
        if let State::Gzip(inf) = &mut self.state {
            inf.reset(true).map_err(io::Error::other)?;
        }
        let mut p = self.progress.borrow_mut();
        self.member_out = p.out_pos;
        let f = Found {
            in_offset: p.in_pos,
            out_offset: p.out_pos,
            kind: FoundKind::GzipMember,
        };
        p.push(f);
        self.history.clear();
        Ok(())
    }

    fn skip_padding(&mut self) -> io::Result<usize> {
        loop {
            self.fill()?;
            if self.pos == self.len {
                self.state = State::Done;
                return Ok(0);
            }
            if self.inbuf[self.pos..self.len].iter().any(|b| *b != 0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "gzip stream is followed by bytes that are neither a member nor zero padding",
                ));
            }
            let n = self.len - self.pos;
            self.consumed(n);
        }
    }

    fn read_zstd(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        loop {
            self.fill()?;
            let State::Zstd(d, at_start) = &mut self.state else {
                return Ok(0);
            };
            if self.pos == self.len {
                if *at_start {
                    self.state = State::Done;
                    return Ok(0);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "zstd stream ends inside a frame",
                ));
            }
            let mut input = InBuffer::around(&self.inbuf[self.pos..self.len]);
            let mut output = OutBuffer::around(&mut *buf);
            let hint = d
                .run(&mut input, &mut output)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))?;
            let (consumed, produced) = (input.pos(), output.pos());
            *at_start = hint == 0;
            if hint == 0 {
                // A frame ended: the next one (if any) starts here.
                d.reinit()?;
            }
            self.consumed(consumed);
            self.progress.borrow_mut().out_pos += produced as u64;
            if hint == 0 {
                let mut p = self.progress.borrow_mut();
                let f = Found {
                    in_offset: p.in_pos,
                    out_offset: p.out_pos,
                    kind: FoundKind::ZstdFrame,
                };
                p.push(f);
            }
            if produced > 0 {
                return Ok(produced);
            }
            if buf.is_empty() {
                return Ok(0);
            }
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.state {
            State::Plain => {
                self.fill()?;
                let n = (self.len - self.pos).min(buf.len());
                buf[..n].copy_from_slice(&self.inbuf[self.pos..self.pos + n]);
                self.consumed(n);
                self.progress.borrow_mut().out_pos += n as u64;
                Ok(n)
            }
            State::Gzip(_) => self.read_gzip(buf),
            State::GzipPadding => self.skip_padding(),
            State::Zstd(..) => self.read_zstd(buf),
            State::Done => Ok(0),
        }
    }
}
