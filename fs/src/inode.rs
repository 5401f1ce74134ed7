//! The FUSE operations over the bootstrap: lookup, getattr, readdir(plus), readlink, xattrs,
//! statfs, open and read. Metadata is answered in place from the bootstrap on the FUSE loop
//! threads, and so is a read of part of a chunk that memory or the disk cache holds; other
//! reads go to a thread pool (read.rs may wait on the network) and reply from there.
//!
//! FUSE inode numbers are the bootstrap's inode index + 1 (the root is 1); hardlinks share one
//! inode, so they share one number and report their link count.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use shoal_format::bootstrap::{Bootstrap, InodeKind, InodeView};

use crate::access_log::AccessLog;
use crate::ahead::{Ahead, AheadConfig};
use crate::read::Reader;

/// Readahead asked of the kernel (and set on the mount's bdi by mount.rs).
pub const MAX_READAHEAD: u32 = 4 << 20;

/// The image is immutable: the kernel may cache names and attributes for a long time.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// The mounted image.
pub struct ImageFs {
    reader: Arc<Reader>,
    parents: Arc<Vec<u32>>,
    pool: rayon::ThreadPool,
    /// Fetch-ahead work, apart from `pool` so that it never delays a read's own chunks.
    ahead_pool: rayon::ThreadPool,
    ahead: Ahead,
    access: Option<Arc<AccessLog>>,
    file_bytes: u64,
}

/// The parent of every directory (the root is its own parent); other inodes get the first
/// directory found naming them.
fn parents(boot: &Bootstrap) -> Vec<u32> {
    let n = boot.inode_count() as usize;
    let mut parents = vec![u32::MAX; n];
    if let Some(p) = parents.first_mut() {
        *p = 0;
    }
    let mut stack = vec![0u32];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = boot.read_dir(dir, 0) else {
            continue;
        };
        for e in entries {
            if let Some(p) = parents.get_mut(e.ino as usize).filter(|p| **p == u32::MAX) {
                *p = dir;
                if boot
                    .inode(e.ino)
                    .is_some_and(|i| i.kind() == InodeKind::Directory)
                {
                    stack.push(e.ino);
                }
            }
        }
    }
    parents
}

/// `/a/b/c` of inode `ino` (its first name for hardlinks).
fn path_of(boot: &Bootstrap, parents: &[u32], ino: u32) -> Option<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    let mut cur = ino;
    while cur != 0 {
        let parent = *parents.get(cur as usize)?;
        let name = boot
            .read_dir(parent, 0)
            .ok()?
            .find(|e| e.ino == cur)?
            .name
            .to_vec();
        names.push(name);
        cur = parent;
        if names.len() > 4096 {
            return None;
        }
    }
    let mut path = Vec::new();
    for n in names.iter().rev() {
        path.push(b'/');
        path.extend_from_slice(n);
    }
    if path.is_empty() {
        path.push(b'/');
    }
    Some(path)
}

fn time(secs: i64, nsec: u32) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s) + nsec,
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nsec,
    }
}

fn file_type(k: InodeKind) -> FileType {
    match k {
        InodeKind::Directory => FileType::Directory,
        InodeKind::File => FileType::RegularFile,
        InodeKind::Symlink => FileType::Symlink,
        InodeKind::CharDevice => FileType::CharDevice,
        InodeKind::BlockDevice => FileType::BlockDevice,
        InodeKind::Fifo => FileType::NamedPipe,
        InodeKind::Socket => FileType::Socket,
    }
}

/// glibc `dev_t` to the kernel's 32-bit "new" encoding that FUSE carries.
fn fuse_rdev(dev: u64) -> u32 {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    ((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)) as u32
}

fn attr(v: &InodeView<'_>) -> FileAttr {
    let t = time(v.mtime(), v.mtime_nsec());
    let size = v.size();
    FileAttr {
        ino: INodeNo(u64::from(v.ino()) + 1),
        size,
        blocks: size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(v.kind()),
        perm: (v.mode() & 0o7777) as u16,
        nlink: v.nlink(),
        uid: v.uid(),
        gid: v.gid(),
        rdev: fuse_rdev(v.rdev()),
        blksize: 4096,
        flags: 0,
    }
}

impl ImageFs {
    /// A filesystem over `reader`'s image; reads run on `read_threads` threads, fetch-ahead
    /// (`ahead`) on two more.
    pub fn new(
        reader: Arc<Reader>,
        read_threads: usize,
        ahead: AheadConfig,
        access: Option<Arc<AccessLog>>,
    ) -> std::io::Result<Self> {
        let boot = reader.bootstrap();
        let parents = Arc::new(parents(boot));
        let file_bytes = (0..boot.inode_count())
            .filter_map(|i| boot.inode(i))
            .filter(|i| i.kind() == InodeKind::File)
            .map(|i| i.size())
            .sum();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(read_threads)
            .thread_name(|i| format!("shoal-fs-read-{i}"))
            .panic_handler(|_| tracing::error!("a read thread panicked"))
            .build()
            .map_err(std::io::Error::other)?;
        // Two threads: the machine's other core verifies the next chunks while this one replies.
        let ahead_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .thread_name(|i| format!("shoal-fs-ahead-{i}"))
            .panic_handler(|_| tracing::error!("a fetch-ahead thread panicked"))
            .build()
            .map_err(std::io::Error::other)?;
        let ahead = Ahead::new(boot, ahead);
        Ok(ImageFs {
            reader,
            parents,
            pool,
            ahead_pool,
            ahead,
            access,
            file_bytes,
        })
    }

