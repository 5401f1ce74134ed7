//! Test harness: an image built from the machine's own files, converted with the project's
//! builder, and FUSE mounts that are always unmounted (MountHandle unmounts on drop, also when a
//! test panics).

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_format::build::{convert, BuildOptions, Source};
use shoal_format::oci::LayoutRef;

/// True when real FUSE mounts can run here (root, /dev/fuse, fusermount3, chroot); otherwise
/// the test skips, or fails under `CI=true` (shoal_testkit::require decides).
pub fn fuse_ready() -> bool {
    let needs = shoal_testkit::Needs::root(&["fusermount3", "chroot"]).and_paths(&["/dev/fuse"]);
    shoal_testkit::require(needs).is_ok()
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies `path` (following symlinks) to the same path under `root`.
fn copy_in(root: &Path, path: &Path) {
    let dest = root.join(path.strip_prefix("/").unwrap_or(path));
    if let Some(p) = dest.parent() {
        fs::create_dir_all(p).unwrap();
    }
    if !dest.exists() {
        sh(Command::new("cp")
            .arg("-L")
            .arg("--preserve=mode,timestamps")
            .arg(path)
            .arg(&dest));
    }
}

/// Libraries a binary needs, from ldd.
fn libs_of(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// A built test image.
pub struct Image {
    pub _dir: tempfile::TempDir,
    /// The source tree.
    pub tree: PathBuf,
    /// The converted OCI layout.
    pub layout: PathBuf,
    /// Chunk size used.
    pub chunk_size: u32,
}

impl Image {
    /// `oci:LAYOUT`.
    pub fn oci_ref(&self) -> String {
        format!("oci:{}", self.layout.display())
    }
}

/// Builds a tree: the Python stdlib from /usr/lib (a thousand-odd files), python3, sh and cat with
/// their libraries, a multi-chunk random file, zeros, an empty file, symlinks, a hardlink and
/// xattrs; converts it with the project's builder (256 KiB chunks, `/data/big.bin` prefetched).
pub fn build_image(with_python: bool) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    let mut bins = vec![PathBuf::from("/bin/cat")];
    if with_python {
        let py = fs::canonicalize("/usr/bin/python3").expect("python3 on this machine");
        let stdlib = py
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("lib")
            .join(py.file_name().unwrap());
        fs::create_dir_all(tree.join("usr/lib")).unwrap();
        sh(Command::new("cp")
            .arg("-a")
            .arg(&stdlib)
            .arg(tree.join("usr/lib")));
        copy_in(&tree, &py);
        std::os::unix::fs::symlink(py.file_name().unwrap(), tree.join("usr/bin/python3")).unwrap();
        bins.push(py);
    }
    for bin in &bins {
        copy_in(&tree, bin);
        for lib in libs_of(bin) {
            copy_in(&tree, &lib);
        }
    }
    // /bin/sh: the machine's sh (dash on Debian) and its libraries.
    let sh_real = fs::canonicalize("/bin/sh").unwrap();
    for lib in libs_of(&sh_real) {
        copy_in(&tree, &lib);
    }
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::copy(&sh_real, tree.join("bin/sh")).unwrap();

    let etc = tree.join("etc");
    fs::create_dir_all(&etc).unwrap();
    fs::write(etc.join("msg"), "hello from shoal\n").unwrap();
    fs::hard_link(etc.join("msg"), etc.join("msg-link")).unwrap();
    std::os::unix::fs::symlink("msg", etc.join("rel")).unwrap();
    std::os::unix::fs::symlink("/etc/msg", tree.join("abs")).unwrap();
    xattr::set(etc.join("msg"), "user.shoal", b"chunk-verified").unwrap();
    xattr::set(&etc, "user.dir", b"").unwrap();
    fs::set_permissions(etc.join("msg"), fs::Permissions::from_mode(0o640)).unwrap();

    let data = tree.join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("big.bin"), noise(3 << 20 | 12345, 7)).unwrap();
    fs::write(data.join("other.bin"), noise(700_000, 8)).unwrap();
    fs::write(data.join("zeros"), vec![0u8; 2 << 20]).unwrap();
    fs::write(data.join("empty"), b"").unwrap();

    let layout = dir.path().join("layout");
    let opts = BuildOptions {
        chunk_size: 256 << 10,
        prefetch: vec![b"data/big.bin".to_vec()],
        ..BuildOptions::default()
    };
    convert(
        &Source::Dir(tree.clone()),
        &LayoutRef {
            dir: layout.clone(),
            tag: None,
        },
        &opts,
    )
    .expect("convert test tree");
    Image {
        _dir: dir,
        tree,
        layout,
        chunk_size: opts.chunk_size,
    }
}

