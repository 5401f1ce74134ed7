//! A small harness: a scheduler on a manual clock, and helpers that read like the scenario.
#![allow(dead_code)]

use prometheus_client::registry::Registry;
use shoal_scheduler::{
    Decision, Held, HostLoad, HostRegistration, Locality, ManualClock, Scheduler, SchedulerConfig,
    TaskAnnouncement,
};
pub use shoal_types::{Digest, HostId, PieceSet};

/// Pieces per test blob.
pub const PIECES: u32 = 16;
/// Piece size of test blobs.
pub const PIECE_SIZE: u32 = 64 * 1024;

pub struct Cluster {
    pub s: Scheduler<ManualClock>,
    pub clock: ManualClock,
    pub registry: Registry,
}

pub fn cluster() -> Cluster {
    cluster_with(SchedulerConfig::default())
}

pub fn cluster_with(config: SchedulerConfig) -> Cluster {
    let clock = ManualClock::new();
    let mut registry = Registry::default();
    let mut s = Scheduler::new(config, clock.clone(), &mut registry)
        .unwrap_or_else(|e| panic!("scheduler: {e}"));
    s.seed_rng(7);
    Cluster { s, clock, registry }
}

pub fn id(name: &str) -> HostId {
    HostId::new(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn blob(n: u8) -> Digest {
    Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32)))
        .unwrap_or_else(|e| panic!("{e}"))
}

pub fn registration(
    name: &str,
    zone: &str,
    rack: &str,
    slots: u32,
    seed: bool,
) -> HostRegistration {
    HostRegistration {
        id: id(name),
        addresses: vec![format!("127.0.0.1:{}", 4470)
            .parse()
            .unwrap_or_else(|e| panic!("{e}"))],
        locality: Locality {
            zone: zone.into(),
            rack: rack.into(),
        },
        upload_slots: slots,
        upload_limit: 0,
        is_seed: seed,
    }
}

/// A set holding exactly `pieces` of a PIECES-piece blob.
pub fn holding(pieces: impl IntoIterator<Item = u32>) -> Held {
    let mut set = PieceSet::empty(PIECES);
    for p in pieces {
        set.insert(p);
    }
    Held::Set(set)
}

impl Cluster {
    pub fn host(&mut self, name: &str, zone: &str, rack: &str, slots: u32, seed: bool) -> HostId {
        self.s
            .register_host(registration(name, zone, rack, slots, seed))
            .unwrap_or_else(|e| panic!("register {name}: {e}"));
        id(name)
    }

    /// An ordinary peer with 8 upload slots and no labels.
    pub fn peer(&mut self, name: &str) -> HostId {
        self.host(name, "", "", 8, false)
    }

    /// A seed with 64 upload slots and no labels.
    pub fn seed(&mut self, name: &str) -> HostId {
        self.host(name, "", "", 64, true)
    }

    pub fn announce(&mut self, host: &HostId, task: &Digest, held: Held) {
        self.s
            .announce_task(
                host,
                TaskAnnouncement {
                    task: *task,
                    size: u64::from(PIECES) * u64::from(PIECE_SIZE),
                    piece_size: PIECE_SIZE,
                    held,
                },
            )
            .unwrap_or_else(|e| panic!("announce {host} {task}: {e}"));
    }

    pub fn decide(&mut self, host: &HostId, task: &Digest) -> Decision {
        self.s
            .decide(host, task)
            .unwrap_or_else(|e| panic!("decide {host} {task}: {e}"))
    }

    pub fn beat(&mut self, host: &HostId) {
        self.s
            .heartbeat(host, HostLoad::default())
            .unwrap_or_else(|e| panic!("heartbeat {host}: {e}"));
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        out
    }
}

/// The parent names of a decision (the seed first for a seed fetch).
pub fn parents(d: &Decision) -> Vec<String> {
    match d {
        Decision::Parents(p) | Decision::SeedFetch { parents: p, .. } => {
            p.iter().map(|p| p.host.to_string()).collect()
        }
        _ => vec![],
    }
}
