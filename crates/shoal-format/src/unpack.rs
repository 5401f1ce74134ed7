//! `shoal image unpack`: materialise an image's tree under a new directory — content (every chunk
//! verified, zero chunks left as holes), modes, owners, mtimes, xattrs, symlinks, hardlinks and
//! device nodes — never writing outside that directory.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::image::{self, ShoalImage};
use crate::model::{ImageMeta, Inode, Payload};

/// What an unpack wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UnpackStats {
    /// Entries created (hardlinks included).
    pub entries: u64,
    /// Bytes of file content written (holes excluded).
    pub bytes_written: u64,
}

fn err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Unpack {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io<'a>(path: &'a Path, what: &'a str) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| err(path, format!("{what}: {e}"))
}

/// Unpacks `img` into `to`, which must not exist or be an empty directory.
pub fn unpack(img: &ShoalImage, to: &Path) -> Result<UnpackStats> {
    let blobs = (0..img.meta.blobs.len())
        .map(|i| image::open_blob(&img.dir, &img.meta, i))
        .collect::<Result<Vec<_>>>()?;
    unpack_meta(&img.meta, blobs, to)
}

/// Unpacks the tree of `meta` into `to` (which must not exist or be empty), reading chunks from
/// `blobs` (the file of each blob of `meta`, in order).
pub fn unpack_meta(meta: &ImageMeta, blobs: Vec<File>, to: &Path) -> Result<UnpackStats> {
    match fs::read_dir(to) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(err(
                    to,
                    "target directory is not empty; unpack only into a new or empty directory",
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(to).map_err(io(to, "creating"))?
        }
        Err(e) => return Err(err(to, format!("reading: {e}"))),
    }
    let mut u = Unpacker {
        meta,
        blobs,
        linked: HashMap::new(),
        zero_chunks: HashSet::new(),
        stats: UnpackStats::default(),
        // SAFETY: geteuid has no preconditions.
        root: unsafe { libc::geteuid() } == 0,
    };
    let root = meta
        .inodes
        .first()
        .ok_or_else(|| err(to, "image has no root inode"))?;
    // Directories are finished (mode, owner, mtime) children first, so a read-only directory or
    // an mtime is not disturbed by writing into it.
    let mut finish: Vec<(PathBuf, &Inode)> = vec![(to.to_path_buf(), root)];
    let mut stack: Vec<(PathBuf, u32, usize)> = vec![(to.to_path_buf(), 0, 0)];
    while let Some((dir, ino, depth)) = stack.pop() {
        let Some(Payload::Dir(entries)) = meta.inodes.get(ino as usize).map(|n| &n.payload) else {
            return Err(err(&dir, "directory inode is not a directory"));
        };
        if depth > 4096 {
            return Err(err(&dir, "directory nesting deeper than 4096"));
        }
        for e in entries {
            check_name(&dir, &e.name)?;
            let path = dir.join(std::ffi::OsStr::from_bytes(&e.name));
            let node = meta
                .inodes
                .get(e.inode as usize)
                .ok_or_else(|| err(&path, "entry names a missing inode"))?;
            if let Payload::Dir(_) = node.payload {
                if e.inode == 0 || finish.len() > meta.inodes.len() {
                    return Err(err(&path, "directory cycle"));
                }
                fs::create_dir(&path).map_err(io(&path, "creating directory"))?;
                u.stats.entries += 1;
                finish.push((path.clone(), node));
                stack.push((path, e.inode, depth + 1));
            } else {
                u.create(&path, e.inode, node)?;
            }
        }
    }
    for (path, node) in finish.iter().rev() {
        u.set_meta(path, node)?;
    }
    Ok(u.stats)
}

fn check_name(dir: &Path, name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(err(
            dir,
            format!("refusing entry name {:?}", String::from_utf8_lossy(name)),
        ));
    }
    Ok(())
}

struct Unpacker<'a> {
    meta: &'a ImageMeta,
    blobs: Vec<File>,
    linked: HashMap<u32, PathBuf>,
    zero_chunks: HashSet<u32>,
    stats: UnpackStats,
    root: bool,
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| err(path, "path contains NUL"))
}

