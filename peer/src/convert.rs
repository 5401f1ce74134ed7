//! Conversions between the wire types (shoal-proto), the store's types and the origin's types:
//! the same sha256 and the same piece bitmaps under different names.

use shoal_proto::{Digest, PieceSet as WireSet};
use shoal_store::{BlobDigest, PieceSet as StoreSet};

use crate::error::PeerError;

/// The store's name for a blob.
pub(crate) fn store_digest(d: &Digest) -> BlobDigest {
    BlobDigest::from_bytes(*d.as_bytes())
}

/// The origin's (oci-spec) name for a blob.
pub(crate) fn origin_digest(d: &Digest) -> Result<shoal_origin::Digest, PeerError> {
    shoal_origin::parse_digest(&d.to_string()).map_err(PeerError::from)
}

/// A wire piece set with the pieces the store holds.
pub(crate) fn wire_set(held: &StoreSet) -> Result<WireSet, PeerError> {
    let mut set = WireSet::empty(held.len())?;
    for i in held.iter() {
        set.insert(i)?;
    }
    Ok(set)
}
