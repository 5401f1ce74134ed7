//! Hosts: who they are, where they are, how much they can upload, and how they have behaved.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::SchedulerConfig;
use crate::error::SchedulerError;
use crate::ids::TaskKey;
use shoal_types::HostId;

/// What a host tells the scheduler when it registers (again, after a scheduler restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRegistration {
    /// The host's name (its certificate's).
    pub id: HostId,
    /// Where its piece server listens.
    pub addresses: Vec<SocketAddr>,
    /// Failure-domain labels, as Kubernetes topology labels give them.
    pub locality: Locality,
    /// How many children it accepts at once.
    pub upload_slots: u32,
    /// Its upload rate limit in bytes per second (0: unlimited).
    pub upload_limit: u64,
    /// Whether it is a seed (`shoal peer --seed`): fetches from the origin on request.
    pub is_seed: bool,
}

/// A host's failure-domain labels; empty strings mean "unknown".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    /// Zone label (e.g. topology.kubernetes.io/zone).
    pub zone: String,
    /// Rack label, meaningful within the zone.
    pub rack: String,
}

/// Load a host reports with its heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLoad {
    /// Upload slots the host itself counts as free right now; `None` when it did not say.
    pub free_upload_slots: Option<u32>,
    /// Bytes per second it uploaded over its last heartbeat interval; `None` when it did not say.
    pub upload_bytes_per_sec: Option<u64>,
    /// Bytes per second it downloaded over its last heartbeat interval; `None` when it did not say.
    pub download_bytes_per_sec: Option<u64>,
}

/// How close two hosts are: same rack (within the zone), same zone, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Closeness {
    Far,
    SameZone,
    SameRack,
}

/// One registered host.
#[derive(Debug)]
pub(crate) struct Host {
    pub id: HostId,
    pub addresses: Arc<[SocketAddr]>,
    pub locality: Locality,
    /// Hashes of the zone and of (zone, rack), so scoring compares integers; 0 = no label.
    zone_hash: u64,
    rack_hash: u64,
    pub upload_slots: u32,
    /// Parent edges the scheduler has handed out that end at this host, over all tasks.
    pub children: u32,
    /// Free slots by the host's own count at its last heartbeat.
    pub reported_free: Option<u32>,
    pub is_seed: bool,
    pub last_heartbeat: Instant,
    /// Tasks this host takes part in (bounded by max_tasks_per_host / max_tasks_per_seed).
    pub tasks: Vec<TaskKey>,
    /// Upload throughput measured by its children, bytes per second (EWMA); 0 = not yet measured.
    pub throughput: f32,
    /// Its upload rate limit (bytes/s, 0: unlimited), as registered.
    upload_limit: u64,
    /// Bytes/s it uploaded over its last heartbeat interval.
    upload_rate: f32,
    /// The most bytes/s it has moved in either direction over one interval: what its link can
    /// carry at least (links are assumed symmetric), the uplink's capacity when no limit is set.
    link_peak: f32,
    failure_score: f32,
    failure_at: Instant,
}

fn label_hash(parts: &[&str]) -> u64 {
    if parts.iter().any(|p| p.is_empty()) {
        return 0;
    }
    let mut h = rustc_hash::FxHasher::default();
    parts.hash(&mut h);
    h.finish() | 1
}

