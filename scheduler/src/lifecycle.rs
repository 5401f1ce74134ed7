//! Host lifecycle: register (or re-register after a scheduler restart), heartbeat, leave, expire.

use crate::clock::Clock;
use crate::error::SchedulerError;
use crate::host::{Host, HostLoad, HostRegistration};
use crate::state::Scheduler;
use shoal_types::HostId;

impl<C: Clock> Scheduler<C> {
    /// Registers a host, or updates it when it registers again (keeping its tasks and history).
    pub fn register_host(&mut self, reg: HostRegistration) -> Result<(), SchedulerError> {
        let now = self.clock.now();
        let fresh = Host::new(reg, &self.config, now)?;
        if let Some(&hk) = self.host_ids.get(&fresh.id) {
            let is_seed = fresh.is_seed;
            if let Some(host) = self.hosts.get_mut(hk) {
                host.update_from(fresh);
            }
            self.seeds.retain(|&s| s != hk);
            if is_seed {
                self.seeds.push(hk);
            }
            return Ok(());
        }
        if self.hosts.len() >= self.config.max_hosts {
            return Err(SchedulerError::LimitReached {
                what: "hosts",
                limit: self.config.max_hosts,
                context: format!(" registering {}", fresh.id),
            });
        }
        let id = fresh.id.clone();
        let is_seed = fresh.is_seed;
        let hk = self.hosts.insert(fresh);
        self.host_ids.insert(id.clone(), hk);
        if is_seed {
            self.seeds.push(hk);
        }
        self.metrics.hosts.set(self.hosts.len() as i64);
        tracing::debug!(host = %id, seed = is_seed, "host registered");
        Ok(())
    }

    /// Records a heartbeat; an unknown host must register again (the scheduler restarted or
    /// expired it).
    pub fn heartbeat(&mut self, host: &HostId, load: HostLoad) -> Result<(), SchedulerError> {
        let now = self.clock.now();
        let hk = self.host_key(host)?;
        if let Some(h) = self.hosts.get_mut(hk) {
            h.last_heartbeat = now;
            if load.free_upload_slots.is_some() {
                h.reported_free = load.free_upload_slots;
            }
            h.record_load(&load);
        }
        Ok(())
    }

    /// Removes a host that is leaving, with everything it held; returns whether it was known.
    pub fn leave_host(&mut self, host: &HostId) -> bool {
        match self.host_ids.get(host).copied() {
            Some(hk) => {
                self.remove_host(hk);
                tracing::debug!(host = %host, "host left");
                true
            }
            None => false,
        }
    }

    /// Expires every host whose last heartbeat is older than the host timeout; returns them.
    /// Call it every few seconds; it walks all hosts once.
    pub fn expire_hosts(&mut self) -> Vec<HostId> {
        let now = self.clock.now();
        let timeout = self.config.host_timeout();
        let stale: Vec<_> = self
            .hosts
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.last_heartbeat) > timeout)
            .map(|(k, _)| k)
            .collect();
        let mut expired = Vec::with_capacity(stale.len());
        for hk in stale {
            if let Some(id) = self.remove_host(hk) {
                tracing::info!(host = %id, "host expired: no heartbeat within the timeout");
                self.metrics.hosts_expired.inc();
                expired.push(id);
            }
        }
        expired
    }
}
