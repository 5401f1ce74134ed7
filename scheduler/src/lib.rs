//! Shoal's scheduler core: tracks hosts, blobs and which pieces each peer holds, and decides
//! where each peer fetches the pieces it lacks.
//!
//! It does no I/O: the QUIC service feeds it registrations, heartbeats, announcements and
//! reports, asks it for decisions, and sends the answers. All state is soft (rebuilt from peer
//! announcements after a restart) and bounded by [`SchedulerConfig`]. See README.md for the data
//! path and the selection rules.

pub mod adapter;
pub mod clock;
pub mod config;
pub mod error;
pub mod host;
pub mod ids;
mod lifecycle;
pub mod metrics;
pub mod pieces;
mod preheat;
pub mod reports;
pub mod select;
pub mod service;
mod state;
pub mod task;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{SchedulerConfig, SchedulerServiceConfig};
pub use error::SchedulerError;
pub use host::{HostLoad, HostRegistration, Locality};
pub use ids::{HostId, TaskId};
pub use metrics::Metrics;
pub use pieces::PieceSet;
pub use preheat::PreheatDecision;
pub use reports::FailureKind;
pub use select::{Decision, Parent};
pub use state::{HostSummary, Scheduler, TaskSummary};
pub use task::{Held, PieceDigest, TaskAnnouncement};
