//! Tasks: one blob, its pieces, and the peers that hold or fetch them.
//!
//! A task's peers live in one vector partitioned so that `peers[..holders]` are the peers that
//! hold at least one counted piece: parent selection samples that prefix and never walks peers
//! that have nothing to give.

use std::cell::Cell;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::config::{SchedulerConfig, MAX_PARENTS};
use crate::error::SchedulerError;
use crate::ids::HostKey;
use shoal_types::Digest;
use shoal_types::PieceSet;

/// Smallest accepted piece size (64 KiB).
pub const MIN_PIECE_SIZE: u32 = 64 * 1024;
/// Largest accepted piece size (64 MiB).
pub const MAX_PIECE_SIZE: u32 = 64 * 1024 * 1024;
/// Most peers one peer can block for one task; older blocks fall out first.
pub const BLOCKED_PER_PEER: usize = 4;
/// Most hosts blocked for a whole task (bad data); further ones replace the oldest.
pub const BLOCKED_PER_TASK: usize = 32;

/// BLAKE3 digest of one piece, as the blob's piece table lists it.
pub type PieceDigest = [u8; 32];

/// Which pieces an announcing peer already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// None yet: the peer is starting the download.
    Nothing,
    /// The whole blob, verified.
    All,
    /// These pieces (a set of the blob's piece count).
    Set(PieceSet),
}

/// A peer's announcement that it takes part in a task (downloads or holds a blob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskAnnouncement {
    /// The blob's digest.
    pub task: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// Piece size in bytes: a power of two from 64 KiB to 64 MiB.
    pub piece_size: u32,
    /// What the peer already holds.
    pub held: Held,
}

/// Where a peer of a task gets its pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerState {
    /// From parents the scheduler names.
    Swarm,
    /// From the origin (a seed on request, or a peer told to go back to source): a source of
    /// every piece as soon as it stores it.
    Origin,
}

/// One peer's part in one task; about 150 bytes plus one bit per piece.
#[derive(Debug)]
pub(crate) struct PeerTask {
    pub host: HostKey,
    pub pieces: PieceSet,
    pub held: u32,
    pub state: PeerState,
    parents: [HostKey; MAX_PARENTS],
    parent_len: u8,
    blocked: [HostKey; BLOCKED_PER_PEER],
    blocked_next: u8,
    /// Blocked for the whole task: its pieces are not counted and it is never a parent.
    pub excluded: bool,
    /// Its last decision was "wait" (counted in the queue-depth gauge).
    pub waiting: bool,
    /// Visit stamp of the cycle check (a 64-bit counter never repeats a stamp).
    pub mark: Cell<u64>,
}

impl PeerTask {
    fn new(host: HostKey, pieces: PieceSet) -> Self {
        Self {
            host,
            held: pieces.held(),
            pieces,
            state: PeerState::Swarm,
            parents: [HostKey::default(); MAX_PARENTS],
            parent_len: 0,
            blocked: [HostKey::default(); BLOCKED_PER_PEER],
            blocked_next: 0,
            excluded: false,
            waiting: false,
            mark: Cell::new(0),
        }
    }

    /// The parents the scheduler last gave this peer.
    pub fn parents(&self) -> &[HostKey] {
        &self.parents[..self.parent_len as usize]
    }

    /// Replaces the parents; returns the old ones (to release their slots).
    pub fn set_parents(&mut self, new: &[HostKey]) -> ([HostKey; MAX_PARENTS], usize) {
        let old = (self.parents, self.parent_len as usize);
        let n = new.len().min(MAX_PARENTS);
        self.parents[..n].copy_from_slice(&new[..n]);
        self.parent_len = n as u8;
        old
    }

    /// Drops one parent (it failed); returns whether it was a parent.
    pub fn drop_parent(&mut self, parent: HostKey) -> bool {
        let len = self.parent_len as usize;
        match self.parents[..len].iter().position(|&p| p == parent) {
            Some(i) => {
                self.parents.copy_within(i + 1..len, i);
                self.parent_len -= 1;
                true
            }
            None => false,
        }
    }

