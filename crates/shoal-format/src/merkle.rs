//! The Merkle tree over an image's inodes: leaves first, then directories deepest first, without
//! recursion. The hash input of every node kind is specified in docs/format.md, "Merkle tree".

use crate::model::{Blake3, ImageMeta, Inode, InodeIndex, Payload};
use crate::{Error, Result};

const TAG_DIR: &[u8] = b"shoal/merkle/v1/dir\0";
const TAG_FILE: &[u8] = b"shoal/merkle/v1/file\0";
const TAG_SYMLINK: &[u8] = b"shoal/merkle/v1/symlink\0";
const TAG_DEVICE: &[u8] = b"shoal/merkle/v1/device\0";
const TAG_SPECIAL: &[u8] = b"shoal/merkle/v1/special\0";

/// Fill every [`Inode::hash`] bottom-up (a hardlinked inode once) and return the root hash.
pub fn compute(meta: &mut ImageMeta) -> Result<Blake3> {
    let walk = Walk::new(meta)?;
    let hashes = hash_tree(meta, &walk, |_, _| Ok(()))?;
    for (inode, h) in meta.inodes.iter_mut().zip(&hashes) {
        inode.hash = *h;
    }
    Ok(hashes.first().copied().unwrap_or_default())
}

/// Recompute every hash; fail naming the path of the first inode whose stored hash is wrong
/// (leaves before directories, so the culprit rather than its ancestors). Returns the root hash.
pub fn check(meta: &ImageMeta) -> Result<Blake3> {
    let walk = Walk::new(meta)?;
    let hashes = hash_tree(meta, &walk, |ino, computed| {
        let stored = meta.inodes.get(ino).map(|i| i.hash).unwrap_or_default();
        if stored == *computed {
            return Ok(());
        }
        Err(Error::MerkleMismatch {
            path: walk.path(meta, ino),
            stored: hex::encode(stored),
            computed: hex::encode(computed),
        })
    })?;
    Ok(hashes.first().copied().unwrap_or_default())
}

/// The directories in breadth-first order and the first name of every inode.
struct Walk {
    dirs: Vec<usize>,
    /// `(parent directory, entry index)`; `NONE` for the root.
    parent: Vec<(usize, usize)>,
}

const NONE: usize = usize::MAX;

fn bad(msg: String) -> Error {
    Error::InvalidMeta(msg)
}

impl Walk {
    /// Walk from the root; refuse dangling entries, a directory named twice, and orphans.
    fn new(meta: &ImageMeta) -> Result<Walk> {
        let n = meta.inodes.len();
        if !matches!(
            meta.inodes.first().map(|i| &i.payload),
            Some(Payload::Dir(_))
        ) {
            return Err(bad("inode 0 must be the root directory".into()));
        }
        let mut walk = Walk {
            dirs: vec![0],
            parent: vec![(NONE, 0); n],
        };
        let mut next = 0;
        while let Some(&dir) = walk.dirs.get(next) {
            next += 1;
            let Some(Payload::Dir(entries)) = meta.inodes.get(dir).map(|i| &i.payload) else {
                continue;
            };
            for (k, e) in entries.iter().enumerate() {
                let target = e.inode as usize;
                let Some(child) = meta.inodes.get(target) else {
                    return Err(bad(format!(
                        "{}/{}: names inode {target}, but there are {n} inodes",
                        walk.path(meta, dir),
                        String::from_utf8_lossy(&e.name)
                    )));
                };
                let is_dir = matches!(child.payload, Payload::Dir(_));
                if target == 0 || (is_dir && walk.parent[target].0 != NONE) {
                    return Err(bad(format!(
                        "{}/{}: directory inode {target} is reachable twice",
                        walk.path(meta, dir),
                        String::from_utf8_lossy(&e.name)
                    )));
                }
                if walk.parent[target].0 == NONE {
                    walk.parent[target] = (dir, k);
                    if is_dir {
                        walk.dirs.push(target);
                    }
                }
            }
        }
        if let Some(orphan) = (1..n).find(|&i| walk.parent[i].0 == NONE) {
            return Err(bad(format!(
                "inode {orphan} is not reachable from the root"
            )));
        }
        Ok(walk)
    }

