//! The scheduler core's settings, with defaults in one place and the memory bounds they imply.
//! (The service's file config, which embeds these as `[core]`, is service/config.rs: the core
//! does not know the service.)
//!
//! Memory bounds (see README.md "Memory"): one peer-task costs about 200 bytes plus one bit per
//! piece of the blob, so the worst case is `max_hosts × max_tasks_per_host` peer-tasks, and
//! `max_peers_per_task` caps any one blob's swarm.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::SchedulerError;

/// Most parents one decision can name; `max_parents` may not exceed it (peer-task parents are
/// stored inline).
pub const MAX_PARENTS: usize = 8;

/// Settings of the scheduler core; every field has a default and the same name as its flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// A host with no heartbeat for this long is expired with all its piece holdings.
    pub host_timeout_secs: u64,
    /// Most hosts registered at once.
    pub max_hosts: usize,
    /// Most tasks (blobs) tracked at once.
    pub max_tasks: usize,
    /// Most tasks one ordinary peer may take part in at once.
    pub max_tasks_per_host: usize,
    /// Most tasks one seed may take part in at once (seeds keep more cache).
    pub max_tasks_per_seed: usize,
    /// Most peers tracked in one task; later announcers are refused and use the DHT or origin.
    pub max_peers_per_task: usize,
    /// Most pieces one blob may have (bounds each peer-task's bitset to this many bits).
    pub max_pieces_per_task: u32,
    /// Longest zone or rack label, in bytes.
    pub max_label_len: usize,
    /// Most addresses one host may register.
    pub max_addresses: usize,
    /// Most upload slots one host may claim.
    pub max_upload_slots: u32,
    /// Most parents given in one decision (at most 8).
    pub max_parents: usize,
    /// How many holders are examined per decision before the best are picked (sampled from a
    /// random offset; more are examined, up to `scan_limit`, only while fewer than
    /// `max_parents` are usable).
    pub candidate_limit: usize,
    /// Most holders examined in one decision, usable or not: bounds a decision's cost when
    /// most holders are busy or have nothing the asker lacks (it then gets fewer parents, or
    /// waits and samples elsewhere next time).
    pub scan_limit: usize,
    /// Most ordinary peers fetching one blob from the origin at once when no seed can.
    pub back_to_source_limit: u32,
    /// How long a peer told to wait should wait before asking again, in milliseconds.
    pub wait_retry_ms: u64,
    /// Half-life of a host's recent-failure score, in seconds.
    pub failure_half_life_secs: u64,
    /// Most ancestors visited when checking a candidate parent for cycles; a candidate whose
    /// ancestry is larger is refused (never risk a cycle).
    pub cycle_check_limit: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            host_timeout_secs: 30,
            max_hosts: 50_000,
            max_tasks: 200_000,
            max_tasks_per_host: 2_048,
            max_tasks_per_seed: 65_536,
            max_peers_per_task: 20_000,
            max_pieces_per_task: 65_536,
            max_label_len: 63,
            max_addresses: 8,
            max_upload_slots: 1_024,
            max_parents: 8,
            candidate_limit: 64,
            scan_limit: 256,
            back_to_source_limit: 1,
            wait_retry_ms: 500,
            failure_half_life_secs: 60,
            cycle_check_limit: 256,
        }
    }
}

impl SchedulerConfig {
    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let bad = |m: &str| Err(SchedulerError::Config(m.to_string()));
        if self.host_timeout_secs == 0 {
            return bad("host_timeout_secs must be at least 1");
        }
        if self.max_parents == 0 || self.max_parents > MAX_PARENTS {
            return bad("max_parents must be 1..=8");
        }
        if self.candidate_limit < self.max_parents || self.scan_limit < self.candidate_limit {
            return bad("need max_parents <= candidate_limit <= scan_limit");
        }
        if self.max_peers_per_task == 0 || self.max_peers_per_task > u32::MAX as usize / 2 {
            return bad("max_peers_per_task must be 1..=2^31");
        }
        if self.max_pieces_per_task == 0 || self.max_pieces_per_task > 1 << 24 {
            return bad("max_pieces_per_task must be 1..=16777216");
        }
        if self.max_hosts == 0 || self.max_tasks == 0 {
            return bad("max_hosts and max_tasks must be at least 1");
        }
        if self.max_tasks_per_host == 0 || self.max_tasks_per_seed == 0 {
            return bad("max_tasks_per_host and max_tasks_per_seed must be at least 1");
        }
        if self.failure_half_life_secs == 0 {
            return bad("failure_half_life_secs must be at least 1");
        }
        if self.cycle_check_limit == 0 {
            return bad("cycle_check_limit must be at least 1");
        }
        Ok(())
    }

    /// `host_timeout_secs` as a Duration.
    pub fn host_timeout(&self) -> Duration {
        Duration::from_secs(self.host_timeout_secs)
    }

    /// `wait_retry_ms` as a Duration.
    pub fn wait_retry(&self) -> Duration {
        Duration::from_millis(self.wait_retry_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_toml_rejects_unknown_fields() {
        assert_eq!(SchedulerConfig::default().validate(), Ok(()));
        let parsed: SchedulerConfig = toml::from_str("max_parents = 6").unwrap_or_default();
        assert_eq!(parsed.max_parents, 6);
        assert!(toml::from_str::<SchedulerConfig>("max_parent = 6").is_err());
        let too_many = SchedulerConfig {
            max_parents: 9,
            ..SchedulerConfig::default()
        };
        assert!(too_many.validate().is_err());
    }
}
