//! Disk faults: a small tmpfs as a peer's data directory (to fill it), and a flipped byte in a
//! stored file (to corrupt a piece on a parent's disk).

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use crate::cmd::run;
use crate::{io_err, require_root_tools, ChaosError, Result};

/// A tmpfs of fixed size mounted on a directory; unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` on `path` (created if missing). Needs root.
    pub fn mount(path: &Path, size_bytes: u64) -> Result<Tmpfs> {
        require_root_tools()?;
        std::fs::create_dir_all(path).map_err(io_err(format!("creating {}", path.display())))?;
        let opts = format!("size={size_bytes},mode=0755");
        let target = path.to_string_lossy().into_owned();
        run(
            "mount",
            &["-t", "tmpfs", "-o", &opts, "shoal-chaos", &target],
        )?;
        Ok(Tmpfs {
            path: path.to_path_buf(),
            mounted: true,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes still free for writing.
    pub fn free_bytes(&self) -> Result<u64> {
        free_bytes(&self.path)
    }

    /// Fills the filesystem until at most `leave` bytes stay free; returns the bytes written.
    pub fn fill(&self, leave: u64) -> Result<u64> {
        fill_dir(&self.path, leave)
    }

    /// Unmounts now (drop does it otherwise).
    pub fn unmount(&mut self) -> Result<()> {
        if self.mounted {
            let target = self.path.to_string_lossy().into_owned();
            // Lazy: a process still holding a file must not keep the mount alive forever.
            run("umount", &["-l", &target])?;
            self.mounted = false;
        }
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(path = %self.path.display(), error = %e, "chaos: unmount failed");
        }
    }
}

fn free_bytes(path: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| ChaosError::Setup(format!("{} contains a NUL byte", path.display())))?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(ChaosError::Io {
            what: format!("statvfs {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Writes a filler file in `dir` until its filesystem has at most `leave` bytes free (or is
/// full); returns the bytes written. Remove `dir/shoal-chaos-filler` to free the space again.
pub fn fill_dir(dir: &Path, leave: u64) -> Result<u64> {
    let path = dir.join("shoal-chaos-filler");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    let block = vec![0xA5u8; 64 << 10];
    let mut written = 0u64;
    loop {
        let free = free_bytes(dir)?;
        if free <= leave {
            break;
        }
        let n = (free - leave).min(block.len() as u64) as usize;
        match f.write(&block[..n]) {
            Ok(0) => break,
            Ok(w) => written += w as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(format!("filling {}", path.display()))(e)),
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

/// Flips every bit of the byte at `offset` in `path`; returns (old, new) byte.
pub fn corrupt_byte(path: &Path, offset: u64) -> Result<(u8, u8)> {
    let what = format!("corrupting byte {offset} of {}", path.display());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(what.clone()))?;
    let len = f.metadata().map_err(io_err(what.clone()))?.len();
    if offset >= len {
        return Err(ChaosError::Setup(format!(
            "{what}: the file has only {len} bytes"
        )));
    }
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut b))
        .map_err(io_err(what.clone()))?;
    let new = b[0] ^ 0xFF;
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.write_all(&[new]))
        .and_then(|_| f.sync_all())
        .map_err(io_err(what))?;
    Ok((b[0], new))
}
