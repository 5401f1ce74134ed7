//! Property tests of the bootstrap: random valid images round-trip exactly, and damaged bytes are
//! refused without a panic.

use std::collections::HashSet;

use proptest::prelude::*;
use shoal_format::bootstrap::{encode, seal, Bootstrap, InodeKind};
use shoal_format::merkle;
use shoal_format::model::*;

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File {
        chunks: u64,
        tail: u32,
        dedup: bool,
        zstd: bool,
    },
    Symlink(Vec<u8>),
    Device {
        rdev: u64,
        block: bool,
    },
    Special {
        fifo: bool,
    },
    Hardlink(u32),
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    parent: u32,
    name: Vec<u8>,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nsec: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![Just(b'a'), Just(b'.'), Just(0xffu8), 1u8..=255],
        1..12,
    )
    .prop_map(|mut n| {
        n.retain(|&b| b != b'/' && b != 0);
        if n.is_empty() || n == b"." || n == b".." {
            n.insert(0, b'x');
        }
        n
    })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Dir),
        5 => (0u64..4, any::<u32>(), any::<bool>(), any::<bool>())
            .prop_map(|(chunks, tail, dedup, zstd)| Kind::File { chunks, tail, dedup, zstd }),
        1 => name().prop_map(Kind::Symlink),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(rdev, block)| Kind::Device { rdev, block }),
        1 => any::<bool>().prop_map(|fifo| Kind::Special { fifo }),
        1 => any::<u32>().prop_map(Kind::Hardlink),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    let xattr = (name(), prop::collection::vec(any::<u8>(), 0..8));
    (
        kind(),
        any::<u32>(),
        name(),
        0u32..0o7777,
        any::<u32>(),
        any::<u32>(),
        any::<i64>(),
        0u32..1_000_000_000,
        prop::collection::vec(xattr, 0..3),
    )
        .prop_map(
            |(kind, parent, name, perm, uid, gid, mtime, nsec, xattrs)| Node {
                kind,
                parent,
                name,
                perm,
                uid,
                gid,
                mtime,
                nsec,
                xattrs,
            },
        )
}

/// Build a valid image from node specs: each node goes into an existing directory.
fn image(shift: u32, nodes: Vec<Node>, blob_count: usize, prefetch: Vec<u32>) -> ImageMeta {
    let cs = 1u32 << shift;
    let mut entries: Vec<Vec<DirEntry>> = vec![Vec::new()];
    let mut names: Vec<HashSet<Vec<u8>>> = vec![HashSet::new()];
    let mut dirs = vec![0u32];
    let mut leaves: Vec<u32> = Vec::new();
    let mut blob_sizes = vec![0u64; blob_count];
    let mut meta = ImageMeta {
        chunk_size: cs,
        blobs: Vec::new(),
        chunks: Vec::new(),
        inodes: vec![inode(
            0o040_755,
            0,
            0,
            0,
            0,
            Vec::new(),
            Payload::Dir(Vec::new()),
        )],
        prefetch: Vec::new(),
        checkpoints: Vec::new(),
    };
    for n in nodes {
        let parent = dirs[n.parent as usize % dirs.len()];
        if !names[parent as usize].insert(n.name.clone()) {
            continue;
        }
        let (mode, payload) = match n.kind {
            Kind::Hardlink(choice) if !leaves.is_empty() => {
                let target = leaves[choice as usize % leaves.len()];
                meta.inodes[target as usize].nlink += 1;
                entries[parent as usize].push(DirEntry {
                    name: n.name,
                    inode: target,
                });
                continue;
            }
            Kind::Hardlink(_) | Kind::Special { fifo: true } => (0o010_000, Payload::Special),
            Kind::Special { fifo: false } => (0o140_000, Payload::Special),
            Kind::Dir => (0o040_000, Payload::Dir(Vec::new())),
            Kind::Symlink(t) => (0o120_000, Payload::Symlink(t)),
            Kind::Device { rdev, block } => (
                if block { 0o060_000 } else { 0o020_000 },
                Payload::Device(rdev),
            ),
            Kind::File {
                chunks,
                tail,
                dedup,
                zstd,
            } => {
                let tail = 1 + tail % cs;
                let size = if chunks == 0 {
                    0
                } else {
                    (chunks - 1) * u64::from(cs) + u64::from(tail)
                };
                let mut list = Vec::new();
                for k in 0..chunks {
                    let csize = if k + 1 < chunks { cs } else { tail };
                    let reuse = meta
                        .chunks
                        .iter()
                        .position(|c| c.size == csize)
                        .filter(|_| dedup);
                    let index = reuse.unwrap_or_else(|| {
                        let i = meta.chunks.len();
                        let blob = i % blob_count;
                        let stored = if zstd { csize / 2 + 1 } else { csize };
                        meta.chunks.push(ChunkInfo {
                            hash: *blake3::hash(&(i as u64).to_le_bytes()).as_bytes(),
                            blob: blob as u32,
                            offset: blob_sizes[blob],
                            stored_size: stored,
                            size: csize,
                            encoding: if zstd {
                                ChunkEncoding::Zstd
                            } else {
                                ChunkEncoding::Raw
                            },
                        });
                        blob_sizes[blob] += u64::from(stored);
                        i
                    });
                    list.push(index as u32);
                }
                (0o100_000, Payload::File(FileData { size, chunks: list }))
            }
        };
        let ino = meta.inodes.len() as u32;
        let mut xattrs = n.xattrs;
        xattrs.sort();
        xattrs.dedup_by(|a, b| a.0 == b.0);
        let is_dir = matches!(payload, Payload::Dir(_));
        meta.inodes.push(inode(
            mode | n.perm,
            n.uid,
            n.gid,
            n.mtime,
            n.nsec,
            xattrs,
            payload,
        ));
        entries.push(Vec::new());
        names.push(HashSet::new());
        entries[parent as usize].push(DirEntry {
            name: n.name,
            inode: ino,
        });
        if is_dir {
            dirs.push(ino);
        } else {
            meta.inodes[ino as usize].nlink = 1;
            leaves.push(ino);
        }
    }
    for (ino, mut list) in entries.into_iter().enumerate() {
        if let Payload::Dir(_) = meta.inodes[ino].payload {
            list.sort_by(|a, b| a.name.cmp(&b.name));
            let subdirs = list.iter().filter(|e| dirs.contains(&e.inode)).count() as u32;
            meta.inodes[ino].nlink = 2 + subdirs;
            meta.inodes[ino].payload = Payload::Dir(list);
        }
    }
    for (b, size) in blob_sizes.into_iter().enumerate() {
        let piece_size = 4096u32 << (b % 4);
        let pieces = (0..size.div_ceil(u64::from(piece_size)))
            .map(|p| *blake3::hash(&p.to_le_bytes()).as_bytes())
            .collect();
        meta.blobs.push(BlobInfo {
            digest: [b as u8; 32],
            size,
            piece_size,
            pieces,
        });
    }
    let n = meta.inodes.len() as u32;
    meta.prefetch = prefetch.into_iter().map(|p| p % n).collect();
    merkle::compute(&mut meta).expect("generated images are well formed");
    meta
}

