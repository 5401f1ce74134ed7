//! The filesystem's one error type: every message names the image, blob or path and what to do.

use std::path::PathBuf;

/// What can go wrong mounting or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The mount source could not be parsed.
    #[error("mount source {source_name:?}: {reason} (expected docker://HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG] or a bootstrap file with --blob-dir)")]
    BadSource {
        /// What was given.
        source_name: String,
        /// Why it is not usable.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("fs config: {0}")]
    Config(String),
    /// The image's manifest or bootstrap could not be read or did not verify.
    #[error("image {image}: {reason}")]
    Image {
        /// The image source.
        image: String,
        /// What failed.
        reason: String,
    },
    /// Reading the image format failed.
    #[error(transparent)]
    Format(#[from] shoal_format::Error),
    /// The local chunk cache could not be opened.
    #[error("chunk cache: {0}")]
    Store(#[from] shoal_store::Error),
    /// An origin (registry, local directory) failed.
    #[error(transparent)]
    Origin(#[from] shoal_origin::OriginError),
    /// Mounting or unmounting failed.
    #[error("{op} {path}: {source} (is /dev/fuse present and fusermount3 installed? are you root or allowed to mount?)")]
    Mount {
        /// What was being done.
        op: &'static str,
        /// The mountpoint.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// `Result` with [`FsError`].
pub type Result<T, E = FsError> = std::result::Result<T, E>;

impl FsError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FsError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Why a read failed (the reader sees EIO).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The inode is not a regular file.
    #[error("inode {0} is not a regular file")]
    NotFile(u32),
    /// The bootstrap's chunk list does not cover the range (a bootstrap bug; it was validated).
    #[error("inode {ino}: no chunk {index} in its chunk list")]
    MissingChunk {
        /// The inode.
        ino: u32,
        /// The chunk position.
        index: u64,
    },
    /// The bytes did not arrive in time.
    #[error(
        "chunks of blob {blob} did not arrive within {secs} s (network down? origin unreachable?)"
    )]
    Timeout {
        /// The blob.
        blob: String,
        /// The deadline in seconds.
        secs: u64,
    },
    /// Every source failed.
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// The origin served bytes that do not match the chunk's name, twice.
    #[error("chunk {chunk} of blob {blob}: {reason}; refetched from the origin and it failed verification again")]
    Corrupt {
        /// The chunk hash (hex).
        chunk: String,
        /// The blob.
        blob: String,
        /// What was wrong.
        reason: String,
    },
}
