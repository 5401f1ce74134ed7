//! Test fixtures: real servers (registry, S3, relay, containerd) started by Shoal's tests.
//!
//! - [`Registry`]: Debian's `docker-registry` with a generated config (anonymous, htpasswd basic
//!   auth, or bearer tokens from a small issuer in this crate), its access log parsed.
//! - [`MotoS3`]: `moto_server` as an S3-compatible endpoint.
//! - [`Relay`]: an HTTP relay in front of a server that injects 5xx answers, cuts bodies, and
//!   redirects blob GETs to a "storage" address on another host name (to check credentials are
//!   not forwarded).
//! - [`Containerd`]: Debian's containerd 1.6 with its CRI plugin and real runc, in a private
//!   mount namespace ([`MountNs`]) with its own `/run`, roots on tmpfs and a generated config
//!   (snapshotter `overlayfs` or Shoal's proxy plugin, registry hosts dirs); [`Cri`] drives it
//!   the way kubelet does. [`LayerBuilder`], [`write_layout`] and [`sandbox_image`] build the
//!   small busybox images those tests run, as OCI layouts pushed with [`OciLayout::push`];
//!   [`ShoalNode`] runs a node's `shoal peer` and `shoal snapshotter` beside it.
//!
//! Everything is stopped on drop. [`need_binaries`] tells a test to skip when a tool is missing
//! (and fails under `CI=true`, where every tool must be installed).

mod containerd;
pub mod cri;
pub mod http;
mod mntns;
mod moto;
mod oci_image;
mod registry;
mod relay;
mod shoal_node;
pub mod token;

pub use containerd::{Containerd, ContainerdOpts, Teardown, CRI_NAMESPACE, OVERLAYFS, SHOAL};
pub use cri::{Auth, Container, ContainerLog, ContainerSpec, Cri, CriError, Exit, Pod};
pub use mntns::{CgroupScope, MountNs, NsProcess};
pub use moto::MotoS3;
pub use oci_image::{
    oci_arch, read_blob, sandbox_image, write_layout, ImageConfig, LayerBuilder, LayerDesc,
    OciLayout, BUSYBOX,
};
pub use registry::{
    parse_access_line, random_bytes, sha256_digest, AccessEntry, Registry, RegistryAuth,
    RegistryOpts, TestImage,
};
pub use relay::{Relay, RelayFaults, RelayStats};
pub use shoal_node::ShoalNode;

/// What went wrong setting up a fixture.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A tool is not installed: the test should skip.
    #[error("skipped: {0}")]
    Missing(String),
    /// A fixture could not start.
    #[error("test fixture setup failed: {0}")]
    Setup(String),
    /// A fixture's HTTP call failed.
    #[error("test fixture HTTP call failed: {0}")]
    Http(String),
}

/// `Ok(())` when every binary is on `PATH`; otherwise prints the skip reason and returns it.
/// Under `CI=true` a missing binary panics: CI installs every tool, so a skip there hides a bug.
pub fn need_binaries(names: &[&str]) -> Result<(), String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !std::env::split_paths(&path).any(|d| d.join(n).is_file()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let reason = format!("{} not installed (on PATH)", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI must have every test tool: {reason}");
    }
    eprintln!("SKIP: {reason}");
    Err(reason)
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> Result<u16, TestkitError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| TestkitError::Setup(format!("no free port: {e}")))
}

/// Starts a fixture, or prints why the test is skipped and returns `None`.
/// Setup failures other than a missing tool panic with the reason.
pub fn or_skip<T>(r: Result<T, TestkitError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(TestkitError::Missing(reason)) => {
            eprintln!("SKIP: {reason}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}
