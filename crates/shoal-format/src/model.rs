//! The owned, in-memory form of an image's metadata.
//!
//! The builder produces an [`ImageMeta`]; `bootstrap::encode` turns it into the on-disk bootstrap and
//! the loaded bootstrap can be turned back into one (for verify and unpack). The file system reads
//! the bootstrap in place and never builds this form. Layout rules live in docs/format.md.

/// A BLAKE3 digest (chunks, pieces, Merkle nodes).
pub type Blake3 = [u8; 32];

/// A SHA-256 digest (OCI blob identity).
pub type Sha256 = [u8; 32];

/// Index of an inode in [`ImageMeta::inodes`]; the root directory is always index 0.
pub type InodeIndex = u32;

/// Everything the bootstrap records about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    /// Uncompressed chunk size in bytes: a power of two from 64 KiB to 16 MiB.
    pub chunk_size: u32,
    /// The data blobs chunks live in, in the order chunk records refer to them.
    pub blobs: Vec<BlobInfo>,
    /// Every unique chunk, referenced by index from [`FileData::chunks`].
    pub chunks: Vec<ChunkInfo>,
    /// Every inode; index 0 is the root directory. Hardlinks share one inode.
    pub inodes: Vec<Inode>,
    /// Inodes to fetch first after mount, in order (from `--prefetch`).
    pub prefetch: Vec<InodeIndex>,
    /// Where decompression of a compressed layer blob can start (`shoal image index`), in
    /// (blob, uncompressed offset) order; span chunks refer to them. Empty for converted images.
    pub checkpoints: Vec<Checkpoint>,
}

/// One data blob: an OCI blob holding compressed chunks back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// sha256 of the whole blob: its OCI digest.
    pub digest: Sha256,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Piece size in bytes (power of two); the last piece may be shorter.
    pub piece_size: u32,
    /// BLAKE3 of each piece, in order; `ceil(size / piece_size)` entries.
    pub pieces: Vec<Blake3>,
}

/// One unique chunk of file content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// BLAKE3 of the uncompressed bytes: the chunk's name.
    pub hash: Blake3,
    /// Index into [`ImageMeta::blobs`].
    pub blob: u32,
    /// Byte offset of the stored form inside the blob.
    pub offset: u64,
    /// Length of the stored form inside the blob.
    pub stored_size: u32,
    /// Length of the uncompressed chunk.
    pub size: u32,
    /// How the stored form is encoded.
    pub encoding: ChunkEncoding,
}

/// How a chunk is stored in its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkEncoding {
    /// Stored as is (compression did not help, or a byte range of an uncompressed tar layer).
    Raw,
    /// One zstd frame.
    Zstd,
    /// Bytes of a compressed layer stream (gzip or zstd) starting at a checkpoint: decompressed
    /// from there, the first `skip` bytes dropped, the next `size` bytes are the chunk.
    Span {
        /// Index into [`ImageMeta::checkpoints`]; its `in_offset` is the chunk's `offset`.
        checkpoint: u32,
        /// Uncompressed bytes between the checkpoint and the chunk's first byte.
        skip: u64,
    },
}

/// A place in a compressed layer blob where decompression can start (zlib's zran approach for
/// gzip, frame starts for zstd); docs/format.md, "Checkpoints".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Index into [`ImageMeta::blobs`] of the compressed blob.
    pub blob: u32,
    /// Offset in the blob of the first byte a decoder reads from here (for a deflate checkpoint
    /// with `bits > 0`, the byte holding those bits).
    pub in_offset: u64,
    /// Offset in the uncompressed stream (the tar) the decoder is at.
    pub out_offset: u64,
    /// What kind of decoder state starts here.
    pub kind: CheckpointKind,
}

/// The decoder state at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// The start of a gzip member: a gzip header follows.
    GzipMember,
    /// A deflate block boundary inside a gzip member: the first `bits` bits (0..=7, the high
    /// bits of the byte at `in_offset`) are still to be read, and the last 32 KiB of output (the
    /// window) is chunk `window`.
    Deflate {
        /// Bits of the byte at `in_offset` still to be read.
        bits: u8,
        /// Index into [`ImageMeta::chunks`] of the window (raw or zstd, at most 32 KiB).
        window: u32,
    },
    /// The start of a zstd frame.
    ZstdFrame,
}

/// One inode: metadata shared by all its names, and its kind-specific payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Full `st_mode`, file type bits included.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Number of directory entries naming this inode (2 + subdirectories for directories).
    pub nlink: u32,
    /// Extended attributes, sorted by name, names unique.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Kind-specific payload; must agree with the file type bits of `mode`.
    pub payload: Payload,
    /// Merkle hash of this node (docs/format.md, "Merkle tree"); the root's names the image.
    pub hash: Blake3,
}

/// What an inode holds besides its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A directory: entries sorted by name (byte order), no `.` or `..`, names unique.
    Dir(Vec<DirEntry>),
    /// A regular file.
    File(FileData),
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A character or block device (`mode` says which) and its device number.
    Device(u64),
    /// A fifo or socket: nothing beyond the metadata.
    Special,
}

/// One name in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name: no `/`, no NUL, not `.` or `..`, at most 255 bytes.
    pub name: Vec<u8>,
    /// The inode it names.
    pub inode: InodeIndex,
}

/// The content of a regular file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    /// File size in bytes.
    pub size: u64,
    /// Indices into [`ImageMeta::chunks`], in file order; every chunk but the last is `chunk_size`
    /// long. A sparse hole is a chunk of zeros, stored once like any other.
    pub chunks: Vec<u32>,
}
