//! Cuts file content into fixed-size chunks and hashes (BLAKE3) and compresses (zstd) them on
//! every core while the caller keeps reading the layers.
//!
//! Data path: reader thread -> bounded job queue -> N workers (hash; compress only chunks not seen
//! before) -> spill writer thread (appends new chunks to a temporary spill file). The final data
//! blob is later copied out of the spill with only the chunks the flattened tree references.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::flatten::FileChunks;
use crate::error::{Error, Result};
use crate::model::{Blake3, ChunkEncoding};

/// Where a new chunk sits in the spill file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpillChunk {
    pub offset: u64,
    pub stored_size: u32,
    pub encoding: ChunkEncoding,
}

/// What the pipeline produced: the spill file, its chunks, and every sequence number's hash.
pub(crate) struct Spill {
    pub file: File,
    pub chunks: HashMap<Blake3, SpillChunk>,
    pub seq_hashes: Vec<Blake3>,
    /// Uncompressed size of every chunk cut (duplicates included).
    pub seq_sizes: Vec<u32>,
}

struct Job {
    seq: u64,
    data: Vec<u8>,
}

enum Done {
    New {
        seq: u64,
        hash: Blake3,
        size: u32,
        stored: Vec<u8>,
        encoding: ChunkEncoding,
    },
    Known {
        seq: u64,
        hash: Blake3,
        size: u32,
    },
}

/// Where a layer reader puts file content: the pipeline that builds an image, or an in-memory
/// hasher that only checks a layer (`scan_layer`).
pub(crate) trait ChunkSink {
    /// Reads exactly `size` bytes of one file from `r` and returns its chunks.
    fn add_file(&mut self, r: &mut dyn Read, size: u64, what: &str) -> Result<FileChunks>;
}

impl ChunkSink for Chunker {
    fn add_file(&mut self, r: &mut dyn Read, size: u64, what: &str) -> Result<FileChunks> {
        Chunker::add_file(self, r, size, what)
    }
}

