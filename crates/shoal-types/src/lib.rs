//! The identities every Shoal component shares, defined once: a blob's [`Digest`], a blob's
//! [`PieceSet`] and a node's [`HostId`].
//!
//! This crate is a leaf: it knows nothing of the wire, the disk or the network. The protocol
//! (shoal-proto) carries these types as they are, the store (shoal-store) keys its files by
//! them, and the scheduler, the peer and the filesystem pass them around unconverted; only the
//! edge to oci-spec (the origins) converts. Words mean one thing on every type: `len` is how
//! many there are (pieces in the blob), `held` how many are present.

mod digest;
mod error;
mod host;
mod pieces;

pub use digest::Digest;
pub use error::IdError;
pub use host::{HostId, MAX_HOST_ID_LEN};
pub use pieces::PieceSet;
