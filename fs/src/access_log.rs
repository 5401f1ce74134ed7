//! `--record-access FILE`: the order in which files are first read, one absolute path per line
//! (the format `shoal image convert --prefetch` reads). Each line is flushed as it is written, so
//! the file is usable while the image is still mounted.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::{FsError, Result};

/// Records the first read of each inode.
pub struct AccessLog {
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
    seen: Vec<AtomicBool>,
}

impl AccessLog {
    /// Creates (truncates) `path` for an image of `inodes` inodes.
    pub fn create(path: &Path, inodes: u32) -> Result<Self> {
        let file = File::create(path).map_err(|e| FsError::io("creating access log", path, e))?;
        Ok(AccessLog {
            path: path.to_path_buf(),
            out: Mutex::new(BufWriter::new(file)),
            seen: (0..inodes).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Notes a read of `ino`; the first one writes `path_of(ino)`.
    pub fn record(&self, ino: u32, path_of: impl FnOnce() -> Option<Vec<u8>>) {
        let first = self
            .seen
            .get(ino as usize)
            .is_some_and(|s| !s.swap(true, Ordering::Relaxed));
        if !first {
            return;
        }
        let Some(mut line) = path_of() else { return };
        if line.contains(&b'\n') {
            // A name with a newline cannot be listed in a line-based file: leave it out.
            return;
        }
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::warn!(file = %self.path.display(), error = %e, "writing the access log failed");
        }
    }
}
