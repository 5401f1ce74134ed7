//! Shoal's image format: the Merkle-tree bootstrap, the chunk table, data blobs with piece tables,
//! and the builder that converts OCI layers into them.
//!
//! The byte-for-byte layout is specified in docs/format.md; this crate is its only implementation.

pub mod bootstrap;
pub mod build;
pub mod codec;
pub mod error;
pub mod image;
pub mod index;
mod inflater;
pub mod merkle;
pub mod model;
pub mod oci;
pub mod unpack;
pub mod verify;

pub use error::{Error, Result};
