//! Parent selection: one peer asks for parents for one blob; the scheduler answers with parents,
//! an origin fetch by a seed, back-to-source for this peer, or wait.
//!
//! Steps (README.md "Parent selection" has the reasoning):
//! 1. release the asker's previous parents (their slots count as free again);
//! 2. sample candidates: every origin fetcher, then holders from a random offset until
//!    `candidate_limit` are examined and at least `max_parents` are usable (at most
//!    `scan_limit` examined);
//! 3. rank: non-seeds before seeds whenever any non-seed can give something, then by score;
//! 4. pick up to `max_parents`, leaving out peers well behind the asker and refusing any
//!    candidate that descends from the asker (no cycles), and adding a seed only for pieces the
//!    picked peers cannot give;
//! 5. if some piece is held by nobody and nobody fetches it: order a seed to fetch it, else send
//!    this peer to the origin (capped per task), else wait.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slotmap::SlotMap;

use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::error::SchedulerError;
use crate::host::{Closeness, Host};
use crate::ids::{HostKey, TaskKey};
use crate::state::Scheduler;
use crate::task::{PeerState, Task};
use shoal_types::{Digest, HostId};

/// Weight of the share of the asker's missing pieces a candidate can give.
const W_USEFUL: f32 = 2.0;
/// Weight of the share of the candidate's upload slots still free.
const W_FREE: f32 = 1.0;
/// Weight of the share of the candidate's uplink not in use (heartbeat rates, host.rs).
const W_SPARE: f32 = 1.0;
/// Weight of measured throughput, as `tp / (tp + TP_HALF)`.
const W_THROUGHPUT: f32 = 1.0;
/// Weight of locality: same rack 1, same zone 0.5.
const W_LOCALITY: f32 = 1.0;
/// Throughput (bytes/s) that scores half of W_THROUGHPUT.
const TP_HALF: f32 = 64.0 * 1024.0 * 1024.0;
/// Throughput term of a host nobody has measured yet: neutral.
const TP_UNKNOWN: f32 = 0.5;
/// A candidate holding fewer pieces than the asker by more than 1/BEHIND_SHARE of the asker's
/// (at least BEHIND_MIN) is not named.
const BEHIND_SHARE: u32 = 16;
/// See [`BEHIND_SHARE`].
const BEHIND_MIN: u32 = 2;

/// A parent named in a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// The parent's host id (its certificate name: the peer checks it on connect).
    pub host: HostId,
    /// Where its piece server listens.
    pub addresses: Arc<[SocketAddr]>,
    /// Whether it is a seed.
    pub is_seed: bool,
}

/// The answer to "give me parents for this blob".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Fetch pieces from these parents (best first).
    Parents(Vec<Parent>),
    /// Nobody holds some piece: `seed` has been told to fetch the blob from the origin (the
    /// service sends it that order); fetch from `parents`, which start with the seed.
    SeedFetch {
        /// The seed that fetches from the origin.
        seed: Parent,
        /// The parents for the asker, the seed first.
        parents: Vec<Parent>,
    },
    /// Fetch the blob from the origin yourself (no seed can; at most `back_to_source_limit`
    /// peers per blob at once) and report pieces as they are stored.
    BackToSource,
    /// No parent has a free slot or a needed piece yet: ask again after `retry_after`.
    Wait {
        /// When to ask again.
        retry_after: Duration,
    },
    /// The asker already holds every piece.
    Done,
}

impl Decision {
    /// The outcome's metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::Parents(_) => "parents",
            Decision::SeedFetch { .. } => "seed_fetch",
            Decision::BackToSource => "back_to_source",
            Decision::Wait { .. } => "wait",
            Decision::Done => "done",
        }
    }
}

/// A scored candidate; `slot` indexes the task's peers.
#[derive(Debug, Clone, Copy)]
struct Cand {
    key: HostKey,
    slot: u32,
    score: f32,
    is_seed: bool,
    /// Fetching from the origin: will hold every piece.
    full: bool,
}

/// Buffers reused by every decision so a decision allocates only its answer.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    cands: Vec<Cand>,
    picks: Vec<HostKey>,
    covered: Vec<u64>,
    stack: Vec<HostKey>,
    epoch: u64,
    /// Candidates refused by the cycle check in the last decision.
    pub refused: u64,
}

