//! What peers tell the scheduler about tasks: announcements (join, or rejoin after a scheduler
//! restart with held pieces), pieces as they are stored, transfers, failures, piece tables, leave.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::error::SchedulerError;
use crate::ids::{HostKey, TaskKey};
use crate::metrics::FailureLabels;
use crate::state::Scheduler;
use crate::task::{Held, PeerState, PieceDigest, Task, TaskAnnouncement};
use shoal_types::PieceSet;
use shoal_types::{Digest, HostId};

/// Why a child gave up on a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// Could not connect.
    Unreachable,
    /// Connected but the transfer stalled or was too slow.
    Stalled,
    /// The parent refused (no slot, does not hold the piece).
    Refused,
    /// The parent sent bytes that failed verification: blocked for the whole task.
    BadData,
}

impl FailureKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Unreachable => "unreachable",
            FailureKind::Stalled => "stalled",
            FailureKind::Refused => "refused",
            FailureKind::BadData => "bad_data",
        }
    }
}

impl<C: Clock> Scheduler<C> {
    /// `host` takes part in a blob: creates the task on first announcement and records the
    /// pieces the host already holds. Announcing again merges the held pieces.
    pub fn announce_task(
        &mut self,
        host: &HostId,
        a: TaskAnnouncement,
    ) -> Result<(), SchedulerError> {
        let hk = self.host_key(host)?;
        let existing = self.task_ids.get(&a.task).copied();
        let mut new_task = None;
        let piece_count = match existing.and_then(|tk| self.tasks.get(tk)) {
            Some(t) => {
                if t.size != a.size || t.piece_size != a.piece_size {
                    return Err(SchedulerError::TaskMismatch {
                        task: a.task,
                        host: host.clone(),
                        reason: format!(
                            "announced size {} / piece size {}, the swarm has {} / {}",
                            a.size, a.piece_size, t.size, t.piece_size
                        ),
                    });
                }
                t.piece_count
            }
            None => {
                let t = Task::new(&a, &self.config)?;
                let n = t.piece_count;
                new_task = Some(t);
                n
            }
        };
        let held = match &a.held {
            Held::Nothing => PieceSet::empty(piece_count),
            Held::All => PieceSet::full(piece_count),
            Held::Set(set) => {
                set.check_len(piece_count)
                    .map_err(|e| SchedulerError::InvalidTask {
                        task: a.task,
                        reason: format!("announced by {host}: {e}"),
                    })?;
                set.clone()
            }
        };
        if let Some(tk) = existing {
            if let Some(slot) = self.tasks.get(tk).and_then(|t| t.slot(hk)) {
                if let Some(t) = self.tasks.get_mut(tk) {
                    t.add_set(slot, &held);
                }
                self.finish_if_complete(hk, tk);
                return Ok(());
            }
        }
        self.check_join_limits(hk, host, &a.task, existing)?;
        let tk = match (existing, new_task) {
            (Some(tk), _) => tk,
            (None, Some(t)) => {
                let tk = self.tasks.insert(t);
                self.task_ids.insert(a.task, tk);
                self.metrics.tasks.set(self.tasks.len() as i64);
                tk
            }
            (None, None) => {
                return Err(SchedulerError::NotInTask {
                    host: host.clone(),
                    task: a.task,
                })
            }
        };
        self.join(hk, tk, held);
        Ok(())
    }

    fn check_join_limits(
        &self,
        hk: HostKey,
        host: &HostId,
        task: &Digest,
        existing: Option<TaskKey>,
    ) -> Result<(), SchedulerError> {
        if let Some(h) = self.hosts.get(hk) {
            let limit = h.task_limit(&self.config);
            if h.tasks.len() >= limit {
                return Err(SchedulerError::LimitReached {
                    what: "tasks per host",
                    limit,
                    context: format!(" for {host} announcing {task}"),
                });
            }
        }
        match existing.and_then(|tk| self.tasks.get(tk)) {
            Some(t) if t.peers.len() >= self.config.max_peers_per_task => {
                Err(SchedulerError::LimitReached {
                    what: "peers per task",
                    limit: self.config.max_peers_per_task,
                    context: format!(" for {task} (announced by {host})"),
                })
            }
            None if self.tasks.len() >= self.config.max_tasks => {
                Err(SchedulerError::LimitReached {
                    what: "tasks",
                    limit: self.config.max_tasks,
                    context: format!(" creating {task} (announced by {host})"),
                })
            }
            _ => Ok(()),
        }
    }

    /// Adds a host (limits already checked) to a task.
    pub(crate) fn join(&mut self, hk: HostKey, tk: TaskKey, held: PieceSet) {
        let Some(t) = self.tasks.get_mut(tk) else {
            return;
        };
        t.join(hk, held);
        if let Some(h) = self.hosts.get_mut(hk) {
            h.tasks.push(tk);
        }
        self.peer_tasks += 1;
        self.metrics.peer_tasks.set(self.peer_tasks as i64);
    }

