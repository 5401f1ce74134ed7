//! Where things live under the store's root, and the primitives every other module builds on
//! (file writes, verified reads, clocks, locks). The lowest layer: it knows no store state.
//!
//! ```text
//! <root>/VERSION                  layout version line
//! <root>/LOCK                     flock'ed by the one process that owns the store
//! <root>/blobs/<h2>/<hex>.meta    header + piece table + journal (see journal.rs)
//! <root>/blobs/<h2>/<hex>.data    sparse data file, piece i at offset i * piece_size
//! <root>/chunks/<id>.pack         chunks packed one after another (pack.rs)
//! <root>/chunks/<id>.idx          the pack's journal
//! <root>/tmp/                     files being written; emptied on open
//! ```
//! `<hex>` is the validated 64-digit key and `<h2>` its first two digits.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::key::{Blake3Hash, Digest};

/// The store's directory tree.
#[derive(Debug)]
pub(crate) struct Paths {
    pub root: PathBuf,
    pub blobs: PathBuf,
    pub chunks: PathBuf,
    pub tmp: PathBuf,
    seq: AtomicU64,
}

impl Paths {
    pub fn new(root: &Path) -> Self {
        Paths {
            root: root.to_path_buf(),
            blobs: root.join("blobs"),
            chunks: root.join("chunks"),
            tmp: root.join("tmp"),
            seq: AtomicU64::new(0),
        }
    }

    fn fan(dir: &Path, hex: &str) -> PathBuf {
        dir.join(&hex[..2])
    }

    /// The fan-out directory of a blob.
    pub fn blob_dir(&self, d: &Digest) -> PathBuf {
        Self::fan(&self.blobs, &d.hex())
    }

    /// A blob's metadata file.
    pub fn meta(&self, d: &Digest) -> PathBuf {
        self.blob_dir(d).join(format!("{}.meta", d.hex()))
    }

    /// A blob's data file.
    pub fn data(&self, d: &Digest) -> PathBuf {
        self.blob_dir(d).join(format!("{}.data", d.hex()))
    }

    /// A fresh temporary file name (unique within this process; tmp/ is emptied on open).
    pub fn temp(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}-{n}.tmp", std::process::id()))
    }
}

/// True for the errors that mean "the disk (or the disk quota) is full".
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

/// True for read errors that mean stored bytes are missing or cut short: the item is treated
/// as corrupt (dropped and fetched again), not as a failing disk.
pub(crate) fn bytes_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::NotFound
    )
}

/// Flushes a directory so a rename or unlink in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to a new file at `tmp`, flushes it to disk and renames it to `dest`.
pub(crate) fn write_atomic(tmp: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        drop(f);
        fs::rename(tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Removes a file; a file that is already gone is not an error.
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A piece or chunk is read and hashed this much at a time, so the hash reads bytes still in
/// the CPU cache.
const VERIFY_SLICE: usize = 256 << 10;

/// Fills `out` from `file` at `offset` and returns the BLAKE3 hash of what was read, hashing
/// each slice right after reading it, while it is still in the CPU cache.
pub(crate) fn read_hashed(file: &File, offset: u64, out: &mut [u8]) -> io::Result<Blake3Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut done = 0;
    for slice in out.chunks_mut(VERIFY_SLICE) {
        file.read_exact_at(slice, offset + done as u64)?;
        hasher.update(slice);
        done += slice.len();
    }
    Ok(Blake3Hash::from_bytes(*hasher.finalize().as_bytes()))
}

/// Locks a mutex, taking the data even if another thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A file's modification time in milliseconds since the Unix epoch (now if unknown): the
/// last-access time of what it holds after a restart.
pub(crate) fn mtime_ms(meta: &Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or_else(now_ms)
}