    /// Blocks `parent` for this peer in this task (a ring: the oldest block falls out).
    pub fn block(&mut self, parent: HostKey) {
        if self.is_blocked(parent) {
            return;
        }
        let i = self.blocked_next as usize % BLOCKED_PER_PEER;
        self.blocked[i] = parent;
        self.blocked_next = self.blocked_next.wrapping_add(1);
    }

    /// Whether this peer blocked `parent`.
    #[inline]
    pub fn is_blocked(&self, parent: HostKey) -> bool {
        parent != HostKey::default() && self.blocked.contains(&parent)
    }
}

/// One blob being distributed.
#[derive(Debug)]
pub(crate) struct Task {
    pub id: Digest,
    pub size: u64,
    pub piece_size: u32,
    pub piece_count: u32,
    pub piece_table: Option<Arc<[PieceDigest]>>,
    pub peers: Vec<PeerTask>,
    /// `peers[..holders]` hold at least one counted piece.
    pub holders: usize,
    index: FxHashMap<HostKey, u32>,
    /// Holders per piece (excluded peers not counted).
    avail: Vec<u32>,
    /// Pieces nobody holds.
    pub unavailable: u32,
    /// Peers fetching from the origin now (seeds and back-to-source peers).
    pub origin_fetchers: Vec<HostKey>,
    /// Hosts blocked for the whole task.
    pub blocked: Vec<HostKey>,
    /// Piece hashes streamed by the origin fetcher before the whole table exists.
    pub partial: Option<Box<PartialTable>>,
}

/// Piece hashes one origin fetcher published as the pieces arrived (docs/protocol.md,
/// "Streamed piece hashes"); trusted like a table from that host until the blob's sha256 says
/// otherwise, and dropped with the host.
#[derive(Debug)]
pub(crate) struct PartialTable {
    /// The host that published them.
    pub from: HostKey,
    /// One entry per piece; `None` until published.
    pub hashes: Vec<Option<PieceDigest>>,
}

impl Task {
    /// A task for an announced blob, checked against the config's bounds.
    pub fn new(a: &TaskAnnouncement, config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let piece_count = piece_count(a, config)?;
        Ok(Self {
            id: a.task,
            size: a.size,
            piece_size: a.piece_size,
            piece_count,
            piece_table: None,
            peers: Vec::new(),
            holders: 0,
            index: FxHashMap::default(),
            avail: vec![0; piece_count as usize],
            unavailable: piece_count,
            origin_fetchers: Vec::new(),
            blocked: Vec::new(),
            partial: None,
        })
    }

    /// The slot of `host`'s peer-task.
    #[inline]
    pub fn slot(&self, host: HostKey) -> Option<usize> {
        self.index.get(&host).map(|&s| s as usize)
    }

    /// `host`'s peer-task.
    #[inline]
    pub fn peer(&self, host: HostKey) -> Option<&PeerTask> {
        self.slot(host).and_then(|s| self.peers.get(s))
    }

    /// `host`'s peer-task, mutable.
    pub fn peer_mut(&mut self, host: HostKey) -> Option<&mut PeerTask> {
        let slot = self.slot(host)?;
        self.peers.get_mut(slot)
    }

    /// Whether the task is blocked for `host` as a whole.
    pub fn is_blocked(&self, host: HostKey) -> bool {
        self.blocked.contains(&host)
    }

    fn swap_slots(&mut self, i: usize, j: usize) {
        if i == j {
            return;
        }
        self.peers.swap(i, j);
        for s in [i, j] {
            if let Some(p) = self.peers.get(s) {
                self.index.insert(p.host, s as u32);
            }
        }
    }

    /// Keeps the holder partition right after `slot`'s counted holdings changed.
    fn repartition(&mut self, slot: usize) -> usize {
        let Some(p) = self.peers.get(slot) else {
            return slot;
        };
        let is_holder = p.held > 0 && !p.excluded;
        if is_holder && slot >= self.holders {
            self.swap_slots(slot, self.holders);
            self.holders += 1;
            self.holders - 1
        } else if !is_holder && slot < self.holders {
            self.holders -= 1;
            self.swap_slots(slot, self.holders);
            self.holders
        } else {
            slot
        }
    }

