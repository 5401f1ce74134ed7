//! Seed mode (`shoal peer --seed`): the scheduler orders a seed to fetch a blob from its origin
//! (back-to-source on the swarm's behalf); the seed imports it whole, publishes the piece table it
//! computed, and then serves the pieces like any peer. Seeds keep more cache (see
//! [`crate::PeerConfig::cache_quota`]). An order for an origin outside the seed's own
//! `allowed_origins` is refused before anything is fetched, and the scheduler is told why.

use std::sync::Arc;

use shoal_origin::AllowedOrigins;
use shoal_proto::{ErrorCode, ErrorReply, FetchFromOrigin, SchedulerPush};

use crate::download::Downloader;
use crate::scheduler_client::PushGate;

/// Which pushes this host takes: origin fetch orders only as a seed, and only for origins in
/// `allowed`; parent updates always.
pub(crate) fn push_gate(is_seed: bool, allowed: Arc<AllowedOrigins>) -> PushGate {
    Arc::new(move |push| match push {
        SchedulerPush::FetchFromOrigin(_) if !is_seed => Err(ErrorReply::new(
            ErrorCode::Refused,
            "this peer is not a seed; it fetches from origin only on its own behalf",
        )),
        SchedulerPush::FetchFromOrigin(order) => allowed
            .check_reference(&order.origin.reference)
            .map_err(|r| ErrorReply::new(ErrorCode::Refused, r.message)),
        SchedulerPush::PiecesUpdate(_) => Ok(()),
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_origin::ListOwner;
    use shoal_proto::{Digest, OriginRef, PiecesUpdate, TaskMeta};

    fn order(reference: &str) -> SchedulerPush {
        SchedulerPush::FetchFromOrigin(FetchFromOrigin {
            task: TaskMeta {
                blob: Digest::from_bytes([3; 32]),
                size: 10,
                piece_size: 1 << 20,
            },
            origin: OriginRef {
                reference: reference.into(),
                authorization: None,
            },
        })
    }

    #[test]
    fn seeds_take_orders_for_allowed_origins_only() {
        let list = AllowedOrigins::parse(&["reg.example".into()], ListOwner::Seed).unwrap();
        let gate = push_gate(true, Arc::new(list));
        gate(&order("docker://reg.example/app")).unwrap();
        let e = gate(&order("docker://169.254.169.254/app")).unwrap_err();
        assert_eq!(e.code, ErrorCode::Refused);
        assert!(
            e.message.contains("not an allowed origin of this seed"),
            "{}",
            e.message
        );
        assert!(e.message.contains("allowed_origins"), "{}", e.message);
        let update = SchedulerPush::PiecesUpdate(PiecesUpdate {
            blob: Digest::from_bytes([3; 32]),
            parents: vec![],
            removed: vec![],
        });
        gate(&update).unwrap();
        let not_seed = push_gate(
            false,
            Arc::new(AllowedOrigins::parse(&[], ListOwner::Peer).unwrap()),
        );
        let e = not_seed(&order("docker://reg.example/app")).unwrap_err();
        assert!(e.message.contains("not a seed"), "{}", e.message);
    }
}
