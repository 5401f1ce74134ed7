//! The mounts containerd is told to make for a snapshot, as containerd's overlayfs snapshotter
//! makes them: a writable snapshot is an overlay whose upper directory is its own and whose lower
//! directories are its ancestors' (nearest first); with no ancestor it is a bind mount of its own
//! directory; a view of one ancestor is a read-only bind mount of it. A lazily mounted image is
//! one lower directory: its FUSE mount.

use std::path::{Path, PathBuf};

/// One mount(2) for containerd to make (containerd.types.Mount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `overlay` or `bind`.
    pub kind: String,
    /// Source: a directory for bind mounts, `overlay` for overlays.
    pub source: String,
    /// mount(8) options.
    pub options: Vec<String>,
}

/// What a snapshot's mounts are made of.
#[derive(Debug)]
pub struct Layers<'a> {
    /// The snapshot's own directory (`fs`).
    pub upper: &'a Path,
    /// Its overlay work directory (writable snapshots only).
    pub work: &'a Path,
    /// Lower directories, nearest ancestor first.
    pub lowers: &'a [PathBuf],
    /// A writable snapshot (else a read-only view).
    pub writable: bool,
    /// Add `index=off` (the kernel's overlay has the index feature; containerd turns it off so
    /// that lower directories may be shared by many overlays).
    pub index_off: bool,
}

/// The mounts of a snapshot.
pub fn mounts(l: &Layers<'_>) -> Vec<Mount> {
    let bind = |dir: &Path, rw: bool| Mount {
        kind: "bind".into(),
        source: dir.display().to_string(),
        options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
    };
    if l.lowers.is_empty() {
        return vec![bind(l.upper, l.writable)];
    }
    if !l.writable && l.lowers.len() == 1 {
        return vec![bind(&l.lowers[0], false)];
    }
    let mut options = Vec::new();
    if l.index_off {
        options.push("index=off".to_string());
    }
    if l.writable {
        options.push(format!("workdir={}", l.work.display()));
        options.push(format!("upperdir={}", l.upper.display()));
    }
    let lower: Vec<String> = l.lowers.iter().map(|p| p.display().to_string()).collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }]
}

/// Whether this kernel's overlay has the index feature (then containerd's `index=off` applies).
pub fn kernel_has_overlay_index() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_follow_containerds_overlay_snapshotter() {
        let up = Path::new("/r/snapshots/3/fs");
        let work = Path::new("/r/snapshots/3/work");
        let l = |lowers: &[PathBuf], writable| {
            mounts(&Layers {
                upper: up,
                work,
                lowers,
                writable,
                index_off: true,
            })
        };
        let m = l(&[], true);
        assert_eq!(
            (m[0].kind.as_str(), m[0].options[0].as_str()),
            ("bind", "rw")
        );
        let v = l(&[PathBuf::from("/img/mnt")], false);
        assert_eq!(
            (
                v[0].kind.as_str(),
                v[0].source.as_str(),
                v[0].options[0].as_str()
            ),
            ("bind", "/img/mnt", "ro")
        );
        let two = [PathBuf::from("/a"), PathBuf::from("/b")];
        assert_eq!(
            l(&two, true)[0].options,
            [
                "index=off",
                "workdir=/r/snapshots/3/work",
                "upperdir=/r/snapshots/3/fs",
                "lowerdir=/a:/b"
            ]
        );
        assert_eq!(l(&two, false)[0].options, ["index=off", "lowerdir=/a:/b"]);
    }
}
