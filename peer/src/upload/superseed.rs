//! Super-seeding: a seed sends each piece to one peer at a time. Another peer that asks for a
//! piece the seed has just sent is told it is not held here, and takes it from the first peer
//! once that one has it; so the seed's uplink, the narrowest point while it imports a blob,
//! carries each piece about once. After [`SEED_RESEND_AFTER`] the piece is sent again (the
//! first peer may be gone or slow).

use std::time::Duration;

use shoal_proto::{Digest, HostId};

/// How long a seed sends a piece to no one but the peer it last sent it to.
pub(crate) const SEED_RESEND_AFTER: Duration = Duration::from_secs(1);
/// Most pieces a seed remembers having just sent.
const ENTRIES: u64 = 1 << 16;

/// The peer each piece was last sent to, for a while.
#[derive(Debug)]
pub(crate) struct SentRecently(moka::sync::Cache<(Digest, u32), HostId>);

impl SentRecently {
    /// Remembers each send for `window`.
    pub fn new(window: Duration) -> Self {
        SentRecently(
            moka::sync::Cache::builder()
                .max_capacity(ENTRIES)
                .time_to_live(window)
                .build(),
        )
    }

    /// Whether piece `index` of `blob` may be sent to `peer` now (no other peer got it within
    /// the window); if so, records that `peer` gets it.
    pub fn claim(&self, blob: Digest, index: u32, peer: &HostId) -> bool {
        let entry = self.0.entry((blob, index)).or_insert_with(|| peer.clone());
        entry.is_fresh() || entry.value() == peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_goes_to_one_peer_per_window() {
        let sent = SentRecently::new(Duration::from_millis(200));
        let blob = Digest::from_bytes([9; 32]);
        let (a, b) = (HostId::new("a").unwrap(), HostId::new("b").unwrap());
        assert!(sent.claim(blob, 0, &a));
        assert!(sent.claim(blob, 0, &a), "the same peer may ask again");
        assert!(!sent.claim(blob, 0, &b), "another peer takes it from a");
        assert!(sent.claim(blob, 1, &b), "other pieces are not held up");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            sent.claim(blob, 0, &b),
            "after the window the seed sends it again"
        );
        assert!(!sent.claim(blob, 0, &a));
    }
}
