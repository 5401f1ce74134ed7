//! The parents of one download: what each holds, how fast it has been, what is in flight to it;
//! choosing the fastest parent for each piece; fetching a piece or a held set over QUIC.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_proto::{
    read_piece, Digest, FailureReason, HostId, PieceErrorCode, PieceRequest, PieceResponse,
    PieceSet,
};

use crate::transport::Transport;

/// Throughput assumed for a parent nobody has measured yet (bytes/s): high, so new parents get tried.
const UNMEASURED_BPS: f64 = 1e9;
/// Weight of the newest sample in the throughput average.
const EWMA_NEW: f64 = 0.3;
/// A parent that answered "not held" for a piece is not asked for it again for this long,
/// whatever its held set says (a seed refuses a piece it has just sent to another peer).
const NOT_HELD_FOR: Duration = Duration::from_secs(1);

/// One parent of a download.
#[derive(Debug)]
pub(crate) struct ParentState {
    pub addresses: Vec<SocketAddr>,
    /// Pieces it is known to hold (pushed through WatchHeld, or polled with HeldPieces).
    pub pieces: Option<PieceSet>,
    /// Whether `pieces` came from the parent itself (then the scheduler's older word on it is
    /// not taken).
    pub own_word: bool,
    /// When the parent's own held set last came: its "not held" answers before that are
    /// superseded by it.
    pub pieces_at: Option<Instant>,
    pub inflight: usize,
    /// Measured bytes per second (EWMA); `None` until the first piece.
    pub bps: Option<f64>,
    /// Do not send it requests before this (it answered busy).
    pub busy_until: Option<Instant>,
    /// Pieces it answered "not held" for in this download, and when it last did.
    pub refused: HashMap<u32, Instant>,
    pub is_seed: bool,
}

/// Why a piece request failed, and whether the parent should be dropped for it.
#[derive(Debug)]
pub(crate) enum FetchFailure {
    /// The parent is unusable for this download: drop and report it.
    Drop(FailureReason, String),
    /// The parent does not hold the piece after all: forget that it does.
    NotHeld,
    /// All slots busy: retry later.
    Busy(Duration),
    /// Cancelled here: another parent delivered the piece first (endgame).
    Cancelled,
}

/// The parents of one download.
#[derive(Debug, Default)]
pub(crate) struct ParentTable {
    parents: HashMap<HostId, ParentState>,
    /// Parents dropped in this download; never used again by it.
    pub excluded: Vec<HostId>,
}

impl ParentTable {
    /// Adds a parent the scheduler named (unless excluded), or updates its addresses, and its
    /// pieces until the parent has sent its own held set.
    pub fn add(
        &mut self,
        host: HostId,
        addresses: Vec<SocketAddr>,
        pieces: Option<PieceSet>,
        is_seed: bool,
        me: &HostId,
    ) {
        if &host == me || self.excluded.contains(&host) {
            return;
        }
        let entry = self.parents.entry(host).or_insert_with(|| ParentState {
            addresses: Vec::new(),
            pieces: None,
            own_word: false,
            pieces_at: None,
            inflight: 0,
            bps: None,
            busy_until: None,
            refused: HashMap::new(),
            is_seed,
        });
        entry.addresses = addresses;
        if let Some(p) = pieces.filter(|p| p.held() > 0 && !entry.own_word) {
            entry.pieces = Some(p);
        }
    }

    /// Drops a parent for the rest of this download.
    pub fn drop_parent(&mut self, host: &HostId) {
        self.parents.remove(host);
        if !self.excluded.contains(host) {
            self.excluded.push(host.clone());
        }
    }

    /// Whether `host` was dropped in this download.
    pub fn is_excluded(&self, host: &HostId) -> bool {
        self.excluded.contains(host)
    }

    /// How many parents are usable.
    pub fn len(&self) -> usize {
        self.parents.len()
    }

    /// How many usable parents are not seeds.
    pub fn peer_count(&self) -> usize {
        self.parents.values().filter(|p| !p.is_seed).count()
    }

