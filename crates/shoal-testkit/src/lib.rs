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
//! Everything is stopped on drop. [`require`] is the one place that decides whether this machine
//! can run a test (root, tools, devices): a test skips with a printed reason when it cannot, and
//! fails instead under `CI=true`, where everything is installed and tests run as root.

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

/// What a test needs of this machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs<'a> {
    /// Root (mounts, network namespaces, device nodes, file owners).
    pub root: bool,
    /// Programs on `PATH`; `"a|b"` is satisfied by either.
    pub tools: &'a [&'a str],
    /// Files that must exist (`/dev/fuse`, `/bin/busybox`).
    pub paths: &'a [&'a str],
}

impl<'a> Needs<'a> {
    /// Root and these tools.
    pub fn root(tools: &'a [&'a str]) -> Self {
        Needs {
            root: true,
            tools,
            paths: &[],
        }
    }

    /// These tools.
    pub fn tools(tools: &'a [&'a str]) -> Self {
        Needs {
            root: false,
            tools,
            paths: &[],
        }
    }

    /// And these files.
    pub fn and_paths(self, paths: &'a [&'a str]) -> Self {
        Needs { paths, ..self }
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `tool` is a file on `PATH`.
pub fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(tool).is_file())
}

/// Whether tests run under CI (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The one decision "can this machine run the test": `Ok(())` when it has everything in
/// `needs`; otherwise [`cannot_run`] with what is missing (a printed skip, or a panic under CI).
pub fn require(needs: Needs<'_>) -> Result<(), String> {
    let mut missing = Vec::new();
    if needs.root && !is_root() {
        missing.push("root".to_string());
    }
    for group in needs.tools {
        if !group.split('|').any(on_path) {
            missing.push(format!("`{}` on PATH", group.replace('|', "` or `")));
        }
    }
    for p in needs.paths {
        if !std::path::Path::new(p).exists() {
            missing.push((*p).to_string());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(cannot_run(format!("needs {}", missing.join(", "))))
}

/// A test that cannot run here for `reason`: under `CI=true` that is a failure (CI runs as
/// root with every tool deploy/local/deps.sh installs, so a skip there would hide a bug), and
/// this panics; elsewhere it prints `SKIP: reason` and returns the reason.
pub fn cannot_run(reason: impl std::fmt::Display) -> String {
    let reason = reason.to_string();
    if in_ci() {
        panic!("CI=true: a test cannot run: {reason}");
    }
    eprintln!("SKIP: {reason}");
    reason
}

/// `Ok(())` when every binary is on `PATH` ([`require`] with tools only).
pub fn need_binaries(names: &[&str]) -> Result<(), String> {
    require(Needs::tools(names))
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
            // `need_binaries` already decided (and printed) it.
            let _ = reason;
            None
        }
        Err(e) => panic!("{e}"),
    }
}
