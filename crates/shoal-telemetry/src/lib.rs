//! Shoal's telemetry: one way to set up logs (human or JSON, env-filter) and one small HTTP
//! server for `/metrics` (Prometheus text from a prometheus-client registry), `/healthz`
//! (liveness: the process answers) and `/readyz` (readiness: a callback of the component).
//!
//! It does not decide what is measured: each component registers its own metrics and says
//! when it is ready.

mod logs;
mod server;

pub use logs::{init_tracing, LogFormat};
pub use prometheus_client::registry::Registry;
pub use server::{serve, ReadyFn, TelemetryServer, DEFAULT_METRICS_ADDR};

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error(
        "log filter {filter:?} is invalid: {reason} (use e.g. `info` or `shoal_peer=debug,warn`)"
    )]
    Filter {
        /// The filter text.
        filter: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A global log subscriber was already set.
    #[error("logging was already initialised in this process")]
    AlreadyInitialised,
    /// The metrics address could not be bound.
    #[error("bind the metrics and health server on {addr}: {source} (choose another with --metrics-listen)")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}