/// What one decision needs to know about its asker, gathered once.
struct Asker<'a> {
    key: HostKey,
    host: &'a Host,
    slot: usize,
    needed: u32,
}

fn score(asker: &Asker<'_>, cand: &Host, useful: u32, now: Instant, half_life: Duration) -> f32 {
    let useful = useful as f32 / asker.needed.max(1) as f32;
    let free = cand.free_slots() as f32 / cand.upload_slots.max(1) as f32;
    let tp = if cand.throughput > 0.0 {
        cand.throughput / (cand.throughput + TP_HALF)
    } else {
        TP_UNKNOWN
    };
    let local = match asker.host.closeness(cand) {
        Closeness::SameRack => 1.0,
        Closeness::SameZone => 0.5,
        Closeness::Far => 0.0,
    };
    let spare = cand.spare_uplink();
    let base = W_USEFUL * useful
        + W_FREE * free
        + W_SPARE * spare
        + W_THROUGHPUT * tp
        + W_LOCALITY * local;
    base / (1.0 + cand.failures(now, half_life))
}

/// Scores candidates into `cands`: every origin fetcher, then sampled holders. Candidates with
/// no free upload slot, blocked ones and the asker itself are left out.
fn collect(
    task: &Task,
    hosts: &SlotMap<HostKey, Host>,
    asker: &Asker<'_>,
    config: &SchedulerConfig,
    now: Instant,
    rng: &mut fastrand::Rng,
    cands: &mut Vec<Cand>,
) {
    cands.clear();
    let half_life = Duration::from_secs(config.failure_half_life_secs);
    let Some(me) = task.peers.get(asker.slot) else {
        return;
    };
    let mut consider = |key: HostKey, slot: usize, useful: u32, full: bool| {
        if key == asker.key || me.is_blocked(key) || task.is_blocked(key) {
            return false;
        }
        let Some(h) = hosts.get(key) else {
            return false;
        };
        if h.free_slots() == 0 {
            return false;
        }
        cands.push(Cand {
            key,
            slot: slot as u32,
            score: score(asker, h, useful, now, half_life),
            is_seed: h.is_seed,
            full,
        });
        true
    };
    let mut usable = 0;
    for &f in &task.origin_fetchers {
        if let Some(slot) = task.slot(f) {
            usable += usize::from(consider(f, slot, asker.needed, true));
        }
    }
    let n = task.holders;
    if n > 0 {
        let start = rng.usize(..n);
        let mut scanned = 0;
        for k in 0..n {
            if scanned >= config.scan_limit
                || (scanned >= config.candidate_limit && usable >= config.max_parents)
            {
                break;
            }
            let slot = (start + k) % n;
            let Some(p) = task.peers.get(slot) else {
                continue;
            };
            if p.state == PeerState::Origin || p.host == asker.key {
                continue;
            }
            scanned += 1;
            let useful = p.pieces.count_missing_from(&me.pieces);
            if useful > 0 {
                usable += usize::from(consider(p.host, slot, useful, false));
            }
        }
    }
}

/// Whether `asker` is an ancestor of `cand` in the task's parent graph (or the ancestry is too
/// large to tell within `limit` visits, which counts as a cycle: never risk one). Visited
/// peer-tasks are stamped with a fresh `epoch`, so a check costs one step per ancestor.
fn creates_cycle(
    task: &Task,
    asker: HostKey,
    cand: HostKey,
    limit: usize,
    epoch: &mut u64,
    stack: &mut Vec<HostKey>,
) -> bool {
    *epoch += 1;
    let stamp = *epoch;
    stack.clear();
    stack.push(cand);
    let mut visited = 0;
    while let Some(k) = stack.pop() {
        if k == asker {
            return true;
        }
        let Some(p) = task.peer(k) else {
            continue;
        };
        if p.mark.get() == stamp {
            continue;
        }
        p.mark.set(stamp);
        visited += 1;
        if visited > limit {
            return true;
        }
        stack.extend_from_slice(p.parents());
    }
    false
}

