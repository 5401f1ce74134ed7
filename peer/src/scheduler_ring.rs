//! Several schedulers: one connection per scheduler, and per blob the scheduler that owns it by
//! rendezvous hashing (highest `BLAKE3(address, blob)` wins). When the owner does not answer the
//! blob goes to the next scheduler in its rendezvous order; when the owner is back it takes the
//! blob back, because the order is computed on every request. A scheduler's state is soft: after
//! any scheduler registers or is lost, the peer announces each of its tasks again to whichever
//! scheduler owns that task now (docs/protocol.md, "Several schedulers").
//!
//! The list is static (`schedulers = [...]`) or the addresses behind one DNS name (a Kubernetes
//! headless Service), resolved again every `scheduler_dns_refresh_secs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::{Digest, RegisterHost};
use tokio::sync::mpsc;

use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::scheduler_client::{HostHooks, SchedEvent, SchedulerClient};
use crate::transport::Transport;

/// Where the scheduler list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SchedulerSource {
    /// A fixed list.
    Static(Vec<SocketAddr>),
    /// Every address `name:port` resolves to, resolved again every `refresh`.
    Dns {
        /// `name:port`.
        name: String,
        /// How often to resolve again.
        refresh: Duration,
    },
}

/// The rendezvous score of scheduler `addr` for `blob`: the highest score owns the blob.
pub fn rendezvous_score(addr: &SocketAddr, blob: &Digest) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(addr.to_string().as_bytes());
    h.update(&[0]);
    h.update(blob.to_string().as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// `addrs` in rendezvous order for `blob`: owner first, then the failover order.
pub fn rendezvous_order(addrs: &[SocketAddr], blob: &Digest) -> Vec<SocketAddr> {
    let mut scored: Vec<(u64, SocketAddr)> = addrs
        .iter()
        .map(|a| (rendezvous_score(a, blob), *a))
        .collect();
    // Ties (practically impossible) are broken by address so every peer agrees.
    scored.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
    scored.into_iter().map(|(_, a)| a).collect()
}

/// What a new per-scheduler client needs.
struct Template {
    transport: Arc<Transport>,
    name: String,
    timeout: Duration,
    registration: RegisterHost,
    hooks: HostHooks,
    events: mpsc::UnboundedSender<SchedEvent>,
}

/// One live client and the task keeping its connection up.
struct Member {
    client: Arc<SchedulerClient>,
    task: tokio::task::JoinHandle<()>,
}

/// The peer's schedulers: one client per address, blobs spread by rendezvous hashing.
pub(crate) struct SchedulerRing {
    template: Template,
    source: SchedulerSource,
    members: Mutex<HashMap<SocketAddr, Member>>,
}

impl std::fmt::Debug for SchedulerRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerRing")
            .field("source", &self.source)
            .field("schedulers", &self.addresses())
            .finish()
    }
}

impl SchedulerRing {
    /// A ring over `source`; call [`Self::spawn`] to connect.
    pub fn new(
        transport: Arc<Transport>,
        source: SchedulerSource,
        name: String,
        timeout: Duration,
        registration: RegisterHost,
        hooks: HostHooks,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<SchedEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let ring = Arc::new(SchedulerRing {
            template: Template {
                transport,
                name,
                timeout,
                registration,
                hooks,
                events,
            },
            source,
            members: Mutex::new(HashMap::new()),
        });
        (ring, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Member>> {
        crate::sync::lock(&self.members)
    }

    /// Every scheduler address in use now.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut v: Vec<_> = self.lock().keys().copied().collect();
        v.sort();
        v
    }

    /// The scheduler that owns `blob` now: the first connected one in its rendezvous order.
    pub fn for_blob(&self, blob: &Digest) -> Option<Arc<SchedulerClient>> {
        let members = self.lock();
        let addrs: Vec<SocketAddr> = members.keys().copied().collect();
        rendezvous_order(&addrs, blob)
            .into_iter()
            .filter_map(|a| members.get(&a))
            .map(|m| &m.client)
            .find(|c| c.is_connected())
            .cloned()
    }

    /// Any connected scheduler (for requests about no blob, like ListHosts).
    pub fn any(&self) -> Option<Arc<SchedulerClient>> {
        self.lock()
            .values()
            .map(|m| &m.client)
            .find(|c| c.is_connected())
            .cloned()
    }

    /// How many schedulers are connected now.
    pub fn connected(&self) -> usize {
        self.lock()
            .values()
            .filter(|m| m.client.is_connected())
            .count()
    }

    /// Makes the member set equal to `addrs`: new schedulers are dialled, gone ones dropped.
    fn set_addresses(&self, addrs: &[SocketAddr]) {
        let mut removed = Vec::new();
        {
            let mut members = self.lock();
            members.retain(|a, m| {
                let keep = addrs.contains(a);
                if !keep {
                    removed.push((*a, Arc::clone(&m.client)));
                    m.task.abort();
                }
                keep
            });
            for a in addrs {
                if members.contains_key(a) {
                    continue;
                }
                let t = &self.template;
                let client = SchedulerClient::new(
                    Arc::clone(&t.transport),
                    *a,
                    t.name.clone(),
                    t.timeout,
                    t.registration.clone(),
                    t.hooks.clone(),
                    t.events.clone(),
                );
                let task = client.spawn();
                tracing::info!(scheduler = %a, "scheduler added");
                members.insert(*a, Member { client, task });
            }
        }
        if !removed.is_empty() {
            // Ownership moved: tasks are announced again to their new owners.
            let _ = self.template.events.send(SchedEvent::Lost);
        }
        for (a, c) in removed {
            tracing::info!(scheduler = %a, "scheduler removed (no longer resolved)");
            c.stop();
        }
    }

    /// Connects to every scheduler and, for a DNS source, resolves it again periodically.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            match this.source.clone() {
                SchedulerSource::Static(addrs) => {
                    this.set_addresses(&addrs);
                    std::future::pending::<()>().await;
                }
                SchedulerSource::Dns { name, refresh } => loop {
                    match resolve(&name).await {
                        Ok(addrs) if !addrs.is_empty() => {
                            if addrs != this.addresses() {
                                this.set_addresses(&addrs);
                            }
                        }
                        // An empty or failed answer keeps the last list: a DNS hiccup is
                        // not a reason to drop every scheduler.
                        Ok(_) => {
                            tracing::warn!(name = %name, "scheduler DNS name resolved to nothing")
                        }
                        Err(e) => tracing::warn!(error = %e, "resolving schedulers failed"),
                    }
                    tokio::time::sleep(refresh).await;
                },
            }
        })
    }

    /// Tells every connected scheduler this host leaves, and stops re-dialling.
    pub async fn leave(&self) {
        let members: Vec<_> = self
            .lock()
            .drain()
            .map(|(_, m)| {
                m.task.abort();
                m.client
            })
            .collect();
        futures::future::join_all(members.iter().map(|c| c.leave())).await;
    }
}