fn inode(
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    payload: Payload,
) -> Inode {
    Inode {
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        nlink: 0,
        xattrs,
        payload,
        hash: [0; 32],
    }
}

fn images() -> impl Strategy<Value = ImageMeta> {
    (
        16u32..=24,
        prop::collection::vec(node(), 0..40),
        1usize..4,
        prop::collection::vec(any::<u32>(), 0..4),
    )
        .prop_map(|(shift, nodes, blobs, prefetch)| image(shift, nodes, blobs, prefetch))
}

/// Read everything a file system would, from the root down; return the inodes seen.
fn walk(bs: &Bootstrap) -> usize {
    let mut seen = 0;
    let mut stack = vec![0u32];
    while let Some(ino) = stack.pop() {
        seen += 1;
        let view = bs.inode(ino).expect("walked inodes exist");
        let _ = (
            view.mode(),
            view.size(),
            view.rdev(),
            view.nlink(),
            view.hash(),
        );
        for (k, v) in bs.xattrs(ino).unwrap() {
            assert_eq!(bs.xattr(ino, k).unwrap(), Some(v));
        }
        match view.kind() {
            InodeKind::Directory => {
                for e in bs.read_dir(ino, 0).unwrap() {
                    assert_eq!(bs.lookup(ino, e.name).unwrap(), Some(e.ino));
                    let child = bs.inode(e.ino).unwrap();
                    if child.kind() == InodeKind::Directory {
                        stack.push(e.ino);
                    } else {
                        seen += 1;
                        let _ = bs.xattrs(e.ino).unwrap().count();
                    }
                    if child.kind() == InodeKind::File {
                        let chunks = bs.file_chunks(e.ino).unwrap();
                        let total: u64 = chunks.iter().map(|c| u64::from(c.size)).sum();
                        assert_eq!(total, child.size());
                    }
                    if child.kind() == InodeKind::Symlink {
                        assert_eq!(bs.read_link(e.ino).unwrap().len() as u64, child.size());
                    }
                }
            }
            other => panic!("only directories are pushed, got {other:?}"),
        }
    }
    for b in bs.blobs() {
        assert_eq!(
            b.pieces.len() as u64,
            b.size.div_ceil(u64::from(b.piece_size))
        );
    }
    seen
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_images_round_trip(meta in images()) {
        let bytes = encode(&meta).unwrap();
        let bs = Bootstrap::load(bytes.clone()).unwrap();
        prop_assert_eq!(bs.to_meta(), meta.clone());
        prop_assert_eq!(bs.root_hash(), meta.inodes[0].hash);
        prop_assert_eq!(merkle::check(&bs.to_meta()).unwrap(), bs.root_hash());
        prop_assert_eq!(encode(&bs.to_meta()).unwrap(), bytes);
        prop_assert!(walk(&bs) >= meta.inodes.len());
    }

    #[test]
    fn any_flipped_byte_is_refused(meta in images(), at in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let mut bytes = encode(&meta).unwrap();
        let i = at.index(bytes.len());
        bytes[i] ^= mask;
        prop_assert!(Bootstrap::load(bytes).is_err());
    }

    #[test]
    fn truncations_are_refused(meta in images(), at in any::<prop::sample::Index>()) {
        let bytes = encode(&meta).unwrap();
        let keep = at.index(bytes.len());
        prop_assert!(Bootstrap::load(bytes[..keep].to_vec()).is_err());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 16 {
            bytes[..8].copy_from_slice(b"SHOALBS\n");
            bytes[8] = 1;
            bytes[9] = 0;
        }
        let _ = Bootstrap::load(bytes);
    }

    /// Edits behind a valid checksum reach the structural checks: never a panic, and whatever
    /// still loads is fully walkable and re-encodes.
    #[test]
    fn resealed_edits_never_panic(
        meta in images(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = encode(&meta).unwrap();
        let body = bytes.len() - 104;
        for (at, value) in edits {
            let i = 104 + at.index(body);
            bytes[i] = value;
        }
        seal(&mut bytes);
        if let Ok(bs) = Bootstrap::load(bytes) {
            walk(&bs);
            let again = bs.to_meta();
            prop_assert!(encode(&again).is_ok());
        }
    }
}