/// Needed pieces (not in `asker`) that are not in `covered`, counting only real pieces.
fn uncovered(asker: &[u64], covered: &[u64], offer: Option<&[u64]>, pieces: u32) -> u32 {
    let mut total = 0;
    for (w, (&a, &c)) in asker.iter().zip(covered.iter()).enumerate() {
        let first = w as u32 * 64;
        let left = pieces.saturating_sub(first);
        let mask = if left >= 64 {
            u64::MAX
        } else {
            (1u64 << left) - 1
        };
        let offered = offer.map_or(u64::MAX, |o| o.get(w).copied().unwrap_or(0));
        total += (!a & !c & mask & offered).count_ones();
    }
    total
}

/// Picks parents from the ranked candidates into `scratch.picks`.
fn pick(task: &Task, asker: &Asker<'_>, config: &SchedulerConfig, s: &mut Scratch) {
    s.picks.clear();
    s.refused = 0;
    let has_nonseed = s.cands.iter().any(|c| !c.is_seed);
    s.cands.sort_unstable_by(|a, b| {
        let ga = a.is_seed && has_nonseed;
        let gb = b.is_seed && has_nonseed;
        ga.cmp(&gb).then(b.score.total_cmp(&a.score))
    });
    let Some(me) = task.peers.get(asker.slot) else {
        return;
    };
    s.covered.clear();
    s.covered.resize(me.pieces.words().len(), 0);
    // A peer well behind the asker is not named: parents are then mostly ahead of their
    // children, so a peer that falls behind is nobody's ancestor and gets parents (no cycles).
    let mine = me.pieces.held();
    let margin = (mine / BEHIND_SHARE).max(BEHIND_MIN);
    let behind = |c: &Cand| {
        !c.full
            && !c.is_seed
            && task
                .peers
                .get(c.slot as usize)
                .is_some_and(|p| p.pieces.held().saturating_add(margin) < mine)
    };
    for c in s.cands.iter() {
        if s.picks.len() >= config.max_parents {
            break;
        }
        if c.is_seed && has_nonseed {
            break; // seeds follow in their own pass
        }
        if behind(c) {
            continue;
        }
        if creates_cycle(
            task,
            asker.key,
            c.key,
            config.cycle_check_limit,
            &mut s.epoch,
            &mut s.stack,
        ) {
            s.refused += 1;
            continue;
        }
        s.picks.push(c.key);
        cover(task, c, &mut s.covered);
    }
    if !has_nonseed {
        return;
    }
    // Seeds only for what the picked peers cannot give: they stay free for pieces nobody else has.
    for c in s.cands.iter().filter(|c| c.is_seed) {
        let offer = task.peers.get(c.slot as usize).map(|p| p.pieces.words());
        let offer = if c.full { None } else { offer };
        if uncovered(me.pieces.words(), &s.covered, offer, task.piece_count) == 0 {
            continue;
        }
        if creates_cycle(
            task,
            asker.key,
            c.key,
            config.cycle_check_limit,
            &mut s.epoch,
            &mut s.stack,
        ) {
            s.refused += 1;
            continue;
        }
        if s.picks.len() >= config.max_parents {
            s.picks.pop();
        }
        s.picks.push(c.key);
        break;
    }
}

fn cover(task: &Task, c: &Cand, covered: &mut [u64]) {
    if c.full {
        covered.iter_mut().for_each(|w| *w = u64::MAX);
    } else if let Some(p) = task.peers.get(c.slot as usize) {
        for (w, o) in covered.iter_mut().zip(p.pieces.words()) {
            *w |= o;
        }
    }
}