    /// This peer's turn to ask a seed for pieces only the seed holds: its rank by host id
    /// among itself and its non-seed parents, and how many they are. Piece i is its turn when
    /// i % count == rank, so peers that know each other split the seed's pieces evenly, each
    /// asked once.
    pub fn seed_turn(&self, me: &HostId) -> (u64, u64) {
        let rank = self
            .parents
            .iter()
            .filter(|(h, p)| !p.is_seed && *h < me)
            .count();
        (rank as u64, self.peer_count() as u64 + 1)
    }

    /// Host ids and addresses of every parent that `keep` (for watching or refreshing held sets).
    pub fn all(&self, keep: impl Fn(&HostId) -> bool) -> Vec<(HostId, Vec<SocketAddr>)> {
        self.parents
            .iter()
            .filter(|(h, _)| keep(h))
            .map(|(h, p)| (h.clone(), p.addresses.clone()))
            .collect()
    }

    /// Parents to ask for the piece table, seeds first (a seed imports the blob, so its table
    /// is the first to be whole), then the others by host id.
    pub fn table_sources(&self) -> Vec<(HostId, Vec<SocketAddr>)> {
        let mut all: Vec<_> = self.parents.iter().collect();
        all.sort_by(|(a, pa), (b, pb)| pb.is_seed.cmp(&pa.is_seed).then_with(|| a.cmp(b)));
        all.into_iter()
            .map(|(h, p)| (h.clone(), p.addresses.clone()))
            .collect()
    }

    /// Whether `host` is a usable parent.
    pub fn contains(&self, host: &HostId) -> bool {
        self.parents.contains_key(host)
    }

    /// Records a held set the parent sent.
    pub fn set_pieces(&mut self, host: &HostId, pieces: PieceSet) {
        if let Some(p) = self.parents.get_mut(host) {
            p.pieces = Some(pieces);
            p.own_word = true;
            p.pieces_at = Some(Instant::now());
        }
    }

    /// Whether some parent is known to hold `index` and has not answered "not held" for it
    /// since its own latest held set (a held set from the scheduler can be older than the
    /// parent's answer; a parent still importing the blob refuses pieces it lists later).
    pub fn anyone_holds(&self, index: u32) -> bool {
        self.parents.values().any(|p| {
            p.pieces.as_ref().is_some_and(|s| s.contains(index))
                && p.refused
                    .get(&index)
                    .is_none_or(|refused| p.pieces_at.is_some_and(|at| at > *refused))
        })
    }

    /// How many parents are known to hold each of the blob's `piece_count` pieces.
    pub fn holder_counts(&self, piece_count: u32) -> Vec<u16> {
        let mut counts = vec![0u16; piece_count as usize];
        for set in self.parents.values().filter_map(|p| p.pieces.as_ref()) {
            for i in set.iter() {
                if let Some(c) = counts.get_mut(i as usize) {
                    *c = c.saturating_add(1);
                }
            }
        }
        counts
    }

    /// The parent fastest for `index` now: holds it, has room, and has the best measured
    /// throughput shared by what is already in flight to it; `avoid` are left out (asked
    /// already). A seed is asked only for pieces no other parent holds, only when `seed_ok`
    /// (this peer's turn for the piece, see swarm.rs), and with half the requests in flight:
    /// its uplink is for pieces nobody else has yet, each sent once if it can be.
    pub fn pick(
        &self,
        index: u32,
        per_parent: usize,
        now: Instant,
        avoid: &[HostId],
        seed_ok: bool,
    ) -> Option<(HostId, Vec<SocketAddr>)> {
        let holds = |p: &ParentState| {
            p.pieces.as_ref().is_some_and(|s| s.contains(index))
                && p.refused
                    .get(&index)
                    .is_none_or(|at| now >= *at + NOT_HELD_FOR)
        };
        let peer_holds = self.parents.values().any(|p| !p.is_seed && holds(p));
        let seed_slots = (per_parent / 2).max(1);
        self.parents
            .iter()
            .filter(|(h, p)| !(avoid.contains(h) || (p.is_seed && (peer_holds || !seed_ok))))
            .filter(|(_, p)| p.inflight < if p.is_seed { seed_slots } else { per_parent })
            .filter(|(_, p)| p.busy_until.is_none_or(|t| t <= now))
            .filter(|(_, p)| holds(p))
            .map(|(h, p)| {
                let bps = p.bps.unwrap_or(UNMEASURED_BPS);
                let seed_penalty = if p.is_seed { 0.9 } else { 1.0 };
                (h, p, bps * seed_penalty / (1.0 + p.inflight as f64))
            })
            .max_by(|a, b| a.2.total_cmp(&b.2))
            .map(|(h, p, _)| (h.clone(), p.addresses.clone()))
    }

