//! The bootstrap: an image's metadata as one versioned, checksummed, zero-copy binary file.
//!
//! [`encode`] writes an [`ImageMeta`](crate::model::ImageMeta); [`Bootstrap`] validates one in
//! O(size) and reads it in place. The byte layout is docs/format.md, "Bootstrap".

mod encode;
pub mod layout;
mod load;
mod validate;
mod view;

#[cfg(test)]
mod validate_tests;

pub use encode::{encode, seal};
pub use layout::InodeKind;
pub use load::Bootstrap;
pub use view::{BlobView, ChunkView, DirEntryView, FileChunks, InodeView, ReadDir, Xattrs};
