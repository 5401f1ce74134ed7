//! Byte layout of the bootstrap: header, section table and fixed-size records.
//!
//! Every record is little-endian, unaligned (`Unaligned`), and its size is asserted at compile
//! time; docs/format.md, "Bootstrap", gives the same tables byte for byte.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The first eight bytes of every bootstrap.
pub const MAGIC: [u8; 8] = *b"SHOALBS\n";
/// The major version this build writes and reads; another major is refused.
pub const MAJOR: u16 = 1;
/// The newest minor version this build writes (1.1: checkpoints and span chunks); any minor of
/// [`MAJOR`] is read. A bootstrap without span chunks is written as 1.0.
pub const MINOR: u16 = 1;
/// Size of the 1.0 header; the fields every version has.
pub const HEADER_SIZE: usize = 256;
/// Size of the 1.1 header: the 1.0 header and the references of the two 1.1 sections.
pub const HEADER_SIZE_1_1: usize = HEADER_SIZE + 2 * size_of::<SectionRef>();
/// Byte offset of the checksum field inside the header.
pub const CHECKSUM_OFFSET: usize = 72;
/// Flag bits 0..32 change how the file must be read: a reader refuses any it does not know.
pub const INCOMPATIBLE_FLAGS: u64 = 0xffff_ffff;
/// Incompatible flag (1.1): some chunks are spans of a compressed layer (checkpoints and spans
/// sections); a reader that cannot decode them must refuse the file.
pub const FLAG_SPANS: u64 = 1;
/// Incompatible flags this build understands.
pub const KNOWN_INCOMPATIBLE_FLAGS: u64 = FLAG_SPANS;
/// Largest window of a deflate checkpoint (deflate's 32 KiB history).
pub const MAX_WINDOW: u32 = 32 << 10;

/// Smallest chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Smallest piece size (4 KiB).
pub const MIN_PIECE_SIZE: u32 = 4 << 10;
/// Largest piece size (1 GiB).
pub const MAX_PIECE_SIZE: u32 = 1 << 30;
/// Longest directory entry name (NAME_MAX).
pub const MAX_NAME: usize = 255;
/// Longest extended attribute name (XATTR_NAME_MAX).
pub const MAX_XATTR_NAME: usize = 255;
/// Largest extended attribute value (XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Longest symlink target (PATH_MAX - 1).
pub const MAX_SYMLINK: usize = 4095;

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170_000;
/// Mode bits a bootstrap may carry: file type, set-id, sticky and permission bits.
pub const MODE_MASK: u32 = 0o177_777;

/// Where one section lives: byte offset from the file start and number of records.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct SectionRef {
    /// Byte offset of the first record.
    pub offset: U64,
    /// Number of records (bytes, for the string heap).
    pub count: U64,
}

/// The sections, in the order they are stored; the index into [`Header::sections`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// [`InodeRecord`]s, indexed by inode number.
    Inodes = 0,
    /// [`DirentRecord`]s, each directory's entries contiguous and sorted by name.
    Dirents,
    /// [`XattrRecord`]s, each inode's contiguous and sorted by key.
    Xattrs,
    /// [`ChunkRecord`]s: every unique chunk.
    Chunks,
    /// `u32` chunk indices, each file's contiguous and in file order.
    FileChunks,
    /// [`BlobRecord`]s.
    Blobs,
    /// 32-byte BLAKE3 piece hashes, each blob's contiguous.
    Pieces,
    /// `u32` inode numbers to prefetch, in order.
    Prefetch,
    /// Bytes of names, symlink targets and xattr keys and values.
    Strings,
    /// [`CheckpointRecord`]s (1.1), sorted by blob, then uncompressed offset.
    Checkpoints,
    /// [`SpanRecord`]s (1.1): none, or one per chunk record, in chunk order.
    Spans,
}

/// Number of sections in this version.
pub const SECTION_COUNT: usize = 11;
/// Number of sections of a 1.0 bootstrap (their references are in [`Header::sections`]).
pub const SECTION_COUNT_1_0: usize = 9;

impl Section {
    /// All sections in storage order.
    pub const ALL: [Section; SECTION_COUNT] = [
        Section::Inodes,
        Section::Dirents,
        Section::Xattrs,
        Section::Chunks,
        Section::FileChunks,
        Section::Blobs,
        Section::Pieces,
        Section::Prefetch,
        Section::Strings,
        Section::Checkpoints,
        Section::Spans,
    ];

