//! Unit tests of the rejection paths of bootstrap validation: each builds the bad bytes (through
//! the unvalidated writer, or by editing a good bootstrap and resealing it) and checks the error.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::encode::write;
use super::layout::{
    BlobRecord, ChunkRecord, DirentRecord, Header, InodeRecord, Section, XattrRecord, HEADER_SIZE,
};
use super::{encode, seal, Bootstrap};
use crate::merkle;
use crate::model::*;
use crate::Error;

const DIR: u32 = 0o040_755;
const REG: u32 = 0o100_644;
const CS: u32 = 64 << 10;

fn inode(mode: u32, nlink: u32, payload: Payload) -> Inode {
    Inode {
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 5,
        nlink,
        xattrs: Vec::new(),
        payload,
        hash: [0; 32],
    }
}

fn dir_mut(meta: &mut ImageMeta, ino: usize) -> &mut Vec<DirEntry> {
    match &mut meta.inodes[ino].payload {
        Payload::Dir(e) => e,
        _ => panic!("inode {ino} is not a directory"),
    }
}

fn file_mut(meta: &mut ImageMeta, ino: usize) -> &mut FileData {
    match &mut meta.inodes[ino].payload {
        Payload::File(f) => f,
        _ => panic!("inode {ino} is not a file"),
    }
}

fn ent(name: &[u8], inode: u32) -> DirEntry {
    DirEntry {
        name: name.to_vec(),
        inode,
    }
}

/// `/` (xattrs) with `d/` holding `f` (2 chunks, also hardlinked as `/h`), `l` -> `d/f`,
/// char device `c`, fifo `p`; one blob of 3 pieces.
fn sample() -> ImageMeta {
    let mut root = inode(
        DIR,
        3,
        Payload::Dir(vec![
            ent(b"c", 4),
            ent(b"d", 1),
            ent(b"h", 2),
            ent(b"l", 3),
            ent(b"p", 5),
        ]),
    );
    root.xattrs = vec![
        (b"trusted.a".to_vec(), b"1".to_vec()),
        (b"user.b".to_vec(), vec![]),
    ];
    let chunk = |n: u8, offset, size| ChunkInfo {
        hash: [n; 32],
        blob: 0,
        offset,
        stored_size: size,
        size,
        encoding: ChunkEncoding::Raw,
    };
    let mut meta = ImageMeta {
        chunk_size: CS,
        blobs: vec![BlobInfo {
            digest: [7; 32],
            size: 3 * 4096 - 1,
            piece_size: 4096,
            pieces: vec![[1; 32], [2; 32], [3; 32]],
        }],
        chunks: vec![chunk(1, 0, 100), chunk(2, 100, CS)],
        inodes: vec![
            root,
            inode(DIR, 2, Payload::Dir(vec![ent(b"f", 2)])),
            inode(
                REG,
                2,
                Payload::File(FileData {
                    size: u64::from(CS) + 100,
                    chunks: vec![1, 0],
                }),
            ),
            inode(0o120_777, 1, Payload::Symlink(b"d/f".to_vec())),
            inode(0o020_600, 1, Payload::Device(0x0501)),
            inode(0o010_644, 1, Payload::Special),
        ],
        prefetch: vec![2],
        checkpoints: Vec::new(),
    };
    // Chunk 1 (CS bytes) first, then chunk 0 (100 bytes): sizes match the file.
    meta.chunks[0].offset = 0;
    meta.chunks[0].size = 100;
    meta.chunks[0].stored_size = 100;
    meta.chunks[1].offset = 100;
    meta.blobs[0].size = 100 + u64::from(CS);
    meta.blobs[0].pieces = vec![[1; 32]; (100 + CS as usize).div_ceil(4096)];
    merkle::compute(&mut meta).unwrap();
    meta
}

/// Load the unvalidated encoding of `meta` and return the error message.
fn rejected(meta: &ImageMeta) -> String {
    let err = Bootstrap::load(write(meta).unwrap()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidBootstrap(_)),
        "unexpected error kind: {err:?}"
    );
    err.to_string()
}

fn assert_rejected(meta: &ImageMeta, needle: &str) {
    let msg = rejected(meta);
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
}

/// Edit a good bootstrap, reseal it, and return the load error message.
fn edited(edit: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut bytes = encode(&sample()).unwrap();
    edit(&mut bytes);
    seal(&mut bytes);
    Bootstrap::load(bytes).unwrap_err().to_string()
}

fn header_mut(bytes: &mut [u8]) -> &mut Header {
    Header::mut_from_prefix(bytes).unwrap().0
}