    fn count_in(&mut self, pieces: &PieceSet) {
        for i in pieces.iter() {
            if let Some(a) = self.avail.get_mut(i as usize) {
                if *a == 0 {
                    self.unavailable -= 1;
                }
                *a += 1;
            }
        }
    }

    fn count_out(&mut self, pieces: &PieceSet) {
        for i in pieces.iter() {
            if let Some(a) = self.avail.get_mut(i as usize) {
                *a = a.saturating_sub(1);
                if *a == 0 {
                    self.unavailable += 1;
                }
            }
        }
    }

    /// Adds `host` with the pieces it holds; the caller checked the peer cap.
    pub fn join(&mut self, host: HostKey, pieces: PieceSet) {
        if let Some(slot) = self.slot(host) {
            self.add_set(slot, &pieces);
            return;
        }
        self.count_in(&pieces);
        self.peers.push(PeerTask::new(host, pieces));
        let slot = self.peers.len() - 1;
        self.index.insert(host, slot as u32);
        self.repartition(slot);
    }

    /// Merges a held set into `slot` (pieces only grow); returns how many were new.
    pub fn add_set(&mut self, slot: usize, pieces: &PieceSet) -> u32 {
        let mut new = 0;
        for i in pieces.iter() {
            new += u32::from(self.add_piece(slot, i));
        }
        new
    }

    /// Records that `slot` holds piece `i` (range-checked by the caller); returns whether new.
    pub fn add_piece(&mut self, slot: usize, i: u32) -> bool {
        let Some(p) = self.peers.get_mut(slot) else {
            return false;
        };
        if !p.pieces.insert(i) {
            return false;
        }
        p.held += 1;
        let (first, excluded) = (p.held == 1, p.excluded);
        if !excluded {
            if let Some(a) = self.avail.get_mut(i as usize) {
                if *a == 0 {
                    self.unavailable -= 1;
                }
                *a += 1;
            }
            if first {
                self.repartition(slot);
            }
        }
        true
    }

    /// Records that `slot` no longer holds piece `i` (evicted); returns whether it did.
    pub fn remove_piece(&mut self, slot: usize, i: u32) -> bool {
        let Some(p) = self.peers.get_mut(slot) else {
            return false;
        };
        if !p.pieces.remove(i) {
            return false;
        }
        p.held -= 1;
        let (now_empty, excluded) = (p.held == 0, p.excluded);
        if !excluded {
            if let Some(a) = self.avail.get_mut(i as usize) {
                *a = a.saturating_sub(1);
                if *a == 0 {
                    self.unavailable += 1;
                }
            }
            if now_empty {
                self.repartition(slot);
            }
        }
        true
    }

    /// Removes `host`'s peer-task and its counted pieces; returns it for edge cleanup.
    pub fn remove(&mut self, host: HostKey) -> Option<PeerTask> {
        let slot = self.slot(host)?;
        let excluded = self.peers.get(slot).is_some_and(|p| p.excluded);
        if let Some(p) = self.peers.get_mut(slot) {
            // Marking it excluded first makes repartition move it out of the holder prefix.
            p.excluded = true;
        }
        let slot = self.repartition(slot);
        let last = self.peers.len() - 1;
        self.swap_slots(slot, last);
        let gone = self.peers.pop()?;
        self.index.remove(&host);
        if !excluded {
            self.count_out(&gone.pieces);
        }
        self.origin_fetchers.retain(|&h| h != host);
        self.forget_hashes_of(host);
        Some(gone)
    }

    /// Drops streamed hashes `host` published (it left or was blocked before the table was whole).
    pub fn forget_hashes_of(&mut self, host: HostKey) {
        if self.partial.as_ref().is_some_and(|p| p.from == host) {
            self.partial = None;
        }
    }