    /// Size of one record of this section in bytes.
    pub const fn record_size(self) -> usize {
        match self {
            Section::Inodes => size_of::<InodeRecord>(),
            Section::Dirents => size_of::<DirentRecord>(),
            Section::Xattrs => size_of::<XattrRecord>(),
            Section::Chunks => size_of::<ChunkRecord>(),
            Section::FileChunks | Section::Prefetch => size_of::<U32>(),
            Section::Blobs => size_of::<BlobRecord>(),
            Section::Pieces => 32,
            Section::Strings => 1,
            Section::Checkpoints => size_of::<CheckpointRecord>(),
            Section::Spans => size_of::<SpanRecord>(),
        }
    }

    /// The name used in error messages and docs/format.md.
    pub const fn name(self) -> &'static str {
        match self {
            Section::Inodes => "inodes",
            Section::Dirents => "dirents",
            Section::Xattrs => "xattrs",
            Section::Chunks => "chunks",
            Section::FileChunks => "file chunks",
            Section::Blobs => "blobs",
            Section::Pieces => "pieces",
            Section::Prefetch => "prefetch",
            Section::Strings => "strings",
            Section::Checkpoints => "checkpoints",
            Section::Spans => "spans",
        }
    }
}

/// The fixed header at offset 0.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// Major version ([`MAJOR`]).
    pub major: U16,
    /// Minor version.
    pub minor: U16,
    /// Size of the header in bytes; the first section starts here.
    pub header_size: U32,
    /// Feature flags (see [`INCOMPATIBLE_FLAGS`]).
    pub flags: U64,
    /// Length of the whole file in bytes.
    pub total_size: U64,
    /// Uncompressed chunk size of the image.
    pub chunk_size: U32,
    /// Written as zero, ignored on read.
    pub reserved0: U32,
    /// Merkle hash of the root directory: the image's name.
    pub root_hash: [u8; 32],
    /// BLAKE3 of the whole file with this field set to zeros.
    pub checksum: [u8; 32],
    /// Where each 1.0 section lives, in [`Section::ALL`] order (the 1.1 sections' references
    /// follow the 256-byte header).
    pub sections: [SectionRef; SECTION_COUNT_1_0],
    /// Written as zero, ignored on read.
    pub reserved1: [u8; 8],
}

/// One inode (80 bytes); its number is its index.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct InodeRecord {
    /// Merkle hash of this node.
    pub hash: [u8; 32],
    /// Full `st_mode`.
    pub mode: U32,
    /// Owner user id.
    pub uid: U32,
    /// Owner group id.
    pub gid: U32,
    /// Number of names (2 + subdirectories for a directory).
    pub nlink: U32,
    /// Modification time, seconds since the epoch.
    pub mtime: I64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: U32,
    /// First xattr record; this inode's run ends where the next inode's starts.
    pub xattr_start: U32,
    /// Directory: first dirent. File: first file-chunk entry. Symlink: string heap offset.
    pub data_start: U32,
    /// Directory: number of entries. File: number of chunks. Otherwise 0.
    pub data_count: U32,
    /// File: size. Symlink: target length. Device: device number. Otherwise 0.
    pub size: U64,
}

/// One directory entry (12 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct DirentRecord {
    /// Offset of the name in the string heap.
    pub name_offset: U32,
    /// The inode this entry names.
    pub inode: U32,
    /// Length of the name.
    pub name_len: U16,
    /// Written as zero, ignored on read.
    pub reserved: U16,
}

/// One extended attribute (16 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct XattrRecord {
    /// Offset of the key in the string heap.
    pub key_offset: U32,
    /// Offset of the value in the string heap.
    pub value_offset: U32,
    /// Length of the value.
    pub value_len: U32,
    /// Length of the key.
    pub key_len: U16,
    /// Written as zero, ignored on read.
    pub reserved: U16,
}

/// One unique chunk (52 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ChunkRecord {
    /// BLAKE3 of the uncompressed bytes.
    pub hash: [u8; 32],
    /// Offset of the stored form in its blob.
    pub offset: U64,
    /// Length of the stored form.
    pub stored_size: U32,
    /// Uncompressed length.
    pub size: U32,
    /// Index of the blob.
    pub blob: U16,
    /// 0 raw, 1 zstd.
    pub encoding: u8,
    /// Written as zero, ignored on read.
    pub reserved: u8,
}

