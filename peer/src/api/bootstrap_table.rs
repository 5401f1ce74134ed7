//! Piece tables of Shoal data blobs, read from the image's bootstrap. A lazy mount asks for
//! ranges of a data blob nobody has fetched whole; with no piece table from the swarm a peer could
//! only import the whole blob to build one, and a lazy start would move the whole image. The
//! mount names the bootstrap it trusts (`bootstrap=sha256:…`, which it checked against the
//! image's manifest); the peer fetches that bootstrap itself (a small plain blob, sha256-checked
//! here), finds the data blob in it and gives the store the blob's layout. The table is exactly as
//! trusted as the bootstrap's digest, and every piece is checked against it as it arrives.

use bytes::BytesMut;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use shoal_proto::{Digest, OriginRef};
use shoal_store::{Blake3Hash, PieceLayout};

use super::{cached, ApiState};
use crate::error::PeerError;

/// Largest bootstrap read for its piece tables.
const MAX_BOOTSTRAP: u64 = 1 << 30;

/// Makes sure the store knows `blob`'s layout, reading it from `bootstrap` when it does not.
pub(super) async fn ensure(
    state: &ApiState,
    blob: Digest,
    bootstrap: Digest,
    origin: Option<OriginRef>,
) -> Result<(), PeerError> {
    if state.store.blob_status(&blob).is_some() || blob == bootstrap {
        return Ok(());
    }
    let task = state.downloader.open(bootstrap, origin).await?;
    let size = task
        .size()
        .ok_or_else(|| PeerError::download(bootstrap, "size unknown"))?;
    if size > MAX_BOOTSTRAP {
        return Err(PeerError::download(
            bootstrap,
            format!("a bootstrap of {size} bytes is over the limit of {MAX_BOOTSTRAP}"),
        ));
    }
    let mut stream = cached::read(&task, &state.store, bootstrap, 0, size, false).await?;
    let mut bytes = BytesMut::with_capacity(size as usize);
    while let Some(part) = stream.next().await {
        bytes.extend_from_slice(&part?);
    }
    if Sha256::digest(&bytes).as_slice() != bootstrap.as_bytes() {
        return Err(PeerError::download(
            bootstrap,
            "the bootstrap's bytes do not match its digest",
        ));
    }
    let boot = shoal_format::bootstrap::Bootstrap::load(bytes.to_vec())
        .map_err(|e| PeerError::download(bootstrap, format!("not a Shoal bootstrap: {e}")))?;
    let Some(entry) = boot.blobs().find(|b| b.digest == *blob.as_bytes()) else {
        return Err(PeerError::BadRequest(format!(
            "bootstrap {bootstrap} does not list blob {blob}"
        )));
    };
    let pieces = entry
        .pieces
        .iter()
        .map(|h| Blake3Hash::from_bytes(*h))
        .collect();
    let layout = PieceLayout::new(&blob, entry.size, entry.piece_size, pieces)?;
    state
        .store
        .ensure_blob(blob, std::sync::Arc::new(layout))
        .await?;
    tracing::info!(%blob, %bootstrap, "piece table of a Shoal data blob taken from its bootstrap");
    Ok(())
}
