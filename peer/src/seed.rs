//! Seed mode (`shoal peer --seed`): the scheduler orders a seed to fetch a blob from its origin
//! (back-to-source on the swarm's behalf); the seed imports it whole, publishes the piece table it
//! computed, and then serves the pieces like any peer. Seeds keep more cache (see
//! [`crate::PeerConfig::cache_quota`]).

use std::sync::Arc;

use shoal_proto::FetchFromOrigin;

use crate::download::Downloader;

/// Starts the origin fetch the scheduler asked for; progress and failure are reported to the
/// scheduler by the download itself.
pub(crate) fn fetch_from_origin(downloader: &Arc<Downloader>, order: FetchFromOrigin) {
    tracing::info!(blob = %order.task.blob, origin = %order.origin.reference, "seed: fetching from origin on the scheduler's order");
    let task = downloader.fetch_for_scheduler(order.task, order.origin);
    tokio::spawn(async move {
        if let Err(e) = task.fetch_all().await {
            tracing::warn!(blob = %task.blob(), error = %e, "seed: origin fetch failed");
        }
    });
}