    /// Marks a request to `host` started.
    pub fn start(&mut self, host: &HostId) {
        if let Some(p) = self.parents.get_mut(host) {
            p.inflight += 1;
        }
    }

    /// Marks a request to `host` ended; `sample` is (bytes, elapsed) of a success.
    pub fn finish(&mut self, host: &HostId, sample: Option<(u64, Duration)>) {
        if let Some(p) = self.parents.get_mut(host) {
            p.inflight = p.inflight.saturating_sub(1);
            if let Some((bytes, took)) = sample {
                let bps = bytes as f64 / took.as_secs_f64().max(1e-6);
                p.bps = Some(match p.bps {
                    Some(old) => old * (1.0 - EWMA_NEW) + bps * EWMA_NEW,
                    None => bps,
                });
            }
        }
    }

    /// The parent does not hold `index` after all, or will not send it now: it is not asked
    /// for it again for [`NOT_HELD_FOR`], and no longer counts as its holder until a held set
    /// of its own lists the piece again. (Its held set is left alone: a parent that lost the
    /// piece sends a new one, and a seed that only refused it now holds it still.)
    pub fn not_held(&mut self, host: &HostId, index: u32) {
        if let Some(p) = self.parents.get_mut(host) {
            p.refused.insert(index, Instant::now());
        }
    }

    /// The parent is busy until `until`.
    pub fn busy(&mut self, host: &HostId, until: Instant) {
        if let Some(p) = self.parents.get_mut(host) {
            p.busy_until = Some(until);
        }
    }
}

/// Sends `request` to `host` on a new stream (connecting first if needed) and finishes the
/// sending side; returns the connection's codec and the stream the answer comes on. Fails with
/// `Connect` when the parent cannot be reached and `Protocol` when the request cannot be sent.
pub(crate) async fn ask(
    transport: &Transport,
    host: &HostId,
    addrs: &[SocketAddr],
    request: &PieceRequest,
) -> Result<(shoal_proto::Codec, quinn::RecvStream), (FailureReason, String)> {
    let link = transport
        .parent(host, addrs)
        .await
        .map_err(|e| (FailureReason::Connect, e.to_string()))?;
    let (mut send, recv) = link
        .conn
        .open_bi()
        .await
        .map_err(|e| (FailureReason::Connect, e.to_string()))?;
    link.codec
        .write(&mut send, request)
        .await
        .map_err(|e| (FailureReason::Protocol, e.to_string()))?;
    let _ = send.finish();
    Ok((link.codec, recv))
}

/// Fetches piece `index` (`len` bytes) of `blob` from `host`; fails when no byte of it arrives
/// for `timeout` (a slow parent that keeps sending is not a stall, progress.rs). The bytes are
/// not verified here: the caller checks them against the piece table before storing them.
pub(crate) async fn fetch_piece(
    transport: &Transport,
    host: &HostId,
    addrs: &[SocketAddr],
    blob: Digest,
    index: u32,
    len: u32,
    timeout: Duration,
) -> Result<Bytes, FetchFailure> {
    // Room for the piece before asking for it, outside the timeout: waiting for our own
    // memory is not the parent's fault. The room goes with the bytes to the store (budget.rs).
    let room = transport.budget().download(u64::from(len)).await;
    let stamp = super::progress::Stamp::new();
    let attempt = async {
        let (codec, mut recv) = ask(
            transport,
            host,
            addrs,
            &PieceRequest::GetPiece { blob, index },
        )
        .await
        .map_err(|(why, e)| FetchFailure::Drop(why, e))?;
        let io = |e: String| FetchFailure::Drop(FailureReason::Protocol, e);
        let mut recv = super::progress::Progress::new(&mut recv, stamp.clone());
        match read_piece(&codec, &mut recv, &blob, index, len).await {
            Ok(PieceResponse::Piece { bytes, .. }) => Ok(room.attach(Bytes::from(bytes))),
            Ok(PieceResponse::Error(e)) => Err(match e.code {
                PieceErrorCode::NotHeld => FetchFailure::NotHeld,
                PieceErrorCode::Busy => FetchFailure::Busy(Duration::from_millis(u64::from(
                    e.retry_after_ms.clamp(10, 5000),
                ))),
                PieceErrorCode::BadRequest | PieceErrorCode::Internal => {
                    FetchFailure::Drop(FailureReason::Refused, e.message)
                }
            }),
            Ok(PieceResponse::Held(_)) => {
                Err(io("answered a piece request with a held set".into()))
            }
            Err(e) => Err(io(e.to_string())),
        }
    };
    match super::progress::until_idle(attempt, &stamp, timeout).await {
        Some(r) => r,
        None => Err(FetchFailure::Drop(
            FailureReason::Timeout,
            format!("no byte of piece {index} for {timeout:?}"),
        )),
    }
}

