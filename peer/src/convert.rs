//! The one conversion left at the edge: a blob digest as the origins' oci-spec names it.

use shoal_proto::Digest;

use crate::error::PeerError;

/// The origin's (oci-spec) name for a blob.
pub(crate) fn origin_digest(d: &Digest) -> Result<shoal_origin::Digest, PeerError> {
    shoal_origin::parse_digest(&d.to_string()).map_err(PeerError::from)
}
