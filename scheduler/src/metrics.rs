//! Prometheus metrics of the scheduler core, registered under the `shoal_scheduler` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of `decisions_total`: the decision's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `parents`, `seed_fetch`, `back_to_source`, `wait` or `done`.
    pub outcome: &'static str,
}

/// Label of `back_to_source_total`: who was sent to the origin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `seed` or `peer`.
    pub by: &'static str,
}

/// Label of `failures_reported_total`: the failure kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// See `FailureKind::as_str`.
    pub kind: &'static str,
}

/// The scheduler core's metric handles.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Parent-selection decisions, by outcome.
    pub decisions: Family<OutcomeLabels, Counter>,
    /// Origin fetches ordered, by who fetches.
    pub back_to_source: Family<SourceLabels, Counter>,
    /// Failure reports, by kind.
    pub failures: Family<FailureLabels, Counter>,
    /// Hosts expired for missing heartbeats.
    pub hosts_expired: Counter,
    /// Candidate parents refused because they descend from the asker (or their ancestry is
    /// larger than `cycle_check_limit`).
    pub cycle_refusals: Counter,
    /// Registered hosts.
    pub hosts: Gauge,
    /// Tracked tasks.
    pub tasks: Gauge,
    /// Tracked peer-tasks (peer × blob).
    pub peer_tasks: Gauge,
    /// Peers whose last decision was "wait": the scheduling queue.
    pub queue_depth: Gauge,
}

impl Metrics {
    /// Creates the handles and registers them in `registry` under `shoal_scheduler_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("shoal_scheduler");
        r.register(
            "decisions",
            "Parent-selection decisions by outcome",
            m.decisions.clone(),
        );
        r.register(
            "back_to_source",
            "Origin fetches ordered, by seed or peer",
            m.back_to_source.clone(),
        );
        r.register(
            "failures_reported",
            "Failure reports against parents, by kind",
            m.failures.clone(),
        );
        r.register(
            "hosts_expired",
            "Hosts expired for missing heartbeats",
            m.hosts_expired.clone(),
        );
        r.register(
            "parent_cycle_refusals",
            "Candidate parents refused because they descend from the asker",
            m.cycle_refusals.clone(),
        );
        r.register("hosts", "Registered hosts", m.hosts.clone());
        r.register("tasks", "Tracked tasks (blobs)", m.tasks.clone());
        r.register(
            "peer_tasks",
            "Tracked peer-tasks (peer x blob)",
            m.peer_tasks.clone(),
        );
        r.register(
            "queue_depth",
            "Peers told to wait for a parent",
            m.queue_depth.clone(),
        );
        m
    }
}