    /// The first path naming `ino`, for messages.
    fn path(&self, meta: &ImageMeta, ino: usize) -> String {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut at = ino;
        while let Some(&(dir, k)) = self.parent.get(at).filter(|p| p.0 != NONE) {
            if names.len() > self.parent.len() {
                break;
            }
            if let Some(Payload::Dir(entries)) = meta.inodes.get(dir).map(|i| &i.payload) {
                names.push(entries.get(k).map(|e| e.name.as_slice()).unwrap_or(b"?"));
            }
            at = dir;
        }
        let mut path = String::new();
        for name in names.iter().rev() {
            path.push('/');
            path.push_str(&String::from_utf8_lossy(name));
        }
        if path.is_empty() {
            path.push('/');
        }
        path
    }
}

/// Hash every inode in dependency order, calling `visit` with each fresh hash.
fn hash_tree(
    meta: &ImageMeta,
    walk: &Walk,
    mut visit: impl FnMut(usize, &Blake3) -> Result<()>,
) -> Result<Vec<Blake3>> {
    let mut hashes = vec![[0u8; 32]; meta.inodes.len()];
    for (ino, inode) in meta.inodes.iter().enumerate() {
        if matches!(inode.payload, Payload::Dir(_)) {
            continue;
        }
        let h = leaf_hash(meta, ino, inode)?;
        visit(ino, &h)?;
        hashes[ino] = h;
    }
    // Breadth-first order reversed: every subdirectory comes before its parent.
    for &dir in walk.dirs.iter().rev() {
        let Some(inode) = meta.inodes.get(dir) else {
            continue;
        };
        let h = dir_hash(meta, inode, &hashes);
        visit(dir, &h)?;
        hashes[dir] = h;
    }
    Ok(hashes)
}

fn put_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

/// Tag and the fields every node commits to: mode, owner, mtime and xattrs.
fn node_hasher(tag: &[u8], inode: &Inode) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(tag);
    h.update(&inode.mode.to_le_bytes());
    h.update(&inode.uid.to_le_bytes());
    h.update(&inode.gid.to_le_bytes());
    h.update(&inode.mtime.to_le_bytes());
    h.update(&inode.mtime_nsec.to_le_bytes());
    h.update(&(inode.xattrs.len() as u64).to_le_bytes());
    for (key, value) in &inode.xattrs {
        put_bytes(&mut h, key);
        put_bytes(&mut h, value);
    }
    h
}

fn leaf_hash(meta: &ImageMeta, ino: usize, inode: &Inode) -> Result<Blake3> {
    let h = match &inode.payload {
        Payload::File(data) => {
            let mut h = node_hasher(TAG_FILE, inode);
            h.update(&data.size.to_le_bytes());
            h.update(&(data.chunks.len() as u64).to_le_bytes());
            for &c in &data.chunks {
                let chunk = meta.chunks.get(c as usize).ok_or_else(|| {
                    bad(format!(
                        "inode {ino}: chunk index {c} is beyond the {} chunks",
                        meta.chunks.len()
                    ))
                })?;
                h.update(&chunk.hash);
            }
            h
        }
        Payload::Symlink(target) => {
            let mut h = node_hasher(TAG_SYMLINK, inode);
            put_bytes(&mut h, target);
            h
        }
        Payload::Device(rdev) => {
            let mut h = node_hasher(TAG_DEVICE, inode);
            h.update(&rdev.to_le_bytes());
            h
        }
        Payload::Special => node_hasher(TAG_SPECIAL, inode),
        Payload::Dir(_) => return Err(bad(format!("inode {ino}: directory hashed as a leaf"))),
    };
    Ok(*h.finalize().as_bytes())
}

fn dir_hash(meta: &ImageMeta, inode: &Inode, hashes: &[Blake3]) -> Blake3 {
    let mut h = node_hasher(TAG_DIR, inode);
    let entries: &[_] = match &inode.payload {
        Payload::Dir(entries) => entries,
        _ => &[],
    };
    h.update(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        put_bytes(&mut h, &e.name);
        // The walk checked every entry's inode index.
        let child = meta.inodes.get(e.inode as usize);
        h.update(&child.map_or(0, |c| c.mode).to_le_bytes());
        h.update(&child.map_or(0, |c| c.uid).to_le_bytes());
        h.update(&child.map_or(0, |c| c.gid).to_le_bytes());
        h.update(hashes.get(e.inode as usize).unwrap_or(&[0; 32]));
    }
    *h.finalize().as_bytes()
}

