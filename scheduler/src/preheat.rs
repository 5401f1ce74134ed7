//! Preheat (`shoal preheat`): an operator names blobs before any peer asks for them. For each,
//! the scheduler opens the task, picks a seed, and records it as the blob's origin fetcher, so
//! the first peers to ask are pointed at that seed instead of the origin. The service sends the
//! seed its `FetchFromOrigin` order.

use std::time::Duration;

use crate::clock::Clock;
use crate::error::SchedulerError;
use crate::state::Scheduler;
use crate::task::{Held, PeerState, TaskAnnouncement};
use shoal_types::{Digest, HostId};

/// What a preheat did for one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreheatDecision {
    /// This seed is now the blob's origin fetcher: send it the fetch order.
    Ordered(HostId),
    /// A seed holds the whole blob or is fetching it already.
    AlreadyWarm,
    /// No seed can take it, with why.
    NoSeed(String),
}

impl<C: Clock> Scheduler<C> {
    /// Has a seed fetch `task` (`size` bytes in pieces of `piece_size`) from the origin now,
    /// unless a seed holds or fetches it already.
    pub fn preheat(
        &mut self,
        task: &Digest,
        size: u64,
        piece_size: u32,
    ) -> Result<PreheatDecision, SchedulerError> {
        let existing = self.task_ids.get(task).copied();
        if let Some(t) = existing.and_then(|tk| self.tasks.get(tk)) {
            if t.size != size || t.piece_size != piece_size {
                return Err(SchedulerError::TaskMismatch {
                    task: *task,
                    host: HostId::new("preheat")?,
                    reason: format!(
                        "preheat says size {size} / piece size {piece_size}, the swarm has {} / {}",
                        t.size, t.piece_size
                    ),
                });
            }
            let fetching = t
                .origin_fetchers
                .iter()
                .any(|&f| self.hosts.get(f).is_some_and(|h| h.is_seed));
            let held = self
                .seeds
                .iter()
                .any(|&s| t.peer(s).is_some_and(|p| t.is_complete(p)));
            if fetching || held {
                return Ok(PreheatDecision::AlreadyWarm);
            }
        }
        if self.seeds.is_empty() {
            return Ok(PreheatDecision::NoSeed(
                "no seed is registered (start `shoal peer --seed`)".into(),
            ));
        }
        let now = self.clock.now();
        let half_life = Duration::from_secs(self.config.failure_half_life_secs);
        let task_ref = existing.and_then(|tk| self.tasks.get(tk));
        let best = self
            .seeds
            .iter()
            .filter_map(|&s| self.hosts.get(s).map(|h| (s, h)))
            .filter(|(s, h)| {
                h.free_slots() > 0
                    && !task_ref.is_some_and(|t| t.is_blocked(*s))
                    && (task_ref.is_some_and(|t| t.slot(*s).is_some())
                        || h.tasks.len() < h.task_limit(&self.config))
            })
            .map(|(s, h)| {
                // Spread preheats: the seed with the most free slots and fewest tasks wins.
                let free = h.free_slots() as f32 / h.upload_slots.max(1) as f32;
                let load = 1.0 / (1.0 + h.tasks.len() as f32);
                (
                    s,
                    h.id.clone(),
                    (free + load) / (1.0 + h.failures(now, half_life)),
                )
            })
            .max_by(|a, b| a.2.total_cmp(&b.2));
        let Some((key, seed, _)) = best else {
            return Ok(PreheatDecision::NoSeed(
                "every seed is busy, blocked for this blob, or at its task limit".into(),
            ));
        };
        self.announce_task(
            &seed,
            TaskAnnouncement {
                task: *task,
                size,
                piece_size,
                held: Held::Nothing,
            },
        )?;
        if let Some(t) = self
            .task_ids
            .get(task)
            .and_then(|&tk| self.tasks.get_mut(tk))
        {
            if let Some(p) = t.peer_mut(key) {
                p.state = PeerState::Origin;
            }
            if !t.origin_fetchers.contains(&key) {
                t.origin_fetchers.push(key);
            }
        }
        self.hot.bts_seed.inc();
        tracing::info!(blob = %task, seed = %seed, "preheat: seed ordered to fetch from origin");
        Ok(PreheatDecision::Ordered(seed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::SchedulerConfig;
    use crate::host::{HostLoad, HostRegistration, Locality};
    use crate::select::Decision;
    use prometheus_client::registry::Registry;

    fn id(s: &str) -> HostId {
        HostId::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn scheduler() -> Scheduler<ManualClock> {
        let mut registry = Registry::default();
        Scheduler::new(
            SchedulerConfig::default(),
            ManualClock::new(),
            &mut registry,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn register(s: &mut Scheduler<ManualClock>, name: &str, seed: bool) {
        s.register_host(HostRegistration {
            id: id(name),
            addresses: vec!["127.0.0.1:4470".parse().unwrap_or_else(|e| panic!("{e}"))],
            locality: Locality::default(),
            upload_slots: 8,
            upload_limit: 0,
            is_seed: seed,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let _ = s.heartbeat(
            &id(name),
            HostLoad {
                free_upload_slots: Some(8),
                ..HostLoad::default()
            },
        );
    }

    #[test]
    fn without_a_seed_nothing_is_ordered() {
        let mut s = scheduler();
        register(&mut s, "peer-1", false);
        let task =
            Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap_or_else(|e| panic!("{e}"));
        let d = s
            .preheat(&task, 4 << 20, 1 << 20)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(d, PreheatDecision::NoSeed(_)), "{d:?}");
    }

    #[test]
    fn a_preheated_blob_sends_later_askers_to_the_seed_and_is_ordered_once() {
        let mut s = scheduler();
        register(&mut s, "seed-1", true);
        register(&mut s, "peer-1", false);
        let task =
            Digest::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap_or_else(|e| panic!("{e}"));
        let d = s
            .preheat(&task, 4 << 20, 1 << 20)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d, PreheatDecision::Ordered(id("seed-1")));
        let again = s
            .preheat(&task, 4 << 20, 1 << 20)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, PreheatDecision::AlreadyWarm);
        assert!(
            s.preheat(&task, 5 << 20, 1 << 20).is_err(),
            "other geometry is refused"
        );
        s.announce_task(
            &id("peer-1"),
            TaskAnnouncement {
                task,
                size: 4 << 20,
                piece_size: 1 << 20,
                held: Held::Nothing,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        match s
            .decide(&id("peer-1"), &task)
            .unwrap_or_else(|e| panic!("{e}"))
        {
            Decision::Parents(p) => assert_eq!(p.first().map(|p| p.host.as_str()), Some("seed-1")),
            other => panic!("expected the seed as parent, got {other:?}"),
        }
    }
}
