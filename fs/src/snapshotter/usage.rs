//! Disk usage of a directory tree, as containerd's snapshotters report it: allocated bytes and
//! inodes, hardlinks counted once, other filesystems mounted inside not entered.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::state::Usage;

/// Usage of the tree at `root` (0 when it does not exist).
pub fn disk_usage(root: &Path) -> Usage {
    let mut usage = Usage::default();
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return usage;
    };
    let dev = top.dev();
    let mut seen = HashSet::new();
    let mut stack = vec![(root.to_path_buf(), top)];
    while let Some((path, meta)) = stack.pop() {
        if meta.dev() != dev || !seen.insert(meta.ino()) {
            continue;
        }
        usage.inodes += 1;
        usage.size += meta.blocks() * 512;
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(&path) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(m) = entry.metadata() {
                    stack.push((entry.path(), m));
                }
            }
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 100_000]).unwrap();
        let one = disk_usage(dir.path());
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let two = disk_usage(dir.path());
        assert_eq!(one, two);
        assert_eq!(one.inodes, 2);
        assert!(one.size >= 100_000);
        assert_eq!(disk_usage(&dir.path().join("none")), Usage::default());
    }
}