impl<C: Clock> Scheduler<C> {
    /// Decides where `host` gets the pieces of `task` it lacks, and records the parent edges
    /// (they hold the parents' upload slots until the next decision, completion or leave).
    pub fn decide(&mut self, host: &HostId, task: &Digest) -> Result<Decision, SchedulerError> {
        let (hk, tk) = self.member(host, task)?;
        let now = self.clock.now();
        let Some(t) = self.tasks.get_mut(tk) else {
            return Err(SchedulerError::NotInTask {
                host: host.clone(),
                task: *task,
            });
        };
        let piece_count = t.piece_count;
        let Some(slot) = t.slot(hk) else {
            return Err(SchedulerError::NotInTask {
                host: host.clone(),
                task: *task,
            });
        };
        let Some(me) = t.peers.get_mut(slot) else {
            return Err(SchedulerError::NotInTask {
                host: host.clone(),
                task: *task,
            });
        };
        let (old, n) = me.set_parents(&[]);
        let held = me.held;
        if me.state == PeerState::Origin {
            // Asking again means its origin fetch is over.
            me.state = PeerState::Swarm;
            t.origin_fetchers.retain(|&h| h != hk);
        }
        self.release_parents(&old[..n]);
        if held >= piece_count {
            self.set_waiting(tk, hk, false);
            self.hot.done.inc();
            return Ok(Decision::Done);
        }
        let decision = self.choose(hk, tk, slot, piece_count - held, now);
        self.set_waiting(tk, hk, matches!(decision, Decision::Wait { .. }));
        match &decision {
            Decision::Parents(_) => self.hot.parents.inc(),
            Decision::SeedFetch { .. } => self.hot.seed_fetch.inc(),
            Decision::BackToSource => self.hot.back_to_source.inc(),
            Decision::Wait { .. } => self.hot.wait.inc(),
            Decision::Done => self.hot.done.inc(),
        };
        Ok(decision)
    }

    fn choose(
        &mut self,
        hk: HostKey,
        tk: TaskKey,
        slot: usize,
        needed: u32,
        now: Instant,
    ) -> Decision {
        let (Some(t), Some(host)) = (self.tasks.get(tk), self.hosts.get(hk)) else {
            return Decision::Wait {
                retry_after: self.config.wait_retry(),
            };
        };
        let asker = Asker {
            key: hk,
            host,
            slot,
            needed,
        };
        collect(
            t,
            &self.hosts,
            &asker,
            &self.config,
            now,
            &mut self.rng,
            &mut self.scratch.cands,
        );
        pick(t, &asker, &self.config, &mut self.scratch);
        if self.scratch.refused > 0 {
            self.metrics.cycle_refusals.inc_by(self.scratch.refused);
        }
        let fetcher_usable = t.peers.get(slot).is_some_and(|me| {
            t.origin_fetchers
                .iter()
                .any(|&f| f != hk && !me.is_blocked(f) && self.hosts.contains_key(f))
        });
        if t.unavailable > 0 && !fetcher_usable {
            if let Some(seed) = self.best_seed(hk, tk, now) {
                return self.order_seed_fetch(hk, tk, seed);
            }
            // A seed that could fetch it but has no free upload slot now frees one as soon as
            // a child finishes: waiting for it costs less than a second origin fetch per blob
            // (docs/benchmarks.md, "Peer memory"). Only with no usable seed does a peer go.
            if self.seed_busy(hk, tk)
                && t.peers
                    .get(slot)
                    .is_some_and(|me| me.state != PeerState::Origin)
            {
                return Decision::Wait {
                    retry_after: self.config.wait_retry(),
                };
            }
            let peers_at_origin = t
                .origin_fetchers
                .iter()
                .filter(|&&f| self.hosts.get(f).is_some_and(|h| !h.is_seed))
                .count();
            if peers_at_origin < self.config.back_to_source_limit as usize {
                if let Some(t) = self.tasks.get_mut(tk) {
                    if let Some(me) = t.peers.get_mut(slot) {
                        me.state = PeerState::Origin;
                    }
                    t.origin_fetchers.push(hk);
                }
                self.hot.bts_peer.inc();
                tracing::debug!(host = ?hk, "back to source: no seed can fetch");
                return Decision::BackToSource;
            }
        }
        if self.scratch.picks.is_empty() {
            return Decision::Wait {
                retry_after: self.config.wait_retry(),
            };
        }
        let picks = std::mem::take(&mut self.scratch.picks);
        let parents = self.assign(hk, tk, &picks);
        self.scratch.picks = picks;
        Decision::Parents(parents)
    }

