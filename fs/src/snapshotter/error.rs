//! The snapshotter's one error type. Each variant maps to the gRPC code containerd turns back
//! into its own error kinds (errdefs): AlreadyExists is how a remote snapshotter tells the unpacker
//! "this layer is already here, do not download it".

use std::path::PathBuf;

/// What can go wrong serving containerd's snapshots API.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    /// No snapshot, parent or image by that name.
    #[error("{0}: not found")]
    NotFound(String),
    /// A snapshot by that name exists (for a Shoal layer: the layer is ready, nothing to fetch).
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the call (e.g. committing a view).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A Shoal image could not be mounted lazily (bootstrap fetch, verification, FUSE mount).
    #[error("lazy image {image}: {reason}")]
    Image {
        /// The image (reference and bootstrap digest).
        image: String,
        /// What failed and what to do.
        reason: String,
    },
    /// The state database failed.
    #[error("snapshotter state {path}: {reason} (the file is the snapshotter's own; restore it from a backup or remove the whole root to start over)")]
    State {
        /// The database file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("snapshotter config: {0}")]
    Config(String),
}

impl SnapshotterError {
    /// An I/O error on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SnapshotterError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The gRPC status containerd maps back to its error kind.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            SnapshotterError::NotFound(_) => Code::NotFound,
            SnapshotterError::AlreadyExists(_) => Code::AlreadyExists,
            SnapshotterError::FailedPrecondition(_) => Code::FailedPrecondition,
            SnapshotterError::InvalidArgument(_) | SnapshotterError::Config(_) => {
                Code::InvalidArgument
            }
            SnapshotterError::Image { .. } => Code::Unavailable,
            SnapshotterError::State { .. } | SnapshotterError::Io { .. } => Code::Internal,
        };
        tonic::Status::new(code, self.to_string())
    }
}

impl From<SnapshotterError> for tonic::Status {
    fn from(e: SnapshotterError) -> Self {
        e.to_status()
    }
}

/// `Result` with [`SnapshotterError`].
pub type Result<T, E = SnapshotterError> = std::result::Result<T, E>;