/// One data blob (56 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct BlobRecord {
    /// sha256 of the blob (its OCI digest).
    pub digest: [u8; 32],
    /// Blob size in bytes.
    pub size: U64,
    /// Piece size in bytes.
    pub piece_size: U32,
    /// Index of the blob's first piece hash.
    pub piece_start: U32,
    /// Number of piece hashes: `ceil(size / piece_size)`.
    pub piece_count: U32,
    /// Written as zero, ignored on read.
    pub reserved: U32,
}

/// One checkpoint of a compressed blob (24 bytes, 1.1).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct CheckpointRecord {
    /// Offset in the blob of the first byte to read from here.
    pub in_offset: U64,
    /// Offset in the uncompressed stream.
    pub out_offset: U64,
    /// Deflate checkpoints: the window's chunk index; otherwise [`NO_WINDOW`].
    pub window: U32,
    /// Index of the compressed blob.
    pub blob: U16,
    /// [`CHECKPOINT_GZIP_MEMBER`], [`CHECKPOINT_DEFLATE`] or [`CHECKPOINT_ZSTD_FRAME`].
    pub kind: u8,
    /// Deflate checkpoints: bits (0..=7) of the byte at `in_offset` still to be read; else 0.
    pub bits: u8,
}

/// Where a span chunk starts decoding (16 bytes, 1.1; one per chunk record).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct SpanRecord {
    /// Span chunks: the checkpoint index; other chunks: 0.
    pub checkpoint: U32,
    /// Written as zero, ignored on read.
    pub reserved: U32,
    /// Span chunks: uncompressed bytes from the checkpoint to the chunk; other chunks: 0.
    pub skip: U64,
}

/// Chunk encoding byte: stored as is.
pub const ENCODING_RAW: u8 = 0;
/// Chunk encoding byte: one zstd frame.
pub const ENCODING_ZSTD: u8 = 1;
/// Chunk encoding byte (1.1): a span of a compressed stream, decoded from its checkpoint.
pub const ENCODING_SPAN: u8 = 2;

/// Checkpoint kind: the start of a gzip member.
pub const CHECKPOINT_GZIP_MEMBER: u8 = 0;
/// Checkpoint kind: a deflate block boundary, with a window and leftover bits.
pub const CHECKPOINT_DEFLATE: u8 = 1;
/// Checkpoint kind: the start of a zstd frame.
pub const CHECKPOINT_ZSTD_FRAME: u8 = 2;
/// `window` of a checkpoint that has none.
pub const NO_WINDOW: u32 = u32::MAX;

const _: () = assert!(size_of::<SectionRef>() == 16);
const _: () = assert!(size_of::<Header>() == HEADER_SIZE);
const _: () = assert!(std::mem::offset_of!(Header, checksum) == CHECKSUM_OFFSET);
const _: () = assert!(std::mem::offset_of!(Header, sections) == 104);
const _: () = assert!(size_of::<InodeRecord>() == 80);
const _: () = assert!(size_of::<DirentRecord>() == 12);
const _: () = assert!(size_of::<XattrRecord>() == 16);
const _: () = assert!(size_of::<ChunkRecord>() == 52);
const _: () = assert!(size_of::<BlobRecord>() == 56);
const _: () = assert!(size_of::<CheckpointRecord>() == 24);
const _: () = assert!(size_of::<SpanRecord>() == 16);
const _: () = assert!(HEADER_SIZE_1_1 == 288);

/// What kind of object an inode is, from the file type bits of its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InodeKind {
    /// A directory.
    Directory,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

impl InodeKind {
    /// The kind named by `mode`'s file type bits, or `None` for an unknown type.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & S_IFMT {
            0o040_000 => InodeKind::Directory,
            0o100_000 => InodeKind::File,
            0o120_000 => InodeKind::Symlink,
            0o020_000 => InodeKind::CharDevice,
            0o060_000 => InodeKind::BlockDevice,
            0o010_000 => InodeKind::Fifo,
            0o140_000 => InodeKind::Socket,
            _ => return None,
        })
    }

    /// A short name for messages.
    pub const fn name(self) -> &'static str {
        match self {
            InodeKind::Directory => "directory",
            InodeKind::File => "regular file",
            InodeKind::Symlink => "symlink",
            InodeKind::CharDevice => "character device",
            InodeKind::BlockDevice => "block device",
            InodeKind::Fifo => "fifo",
            InodeKind::Socket => "socket",
        }
    }
}