impl Drop for SchedulerRing {
    fn drop(&mut self) {
        for m in self.lock().values() {
            m.task.abort();
        }
    }
}

/// The scheduler list a config asks for; `None`: no scheduler (DHT and origin only).
pub(crate) fn source_of(cfg: &PeerConfig) -> Option<SchedulerSource> {
    if let Some(name) = &cfg.scheduler_dns {
        return Some(SchedulerSource::Dns {
            name: name.clone(),
            refresh: Duration::from_secs(cfg.scheduler_dns_refresh_secs.max(1)),
        });
    }
    let mut addrs: Vec<SocketAddr> = cfg
        .scheduler
        .iter()
        .chain(&cfg.schedulers)
        .copied()
        .collect();
    addrs.sort();
    addrs.dedup();
    (!addrs.is_empty()).then_some(SchedulerSource::Static(addrs))
}

/// Checks the scheduler fields of a config.
pub(crate) fn check_config(cfg: &PeerConfig) -> Result<(), PeerError> {
    for (field, name) in [
        ("scheduler_dns", &cfg.scheduler_dns),
        ("dht_bootstrap_dns", &cfg.dht_bootstrap_dns),
    ] {
        if let Some(name) = name {
            let port_ok = name
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(PeerError::Config(format!(
                    "{field} {name:?} must be \"name:port\", e.g. \"shoal-scheduler.shoal.svc:4471\""
                )));
            }
        }
    }
    if cfg.scheduler_dns.is_some() && (cfg.scheduler.is_some() || !cfg.schedulers.is_empty()) {
        return Err(PeerError::Config(
            "set either scheduler_dns or scheduler/schedulers, not both".into(),
        ));
    }
    Ok(())
}

/// Every address `name` ("host:port") resolves to, sorted and without duplicates.
pub(crate) async fn resolve(name: &str) -> Result<Vec<SocketAddr>, PeerError> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(name)
        .await
        .map_err(|e| PeerError::io("resolve", name, e))?
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(i: u32) -> Digest {
        let hex = blake3::hash(&i.to_le_bytes()).to_hex().to_string();
        Digest::parse(&format!("sha256:{hex}")).unwrap()
    }

    #[test]
    fn rendezvous_spreads_blobs_and_moves_only_the_lost_schedulers_blobs() {
        let s: Vec<SocketAddr> = (0..3)
            .map(|i| SocketAddr::from(([10, 0, 0, i + 1], 4471)))
            .collect();
        let mut owned = HashMap::new();
        for i in 0..3000 {
            let b = blob(i);
            let order = rendezvous_order(&s, &b);
            assert_eq!(order.len(), 3);
            *owned.entry(order[0]).or_insert(0u32) += 1;
            // Without s[0], a blob it did not own keeps its owner; one it owned goes to the
            // next in its own order.
            let without: Vec<_> = s[1..].to_vec();
            let after = rendezvous_order(&without, &b);
            if order[0] == s[0] {
                assert_eq!(after[0], order[1]);
            } else {
                assert_eq!(after[0], order[0]);
            }
        }
        for a in &s {
            let n = owned[a];
            assert!((800..1200).contains(&n), "{a} owns {n} of 3000");
        }
    }
}