impl Host {
    /// Checks a registration against the config's bounds and builds the host.
    pub fn new(
        reg: HostRegistration,
        config: &SchedulerConfig,
        now: Instant,
    ) -> Result<Self, SchedulerError> {
        let bad = |reason: String| SchedulerError::InvalidHost {
            host: reg.id.clone(),
            reason,
        };
        for (name, label) in [("zone", &reg.locality.zone), ("rack", &reg.locality.rack)] {
            if label.len() > config.max_label_len {
                return Err(bad(format!(
                    "{name} label is {} bytes, the limit is {}",
                    label.len(),
                    config.max_label_len
                )));
            }
            if label.chars().any(char::is_control) {
                return Err(bad(format!("{name} label holds control characters")));
            }
        }
        if reg.addresses.len() > config.max_addresses {
            return Err(bad(format!(
                "{} addresses registered, the limit is {}",
                reg.addresses.len(),
                config.max_addresses
            )));
        }
        if reg.upload_slots > config.max_upload_slots {
            return Err(bad(format!(
                "{} upload slots claimed, the limit is {}",
                reg.upload_slots, config.max_upload_slots
            )));
        }
        let zone_hash = label_hash(&[&reg.locality.zone]);
        let rack_hash = label_hash(&[&reg.locality.zone, &reg.locality.rack]);
        Ok(Self {
            id: reg.id,
            addresses: reg.addresses.into(),
            locality: reg.locality,
            zone_hash,
            rack_hash,
            upload_slots: reg.upload_slots,
            children: 0,
            reported_free: None,
            is_seed: reg.is_seed,
            last_heartbeat: now,
            tasks: Vec::new(),
            throughput: 0.0,
            upload_limit: reg.upload_limit,
            upload_rate: 0.0,
            link_peak: 0.0,
            failure_score: 0.0,
            failure_at: now,
        })
    }

    /// Takes a re-registration's fields, keeping measured history and task membership.
    pub fn update_from(&mut self, fresh: Host) {
        self.addresses = fresh.addresses;
        self.locality = fresh.locality;
        self.zone_hash = fresh.zone_hash;
        self.rack_hash = fresh.rack_hash;
        self.upload_slots = fresh.upload_slots;
        self.upload_limit = fresh.upload_limit;
        self.is_seed = fresh.is_seed;
        self.last_heartbeat = fresh.last_heartbeat;
    }

    /// How close `other` is to this host.
    #[inline]
    pub fn closeness(&self, other: &Host) -> Closeness {
        if self.rack_hash != 0 && self.rack_hash == other.rack_hash {
            Closeness::SameRack
        } else if self.zone_hash != 0 && self.zone_hash == other.zone_hash {
            Closeness::SameZone
        } else {
            Closeness::Far
        }
    }

    /// Upload slots not yet taken, by the scheduler's count or the host's own, whichever is lower.
    #[inline]
    pub fn free_slots(&self) -> u32 {
        let ours = self.upload_slots.saturating_sub(self.children);
        self.reported_free.map_or(ours, |theirs| ours.min(theirs))
    }

    /// The task cap that applies to this host.
    pub fn task_limit(&self, config: &SchedulerConfig) -> usize {
        if self.is_seed {
            config.max_tasks_per_seed
        } else {
            config.max_tasks_per_host
        }
    }

    /// Recent failures, decayed by the half-life.
    #[inline]
    pub fn failures(&self, now: Instant, half_life: Duration) -> f32 {
        if self.failure_score == 0.0 {
            return 0.0;
        }
        let age = now.saturating_duration_since(self.failure_at).as_secs_f32();
        self.failure_score * (-age / half_life.as_secs_f32()).exp2()
    }

    /// Counts one more failure reported against this host.
    pub fn record_failure(&mut self, now: Instant, half_life: Duration) {
        self.failure_score = self.failures(now, half_life) + 1.0;
        self.failure_at = now;
    }

    /// Records the rates a heartbeat reported.
    pub fn record_load(&mut self, load: &HostLoad) {
        if let Some(up) = load.upload_bytes_per_sec {
            self.upload_rate = up as f32;
            self.link_peak = self.link_peak.max(up as f32);
        }
        if let Some(down) = load.download_bytes_per_sec {
            self.link_peak = self.link_peak.max(down as f32);
        }
    }

    /// The share of its uplink not in use at its last heartbeat, 0 to 1: its upload rate
    /// against its limit, or, without one, against the most it has moved in either direction.
    /// A host that uploads nothing (or never said) has all of it.
    pub fn spare_uplink(&self) -> f32 {
        let capacity = match self.upload_limit {
            0 => self.link_peak,
            limit => limit as f32,
        };
        if self.upload_rate <= 0.0 || capacity <= 0.0 {
            return 1.0;
        }
        (1.0 - self.upload_rate / capacity).clamp(0.0, 1.0)
    }