fn record_mut<T: FromBytes + IntoBytes + KnownLayout + Immutable>(
    bytes: &mut [u8],
    s: Section,
    index: usize,
) -> &mut T {
    let offset = header_mut(bytes).sections[s as usize].offset.get() as usize;
    let size = size_of::<T>();
    let at = offset + index * size;
    T::mut_from_bytes(&mut bytes[at..at + size]).unwrap()
}

#[test]
fn sample_round_trips() {
    let meta = sample();
    let bs = Bootstrap::load(encode(&meta).unwrap()).unwrap();
    assert_eq!(bs.to_meta(), meta);
    assert_eq!(bs.lookup(0, b"d").unwrap(), Some(1));
    assert_eq!(bs.lookup(0, b"e").unwrap(), None);
    assert_eq!(bs.read_link(3).unwrap(), b"d/f");
    assert_eq!(bs.xattr(0, b"user.b").unwrap(), Some(&b""[..]));
    assert_eq!(bs.inode(4).unwrap().rdev(), 0x0501);
    let names: Vec<_> = bs.read_dir(0, 3).unwrap().map(|e| e.name).collect();
    assert_eq!(names, [&b"l"[..], b"p"]);
    assert!(matches!(
        bs.read_dir(2, 0),
        Err(Error::WrongKind { ino: 2, .. })
    ));
    assert!(matches!(
        bs.file_chunks(99),
        Err(Error::NoSuchInode { ino: 99, .. })
    ));
}

#[test]
fn header_problems() {
    let good = encode(&sample()).unwrap();
    let msg = Bootstrap::load(good[..100].to_vec())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("shorter than the 256-byte header"), "{msg}");
    let msg = Bootstrap::load(good[..good.len() - 1].to_vec())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("truncated or padded"), "{msg}");
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(matches!(
        Bootstrap::load(flipped),
        Err(Error::ChecksumMismatch { .. })
    ));
    let mut future = good.clone();
    header_mut(&mut future).major = U16::new(2);
    assert!(matches!(
        Bootstrap::load(future),
        Err(Error::UnsupportedVersion { major: 2, .. })
    ));
    assert!(edited(|b| b[0] = b'X').contains("bad magic"));
    assert!(edited(|b| header_mut(b).flags = U64::new(4)).contains("unknown incompatible flags"));
    assert!(edited(|b| header_mut(b).root_hash = [9; 32]).contains("header root hash"));
    assert!(edited(|b| header_mut(b).header_size = U32::new(8)).contains("header size 8"));
}

#[test]
fn chunk_size_must_be_a_power_of_two_in_range() {
    for cs in [100_000, 32 << 10, 32 << 20] {
        let mut meta = sample();
        meta.chunk_size = cs;
        assert_rejected(&meta, &format!("chunk size {cs} is not a power of two"));
    }
}

#[test]
fn section_problems() {
    let msg = edited(|b| {
        let h = header_mut(b);
        let off = h.sections[Section::Dirents as usize].offset.get();
        h.sections[Section::Dirents as usize].offset = U64::new(off - 4);
    });
    assert!(msg.contains("section dirents starts at byte"), "{msg}");
    let msg =
        edited(|b| header_mut(b).sections[Section::Inodes as usize].count = U64::new(1 << 31));
    assert!(msg.contains("runs past the end"), "{msg}");
    let msg =
        edited(|b| header_mut(b).sections[Section::Pieces as usize].count = U64::new(u64::MAX));
    assert!(msg.contains("over the 2^32 limit"), "{msg}");
    let msg = edited(|b| {
        b.extend_from_slice(&[0; 8]);
        let len = b.len() as u64;
        header_mut(b).total_size = U64::new(len);
    });
    assert!(msg.contains("8 unaccounted bytes"), "{msg}");
    let msg = edited(|b| {
        let h = header_mut(b);
        h.sections[Section::Strings as usize].offset = U64::new(HEADER_SIZE as u64);
    });
    assert!(msg.contains("section strings starts at byte"), "{msg}");
}

#[test]
fn bad_names() {
    for (name, problem) in [
        (&b"a/b"[..], "contains '/'"),
        (b"a\0", "contains NUL"),
        (b".", "is . or .."),
        (b"..", "is . or .."),
        (b"", "empty name"),
    ] {
        let mut meta = sample();
        dir_mut(&mut meta, 1)[0].name = name.to_vec();
        assert_rejected(&meta, problem);
    }
    let mut meta = sample();
    dir_mut(&mut meta, 1)[0].name = vec![b'x'; 256];
    assert_rejected(&meta, "over 255 bytes");
}

