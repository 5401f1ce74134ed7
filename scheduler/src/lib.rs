//! Shoal's scheduler: tracks hosts, blobs and which pieces each peer holds, and decides where
//! each peer fetches the pieces it lacks.
//!
//! Three layers, each using only the ones above it:
//! - the core ([`Scheduler`]: `config`, `ids`, `host`, `task`, `state`, `select`, `reports`,
//!   `lifecycle`, `preheat`, `metrics`, `clock`): all state and every rule, no I/O, no protocol.
//!   All state is soft (rebuilt from peer announcements after a restart) and bounded by
//!   [`SchedulerConfig`];
//! - [`adapter`]: `shoal-proto` messages onto core calls and core answers back onto replies;
//! - [`service`]: the QUIC service (mutual TLS, framing) and its config file
//!   ([`SchedulerServiceConfig`], which embeds the core's config as `[core]`).
//!
//! See README.md for the data path and the selection rules.

// The core.
pub mod clock;
pub mod config;
pub mod error;
pub mod host;
mod ids;
mod lifecycle;
pub mod metrics;
mod preheat;
pub mod reports;
pub mod select;
mod state;
pub mod task;

// Protocol edge, then I/O.
pub mod adapter;
pub mod service;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::SchedulerConfig;
pub use error::SchedulerError;
pub use host::{HostLoad, HostRegistration, Locality};
pub use metrics::Metrics;
pub use preheat::PreheatDecision;
pub use reports::FailureKind;
pub use select::{Decision, Parent};
pub use service::SchedulerServiceConfig;
pub use state::{HostSummary, Scheduler, TaskSummary};
pub use task::{Held, PieceDigest, TaskAnnouncement};
