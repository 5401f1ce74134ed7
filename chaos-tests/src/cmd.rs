//! Running the system tools the harness drives (`ip`, `tc`, iptables, mount) with clear errors.

use std::process::Command;

use crate::{ChaosError, Result};

/// True when `name` is an executable file in one of `PATH`'s directories.
pub(crate) fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(name).is_file())
}

/// Runs `program args...` to completion; stdout on success, a `Command` error otherwise.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let line = format!("{program} {}", args.join(" "));
    tracing::debug!(cmd = %line, "chaos: run");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| ChaosError::Io {
            what: format!("starting `{line}`"),
            source,
        })?;
    if !out.status.success() {
        return Err(ChaosError::Command {
            cmd: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args...` inside network namespace `ns` (`ip netns exec`).
pub(crate) fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}
