//! The Shoal peer's local API: HTTP/1 over a unix socket (default `/run/shoal/peer.sock`), how
//! `shoal get`, `shoal status`, the FUSE filesystem and the snapshotter ask the local peer for
//! blobs. This crate is the API's contract, shared by both ends: the paths, the JSON answers
//! ([`TaskStatus`], [`CacheStatus`], [`NodeStatus`]), the one builder of Range answers
//! ([`RangeAnswer`], used by the peer's API and its registry proxy), and a [`Client`] that
//! keeps its connections open between requests.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET\|HEAD /blobs/sha256:<hex>?source=docker://HOST/REPO[&bootstrap=sha256:<hex>]` (+ `Range: bytes=a-b`) | 200 / 206 streamed as pieces arrive, 416 outside the blob, 403 for an origin outside `allowed_origins` |
//! | `POST /blobs/sha256:<hex>/fetch?source=...` | fetch the whole blob; its [`TaskStatus`] once complete |
//! | `PUT /blobs/sha256:<hex>/pieces?source=...` (header `Shoal-Piece-Size`, body the pieces' BLAKE3 back to back) | 204: ranges are then fetched piece by piece ([`BlobRequest::offer_pieces`]); 409 when it disagrees with what the peer knows |
//! | `GET /tasks`, `GET /tasks/sha256:<hex>` | [`TaskStatus`] of every download, or of one |
//! | `GET /cache` | [`CacheStatus`] |
//! | `GET /status` | [`NodeStatus`] |
//!
//! `source` names the origin for a blob no peer holds yet; an `Authorization` header is
//! passed on to it. `bootstrap` names the image bootstrap that lists a Shoal data blob: the peer
//! reads the blob's piece table from it, so a range is fetched piece by piece, not whole. A 403
//! is final: the operator's allow-list refused the origin, and reading it around the peer would
//! defeat that ([`ApiError::is_refused`]). Bytes of a blob are verified by the peer before they are sent (every piece
//! against its BLAKE3, and a whole blob against its sha256 before it counts as complete).
//!
//! ```no_run
//! # async fn example() -> Result<(), shoal_api::ApiError> {
//! let peer = shoal_api::Client::new("/run/shoal/peer.sock");
//! let blob: shoal_types::Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".parse().unwrap();
//! // Bytes 0..4096 of a layer, fetched through the swarm (or its registry) if not cached.
//! let head = peer.blob(&blob).source("docker://registry.example/library/app").range(0..4096).read().await?;
//! // The whole blob into a file (renamed into place once complete).
//! let size = peer.blob(&blob).source("docker://registry.example/library/app").to_file("/tmp/layer".as_ref()).await?;
//! # let _ = (head, size); Ok(()) }
//! ```

mod client;
mod error;
mod range;
mod status;

pub use client::{BlobRequest, BlobResponse, ByteStream, Client};
pub use error::ApiError;
pub use range::{parse_range, RangeAnswer, RangeAsk};
pub use status::{CacheStatus, NodeStatus, TaskStatus};

/// The header carrying the piece size of a piece table offered with `PUT .../pieces`.
pub const PIECE_SIZE_HEADER: &str = "shoal-piece-size";

/// The default socket of the local API.
pub const DEFAULT_SOCKET: &str = "/run/shoal/peer.sock";

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The path and query of a blob request:
/// `/blobs/<digest><suffix>[?source=...][&bootstrap=sha256:...]`.
pub fn blob_path(
    blob: &shoal_types::Digest,
    source: Option<&str>,
    bootstrap: Option<&shoal_types::Digest>,
    suffix: &str,
) -> String {
    let mut query = Vec::new();
    if let Some(s) = source {
        query.push(format!("source={}", encode_query(s)));
    }
    if let Some(b) = bootstrap {
        query.push(format!("bootstrap={}", encode_query(&b.to_string())));
    }
    if query.is_empty() {
        format!("/blobs/{blob}{suffix}")
    } else {
        format!("/blobs/{blob}{suffix}?{}", query.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_encode_the_source() {
        let d = shoal_types::Digest::from_bytes([0xab; 32]);
        assert_eq!(
            blob_path(&d, Some("docker://127.0.0.1:5000/a/b c"), None, ""),
            format!("/blobs/{d}?source=docker%3A%2F%2F127.0.0.1%3A5000%2Fa%2Fb%20c")
        );
        assert_eq!(
            blob_path(&d, None, None, "/fetch"),
            format!("/blobs/{d}/fetch")
        );
        let boot = shoal_types::Digest::from_bytes([0x01; 32]);
        assert_eq!(
            blob_path(&d, Some("docker://r/a"), Some(&boot), ""),
            format!(
                "/blobs/{d}?source=docker%3A%2F%2Fr%2Fa&bootstrap=sha256%3A{}",
                "01".repeat(32)
            )
        );
        assert_eq!(
            blob_path(&d, None, Some(&boot), ""),
            format!("/blobs/{d}?bootstrap=sha256%3A{}", "01".repeat(32))
        );
    }
}