/// The first path naming inode `ino` (`"/a/b"`), for callers that report by path.
pub fn path_of(meta: &ImageMeta, ino: InodeIndex) -> Result<String> {
    Ok(Walk::new(meta)?.path(meta, ino as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DirEntry, FileData};

    fn node(mode: u32, nlink: u32, payload: Payload) -> Inode {
        Inode {
            mode,
            uid: 1,
            gid: 2,
            mtime: 3,
            mtime_nsec: 4,
            nlink,
            xattrs: Vec::new(),
            payload,
            hash: [0; 32],
        }
    }

    fn ent(name: &str, inode: u32) -> DirEntry {
        DirEntry {
            name: name.as_bytes().to_vec(),
            inode,
        }
    }

    /// `/a/x` and `/b` are hardlinks to one empty file; `/a/y` is a fifo.
    fn tree() -> ImageMeta {
        ImageMeta {
            chunk_size: 1 << 20,
            blobs: Vec::new(),
            chunks: Vec::new(),
            inodes: vec![
                node(0o040_755, 3, Payload::Dir(vec![ent("a", 1), ent("b", 2)])),
                node(0o040_755, 2, Payload::Dir(vec![ent("x", 2), ent("y", 3)])),
                node(
                    0o100_644,
                    2,
                    Payload::File(FileData {
                        size: 0,
                        chunks: Vec::new(),
                    }),
                ),
                node(0o010_644, 1, Payload::Special),
            ],
            prefetch: Vec::new(),
            checkpoints: Vec::new(),
        }
    }

    #[test]
    fn compute_then_check_agree_and_detect_changes() {
        let mut meta = tree();
        let root = compute(&mut meta).unwrap();
        assert_eq!(meta.inodes[0].hash, root);
        assert_eq!(check(&meta).unwrap(), root);

        // Any committed field changes the root.
        let mut other = meta.clone();
        other.inodes[3]
            .xattrs
            .push((b"user.k".to_vec(), b"v".to_vec()));
        assert_ne!(compute(&mut other).unwrap(), root);
        let mut other = meta.clone();
        other.inodes[3].mtime_nsec += 1;
        assert_ne!(compute(&mut other).unwrap(), root);

        // A stale stored hash is reported at the inode, by path, not at its ancestors.
        let mut stale = meta.clone();
        stale.inodes[3].uid = 99;
        match check(&stale).unwrap_err() {
            Error::MerkleMismatch { path, .. } => assert_eq!(path, "/a/y"),
            other => panic!("unexpected {other:?}"),
        }
        let mut stale = meta.clone();
        stale.inodes[1].hash[0] ^= 1;
        match check(&stale).unwrap_err() {
            Error::MerkleMismatch { path, .. } => assert_eq!(path, "/a"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn hardlinks_are_not_distinguished_from_copies() {
        let mut linked = tree();
        let mut copied = tree();
        copied.inodes[2].nlink = 1;
        let mut copy = copied.inodes[2].clone();
        copy.nlink = 1;
        copied.inodes.push(copy);
        if let Payload::Dir(e) = &mut copied.inodes[0].payload {
            e[1].inode = 4;
        }
        assert_eq!(compute(&mut linked).unwrap(), compute(&mut copied).unwrap());
    }

    #[test]
    fn deep_trees_do_not_recurse() {
        let depth = 200_000u32;
        let mut inodes = Vec::new();
        for i in 0..depth {
            let entries = if i + 1 < depth {
                vec![ent("d", i + 1)]
            } else {
                Vec::new()
            };
            inodes.push(node(
                0o040_755,
                2 + entries.len() as u32,
                Payload::Dir(entries),
            ));
        }
        let mut meta = ImageMeta { inodes, ..tree() };
        let root = compute(&mut meta).unwrap();
        assert_eq!(check(&meta).unwrap(), root);
    }

    #[test]
    fn malformed_graphs_are_errors() {
        let mut meta = tree();
        if let Payload::Dir(e) = &mut meta.inodes[1].payload {
            e.push(ent("z", 0));
        }
        assert!(matches!(compute(&mut meta), Err(Error::InvalidMeta(m)) if m.contains("/a/z")));
        let mut meta = tree();
        meta.inodes.push(node(0o010_644, 1, Payload::Special));
        assert!(matches!(check(&meta), Err(Error::InvalidMeta(m)) if m.contains("inode 4")));
        let mut meta = tree();
        if let Payload::File(f) = &mut meta.inodes[2].payload {
            f.chunks.push(5);
        }
        assert!(
            matches!(compute(&mut meta), Err(Error::InvalidMeta(m)) if m.contains("chunk index 5"))
        );
    }
}