/// The running chunk pipeline.
pub(crate) struct Chunker {
    chunk_size: usize,
    next_seq: u64,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<Spill>>>,
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Chunker {
    /// Starts workers and the spill writer. Chunks in `known` (a chunk dictionary) are only
    /// hashed, never compressed or spilled. The spill file lives in `spill_dir`.
    pub fn start(
        chunk_size: u32,
        level: i32,
        known: HashSet<Blake3>,
        spill_dir: &Path,
    ) -> Result<Self> {
        let spill = tempfile::tempfile_in(spill_dir)
            .map_err(|e| io_err("creating spill file in", spill_dir, e))?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (job_tx, job_rx) = bounded::<Job>(threads * 2);
        let (done_tx, done_rx) = bounded::<Done>(threads * 2);
        let known = Arc::new(Mutex::new(known));
        let workers = (0..threads)
            .map(|_| {
                let rx = job_rx.clone();
                let tx = done_tx.clone();
                let known = Arc::clone(&known);
                std::thread::spawn(move || worker(rx, tx, known, level))
            })
            .collect();
        drop(done_tx);
        let writer = std::thread::spawn(move || spill_writer(spill, done_rx));
        Ok(Chunker {
            chunk_size: chunk_size as usize,
            next_seq: 0,
            jobs: Some(job_tx),
            workers,
            writer: Some(writer),
        })
    }

    /// Reads exactly `size` bytes of one file from `r` and queues its chunks.
    pub fn add_file(&mut self, r: &mut dyn Read, size: u64, what: &str) -> Result<FileChunks> {
        let mut left = size;
        let mut seqs = Vec::with_capacity(
            usize::try_from(size.div_ceil(self.chunk_size as u64))
                .unwrap_or(0)
                .min(1 << 20),
        );
        while left > 0 {
            let n = usize::try_from(left).map_or(self.chunk_size, |l| l.min(self.chunk_size));
            let mut data = vec![0u8; n];
            r.read_exact(&mut data).map_err(|e| Error::Io {
                op: "reading content of",
                path: what.into(),
                source: e,
            })?;
            left -= n as u64;
            let seq = self.next_seq;
            self.next_seq += 1;
            seqs.push(seq);
            let sent = self
                .jobs
                .as_ref()
                .map(|j| j.send(Job { seq, data }).is_ok())
                .unwrap_or(false);
            if !sent {
                // The writer stopped: its error says why.
                return Err(self
                    .stop()
                    .err()
                    .unwrap_or_else(|| Error::BadOption("chunk pipeline stopped".into())));
            }
        }
        Ok(FileChunks { size, seqs })
    }

    fn stop(&mut self) -> Result<Spill> {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let writer = self
            .writer
            .take()
            .ok_or_else(|| Error::BadOption("chunk pipeline already finished".into()))?;
        let spill = writer
            .join()
            .map_err(|_| Error::BadOption("chunk spill writer panicked".into()))?
            .map_err(|e| io_err("writing chunk spill file", Path::new("<temporary>"), e))?;
        if spill.seq_hashes.len() as u64 != self.next_seq {
            return Err(Error::BadOption("chunk pipeline lost chunks".into()));
        }
        Ok(spill)
    }

    /// Waits for every queued chunk and returns the spill.
    pub fn finish(mut self) -> Result<Spill> {
        self.stop()
    }
}

impl Drop for Chunker {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn worker(rx: Receiver<Job>, tx: Sender<Done>, known: Arc<Mutex<HashSet<Blake3>>>, level: i32) {
    let mut compressor = zstd::bulk::Compressor::new(level).ok();
    for job in rx {
        let hash: Blake3 = *blake3::hash(&job.data).as_bytes();
        let size = job.data.len() as u32;
        let is_new = known.lock().map(|mut k| k.insert(hash)).unwrap_or(true);
        let done = if is_new {
            // Compressed only when it is smaller; raw otherwise (design.md, "Identities").
            let compressed = compressor.as_mut().and_then(|c| c.compress(&job.data).ok());
            match compressed {
                Some(c) if c.len() < job.data.len() => Done::New {
                    seq: job.seq,
                    hash,
                    size,
                    stored: c,
                    encoding: ChunkEncoding::Zstd,
                },
                _ => Done::New {
                    seq: job.seq,
                    hash,
                    size,
                    stored: job.data,
                    encoding: ChunkEncoding::Raw,
                },
            }
        } else {
            Done::Known {
                seq: job.seq,
                hash,
                size,
            }
        };
        if tx.send(done).is_err() {
            return;
        }
    }
}

fn spill_writer(file: File, rx: Receiver<Done>) -> io::Result<Spill> {
    let mut out = BufWriter::with_capacity(4 << 20, file);
    let mut offset = 0u64;
    let mut chunks = HashMap::new();
    let mut seq_hashes: Vec<Blake3> = Vec::new();
    let mut seq_sizes: Vec<u32> = Vec::new();
    let record = |seq: u64, hash: Blake3, size: u32, hs: &mut Vec<Blake3>, ss: &mut Vec<u32>| {
        let i = seq as usize;
        if hs.len() <= i {
            hs.resize(i + 1, [0; 32]);
            ss.resize(i + 1, 0);
        }
        hs[i] = hash;
        ss[i] = size;
    };
    for done in rx {
        match done {
            Done::New {
                seq,
                hash,
                size,
                stored,
                encoding,
            } => {
                out.write_all(&stored)?;
                chunks.insert(
                    hash,
                    SpillChunk {
                        offset,
                        stored_size: stored.len() as u32,
                        encoding,
                    },
                );
                offset += stored.len() as u64;
                record(seq, hash, size, &mut seq_hashes, &mut seq_sizes);
            }
            Done::Known { seq, hash, size } => {
                record(seq, hash, size, &mut seq_hashes, &mut seq_sizes)
            }
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    Ok(Spill {
        file,
        chunks,
        seq_hashes,
        seq_sizes,
    })
}
