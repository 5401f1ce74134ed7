//! What a request to the local API can fail with.

use std::path::PathBuf;

/// Why a local API request failed; each message names the socket or the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nobody listens on the socket (or it cannot be opened).
    #[error("cannot reach the peer's local API at {socket}: {source} (is `shoal peer` running, and is --api its socket?)")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// What connecting reported.
        source: std::io::Error,
    },
    /// The HTTP exchange broke (the peer went away, or sent something that is not HTTP/1).
    #[error("request to the peer at {socket} failed: {reason}")]
    Http {
        /// The socket path.
        socket: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The peer answered with an error status; `message` is its body (it says what failed).
    #[error("the peer answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The peer's explanation.
        message: String,
    },
    /// The peer's download of the blob failed (the reason it records for the task).
    #[error("the peer's download of {blob} failed: {reason}")]
    Download {
        /// The blob.
        blob: shoal_types::Digest,
        /// Why, as the peer records it.
        reason: String,
    },
    /// The body ended early, broke, ran past what was asked, or was not the JSON expected.
    #[error("bad answer from the peer: {0}")]
    Body(String),
    /// The request cannot be made (an empty range, say).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Writing the fetched blob failed.
    #[error("{action} {path}: {source}")]
    File {
        /// What was being done ("create", "write", "rename into").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl ApiError {
    /// The HTTP status the peer answered with, if it answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The peer refused the request's origin by policy (403: outside its `allowed_origins`, or
    /// the scheduler's or a seed's). Final: fetching the blob around the peer would go around
    /// the operator's decision.
    pub fn is_refused(&self) -> bool {
        self.status() == Some(403)
    }
}
