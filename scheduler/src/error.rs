//! The scheduler core's one error type.

use shoal_types::{Digest, HostId};

/// Everything a scheduler call can refuse; each message names the host or blob and what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerError {
    /// A host id or blob digest that breaks its rule.
    #[error(transparent)]
    InvalidId(#[from] shoal_types::IdError),
    /// A host registration that breaks a documented limit (labels, addresses, slots).
    #[error("host {host}: {reason}")]
    InvalidHost {
        /// The host that registered.
        host: HostId,
        /// Which limit it broke.
        reason: String,
    },
    /// A call for a host the scheduler does not know (never registered, left or timed out).
    #[error("host {host} is not registered (it left or timed out): register it again and re-announce its tasks")]
    UnknownHost {
        /// The host named in the call.
        host: HostId,
    },
    /// A call for a task the host has not announced.
    #[error("host {host} has not announced blob {task}: announce the task before reporting on it")]
    NotInTask {
        /// The host named in the call.
        host: HostId,
        /// The blob named in the call.
        task: Digest,
    },
    /// A task announcement whose size, piece size or piece bitmap does not fit.
    #[error("blob {task}: {reason}")]
    InvalidTask {
        /// The blob.
        task: Digest,
        /// What does not fit.
        reason: String,
    },
    /// An announcement that disagrees with what other peers announced for the same blob.
    #[error("blob {task}: {reason}; the announcing host {host} disagrees with the swarm and should re-check the blob's descriptor")]
    TaskMismatch {
        /// The blob.
        task: Digest,
        /// The host whose announcement was refused.
        host: HostId,
        /// What differs.
        reason: String,
    },
    /// A piece index at or past the blob's piece count.
    #[error("blob {task}: piece {piece} reported by {host} is out of range (the blob has {count} pieces)")]
    PieceOutOfRange {
        /// The blob.
        task: Digest,
        /// The reporting host.
        host: HostId,
        /// The bad index.
        piece: u32,
        /// How many pieces the blob has.
        count: u32,
    },
    /// A bound on memory was reached (hosts, tasks, tasks per host, peers per task).
    #[error("{what} limit of {limit} reached{context}: raise it in the scheduler config or spread the load over more schedulers")]
    LimitReached {
        /// Which limit.
        what: &'static str,
        /// Its configured value.
        limit: usize,
        /// Which host or blob hit it (may be empty).
        context: String,
    },
    /// A config value outside its documented range.
    #[error("scheduler config: {0}")]
    Config(String),
}
