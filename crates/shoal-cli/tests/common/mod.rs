//! Shared helpers for the `shoal image` integration tests: run the real binary, compare trees.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `shoal ARGS`; returns its output (status not checked).
pub fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .expect("running the shoal binary")
}

/// Runs `shoal ARGS` and fails the test unless it succeeds; returns stdout.
pub fn shoal_ok(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `shoal ARGS` expecting failure; returns stderr.
pub fn shoal_err(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(
        !out.status.success(),
        "shoal {args:?} succeeded but should have failed"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command and fails the test unless it succeeds.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `oci:DIR[:TAG]` for a path.
pub fn oci(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

/// Everything compared about one path.
#[derive(Debug, PartialEq, Eq)]
pub struct Facts {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub rdev: u64,
    pub link: Option<PathBuf>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

pub fn facts(p: &Path) -> Facts {
    let md = std::fs::symlink_metadata(p).unwrap();
    let ft = md.file_type();
    let mut xattrs = BTreeMap::new();
    for name in xattr::list(p).unwrap() {
        if let Some(v) = xattr::get(p, &name).unwrap() {
            xattrs.insert(name.as_bytes().to_vec(), v);
        }
    }
    Facts {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
        size: if ft.is_file() { md.len() } else { 0 },
        rdev: if ft.is_char_device() || ft.is_block_device() {
            md.rdev()
        } else {
            0
        },
        link: ft.is_symlink().then(|| std::fs::read_link(p).unwrap()),
        xattrs,
    }
}

pub fn walk(root: &Path) -> BTreeMap<PathBuf, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        out.insert(rel.clone(), abs.clone());
        if std::fs::symlink_metadata(&abs).unwrap().is_dir() {
            for e in std::fs::read_dir(&abs).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out
}

pub fn same_content(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    got
}

/// Hardlink groups (sets of 2+ paths sharing an inode).
fn link_groups(tree: &BTreeMap<PathBuf, PathBuf>) -> BTreeSet<Vec<PathBuf>> {
    let mut by_ino: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for (rel, abs) in tree {
        let md = std::fs::symlink_metadata(abs).unwrap();
        if !md.is_dir() {
            by_ino
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
        }
    }
    by_ino.into_values().filter(|v| v.len() > 1).collect()
}

/// Asserts two trees are equal: names, content, mode, owner, mtime, xattrs, symlink targets,
/// device numbers and hardlink groups. Returns the number of paths compared.
pub fn assert_same_tree(expected: &Path, actual: &Path) -> usize {
    let n = assert_same_files(expected, actual);
    assert_eq!(
        link_groups(&walk(expected)),
        link_groups(&walk(actual)),
        "hardlink groups differ"
    );
    n
}

/// [`assert_same_tree`] without hardlink groups (overlayfs breaks a hardlink whose names come
/// from different layers, as containerd's overlay snapshots do).
pub fn assert_same_files(expected: &Path, actual: &Path) -> usize {
    let (a, b) = (walk(expected), walk(actual));
    let names_a: Vec<_> = a.keys().collect();
    let names_b: Vec<_> = b.keys().collect();
    let only_a: Vec<_> = names_a.iter().filter(|n| !b.contains_key(**n)).collect();
    let only_b: Vec<_> = names_b.iter().filter(|n| !a.contains_key(**n)).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "paths differ: only expected {only_a:?}, only actual {only_b:?}"
    );
    for (rel, pa) in &a {
        let pb = &b[rel];
        let (fa, fb) = (facts(pa), facts(pb));
        assert_eq!(
            fa,
            fb,
            "metadata of /{} differs (expected vs actual)",
            rel.display()
        );
        if std::fs::symlink_metadata(pa).unwrap().is_file() {
            assert!(
                same_content(pa, pb),
                "content of /{} differs",
                rel.display()
            );
        }
    }
    a.len()
}