#[test]
fn unsorted_and_duplicate_entries() {
    let mut meta = sample();
    dir_mut(&mut meta, 0).swap(0, 1);
    assert_rejected(&meta, "not sorted: comes after \"d\"");
    let mut meta = sample();
    dir_mut(&mut meta, 0)[1].name = b"c".to_vec();
    assert_rejected(&meta, "duplicate name");
}

#[test]
fn graph_problems() {
    // Entry pointing past the inode table.
    let mut meta = sample();
    dir_mut(&mut meta, 0)[0].inode = 77;
    assert_rejected(&meta, "names inode 77, but there are 6 inodes");
    // Entry naming the root: a cycle through `/`.
    let mut meta = sample();
    meta.inodes[1].payload = Payload::Dir(vec![ent(b"f", 2), ent(b"up", 0)]);
    assert_rejected(&meta, "names the root directory");
    // A directory with two names.
    let mut meta = sample();
    dir_mut(&mut meta, 0)[2].inode = 1;
    meta.inodes[0].nlink = 4;
    assert_rejected(&meta, "directory inode 1 is reachable twice");
    // Two directories naming each other, reachable from nowhere.
    let mut meta = sample();
    meta.inodes
        .push(inode(DIR, 3, Payload::Dir(vec![ent(b"b", 7)])));
    meta.inodes
        .push(inode(DIR, 3, Payload::Dir(vec![ent(b"a", 6)])));
    assert_rejected(&meta, "inode 6 is not reachable from the root");
    // An orphan file.
    let mut meta = sample();
    meta.inodes.push(inode(0o010_644, 0, Payload::Special));
    assert_rejected(&meta, "inode 6 is not reachable");
    // Root not a directory.
    let mut meta = sample();
    meta.inodes[0] = inode(0o010_644, 1, Payload::Special);
    assert_rejected(&meta, "root) is not a directory");
}

#[test]
fn link_counts() {
    let mut meta = sample();
    meta.inodes[2].nlink = 1;
    assert_rejected(&meta, "inode 2: nlink is 1, but 2 entries name it");
    let mut meta = sample();
    meta.inodes[0].nlink = 2;
    assert_rejected(&meta, "nlink is 2, expected 3 (2 + 1 subdirectories)");
}

#[test]
fn kind_and_mode_problems() {
    let mut meta = sample();
    meta.inodes[5].mode = 0o000_644;
    assert_rejected(&meta, "mode 0o644 is not a valid file mode");
    let mut meta = sample();
    meta.inodes[5].mode = 0o1_010_644;
    assert_rejected(&meta, "is not a valid file mode");
    // A file whose mode says directory.
    let mut meta = sample();
    meta.inodes[2].mode = DIR;
    assert_rejected(&meta, "directory inode 2");
    // A fifo carrying a size.
    let mut meta = sample();
    meta.inodes[5].payload = Payload::Device(3);
    assert_rejected(&meta, "fifo inode 5: data and size fields are not 0");
    let mut meta = sample();
    meta.inodes[3].payload = Payload::Symlink(b"a\0b".to_vec());
    assert_rejected(&meta, "holds NUL");
    let mut meta = sample();
    meta.inodes[3].payload = Payload::Symlink(Vec::new());
    assert_rejected(&meta, "is empty");
    let mut meta = sample();
    meta.inodes[1].mtime_nsec = 1_000_000_000;
    assert_rejected(&meta, "mtime nanoseconds");
}

#[test]
fn file_chunk_problems() {
    let mut meta = sample();
    file_mut(&mut meta, 2).chunks[1] = 9;
    assert_rejected(&meta, "chunk 1 is chunk record 9, but there are 2 chunks");
    let mut meta = sample();
    file_mut(&mut meta, 2).size = 5;
    assert_rejected(&meta, "2 chunks for 5 bytes (expected 1");
    let mut meta = sample();
    file_mut(&mut meta, 2).chunks = vec![0, 0];
    assert_rejected(&meta, "chunk 0 (record 0) holds 100 bytes, expected 65536");
}