/// Asks `host` which pieces of `blob` it holds.
pub(crate) async fn fetch_held(
    transport: &Transport,
    host: &HostId,
    addrs: &[SocketAddr],
    blob: Digest,
    count: u32,
    timeout: Duration,
) -> Result<Option<PieceSet>, FetchFailure> {
    let attempt = async {
        let (codec, mut recv) = ask(transport, host, addrs, &PieceRequest::HeldPieces { blob })
            .await
            .map_err(|(why, e)| FetchFailure::Drop(why, e))?;
        let io = |e: String| FetchFailure::Drop(FailureReason::Protocol, e);
        match codec.read::<_, shoal_proto::PieceReply>(&mut recv).await {
            Ok(shoal_proto::PieceReply::Held(set)) => {
                set.check_len(count).map_err(|e| io(e.to_string()))?;
                Ok(Some(set))
            }
            Ok(shoal_proto::PieceReply::Error(_)) => Ok(None),
            Ok(_) => Err(io("answered HeldPieces with something else".into())),
            Err(e) => Err(io(e.to_string())),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        // A late answer to this small question is load (a busy parent, a busy connection, a
        // busy machine), not a dead parent: dropping the parent for it cost a download its only
        // holder and a 60 s stall (docs/benchmarks.md, "Peer memory"). Ask again later; a dead
        // parent shows in connection errors and piece timeouts.
        Err(_) => Err(FetchFailure::Busy(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_that_know_each_other_split_the_seeds_pieces_once_each() {
        let hosts: Vec<HostId> = ["peer-c", "peer-a", "seed", "peer-d", "peer-b"]
            .iter()
            .map(|h| HostId::new(h).unwrap())
            .collect();
        let turns: Vec<(u64, u64)> = hosts
            .iter()
            .filter(|me| me.as_str() != "seed")
            .map(|me| {
                let mut table = ParentTable::default();
                for h in &hosts {
                    table.add(h.clone(), Vec::new(), None, h.as_str() == "seed", me);
                }
                table.seed_turn(me)
            })
            .collect();
        for piece in 0..100u64 {
            let askers = turns.iter().filter(|(rank, n)| piece % n == *rank).count();
            assert_eq!(askers, 1, "piece {piece}: {turns:?}");
        }
    }

    #[test]
    fn a_refusal_counts_until_the_parents_own_held_set_lists_the_piece_again() {
        let me = HostId::new("me").unwrap();
        let seed = HostId::new("seed").unwrap();
        let mut table = ParentTable::default();
        // The scheduler's word: the seed holds pieces 0 and 1.
        let mut both = PieceSet::empty(4);
        assert!(both.insert(0));
        assert!(both.insert(1));
        table.add(seed.clone(), Vec::new(), Some(both.clone()), true, &me);
        assert!(table.anyone_holds(0));
        // It refuses piece 0 (still importing it): its older word no longer counts.
        std::thread::sleep(Duration::from_millis(2));
        table.not_held(&seed, 0);
        assert!(!table.anyone_holds(0));
        assert!(table.anyone_holds(1));
        // Its own held set, sent after the refusal, lists piece 0 again.
        std::thread::sleep(Duration::from_millis(2));
        table.set_pieces(&seed, both);
        assert!(table.anyone_holds(0));
        // A refusal after that held set counts again.
        std::thread::sleep(Duration::from_millis(2));
        table.not_held(&seed, 0);
        assert!(!table.anyone_holds(0));
    }
}
