//! The store's one error type: each message names the blob, chunk or path and what to do next.

use std::path::PathBuf;
use std::sync::Arc;

/// Result alias for store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A digest or hash from outside is not of the accepted form.
    #[error("invalid key {input:?}: {reason}")]
    InvalidKey {
        /// What was given (cut to 100 characters).
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A piece layout (size, piece size, piece table) is inconsistent.
    #[error("invalid piece layout for {blob}: {reason}")]
    InvalidLayout {
        /// The blob the layout was given for.
        blob: String,
        /// Why it was refused.
        reason: String,
    },
    /// The blob is held with a different piece layout than the one given.
    #[error(
        "{blob} is already stored with a different piece layout; remove it first to replace it"
    )]
    LayoutMismatch {
        /// The blob.
        blob: String,
    },
    /// The blob was never registered with `ensure_blob` (or was evicted): register it, then put pieces.
    #[error("{blob} is not known to the store; register its piece layout first")]
    UnknownBlob {
        /// The blob.
        blob: String,
    },
    /// The item is not (or no longer) in the store: fetch it.
    #[error("{item} is not in the store")]
    NotPresent {
        /// The piece, range or chunk asked for.
        item: String,
    },
    /// Stored bytes failed verification; they were dropped and must be fetched again.
    #[error("{item} failed verification on disk ({path}); dropped it, fetch it again")]
    Corrupt {
        /// The piece or chunk.
        item: String,
        /// The file that held the bad bytes.
        path: PathBuf,
    },
    /// Bytes handed to the store do not match their expected hash: the source sent bad data.
    #[error("{item}: bytes do not match the expected hash; fetch them from another source")]
    HashMismatch {
        /// The piece or chunk.
        item: String,
    },
    /// All pieces were held but the whole blob's sha256 did not match: the piece table was wrong.
    #[error("{blob}: whole-blob sha256 mismatch (got sha256:{actual}); dropped the blob")]
    BlobDigestMismatch {
        /// The blob.
        blob: String,
        /// The digest actually computed.
        actual: String,
    },
    /// `complete_blob` was called before every piece was held.
    #[error("{blob} is missing {missing} of its pieces; fetch them before completing it")]
    Incomplete {
        /// The blob.
        blob: String,
        /// How many pieces are missing.
        missing: u32,
    },
    /// An index, offset or length lies outside the blob, or a size is over the store's limits.
    #[error("{item}: {reason}")]
    OutOfRange {
        /// The piece, range or chunk.
        item: String,
        /// What was out of range.
        reason: String,
    },
    /// Storing this would exceed the quota and nothing more can be evicted (the rest is pinned).
    #[error("quota full: need {needed} bytes, {used} of {high} used and the rest is pinned; serve the bytes without caching them")]
    QuotaFull {
        /// Bytes asked for.
        needed: u64,
        /// Bytes in use.
        used: u64,
        /// The high watermark.
        high: u64,
    },
    /// The disk is full even after evicting: the caller should stream the bytes through uncached.
    #[error("no space left on disk writing {path} ({needed} bytes) even after evicting; serve the bytes without caching them")]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// Bytes being written.
        needed: u64,
    },
    /// The entry is pinned and cannot be removed now.
    #[error("{item} is pinned by a reader; try again after it is released")]
    Pinned {
        /// The blob or chunk.
        item: String,
    },
    /// Another process already uses this store directory.
    #[error("store directory {root} is locked by another process")]
    Locked {
        /// The store root.
        root: PathBuf,
    },
    /// The store directory was written by an incompatible version.
    #[error(
        "store directory {root} has unsupported layout version {found:?}; use a new data directory"
    )]
    UnsupportedVersion {
        /// The store root.
        root: PathBuf,
        /// The version line found.
        found: String,
    },
    /// The store configuration is invalid.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The fetch future given to `get_or_fetch` failed.
    #[error("fetching {item} failed: {source}")]
    Fetch {
        /// The piece or chunk.
        item: String,
        /// The fetcher's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A blocking task of the async wrapper panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
    /// The error of a fetch that several callers shared (single flight).
    #[error(transparent)]
    Shared(Arc<Error>),
}

impl Error {
    /// Builds an [`Error::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The underlying error, looking through [`Error::Shared`].
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(inner) => inner.root(),
            other => other,
        }
    }

    /// True when the item is simply absent (fetch it).
    pub fn is_not_present(&self) -> bool {
        matches!(
            self.root(),
            Error::NotPresent { .. } | Error::UnknownBlob { .. }
        )
    }

    /// True when stored bytes failed verification and were dropped (fetch again).
    pub fn is_corrupt(&self) -> bool {
        matches!(self.root(), Error::Corrupt { .. })
    }

    /// True when the store is out of room: the caller should stream the bytes through uncached.
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self.root(),
            Error::QuotaFull { .. } | Error::DiskFull { .. }
        )
    }

    /// Unwraps an error shared by a single flight when this caller holds the only reference.
    pub(crate) fn from_shared(shared: Arc<Error>) -> Self {
        Arc::try_unwrap(shared).unwrap_or_else(Error::Shared)
    }
}