    /// The best seed to fetch `tk` from the origin for `hk`, if any can.
    fn best_seed(&self, hk: HostKey, tk: TaskKey, now: Instant) -> Option<HostKey> {
        let t = self.tasks.get(tk)?;
        let me = t.peer(hk)?;
        let asker = self.hosts.get(hk)?;
        let half_life = Duration::from_secs(self.config.failure_half_life_secs);
        let full = t.peers.len() >= self.config.max_peers_per_task;
        self.seeds
            .iter()
            .filter(|&&s| s != hk && !me.is_blocked(s) && !t.is_blocked(s))
            .filter_map(|&s| self.hosts.get(s).map(|h| (s, h)))
            .filter(|(s, h)| {
                h.free_slots() > 0
                    && match t.peer(*s) {
                        Some(p) => p.state == PeerState::Swarm && p.parents().is_empty(),
                        None => !full && h.tasks.len() < h.task_limit(&self.config),
                    }
            })
            .map(|(s, h)| {
                let local = asker.closeness(h) as u8 as f32;
                let free = h.free_slots() as f32 / h.upload_slots.max(1) as f32;
                (s, (local + free) / (1.0 + h.failures(now, half_life)))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| s)
    }

    /// Whether a seed could fetch `tk` for `hk` but for its upload slots, all taken now.
    fn seed_busy(&self, hk: HostKey, tk: TaskKey) -> bool {
        let (Some(t), Some(me)) = (
            self.tasks.get(tk),
            self.tasks.get(tk).and_then(|t| t.peer(hk)),
        ) else {
            return false;
        };
        let full = t.peers.len() >= self.config.max_peers_per_task;
        self.seeds
            .iter()
            .filter(|&&s| s != hk && !me.is_blocked(s) && !t.is_blocked(s))
            .filter_map(|&s| self.hosts.get(s).map(|h| (s, h)))
            .any(|(s, h)| {
                h.free_slots() == 0
                    && match t.peer(s) {
                        Some(p) => p.state == PeerState::Swarm && p.parents().is_empty(),
                        None => !full && h.tasks.len() < h.task_limit(&self.config),
                    }
            })
    }

    fn order_seed_fetch(&mut self, hk: HostKey, tk: TaskKey, seed: HostKey) -> Decision {
        let member = self.tasks.get(tk).is_some_and(|t| t.slot(seed).is_some());
        if !member {
            let pieces = self
                .tasks
                .get(tk)
                .map(|t| shoal_types::PieceSet::empty(t.piece_count));
            if let Some(pieces) = pieces {
                self.join(seed, tk, pieces);
            }
        }
        if let Some(t) = self.tasks.get_mut(tk) {
            if let Some(p) = t.peer_mut(seed) {
                p.state = PeerState::Origin;
            }
            t.origin_fetchers.push(seed);
        }
        self.hot.bts_seed.inc();
        let mut picks = std::mem::take(&mut self.scratch.picks);
        picks.retain(|&p| p != seed);
        picks.insert(0, seed);
        picks.truncate(self.config.max_parents);
        let parents = self.assign(hk, tk, &picks);
        self.scratch.picks = picks;
        let seed = parents.first().cloned();
        match seed {
            Some(seed) => {
                tracing::debug!(seed = %seed.host, "seed ordered to fetch from origin");
                Decision::SeedFetch { seed, parents }
            }
            None => Decision::Wait {
                retry_after: self.config.wait_retry(),
            },
        }
    }

    /// Records `picks` as `hk`'s parents in `tk` (taking one upload slot each) and names them.
    fn assign(&mut self, hk: HostKey, tk: TaskKey, picks: &[HostKey]) -> Vec<Parent> {
        if let Some(me) = self.tasks.get_mut(tk).and_then(|t| t.peer_mut(hk)) {
            me.set_parents(picks);
        }
        let mut parents = Vec::with_capacity(picks.len());
        for &p in picks {
            if let Some(h) = self.hosts.get_mut(p) {
                h.children += 1;
                parents.push(Parent {
                    host: h.id.clone(),
                    addresses: h.addresses.clone(),
                    is_seed: h.is_seed,
                });
            }
        }
        parents
    }

    fn set_waiting(&mut self, tk: TaskKey, hk: HostKey, waiting: bool) {
        let Some(me) = self.tasks.get_mut(tk).and_then(|t| t.peer_mut(hk)) else {
            return;
        };
        if me.waiting != waiting {
            me.waiting = waiting;
            if waiting {
                self.metrics.queue_depth.inc();
            } else {
                self.metrics.queue_depth.dec();
            }
        }
    }
}
