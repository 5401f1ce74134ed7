//! The peer's one error type: each message names the blob, the parent or the file, and what to do.

/// Everything a peer operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The configuration is invalid.
    #[error("invalid peer configuration: {0}")]
    Config(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] shoal_store::Error),
    /// TLS identity or configuration failed.
    #[error(transparent)]
    Tls(#[from] shoal_tls::TlsError),
    /// A frame or message was refused.
    #[error(transparent)]
    Proto(#[from] shoal_proto::ProtoError),
    /// A host id, digest or piece set broke its rule.
    #[error(transparent)]
    Id(#[from] shoal_proto::IdError),
    /// The origin failed.
    #[error(transparent)]
    Origin(#[from] shoal_origin::OriginError),
    /// A QUIC connection could not be made or broke.
    #[error("QUIC connection to {who} failed: {reason}")]
    Connect {
        /// The other side (host id or address).
        who: String,
        /// What went wrong.
        reason: String,
    },
    /// A parent failed for one piece.
    #[error("parent {parent} failed for piece {piece} of {blob}: {reason}")]
    Parent {
        /// The parent host id.
        parent: String,
        /// The blob.
        blob: String,
        /// The piece index.
        piece: u32,
        /// What went wrong.
        reason: String,
    },
    /// The scheduler could not be reached or refused.
    #[error("scheduler: {0}")]
    Scheduler(String),
    /// An error shared by several waiters (a download's failure, as its readers see it).
    #[error(transparent)]
    Shared(std::sync::Arc<PeerError>),
    /// The download was given up.
    #[error("download of {blob} failed: {reason}")]
    Download {
        /// The blob.
        blob: String,
        /// Why.
        reason: String,
    },
    /// An origin outside an `allowed_origins` list: this peer's, the scheduler's or a seed's
    /// (the message names the entry to add, and where).
    #[error("{0}")]
    NotAllowed(String),
    /// A request (local API, range) was invalid.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A range lies outside the blob.
    #[error("range {start}..{end} is outside {blob} of {size} bytes")]
    RangeNotSatisfiable {
        /// The blob.
        blob: String,
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
        /// The blob's size.
        size: u64,
    },
    /// A file or socket operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or socket.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<shoal_origin::Refusal> for PeerError {
    fn from(r: shoal_origin::Refusal) -> Self {
        PeerError::NotAllowed(r.message)
    }
}

impl PeerError {
    pub(crate) fn io(
        op: &'static str,
        path: impl std::fmt::Display,
        source: std::io::Error,
    ) -> Self {
        PeerError::Io {
            op,
            path: path.to_string(),
            source,
        }
    }

    pub(crate) fn download(blob: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        PeerError::Download {
            blob: blob.to_string(),
            reason: reason.into(),
        }
    }
}