    /// A peer that now holds every piece stops downloading: its parent edges are released and
    /// an origin fetch it was doing is over.
    fn finish_if_complete(&mut self, hk: HostKey, tk: TaskKey) {
        let Some(t) = self.tasks.get_mut(tk) else {
            return;
        };
        let complete = t.peer(hk).is_some_and(|p| t.is_complete(p));
        if !complete {
            return;
        }
        t.origin_fetchers.retain(|&h| h != hk);
        let Some(p) = t.peer_mut(hk) else {
            return;
        };
        p.state = PeerState::Swarm;
        let was_waiting = std::mem::replace(&mut p.waiting, false);
        let (old, n) = p.set_parents(&[]);
        if was_waiting {
            self.metrics.queue_depth.dec();
        }
        self.release_parents(&old[..n]);
    }

    /// `host` stored (and verified) these pieces of `task`; returns how many were new to the
    /// scheduler. Every index is checked before any is recorded.
    pub fn report_pieces(
        &mut self,
        host: &HostId,
        task: &Digest,
        pieces: &[u32],
    ) -> Result<u32, SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        let Some(t) = self.tasks.get_mut(tk) else {
            return Ok(0);
        };
        check_pieces(host, task, t.piece_count, pieces)?;
        let mut new = 0;
        for &i in pieces {
            // The slot moves when the peer first becomes a holder, so look it up each time.
            if let Some(slot) = t.slot(hk) {
                new += u32::from(t.add_piece(slot, i));
            }
        }
        self.finish_if_complete(hk, tk);
        Ok(new)
    }

    /// `host` no longer holds these pieces of `task` (evicted); returns how many it did hold.
    /// Every index is checked before any is removed.
    pub fn report_pieces_removed(
        &mut self,
        host: &HostId,
        task: &Digest,
        pieces: &[u32],
    ) -> Result<u32, SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        let Some(t) = self.tasks.get_mut(tk) else {
            return Ok(0);
        };
        check_pieces(host, task, t.piece_count, pieces)?;
        let mut gone = 0;
        for &i in pieces {
            if let Some(slot) = t.slot(hk) {
                gone += u32::from(t.remove_piece(slot, i));
            }
        }
        Ok(gone)
    }

    /// Replaces what `host` holds of `task` with a full held set (a full report).
    pub fn report_held(
        &mut self,
        host: &HostId,
        task: &Digest,
        new: &PieceSet,
    ) -> Result<(), SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        let Some(t) = self.tasks.get_mut(tk) else {
            return Ok(());
        };
        new.check_len(t.piece_count)
            .map_err(|e| SchedulerError::InvalidTask {
                task: *task,
                reason: format!("reported by {host}: {e}"),
            })?;
        let old: Vec<u32> = t
            .peer(hk)
            .map_or_else(Vec::new, |p| p.pieces.iter().collect());
        for i in old.into_iter().filter(|&i| !new.contains(i)) {
            if let Some(slot) = t.slot(hk) {
                t.remove_piece(slot, i);
            }
        }
        for i in new.iter() {
            if let Some(slot) = t.slot(hk) {
                t.add_piece(slot, i);
            }
        }
        self.finish_if_complete(hk, tk);
        Ok(())
    }

    /// `host` moved `bytes` of `task` from `parent` in `elapsed`: feeds the parent's measured
    /// throughput. A parent that is gone is ignored.
    pub fn report_transfer(
        &mut self,
        host: &HostId,
        task: &Digest,
        parent: &HostId,
        bytes: u64,
        elapsed: Duration,
    ) -> Result<(), SchedulerError> {
        self.member(host, task)?;
        if let Some(p) = self
            .host_ids
            .get(parent)
            .and_then(|&pk| self.hosts.get_mut(pk))
        {
            p.record_throughput(bytes, elapsed);
        }
        Ok(())
    }

    /// `host` gave up on `parent` for `task`: the parent is blocked for this host in this task,
    /// its slot is released and its recent-failure score rises; for `BadData` it is blocked for
    /// every peer of the task and its pieces stop counting.
    pub fn report_failure(
        &mut self,
        host: &HostId,
        task: &Digest,
        parent: &HostId,
        kind: FailureKind,
    ) -> Result<(), SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        self.metrics
            .failures
            .get_or_create(&FailureLabels {
                kind: kind.as_str(),
            })
            .inc();
        let Some(&pk) = self.host_ids.get(parent) else {
            return Ok(());
        };
        if pk == hk {
            return Ok(());
        }
        let now = self.clock.now();
        let half_life = Duration::from_secs(self.config.failure_half_life_secs);
        if let Some(p) = self.hosts.get_mut(pk) {
            p.record_failure(now, half_life);
        }
        let Some(t) = self.tasks.get_mut(tk) else {
            return Ok(());
        };
        let mut dropped = false;
        if let Some(me) = t.peer_mut(hk) {
            me.block(pk);
            dropped = me.drop_parent(pk);
        }
        if kind == FailureKind::BadData {
            tracing::warn!(blob = %task, parent = %parent, reporter = %host,
                "parent sent bad data: blocked for the whole task");
            t.exclude(pk);
        }
        if dropped {
            self.release_parents(&[pk]);
        }
        Ok(())
    }

    /// `host` asks to leave these parents out for `task` (it tried them already): they are
    /// blocked for this host in this task, without counting a failure against them.
    pub fn block_parents(
        &mut self,
        host: &HostId,
        task: &Digest,
        parents: &[HostId],
    ) -> Result<(), SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        let keys: Vec<HostKey> = parents
            .iter()
            .filter_map(|p| self.host_ids.get(p).copied())
            .collect();
        let mut dropped = Vec::new();
        if let Some(me) = self.tasks.get_mut(tk).and_then(|t| t.peer_mut(hk)) {
            for &k in &keys {
                me.block(k);
                if me.drop_parent(k) {
                    dropped.push(k);
                }
            }
        }
        self.release_parents(&dropped);
        Ok(())
    }

    /// `host` was fetching `task` from the origin and failed: the next decision orders another
    /// seed or peer to fetch.
    pub fn report_origin_failure(
        &mut self,
        host: &HostId,
        task: &Digest,
    ) -> Result<(), SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        let now = self.clock.now();
        let half_life = Duration::from_secs(self.config.failure_half_life_secs);
        if let Some(h) = self.hosts.get_mut(hk) {
            h.record_failure(now, half_life);
        }
        if let Some(t) = self.tasks.get_mut(tk) {
            t.origin_fetchers.retain(|&h| h != hk);
            if let Some(p) = t.peer_mut(hk) {
                p.state = PeerState::Swarm;
            }
        }
        Ok(())
    }

    /// Publishes the blob's piece table (BLAKE3 per piece), as its first origin fetcher computed
    /// it; a different table for the same blob is refused.
    pub fn publish_piece_table(
        &mut self,
        host: &HostId,
        task: &Digest,
        table: Vec<PieceDigest>,
    ) -> Result<(), SchedulerError> {
        let (_, tk) = self.member(host, task)?;
        let Some(t) = self.tasks.get_mut(tk) else {
            return Ok(());
        };
        t.set_piece_table(table)
            .map_err(|reason| SchedulerError::TaskMismatch {
                task: *task,
                host: host.clone(),
                reason,
            })
    }

    /// Records piece hashes `first..` that `host` computed while fetching `task` from the origin.
    /// Only a host the scheduler sent to the origin for the task (a seed or a back-to-source
    /// peer) may publish them, and only one at a time.
    pub fn publish_piece_hashes(
        &mut self,
        host: &HostId,
        task: &Digest,
        first: u32,
        hashes: &[PieceDigest],
    ) -> Result<(), SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        let Some(t) = self.tasks.get_mut(tk) else {
            return Ok(());
        };
        let refuse = |reason: String| SchedulerError::TaskMismatch {
            task: *task,
            host: host.clone(),
            reason,
        };
        if !t.origin_fetchers.contains(&hk) {
            return Err(refuse(
                "only a host sent to the origin for this blob may publish its piece hashes".into(),
            ));
        }
        t.add_hashes(hk, first, hashes).map_err(refuse)
    }

    /// Up to `max` piece hashes of `task` from `first` on (`None` where none is known), and who
    /// published them: the whole table once there is one, else the streamed hashes.
    pub fn piece_hashes(
        &self,
        task: &Digest,
        first: u32,
        max: usize,
    ) -> (Option<HostId>, Vec<Option<PieceDigest>>) {
        let Some(t) = self.task_ids.get(task).and_then(|tk| self.tasks.get(*tk)) else {
            return (None, Vec::new());
        };
        let from = first as usize;
        let to = (t.piece_count as usize).min(from.saturating_add(max));
        if let Some(table) = &t.piece_table {
            let hashes = table.get(from..to).unwrap_or(&[]);
            return (None, hashes.iter().copied().map(Some).collect());
        }
        match &t.partial {
            Some(p) => (
                self.hosts.get(p.from).map(|h| h.id.clone()),
                p.hashes.get(from..to).unwrap_or(&[]).to_vec(),
            ),
            None => (None, vec![None; to.saturating_sub(from)]),
        }
    }

    /// The blob's piece table, once published.
    pub fn piece_table(&self, task: &Digest) -> Option<Arc<[PieceDigest]>> {
        let tk = self.task_ids.get(task)?;
        self.tasks.get(*tk)?.piece_table.clone()
    }

    /// `host` no longer takes part in `task` (evicted it, or cancelled the download).
    pub fn leave_task(&mut self, host: &HostId, task: &Digest) -> Result<(), SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        self.remove_peer_task(hk, tk);
        Ok(())
    }
}

/// Every index in `pieces` names a piece of a task of `count` pieces; checked before any is
/// recorded or removed, so a bad report changes nothing.
fn check_pieces(
    host: &HostId,
    task: &Digest,
    count: u32,
    pieces: &[u32],
) -> Result<(), SchedulerError> {
    match pieces.iter().find(|&&i| i >= count) {
        Some(&piece) => Err(SchedulerError::PieceOutOfRange {
            task: *task,
            host: host.clone(),
            piece,
            count,
        }),
        None => Ok(()),
    }
}