#[test]
fn chunk_and_blob_problems() {
    let mut meta = sample();
    meta.chunks[0].blob = 3;
    assert_rejected(&meta, "chunk 0: blob index 3 out of range (1 blobs)");
    let mut meta = sample();
    meta.chunks[1].offset = u64::MAX - 2;
    assert_rejected(&meta, "chunk 1: bytes");
    let mut meta = sample();
    meta.chunks[0].stored_size = 99;
    assert_rejected(&meta, "raw chunk stores 99 bytes for 100");
    let mut meta = sample();
    meta.chunks[0].size = CS + 1;
    assert_rejected(&meta, "chunk 0: size 65537 is not in 1..=65536");
    let msg = edited(|b| record_mut::<ChunkRecord>(b, Section::Chunks, 0).encoding = 7);
    assert!(msg.contains("unknown encoding 7"), "{msg}");
    let mut meta = sample();
    meta.blobs[0].pieces.pop();
    assert_rejected(
        &meta,
        "16 piece hashes for 65636 bytes in 4096-byte pieces (expected 17)",
    );
    let mut meta = sample();
    meta.blobs[0].piece_size = 5000;
    assert_rejected(&meta, "piece size 5000 is not a power of two");
    let msg = edited(|b| record_mut::<BlobRecord>(b, Section::Blobs, 0).piece_start = U32::new(1));
    assert!(
        msg.contains("piece table starts at hash 1, expected 0"),
        "{msg}"
    );
}

#[test]
fn xattr_problems() {
    let mut meta = sample();
    meta.inodes[0].xattrs.swap(0, 1);
    assert_rejected(&meta, "unsorted xattr name");
    let mut meta = sample();
    meta.inodes[0].xattrs[1].0 = b"trusted.a".to_vec();
    assert_rejected(&meta, "duplicate xattr name");
    let mut meta = sample();
    meta.inodes[0].xattrs[0].0 = b"a\0".to_vec();
    assert_rejected(&meta, "holds NUL");
    let mut meta = sample();
    meta.inodes[0].xattrs[0].1 = vec![0; (64 << 10) + 1];
    assert_rejected(&meta, "over 65536");
    let msg =
        edited(|b| record_mut::<InodeRecord>(b, Section::Inodes, 1).xattr_start = U32::new(3));
    assert!(msg.contains("inode 0: xattr run 0..3"), "{msg}");
    let msg =
        edited(|b| record_mut::<InodeRecord>(b, Section::Inodes, 2).xattr_start = U32::new(1));
    assert!(msg.contains("inode 1: xattr run 2..1"), "{msg}");
    let msg = edited(|b| {
        record_mut::<XattrRecord>(b, Section::Xattrs, 0).key_offset = U32::new(u32::MAX)
    });
    assert!(msg.contains("xattr 0 lies outside"), "{msg}");
}

#[test]
fn range_problems() {
    let msg =
        edited(|b| record_mut::<DirentRecord>(b, Section::Dirents, 0).name_len = U16::new(999));
    assert!(msg.contains("entry 0 lies outside the"), "{msg}");
    let msg = edited(|b| record_mut::<InodeRecord>(b, Section::Inodes, 1).data_start = U32::new(0));
    assert!(
        msg.contains("directory inode 1: entries 0..+1 are not right after"),
        "{msg}"
    );
    let msg = edited(|b| record_mut::<InodeRecord>(b, Section::Inodes, 1).data_count = U32::new(0));
    assert!(msg.contains("1 dirents belong to no directory"), "{msg}");
    let msg = edited(|b| record_mut::<InodeRecord>(b, Section::Inodes, 3).size = U64::new(1 << 40));
    assert!(msg.contains("symlink inode 3: target"), "{msg}");
    let mut meta = sample();
    meta.prefetch = vec![2, 6];
    assert_rejected(&meta, "prefetch entry 1 names inode 6");
}

#[test]
fn encode_reports_meta_errors() {
    let mut meta = sample();
    meta.inodes[2].nlink = 7;
    let err = encode(&meta).unwrap_err();
    assert!(matches!(err, Error::InvalidMeta(_)), "{err:?}");
    meta.inodes.clear();
    assert!(matches!(encode(&meta), Err(Error::InvalidMeta(_))));
}

/// The sample with its 64 KiB chunk as a span of a zstd frame starting at the blob's start, and
/// its 100-byte chunk as a span after a deflate checkpoint whose window is a third chunk.
fn span_sample() -> ImageMeta {
    let mut meta = sample();
    meta.chunks.push(ChunkInfo {
        hash: [3; 32],
        blob: 0,
        offset: 10,
        stored_size: 50,
        size: 32 << 10,
        encoding: ChunkEncoding::Zstd,
    });
    meta.checkpoints = vec![
        Checkpoint {
            blob: 0,
            in_offset: 0,
            out_offset: 0,
            kind: CheckpointKind::ZstdFrame,
        },
        Checkpoint {
            blob: 0,
            in_offset: 60,
            out_offset: 5000,
            kind: CheckpointKind::Deflate { bits: 3, window: 2 },
        },
    ];
    meta.chunks[1].encoding = ChunkEncoding::Span {
        checkpoint: 0,
        skip: 7,
    };
    meta.chunks[1].offset = 0;
    meta.chunks[1].stored_size = 90;
    meta.chunks[0].encoding = ChunkEncoding::Span {
        checkpoint: 1,
        skip: 1 << 40,
    };
    meta.chunks[0].offset = 60;
    meta.chunks[0].stored_size = 40;
    merkle::compute(&mut meta).unwrap();
    meta
}