    /// Records hashes of pieces `first..` from `host`, an origin fetcher of this task. Another
    /// host's hashes are refused while the first one's stand; a hash that differs from one
    /// already known is refused (the set is left unchanged).
    pub fn add_hashes(
        &mut self,
        host: HostKey,
        first: u32,
        hashes: &[PieceDigest],
    ) -> Result<(), String> {
        let end = u64::from(first) + hashes.len() as u64;
        if end > u64::from(self.piece_count) {
            return Err(format!(
                "hashes for pieces {first}..{end}; the blob has {}",
                self.piece_count
            ));
        }
        if let Some(table) = &self.piece_table {
            let same = table
                .get(first as usize..end as usize)
                .is_some_and(|known| known == hashes);
            return match same {
                true => Ok(()),
                false => Err("hashes differ from the published piece table".into()),
            };
        }
        let count = self.piece_count as usize;
        let partial = self.partial.get_or_insert_with(|| {
            Box::new(PartialTable {
                from: host,
                hashes: vec![None; count],
            })
        });
        if partial.from != host {
            return Err("another origin fetcher publishes this blob's hashes".into());
        }
        let slots = partial
            .hashes
            .get_mut(first as usize..end as usize)
            .ok_or("hash range out of bounds")?;
        if slots
            .iter()
            .zip(hashes)
            .any(|(old, new)| old.is_some_and(|o| o != *new))
        {
            return Err("a piece hash differs from the one published before".into());
        }
        for (slot, h) in slots.iter_mut().zip(hashes) {
            *slot = Some(*h);
        }
        Ok(())
    }

    /// Blocks `host` for the whole task: its pieces stop counting and it is never a parent.
    pub fn exclude(&mut self, host: HostKey) {
        if !self.blocked.contains(&host) {
            if self.blocked.len() >= BLOCKED_PER_TASK {
                self.blocked.remove(0);
            }
            self.blocked.push(host);
        }
        self.origin_fetchers.retain(|&h| h != host);
        self.forget_hashes_of(host);
        let Some(slot) = self.slot(host) else {
            return;
        };
        let Some(p) = self.peers.get_mut(slot) else {
            return;
        };
        if p.excluded {
            return;
        }
        p.excluded = true;
        let pieces = p.pieces.clone();
        self.count_out(&pieces);
        self.repartition(slot);
    }

    /// Whether `host` (a member) holds every piece.
    pub fn is_complete(&self, p: &PeerTask) -> bool {
        p.held >= self.piece_count
    }

    /// Records the blob's piece table; a different table for the same blob is refused.
    pub fn set_piece_table(&mut self, table: Vec<PieceDigest>) -> Result<(), String> {
        if table.len() != self.piece_count as usize {
            return Err(format!(
                "piece table lists {} pieces, the blob has {}",
                table.len(),
                self.piece_count
            ));
        }
        match &self.piece_table {
            Some(known) if **known != *table => {
                Err("piece table differs from the one already published".into())
            }
            Some(_) => Ok(()),
            None => {
                // The whole table supersedes streamed hashes; a streamed hash it contradicts
                // means the publisher's pieces were wrong (the sha256 decides, at every peer).
                self.partial = None;
                self.piece_table = Some(table.into());
                Ok(())
            }
        }
    }

    /// Heap bytes owned by the task's peer bookkeeping (for memory accounting and tests).
    #[cfg(test)]
    pub fn check_invariants(&self) {
        for (s, p) in self.peers.iter().enumerate() {
            assert_eq!(self.index.get(&p.host), Some(&(s as u32)));
            assert_eq!(s < self.holders, p.held > 0 && !p.excluded, "slot {s}");
            assert_eq!(p.held, p.pieces.held());
        }
        assert_eq!(self.index.len(), self.peers.len());
        let zero = self.avail.iter().filter(|&&a| a == 0).count() as u32;
        assert_eq!(zero, self.unavailable);
    }
}

