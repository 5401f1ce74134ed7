//! Shoal's image format: the Merkle-tree bootstrap, the chunk table, data blobs with piece tables,
//! and the builder that converts OCI layers into them.
//!
//! The byte-for-byte layout is specified in docs/format.md; this crate is its only implementation.

pub mod error;
pub mod model;

pub use error::{Error, Result};
