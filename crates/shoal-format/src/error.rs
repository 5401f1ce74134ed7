//! The format crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong reading, building or checking an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a named file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done, e.g. "reading layer".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A bootstrap failed validation; the message names the field or record and why.
    #[error("invalid bootstrap: {0}")]
    InvalidBootstrap(String),
    /// A layer entry was refused (path traversal, bad type, over a limit); names the entry.
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    BadEntry {
        /// Which layer (file or digest) held the entry.
        layer: String,
        /// The entry's path as written in the tar.
        entry: String,
        /// Why it was refused.
        reason: String,
    },
    /// A source (`oci:DIR[:TAG]`, directory, tar file) could not be used; says what to fix.
    #[error("source {source_name}: {reason}")]
    BadSource {
        /// The source as given.
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An OCI image layout, manifest or config is malformed or incomplete.
    #[error("OCI layout {path}: {reason}")]
    Oci {
        /// The layout directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A manifest names a Shoal image in a layout this build does not read (the layout of earlier
    /// versions, or Shoal layers that do not add up to an image); says what to do.
    #[error("manifest {manifest}: {reason}")]
    ImageLayout {
        /// The manifest (digest or reference).
        manifest: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Build options were out of range (chunk size, piece size, level, prefetch list).
    #[error("invalid build option: {0}")]
    BadOption(String),
    /// `verify` found a bad object; names it (blob digest, chunk hash and file, inode path).
    #[error("verification failed: {object}: {reason}")]
    Verify {
        /// The bad object: `blob sha256:..`, `chunk <blake3> (file /path)`, `inode /path`.
        object: String,
        /// What did not match.
        reason: String,
    },
    /// `unpack` refused or failed to write a path under the target directory.
    #[error("unpack {path}: {reason}")]
    Unpack {
        /// The path being written.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Image metadata handed to `bootstrap::encode` or `merkle` is malformed; names the inode.
    #[error("invalid image metadata: {0}")]
    InvalidMeta(String),
    /// A bootstrap's major version is not one this build reads.
    #[error("bootstrap version {major}.{minor} is not supported (this build reads major version {supported}); upgrade shoal")]
    UnsupportedVersion {
        /// Major version found in the header.
        major: u16,
        /// Minor version found in the header.
        minor: u16,
        /// The major version this build reads.
        supported: u16,
    },
    /// A bootstrap's BLAKE3 checksum does not match its bytes (corrupt or truncated copy).
    #[error("bootstrap checksum mismatch: header says {stored}, bytes hash to {computed}; fetch the bootstrap again")]
    ChecksumMismatch {
        /// Checksum recorded in the header (hex).
        stored: String,
        /// Checksum of the bytes (hex).
        computed: String,
    },
    /// A Merkle hash stored for an inode differs from the recomputed one; names the inode's path.
    #[error("Merkle hash mismatch at {path}: stored {stored}, computed {computed}")]
    MerkleMismatch {
        /// Path of the first inode whose stored hash is wrong.
        path: String,
        /// The stored hash (hex).
        stored: String,
        /// The recomputed hash (hex).
        computed: String,
    },
    /// An inode number is not in the image.
    #[error("inode {ino} does not exist (the image has {count} inodes)")]
    NoSuchInode {
        /// The inode asked for.
        ino: u32,
        /// How many inodes the image has.
        count: u32,
    },
    /// An operation needs another kind of inode (e.g. `read_dir` on a file).
    #[error("inode {ino} is a {found}, not a {expected}")]
    WrongKind {
        /// The inode asked for.
        ino: u32,
        /// The kind the operation needs.
        expected: &'static str,
        /// The inode's kind.
        found: &'static str,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