/// What a tree comparison saw.
#[derive(Debug, Default)]
pub struct Compared {
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    pub bytes: u64,
    pub hardlinks: usize,
    pub xattrs: usize,
}

/// Compares `rel` under `src` and `mnt` recursively: names, mode, owner, mtime, nlink, sizes,
/// content, symlink targets, xattrs, and hardlinks (one inode in the mount for one in the source).
pub fn compare(src: &Path, mnt: &Path, rel: &Path, seen: &mut HashMap<u64, u64>, c: &mut Compared) {
    let (a, b) = (src.join(rel), mnt.join(rel));
    let (ma, mb) = (
        fs::symlink_metadata(&a).unwrap(),
        fs::symlink_metadata(&b).unwrap_or_else(|e| panic!("{}: {e}", b.display())),
    );
    let what = rel.display();
    assert_eq!(ma.mode(), mb.mode(), "mode of {what}");
    assert_eq!(
        (ma.uid(), ma.gid()),
        (mb.uid(), mb.gid()),
        "owner of {what}"
    );
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "mtime of {what}"
    );
    assert_eq!(ma.nlink(), mb.nlink(), "nlink of {what}");
    let xa: Vec<_> = xattr::list(&a).unwrap().collect();
    let xb: Vec<_> = xattr::list(&b).unwrap().collect();
    assert_eq!(xa, xb, "xattr names of {what}");
    for name in &xa {
        assert_eq!(
            xattr::get(&a, name).unwrap(),
            xattr::get(&b, name).unwrap(),
            "xattr {name:?} of {what}"
        );
        c.xattrs += 1;
    }
    let ft = ma.file_type();
    if ft.is_dir() {
        c.dirs += 1;
        let names = |d: &Path| {
            let mut v: Vec<_> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let (na, nb) = (names(&a), names(&b));
        assert_eq!(na, nb, "entries of {what}");
        for n in na {
            compare(src, mnt, &rel.join(n), seen, c);
        }
    } else if ft.is_symlink() {
        c.symlinks += 1;
        assert_eq!(
            fs::read_link(&a).unwrap(),
            fs::read_link(&b).unwrap(),
            "target of {what}"
        );
        assert_eq!(ma.size(), mb.size(), "size of {what}");
    } else if ft.is_file() {
        c.files += 1;
        assert_eq!(ma.size(), mb.size(), "size of {what}");
        let (da, db) = (
            fs::read(&a).unwrap(),
            fs::read(&b).unwrap_or_else(|e| panic!("reading {}: {e}", b.display())),
        );
        assert!(da == db, "content of {what} differs");
        c.bytes += da.len() as u64;
        if ma.nlink() > 1 {
            match seen.get(&ma.ino()) {
                Some(&ino) => {
                    assert_eq!(
                        ino,
                        mb.ino(),
                        "hardlink {what} has its own inode in the mount"
                    );
                    c.hardlinks += 1;
                }
                None => {
                    seen.insert(ma.ino(), mb.ino());
                }
            }
        }
    }
}

/// A fresh empty mountpoint under `dir`.
pub fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::create_dir_all(&p).unwrap();
    p
}

/// Flips one byte of `path` at `offset`.
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

/// A real peer daemon (no scheduler: it goes back to the origin itself) with its local API at
/// `work/peer.sock`, allowing `allowed` origins.
pub fn start_peer(
    rt: &tokio::runtime::Runtime,
    work: &Path,
    allowed: Vec<String>,
) -> shoal_peer::Peer {
    shoal_tls::install_crypto_provider();
    let ca = shoal_tls::ClusterCa::init(&work.join("ca"), "fs test CA", 30).unwrap();
    let mut req = shoal_tls::NodeCertRequest::new("fs-peer", 30);
    req.ips.push("127.0.0.1".parse().unwrap());
    let tls = work.join("tls");
    ca.issue(&req).unwrap().write_to(&tls).unwrap();
    rt.block_on(shoal_peer::Peer::start(shoal_peer::PeerConfig {
        host_id: "fs-peer".into(),
        data_dir: work.join("peer"),
        tls_dir: tls,
        listen: "127.0.0.1:0".parse().unwrap(),
        api_socket: work.join("peer.sock"),
        cache_bytes: Some(1 << 30),
        allowed_origins: allowed,
        ..shoal_peer::PeerConfig::default()
    }))
    .expect("start peer")
}