impl Unpacker<'_> {
    fn create(&mut self, path: &Path, ino: u32, node: &Inode) -> Result<()> {
        self.stats.entries += 1;
        if let Some(first) = self.linked.get(&ino) {
            return fs::hard_link(first, path).map_err(io(path, "creating hardlink"));
        }
        match &node.payload {
            Payload::File(f) => self.write_file(path, f)?,
            Payload::Symlink(t) => {
                let target = std::ffi::OsString::from_vec(t.clone());
                std::os::unix::fs::symlink(target, path).map_err(io(path, "creating symlink"))?
            }
            Payload::Device(dev) => mknod(path, node.mode, *dev)?,
            Payload::Special => mknod(path, node.mode, 0)?,
            Payload::Dir(_) => return Err(err(path, "hardlinked directory")),
        }
        self.set_meta(path, node)?;
        if node.nlink > 1 {
            self.linked.insert(ino, path.to_path_buf());
        }
        Ok(())
    }

    fn write_file(&mut self, path: &Path, f: &crate::model::FileData) -> Result<()> {
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io(path, "creating file"))?;
        let meta = self.meta;
        let mut pos = 0u64;
        for &ci in &f.chunks {
            let c = meta
                .chunks
                .get(ci as usize)
                .ok_or_else(|| err(path, format!("missing chunk {ci}")))?;
            // A chunk already verified to be all zeros is a hole again (large sparse files).
            if self.zero_chunks.contains(&ci) {
                pos += u64::from(c.size);
                continue;
            }
            let data = image::read_chunk(meta, &self.blobs, c).map_err(|reason| Error::Verify {
                object: format!("chunk {} (file {})", hex::encode(c.hash), path.display()),
                reason,
            })?;
            // All-zero chunks stay holes: sparse files stay sparse.
            if data.iter().any(|b| *b != 0) {
                out.write_all_at(&data, pos).map_err(io(path, "writing"))?;
                self.stats.bytes_written += data.len() as u64;
            } else {
                self.zero_chunks.insert(ci);
            }
            pos += data.len() as u64;
        }
        if pos != f.size {
            return Err(err(
                path,
                format!("chunks hold {pos} bytes, file size is {}", f.size),
            ));
        }
        out.set_len(f.size).map_err(io(path, "setting length"))?;
        Ok(())
    }

    /// Owner, xattrs, mode (after chown, which clears setuid bits), then mtime.
    fn set_meta(&self, path: &Path, node: &Inode) -> Result<()> {
        let c = cpath(path)?;
        let is_link = node.mode & 0o170000 == 0o120000;
        if self.root {
            // SAFETY: `c` is a valid NUL-terminated path; lchown does not follow symlinks.
            if unsafe { libc::lchown(c.as_ptr(), node.uid, node.gid) } != 0 {
                return Err(err(
                    path,
                    format!("chown: {}", std::io::Error::last_os_error()),
                ));
            }
        }
        for (name, value) in &node.xattrs {
            let name = std::ffi::OsStr::from_bytes(name);
            // xattr::set does not follow symlinks (lsetxattr).
            if let Err(e) = xattr::set(path, name, value) {
                if self.root || e.raw_os_error() != Some(libc::EPERM) {
                    return Err(err(
                        path,
                        format!("setting xattr {}: {e}", name.to_string_lossy()),
                    ));
                }
            }
        }
        if !is_link {
            // SAFETY: valid path; chmod on a non-symlink we created.
            if unsafe { libc::chmod(c.as_ptr(), node.mode & 0o7777) } != 0 {
                return Err(err(
                    path,
                    format!("chmod: {}", std::io::Error::last_os_error()),
                ));
            }
        }
        let nsec = i64::from(node.mtime_nsec.min(999_999_999));
        let times = [
            libc::timespec {
                tv_sec: node.mtime as libc::time_t,
                tv_nsec: nsec as _,
            },
            libc::timespec {
                tv_sec: node.mtime as libc::time_t,
                tv_nsec: nsec as _,
            },
        ];
        // SAFETY: valid path and a two-element timespec array, as utimensat requires.
        if unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        } != 0
        {
            return Err(err(
                path,
                format!("setting mtime: {}", std::io::Error::last_os_error()),
            ));
        }
        Ok(())
    }
}

fn mknod(path: &Path, mode: u32, dev: u64) -> Result<()> {
    let c = cpath(path)?;
    // SAFETY: valid path; mknod creates a node and never follows a symlink at the final name.
    if unsafe {
        libc::mknod(
            c.as_ptr(),
            (mode & 0o170000 | 0o600) as libc::mode_t,
            dev as libc::dev_t,
        )
    } != 0
    {
        return Err(err(
            path,
            format!("mknod: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(())
}
