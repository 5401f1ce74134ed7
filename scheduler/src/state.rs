//! The scheduler's soft state: hosts and tasks, and the bookkeeping that keeps them consistent.

use std::collections::HashMap;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use slotmap::SlotMap;

use crate::clock::{Clock, SystemClock};
use crate::config::SchedulerConfig;
use crate::error::SchedulerError;
use crate::host::Host;
use crate::ids::{HostKey, TaskKey};
use crate::metrics::{Metrics, OutcomeLabels, SourceLabels};
use crate::select::Scratch;
use crate::task::{PeerTask, Task};
use shoal_types::{Digest, HostId};

/// What the scheduler knows of a blob's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSummary {
    /// Size in bytes.
    pub size: u64,
    /// Piece size in bytes.
    pub piece_size: u32,
    /// Number of pieces.
    pub piece_count: u32,
}

/// One registered host, as listed for DHT bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSummary {
    /// Host id.
    pub id: HostId,
    /// Its piece server's addresses.
    pub addresses: std::sync::Arc<[std::net::SocketAddr]>,
    /// Zone and rack.
    pub locality: crate::host::Locality,
    /// Whether it is a seed.
    pub is_seed: bool,
}

/// Counters for the hot path, fetched from their families once.
#[derive(Debug)]
pub(crate) struct HotCounters {
    pub parents: Counter,
    pub seed_fetch: Counter,
    pub back_to_source: Counter,
    pub wait: Counter,
    pub done: Counter,
    pub bts_seed: Counter,
    pub bts_peer: Counter,
}

impl HotCounters {
    fn new(m: &Metrics) -> Self {
        let outcome = |o| {
            m.decisions
                .get_or_create(&OutcomeLabels { outcome: o })
                .clone()
        };
        let by = |b| {
            m.back_to_source
                .get_or_create(&SourceLabels { by: b })
                .clone()
        };
        Self {
            parents: outcome("parents"),
            seed_fetch: outcome("seed_fetch"),
            back_to_source: outcome("back_to_source"),
            wait: outcome("wait"),
            done: outcome("done"),
            bts_seed: by("seed"),
            bts_peer: by("peer"),
        }
    }
}

/// The scheduler core: all state, no I/O. Callers serialise access (one task owns it).
///
/// Every piece of state is rebuilt from host registrations and task announcements, so a
/// restarted scheduler loses nothing a peer cannot tell it again.
pub struct Scheduler<C: Clock = SystemClock> {
    pub(crate) config: SchedulerConfig,
    pub(crate) clock: C,
    pub(crate) hosts: SlotMap<HostKey, Host>,
    /// SipHash here: these keys come from outside.
    pub(crate) host_ids: HashMap<HostId, HostKey>,
    pub(crate) seeds: Vec<HostKey>,
    pub(crate) tasks: SlotMap<TaskKey, Task>,
    pub(crate) task_ids: HashMap<Digest, TaskKey>,
    pub(crate) peer_tasks: usize,
    pub(crate) rng: fastrand::Rng,
    pub(crate) metrics: Metrics,
    pub(crate) hot: HotCounters,
    pub(crate) scratch: Scratch,
}

impl<C: Clock> std::fmt::Debug for Scheduler<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("hosts", &self.hosts.len())
            .field("tasks", &self.tasks.len())
            .field("peer_tasks", &self.peer_tasks)
            .finish()
    }
}

impl<C: Clock> Scheduler<C> {
    /// A scheduler with no state, its metrics registered in `registry`.
    pub fn new(
        config: SchedulerConfig,
        clock: C,
        registry: &mut Registry,
    ) -> Result<Self, SchedulerError> {
        config.validate()?;
        let metrics = Metrics::register(registry);
        let hot = HotCounters::new(&metrics);
        Ok(Self {
            config,
            clock,
            hosts: SlotMap::with_key(),
            host_ids: HashMap::new(),
            seeds: Vec::new(),
            tasks: SlotMap::with_key(),
            task_ids: HashMap::new(),
            peer_tasks: 0,
            rng: fastrand::Rng::new(),
            metrics,
            hot,
            scratch: Scratch::default(),
        })
    }

    /// Seeds the candidate-sampling RNG (for reproducible tests and benchmarks).
    pub fn seed_rng(&mut self, seed: u64) {
        self.rng = fastrand::Rng::with_seed(seed);
    }

    /// The config in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The metric handles (the service sets nothing here; it only reads or exports them).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Registered hosts.
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// Tracked tasks.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Tracked peer-tasks (host × blob).
    pub fn peer_task_count(&self) -> usize {
        self.peer_tasks
    }