    fn boot(&self) -> &Bootstrap {
        self.reader.bootstrap()
    }

    /// The bootstrap index of a FUSE inode number.
    fn index(&self, ino: INodeNo) -> Option<u32> {
        let i = u32::try_from(ino.0.checked_sub(1)?).ok()?;
        (i < self.boot().inode_count()).then_some(i)
    }

    fn view(&self, ino: INodeNo) -> Result<InodeView<'_>, Errno> {
        self.index(ino)
            .and_then(|i| self.boot().inode(i))
            .ok_or(Errno::ENOENT)
    }

    fn dir_entries(&self, ino: INodeNo, offset: u64) -> Result<Vec<(u32, u64, Vec<u8>)>, Errno> {
        let dir = self.index(ino).ok_or(Errno::ENOENT)?;
        let parent = self
            .parents
            .get(dir as usize)
            .copied()
            .filter(|p| *p != u32::MAX)
            .unwrap_or(0);
        let mut out = Vec::new();
        if offset < 1 {
            out.push((dir, 1, b".".to_vec()));
        }
        if offset < 2 {
            out.push((parent, 2, b"..".to_vec()));
        }
        let entries = self
            .boot()
            .read_dir(dir, offset.saturating_sub(2))
            .map_err(|_| Errno::ENOTDIR)?;
        // Bounded batches: the kernel asks again from the last offset it got.
        for e in entries.take(1024) {
            out.push((e.ino, e.next_offset + 2, e.name.to_vec()));
        }
        Ok(out)
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_readahead(MAX_READAHEAD);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.index(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match self.boot().lookup(dir, name.as_bytes()) {
            Ok(Some(ino)) => match self.boot().inode(ino) {
                Some(v) => reply.entry(&TTL, &attr(&v), Generation(0)),
                None => reply.error(Errno::EIO),
            },
            Ok(None) => reply.error(Errno::ENOENT),
            Err(_) => reply.error(Errno::ENOTDIR),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.view(ino) {
            Ok(v) => reply.attr(&TTL, &attr(&v)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.index(ino).map(|i| self.boot().read_link(i)) {
            Some(Ok(target)) => reply.data(target),
            Some(Err(_)) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.view(ino) {
            Ok(v) if v.kind() == InodeKind::Directory => reply.error(Errno::EISDIR),
            Ok(_) if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(idx) = self.index(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(log) = &self.access {
            let (reader, parents) = (&self.reader, &self.parents);
            log.record(idx, || path_of(reader.bootstrap(), parents, idx));
        }
        let next = self.ahead.plan(&self.reader, idx, offset, size);
        // Part of a chunk held in memory or in the disk cache: answered here, which saves the
        // hand-over to a read thread (a wake-up, on the order of the disk read itself).
        if let Some(data) = self.reader.read_cached(idx, offset, size) {
            reply.data(&data);
        } else {
            let reader = Arc::clone(&self.reader);
            self.pool
                .spawn(move || match reader.read(idx, offset, size) {
                    Ok(data) => reply.data(&data),
                    Err(e) => {
                        reader.metrics.read_errors.inc();
                        tracing::error!(ino = idx, offset, size, error = %e, "read failed: EIO");
                        reply.error(Errno::EIO);
                    }
                });
        }
        if !next.is_empty() {
            let reader = Arc::clone(&self.reader);
            self.ahead_pool.spawn(move || reader.load_ahead(&next));
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// Nothing is buffered for writing (the image is read-only), so a close has nothing to flush.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.view(ino) {
            Ok(v) if v.kind() == InodeKind::Directory => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.dir_entries(ino, offset) {
            Ok(list) => {
                for (child, off, name) in list {
                    let kind = self
                        .boot()
                        .inode(child)
                        .map_or(FileType::RegularFile, |v| file_type(v.kind()));
                    if reply.add(
                        INodeNo(u64::from(child) + 1),
                        off,
                        kind,
                        OsStr::from_bytes(&name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.dir_entries(ino, offset) {
            Ok(list) => {
                for (child, off, name) in list {
                    let Some(v) = self.boot().inode(child) else {
                        continue;
                    };
                    if reply.add(
                        INodeNo(u64::from(child) + 1),
                        off,
                        OsStr::from_bytes(&name),
                        &TTL,
                        &attr(&v),
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = u64::from(self.boot().inode_count());
        reply.statfs(
            self.file_bytes.div_ceil(4096),
            0,
            0,
            files,
            0,
            4096,
            255,
            4096,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(idx) = self.index(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.boot().xattr(idx, name.as_bytes()) {
            Ok(Some(value)) if size == 0 => reply.size(value.len() as u32),
            Ok(Some(value)) if value.len() <= size as usize => reply.data(value),
            Ok(Some(_)) => reply.error(Errno::ERANGE),
            Ok(None) => reply.error(Errno::ENODATA),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(idx) = self.index(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Ok(xattrs) = self.boot().xattrs(idx) else {
            return reply.error(Errno::EIO);
        };
        let mut list = Vec::new();
        for (name, _) in xattrs {
            list.extend_from_slice(name);
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32);
        } else if list.len() <= size as usize {
            reply.data(&list);
        } else {
            reply.error(Errno::ERANGE);
        }
    }
}
