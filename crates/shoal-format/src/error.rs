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
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