fn piece_count(a: &TaskAnnouncement, config: &SchedulerConfig) -> Result<u32, SchedulerError> {
    let bad = |reason: String| SchedulerError::InvalidTask {
        task: a.task,
        reason,
    };
    if !a.piece_size.is_power_of_two() || !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&a.piece_size)
    {
        return Err(bad(format!(
            "piece size {} is not a power of two from 64 KiB to 64 MiB",
            a.piece_size
        )));
    }
    let count = a.size.div_ceil(u64::from(a.piece_size));
    if count > u64::from(config.max_pieces_per_task) {
        return Err(bad(format!(
            "{count} pieces of {} bytes exceed the limit of {} pieces per blob; use larger pieces",
            a.piece_size, config.max_pieces_per_task
        )));
    }
    Ok(count as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slotmap::SlotMap;

    fn announcement(pieces: u64) -> TaskAnnouncement {
        TaskAnnouncement {
            task: Digest::parse(&format!("sha256:{}", "0".repeat(64)))
                .unwrap_or_else(|e| panic!("{e}")),
            size: pieces * u64::from(MIN_PIECE_SIZE),
            piece_size: MIN_PIECE_SIZE,
            held: Held::Nothing,
        }
    }

    #[test]
    fn holders_stay_a_prefix_through_joins_reports_and_removals() {
        let mut keys: SlotMap<HostKey, ()> = SlotMap::with_key();
        let hosts: Vec<HostKey> = (0..20).map(|_| keys.insert(())).collect();
        let mut task = Task::new(&announcement(100), &SchedulerConfig::default())
            .unwrap_or_else(|e| panic!("{e}"));
        for (n, &h) in hosts.iter().enumerate() {
            let mut set = PieceSet::empty(100);
            if n % 3 == 0 {
                set.insert(n as u32);
            }
            task.join(h, set);
            task.check_invariants();
        }
        assert_eq!(task.holders, 7);
        for (n, &h) in hosts.iter().enumerate().filter(|(n, _)| n % 4 == 1) {
            let slot = task.slot(h).unwrap_or_else(|| panic!("member"));
            assert!(task.add_piece(slot, 50 + n as u32));
            task.check_invariants();
        }
        task.exclude(hosts[0]);
        task.check_invariants();
        for &h in &hosts {
            let slot = task.slot(h).unwrap_or_else(|| panic!("member"));
            let held: Vec<u32> = task.peers[slot].pieces.iter().collect();
            for i in held {
                let slot = task.slot(h).unwrap_or_else(|| panic!("member"));
                assert!(task.remove_piece(slot, i));
                task.check_invariants();
            }
            let slot = task.slot(h).unwrap_or_else(|| panic!("member"));
            task.add_piece(slot, 7);
            task.check_invariants();
        }
        for &h in hosts.iter().step_by(2) {
            assert!(task.remove(h).is_some());
            task.check_invariants();
        }
        assert!(task.remove(hosts[0]).is_none());
        assert_eq!(task.peers.len(), 10);
    }

    #[test]
    fn piece_sizes_and_counts_are_bounded() {
        let config = SchedulerConfig::default();
        let mut a = announcement(10);
        a.piece_size = 1000;
        assert!(Task::new(&a, &config).is_err());
        a.piece_size = MIN_PIECE_SIZE;
        a.size = u64::MAX;
        assert!(Task::new(&a, &config).is_err());
        a.size = 0;
        assert_eq!(Task::new(&a, &config).map(|t| t.piece_count), Ok(0));
    }

    #[test]
    fn a_published_piece_table_is_not_replaced() {
        let mut task = Task::new(&announcement(2), &SchedulerConfig::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(task.set_piece_table(vec![[1; 32]]).is_err());
        assert_eq!(task.set_piece_table(vec![[1; 32], [2; 32]]), Ok(()));
        assert_eq!(task.set_piece_table(vec![[1; 32], [2; 32]]), Ok(()));
        assert!(task.set_piece_table(vec![[1; 32], [3; 32]]).is_err());
    }

    #[test]
    fn peers_block_parents_in_a_small_ring() {
        let mut keys: SlotMap<HostKey, ()> = SlotMap::with_key();
        let hosts: Vec<HostKey> = (0..6).map(|_| keys.insert(())).collect();
        let mut p = PeerTask::new(hosts[0], PieceSet::empty(1));
        for &h in &hosts[1..] {
            p.block(h);
        }
        assert!(!p.is_blocked(hosts[1]), "oldest block fell out");
        assert!(hosts[2..].iter().all(|&h| p.is_blocked(h)));
        p.set_parents(&hosts[1..4]);
        assert!(p.drop_parent(hosts[2]));
        assert_eq!(p.parents(), &[hosts[1], hosts[3]]);
    }
}
