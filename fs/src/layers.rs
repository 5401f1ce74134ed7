//! An unconverted image with a Shoal index, mounted by one process: each layer's bootstrap is
//! its own FUSE session (session.rs) on a directory of a private temporary directory, and the
//! layers are stacked read-only by the kernel's overlayfs at the mountpoint (lower directories
//! only, top layer first). Each layer bootstrap is in overlay form (whiteouts as character
//! devices 0/0, opaque directories as `trusted.overlay.opaque`), so the stack shows the image as
//! `umoci unpack` does. Unmounting takes the overlay down first, then every layer.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{FsError, Result};

/// The layers' directories and the overlay over them.
pub(crate) struct Stack {
    /// Holds `0`, `1`, ... (one per layer, bottom first) and `empty`.
    dir: PathBuf,
    layers: usize,
    mountpoint: PathBuf,
    mounted: bool,
}

impl Stack {
    /// Makes the layers' directories (for `layers` layers) in a new private directory.
    pub(crate) fn new(layers: usize, mountpoint: &Path) -> Result<Stack> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-layers-")
            .tempdir()
            .map_err(|e| {
                FsError::io(
                    "creating a directory for the layers in",
                    std::env::temp_dir(),
                    e,
                )
            })?
            .keep();
        let s = Stack {
            dir,
            layers,
            mountpoint: mountpoint.to_path_buf(),
            mounted: false,
        };
        for i in 0..layers {
            let d = s.layer(i);
            std::fs::create_dir(&d).map_err(|e| FsError::io("creating", &d, e))?;
        }
        let e = s.dir.join("empty");
        std::fs::create_dir(&e).map_err(|err| FsError::io("creating", &e, err))?;
        Ok(s)
    }

    /// Where layer `i` (0 = bottom) is mounted.
    pub(crate) fn layer(&self, i: usize) -> PathBuf {
        self.dir.join(i.to_string())
    }

    /// Stacks the mounted layers at the mountpoint: `lowerdir=top:...:bottom`, read-only (an
    /// image of one layer gets an empty directory below it: overlayfs wants two lower layers
    /// when it has no upper one).
    pub(crate) fn mount(&mut self, name: &str) -> Result<()> {
        let mut lower: Vec<String> = (0..self.layers)
            .rev()
            .map(|i| self.layer(i).display().to_string())
            .collect();
        if lower.len() == 1 {
            lower.push(self.dir.join("empty").display().to_string());
        }
        let data = format!("lowerdir={}", lower.join(":"));
        let err = |reason: String| FsError::Mount {
            op: "stacking the layers with overlayfs at",
            path: self.mountpoint.clone(),
            source: std::io::Error::other(reason),
        };
        if data.len() >= 4000 {
            return Err(err(format!(
                "{} layers make the overlay's options longer than a page",
                self.layers
            )));
        }
        let c = |s: &[u8]| CString::new(s).map_err(|_| err("a path holds a NUL byte".into()));
        let (src, target, fstype, opts) = (
            c(name.as_bytes())?,
            c(self.mountpoint.as_os_str().as_bytes())?,
            c(b"overlay")?,
            c(data.as_bytes())?,
        );
        // SAFETY: every pointer is a NUL-terminated string alive for the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_RDONLY,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(FsError::Mount {
                op: "stacking the layers with overlayfs at",
                path: self.mountpoint.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        self.mounted = true;
        Ok(())
    }

    /// True while the overlay is mounted at the mountpoint (false once someone unmounted it).
    pub(crate) fn still_mounted(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        self.mounted && dev(&self.mountpoint) != self.mountpoint.parent().and_then(dev)
    }

    /// Takes the overlay down (lazily: open files keep it until closed).
    pub(crate) fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        let Ok(target) = CString::new(self.mountpoint.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: a NUL-terminated path alive for the call.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: not mounted any more (`shoal fs umount` took it down).
            if e.raw_os_error() != Some(libc::EINVAL) {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "could not unmount the overlay");
            }
        }
    }

    /// Removes the layers' directories (each already unmounted; a directory still mounted on is
    /// left alone, never walked).
    pub(crate) fn remove(&self) {
        for i in 0..self.layers {
            let _ = std::fs::remove_dir(self.layer(i));
        }
        let _ = std::fs::remove_dir(self.dir.join("empty"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}