    /// Whether `host` is registered.
    pub fn has_host(&self, host: &HostId) -> bool {
        self.host_ids.contains_key(host)
    }

    /// The pieces `host` is known to hold of `task`.
    pub fn held_set(&self, host: &HostId, task: &Digest) -> Option<shoal_types::PieceSet> {
        let (hk, tk) = self.member(host, task).ok()?;
        let t = self.tasks.get(tk)?;
        t.peer(hk).map(|p| p.pieces.clone())
    }

    /// How many peers (holders or not) take part in `task`.
    pub fn task_peer_count(&self, task: &Digest) -> usize {
        self.task_ids
            .get(task)
            .and_then(|&tk| self.tasks.get(tk))
            .map_or(0, |t| t.peers.len())
    }

    /// Size, piece size and piece count of a tracked blob.
    pub fn task_summary(&self, task: &Digest) -> Option<TaskSummary> {
        let t = self.tasks.get(*self.task_ids.get(task)?)?;
        Some(TaskSummary {
            size: t.size,
            piece_size: t.piece_size,
            piece_count: t.piece_count,
        })
    }

    /// Up to `limit` registered hosts (for DHT bootstrap and diagnostics).
    pub fn list_hosts(&self, limit: usize) -> Vec<HostSummary> {
        self.hosts
            .values()
            .take(limit)
            .map(|h| HostSummary {
                id: h.id.clone(),
                addresses: h.addresses.clone(),
                locality: h.locality.clone(),
                is_seed: h.is_seed,
            })
            .collect()
    }

    pub(crate) fn host_key(&self, host: &HostId) -> Result<HostKey, SchedulerError> {
        self.host_ids
            .get(host)
            .copied()
            .ok_or_else(|| SchedulerError::UnknownHost { host: host.clone() })
    }

    /// Keys of a host and a task it has announced.
    pub(crate) fn member(
        &self,
        host: &HostId,
        task: &Digest,
    ) -> Result<(HostKey, TaskKey), SchedulerError> {
        let hk = self.host_key(host)?;
        let not_in = || SchedulerError::NotInTask {
            host: host.clone(),
            task: *task,
        };
        let tk = *self.task_ids.get(task).ok_or_else(not_in)?;
        let joined = self.tasks.get(tk).and_then(|t| t.slot(hk)).is_some();
        if joined {
            Ok((hk, tk))
        } else {
            Err(not_in())
        }
    }

    /// Gives back the upload slots of the parent edges in `old`.
    pub(crate) fn release_parents(&mut self, old: &[HostKey]) {
        for &p in old {
            if let Some(h) = self.hosts.get_mut(p) {
                h.children = h.children.saturating_sub(1);
            }
        }
    }

    /// Forgets what `gone` (a removed peer-task) held in the bookkeeping outside its task.
    pub(crate) fn forget_peer_task(&mut self, gone: &PeerTask) {
        self.release_parents(gone.parents());
        if gone.waiting {
            self.metrics.queue_depth.dec();
        }
        self.peer_tasks = self.peer_tasks.saturating_sub(1);
        self.metrics.peer_tasks.set(self.peer_tasks as i64);
    }

    /// Removes `hk` from task `tk`; drops the task when its last peer leaves (its piece table
    /// is then re-published by the next origin fetch).
    pub(crate) fn remove_peer_task(&mut self, hk: HostKey, tk: TaskKey) {
        let Some(task) = self.tasks.get_mut(tk) else {
            return;
        };
        let gone = task.remove(hk);
        let empty = task.peers.is_empty();
        if let Some(gone) = gone {
            self.forget_peer_task(&gone);
        }
        if let Some(h) = self.hosts.get_mut(hk) {
            h.tasks.retain(|&t| t != tk);
        }
        if empty {
            if let Some(task) = self.tasks.remove(tk) {
                self.task_ids.remove(&task.id);
                tracing::debug!(blob = %task.id, "task dropped: no peers left");
            }
            self.metrics.tasks.set(self.tasks.len() as i64);
        }
    }

    /// Removes a host and every piece it held; its children find out on their next request.
    pub(crate) fn remove_host(&mut self, hk: HostKey) -> Option<HostId> {
        let tasks = self.hosts.get(hk).map(|h| h.tasks.clone())?;
        for tk in tasks {
            self.remove_peer_task(hk, tk);
        }
        let host = self.hosts.remove(hk)?;
        self.host_ids.remove(&host.id);
        self.seeds.retain(|&s| s != hk);
        self.metrics.hosts.set(self.hosts.len() as i64);
        Some(host.id)
    }
}
