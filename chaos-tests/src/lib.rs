//! Chaos harness: builds a small cluster of hosts on one machine and breaks it on purpose.
//!
//! - [`TestNet`]: K hosts, each a network namespace joined by a veth pair to a bridge that lives
//!   in its own "hub" namespace (the machine's own network is never touched). Per-host links get
//!   tbf bandwidth caps in both directions, random packet loss (iptables `statistic`), and
//!   partitions between host sets (iptables DROP), all applied in the hub and undone by `heal`.
//! - [`Proc`]: a child process (optionally inside a host) logging to a file, with kill (SIGKILL),
//!   pause (SIGSTOP), resume (SIGCONT) and restart; killed on drop.
//! - [`DelayRelay`]: a userspace TCP relay that delays each direction (the kernel here has no
//!   netem); [`FaultRelay`]: an HTTP relay in front of a registry that injects 500s, truncated,
//!   slow and corrupted bodies and counts the bytes it served per path.
//! - [`Tmpfs`] and [`corrupt_byte`]: a small disk to fill, a stored byte to flip.
//!
//! Everything is removed on drop, also when a test panics. Names carry a per-process prefix; a
//! sweep at start removes namespaces left by earlier runs that were killed. See
//! docs/reliability.md for the design and the scenario table.

mod cmd;
mod delay;
mod disk;
mod fault;
mod fetch;
mod net;
mod netns;
mod process;
mod shape;

pub use delay::DelayRelay;
pub use disk::{corrupt_byte, fill_dir, Tmpfs};
pub use fault::{Fault, FaultRelay, FaultScope, FaultStats};
pub use fetch::{http_get, HttpReply};
pub use net::{leftover_namespaces, Host, TestNet, MAX_HOSTS};
pub use netns::Netns;
pub use process::{Cmd, Proc};
pub use shape::{netem_available, IptablesBackend};

/// What went wrong in the harness.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// Not root, or a tool is missing: the test should skip.
    #[error("skipped: {0}")]
    Missing(String),
    /// A command the harness ran failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else that stops a fixture from starting or answering.
    #[error("chaos harness: {0}")]
    Setup(String),
}

/// Result of harness calls.
pub type Result<T, E = ChaosError> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ChaosError {
    let what = what.into();
    move |source| ChaosError::Io { what, source }
}

/// `Ok(())` when running as root with `ip`, `tc` and iptables installed; otherwise the reason
/// (printed; a panic under `CI=true`: `shoal_testkit::require` decides).
pub fn require_root_tools() -> Result<()> {
    let needs = shoal_testkit::Needs::root(&["ip", "tc", "iptables-nft|iptables-legacy"]);
    shoal_testkit::require(needs).map_err(ChaosError::Missing)
}

/// Starts a fixture, or prints why the test is skipped and returns `None`.
/// Failures other than a missing prerequisite panic with the reason.
pub fn or_skip<T>(r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        // Printed (or failed under CI) where it was found missing.
        Err(ChaosError::Missing(_)) => None,
        Err(e) => panic!("{e}"),
    }
}
