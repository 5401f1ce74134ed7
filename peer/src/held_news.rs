//! News of pieces newly held here, per blob: the piece server's held-set watchers
//! (`PieceRequest::WatchHeld`) wait on it, so children hear of a piece as soon as it is stored
//! or staged instead of at their next poll.

use std::collections::HashMap;
use std::sync::Mutex;

use shoal_proto::Digest;
use tokio::sync::watch;

/// Above this many blobs, those nobody watches any more are forgotten.
const PRUNE_AT: usize = 64;

/// One change counter per watched blob.
#[derive(Debug, Default)]
pub(crate) struct HeldNews(Mutex<HashMap<Digest, watch::Sender<u64>>>);

impl HeldNews {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, watch::Sender<u64>>> {
        crate::sync::lock(&self.0)
    }

    /// Says that `blob` gained pieces here: wakes its watchers.
    pub fn gained(&self, blob: &Digest) {
        if let Some(tx) = self.map().get(blob) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// A receiver that changes whenever `blob` gains pieces here.
    pub fn watch(&self, blob: Digest) -> watch::Receiver<u64> {
        let mut map = self.map();
        if map.len() >= PRUNE_AT {
            map.retain(|_, tx| tx.receiver_count() > 0);
        }
        map.entry(blob)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_hear_of_their_blob_only() {
        let news = HeldNews::default();
        let (a, b) = (Digest::from_bytes([1; 32]), Digest::from_bytes([2; 32]));
        let mut rx = news.watch(a);
        news.gained(&b);
        assert!(!rx.has_changed().unwrap_or(true));
        news.gained(&a);
        assert!(rx.has_changed().unwrap_or(false));
        rx.borrow_and_update();
        // Blobs nobody watches are forgotten once there are many.
        drop(rx);
        for i in 0..PRUNE_AT as u8 {
            drop(news.watch(Digest::from_bytes([i + 3; 32])));
        }
        let _keep = news.watch(b);
        assert!(news.map().len() <= 2);
    }
}