    /// Folds one measured transfer from this host into its throughput.
    pub fn record_throughput(&mut self, bytes: u64, elapsed: Duration) {
        let secs = elapsed.as_secs_f32().max(1e-3);
        let sample = bytes as f32 / secs;
        self.throughput = if self.throughput == 0.0 {
            sample
        } else {
            0.7 * self.throughput + 0.3 * sample
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, zone: &str, rack: &str) -> Host {
        let reg = HostRegistration {
            id: HostId::new(id).unwrap_or_else(|e| panic!("{e}")),
            addresses: vec![],
            locality: Locality {
                zone: zone.into(),
                rack: rack.into(),
            },
            upload_slots: 4,
            upload_limit: 0,
            is_seed: false,
        };
        Host::new(reg, &SchedulerConfig::default(), Instant::now())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn closeness_needs_labels_and_racks_are_scoped_to_zones() {
        let a = host("a", "z1", "r1");
        assert_eq!(a.closeness(&host("b", "z1", "r1")), Closeness::SameRack);
        assert_eq!(a.closeness(&host("c", "z1", "r2")), Closeness::SameZone);
        assert_eq!(a.closeness(&host("d", "z2", "r1")), Closeness::Far);
        let unlabeled = host("e", "", "");
        assert_eq!(unlabeled.closeness(&host("f", "", "")), Closeness::Far);
    }

    #[test]
    fn failures_decay_with_the_half_life() {
        let mut a = host("a", "", "");
        let t0 = Instant::now();
        let half = Duration::from_secs(60);
        a.record_failure(t0, half);
        a.record_failure(t0, half);
        assert!((a.failures(t0, half) - 2.0).abs() < 1e-4);
        assert!((a.failures(t0 + half, half) - 1.0).abs() < 1e-3);
    }

    #[test]
    fn registration_limits_are_enforced() {
        let config = SchedulerConfig::default();
        let reg = HostRegistration {
            id: HostId::new("a").unwrap_or_else(|e| panic!("{e}")),
            addresses: vec![],
            locality: Locality {
                zone: "z".repeat(64),
                rack: String::new(),
            },
            upload_slots: 4,
            upload_limit: 0,
            is_seed: false,
        };
        assert!(Host::new(reg.clone(), &config, Instant::now()).is_err());
        let too_many_slots = HostRegistration {
            upload_slots: 5_000,
            upload_limit: 0,
            locality: Locality::default(),
            ..reg
        };
        assert!(Host::new(too_many_slots, &config, Instant::now()).is_err());
    }

    #[test]
    fn spare_uplink_is_measured_against_the_limit_or_the_link() {
        let now = Instant::now();
        let reg = |limit| HostRegistration {
            id: HostId::new("h").unwrap_or_else(|e| panic!("{e}")),
            addresses: vec![],
            locality: Locality::default(),
            upload_slots: 4,
            upload_limit: limit,
            is_seed: false,
        };
        let load = |up: u64, down: u64| HostLoad {
            upload_bytes_per_sec: Some(up),
            download_bytes_per_sec: Some(down),
            ..HostLoad::default()
        };
        let cfg = SchedulerConfig::default();
        let mut h = Host::new(reg(0), &cfg, now).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.spare_uplink(), 1.0, "never said: all of it");
        // It downloaded at 200/s once: its link carries that much; uploading 50/s leaves 3/4.
        h.record_load(&load(0, 200));
        h.record_load(&load(50, 0));
        assert_eq!(h.spare_uplink(), 0.75);
        h.record_load(&load(0, 0));
        assert_eq!(h.spare_uplink(), 1.0);
        // With a limit, the limit is the capacity.
        let mut limited = Host::new(reg(100), &cfg, now).unwrap_or_else(|e| panic!("{e}"));
        limited.record_load(&load(100, 1000));
        assert_eq!(limited.spare_uplink(), 0.0);
    }
}