#[test]
fn spans_round_trip_as_version_1_1_and_converted_images_stay_1_0() {
    let plain = Bootstrap::load(encode(&sample()).unwrap()).unwrap();
    assert_eq!(plain.version(), (1, 0));
    let meta = span_sample();
    let bytes = encode(&meta).unwrap();
    let bs = Bootstrap::load(bytes.clone()).unwrap();
    assert_eq!(bs.version(), (1, 1));
    assert_eq!(header_mut(&mut bytes.clone()).header_size.get(), 288);
    assert_eq!(bs.to_meta(), meta);
    assert_eq!(bs.checkpoint_count(), 2);
    assert_eq!(bs.checkpoint(1), Some(meta.checkpoints[1]));
    let c = bs.file_chunks(2).unwrap().get(1).unwrap();
    assert_eq!(
        c.encoding,
        ChunkEncoding::Span {
            checkpoint: 1,
            skip: 1 << 40
        }
    );
    // The spans flag is incompatible: a reader that does not know it refuses the file.
    assert_ne!(
        header_mut(&mut bytes.clone()).flags.get() & super::layout::FLAG_SPANS,
        0
    );
}

#[test]
fn span_problems() {
    let mut m = span_sample();
    m.chunks[1].encoding = ChunkEncoding::Span {
        checkpoint: 5,
        skip: 0,
    };
    assert_rejected(&m, "checkpoint 5 out of range");
    let mut m = span_sample();
    m.chunks[0].offset = 61;
    assert_rejected(&m, "does not start at checkpoint 1");
    let mut m = span_sample();
    m.checkpoints.swap(0, 1);
    assert_rejected(&m, "not after checkpoint 0");
    let mut m = span_sample();
    m.checkpoints[1].kind = CheckpointKind::Deflate { bits: 9, window: 2 };
    assert_rejected(&m, "9 leftover bits");
    let mut m = span_sample();
    m.checkpoints[1].kind = CheckpointKind::Deflate { bits: 1, window: 1 };
    assert_rejected(&m, "window chunk 1 is a span or over");
    let mut m = span_sample();
    m.checkpoints[1].kind = CheckpointKind::Deflate { bits: 1, window: 9 };
    assert_rejected(&m, "window chunk 9 out of range");
    let mut m = span_sample();
    m.checkpoints[0].in_offset = m.blobs[0].size;
    assert_rejected(&m, "outside blob 0");
    let mut m = span_sample();
    m.checkpoints[0].blob = 3;
    assert_rejected(&m, "blob index 3 out of range");
    let mut m = span_sample();
    m.chunks[1].stored_size = 0;
    assert_rejected(&m, "span chunk stores 0 bytes");

    // Byte edits: an unknown checkpoint kind, a span record on a raw chunk, the flag cleared.
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = encode(&span_sample()).unwrap();
        f(&mut bytes);
        seal(&mut bytes);
        Bootstrap::load(bytes).unwrap_err().to_string()
    };
    let ext = |b: &[u8], i: usize| -> usize {
        let at = HEADER_SIZE + i * 16;
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize
    };
    let msg = edit(&|b| {
        let at = ext(b, 0) + 22;
        b[at] = 7;
    });
    assert!(msg.contains("unknown kind 7"), "{msg}");
    let msg = edit(&|b| {
        let at = ext(b, 1) + 2 * 16 + 8;
        b[at] = 1;
    });
    assert!(msg.contains("chunk 2: not a span"), "{msg}");
    let msg = edit(&|b| header_mut(b).flags = U64::new(0));
    assert!(msg.contains("the spans flag is clear"), "{msg}");
    let msg = edit(&|b| header_mut(b).header_size = U32::new(256));
    assert!(msg.contains("below 288"), "{msg}");
    // A span chunk in a 1.0 file (no span records).
    let mut m = sample();
    m.chunks[0].encoding = ChunkEncoding::Span {
        checkpoint: 0,
        skip: 0,
    };
    let mut bytes = write(&m).unwrap();
    // The unvalidated writer made it 1.1 with spans but no checkpoints; drop to 1.0's shape by
    // checking the loader's message instead.
    seal(&mut bytes);
    let msg = Bootstrap::load(bytes).unwrap_err().to_string();
    assert!(msg.contains("checkpoint 0 out of range"), "{msg}");
}
