//! The bodies of the shoal-format fuzz targets as plain functions: `cargo +nightly fuzz run`
//! drives them through libFuzzer, and `tests/smoke.rs` runs them on the stable toolchain over the
//! corpus and mutations of it (the CI smoke when no nightly toolchain is at hand).

use shoal_format::bootstrap::{encode, seal, Bootstrap, InodeKind};
use shoal_format::build::scan_layer;
use shoal_format::model::{CheckpointKind, ChunkEncoding};

/// The bootstrap loader (1.0, and 1.1 with checkpoints and span chunks): load arbitrary bytes,
/// walk whatever loads through every accessor, and check that it re-encodes to the same image.
///
/// The first input byte picks whether the checksum is recomputed first (odd) so mutations reach
/// the structural checks; the rest is the bootstrap.
pub fn bootstrap_load(data: &[u8]) {
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
}

/// The tar layer reader: arbitrary bytes as one layer through `build::scan_layer` (reader, path
/// checks, flattening, chunk hashing; nothing written). What a scan reports must be consistent.
pub fn tar_layer(data: &[u8]) {
    // Smallest chunks: more chunk boundaries per input, same code paths.
    if let Ok(s) = scan_layer(data, "fuzz", 64 << 10) {
        assert!(s.files < s.nodes.max(1), "{s:?}: more files than nodes");
        assert!(s.unique_chunks <= s.chunks, "{s:?}");
        // Every chunk holds at least one byte and at most one chunk size.
        assert!(s.chunks <= s.file_bytes, "{s:?}");
        assert!(s.chunks >= s.file_bytes.div_ceil(64 << 10), "{s:?}");
    }
}

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
                        if let ChunkEncoding::Span { checkpoint, .. } = c.encoding {
                            let cp = bs.checkpoint(checkpoint).expect("span checkpoints exist");
                            assert_eq!((cp.blob, cp.in_offset), (c.blob, c.offset));
                        }
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
    for i in 0..bs.checkpoint_count() {
        let cp = bs.checkpoint(i).expect("checkpoint");
        assert!(bs.blob(cp.blob).is_some_and(|b| cp.in_offset < b.size));
        if let CheckpointKind::Deflate { window, .. } = cp.kind {
            let w = bs.chunk(window).expect("windows are chunks");
            assert!(!matches!(w.encoding, ChunkEncoding::Span { .. }));
        }
    }
}
