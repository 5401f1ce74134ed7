//! Fuzz the bootstrap loader: load arbitrary bytes, and walk whatever loads through every accessor.
//!
//! The first input byte picks whether the checksum is recomputed first (odd) so mutations reach
//! the structural checks; the rest is the bootstrap. Seed the corpus with a real one: byte 0x01
//! followed by a bootstrap written by `shoal image convert`, in `corpus/bootstrap_load/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_format::bootstrap::{encode, seal, Bootstrap, InodeKind};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 {
        seal(&mut bytes);
    }
    let Ok(bs) = Bootstrap::load(bytes) else {
        return;
    };
    walk(&bs);
    let meta = bs.to_meta();
    let again = encode(&meta).expect("a loaded bootstrap re-encodes");
    let reloaded = Bootstrap::load(again).expect("a re-encoded bootstrap loads");
    assert!(reloaded.to_meta() == meta, "round trip changed the image");
});

/// Visit every inode from the root the way the file system does.
fn walk(bs: &Bootstrap) {
    let mut stack = vec![0u32];
    let mut visited = 0u64;
    while let Some(dir) = stack.pop() {
        visited += 1;
        assert!(
            visited <= u64::from(bs.inode_count()),
            "a directory was visited twice"
        );
        for e in bs.read_dir(dir, 0).expect("pushed inodes are directories") {
            assert_eq!(bs.lookup(dir, e.name).expect("lookup"), Some(e.ino));
            let child = bs.inode(e.ino).expect("entries name existing inodes");
            let _ = (
                child.mode(),
                child.uid(),
                child.gid(),
                child.mtime(),
                child.nlink(),
            );
            let _ = (child.size(), child.rdev(), child.hash());
            for (k, v) in bs.xattrs(e.ino).expect("xattrs") {
                assert_eq!(bs.xattr(e.ino, k).expect("xattr"), Some(v));
            }
            match child.kind() {
                InodeKind::Directory => stack.push(e.ino),
                InodeKind::File => {
                    let chunks = bs.file_chunks(e.ino).expect("file chunks");
                    let total: u64 = chunks.iter().map(|c| u64::from(c.size)).sum();
                    assert_eq!(total, child.size());
                    for c in chunks.iter() {
                        assert!(bs.blob(c.blob).is_some());
                    }
                }
                InodeKind::Symlink => {
                    assert_eq!(
                        bs.read_link(e.ino).expect("target").len() as u64,
                        child.size()
                    );
                }
                _ => {}
            }
        }
    }
    for b in bs.blobs() {
        let _ = b.pieces.len();
    }
    for ino in bs.prefetch() {
        assert!(bs.inode(ino).is_some());
    }
}
