//! `MountNs`: a private mount namespace, with its own tmpfs on `/run`, for one test's containerd.
//!
//! runc and containerd's shims keep state under `/run/containerd` whatever containerd's `root` and
//! `state` say, so two containerds on one machine must not share `/run`. Every mount here is
//! `private`, so a mount made in one namespace is never seen in another: containerd, its shims and
//! every helper that mounts for it (a snapshotter and its FUSE daemons) must run in one namespace.
//! A holder process (`unshare --mount` running `sleep`) makes it and keeps it alive; the others
//! enter it with `nsenter --target HOLDER --mount --net`. Mounts made inside vanish with the
//! namespace when its last process is gone: teardown kills processes, it does not unmount.
//!
//! Teardown kills exactly this namespace's processes: those whose mount namespace is this one,
//! their descendants (containers live in namespaces of their own, below the shims) and those in
//! the test's cgroups (see [`CgroupScope`]). The host's namespace is never a target. Namespace
//! inode numbers are reused as soon as a namespace is gone, so a namespace is only ever matched
//! while this process holds it open ([`PinnedNs`]): another test's new namespace cannot take its
//! number meanwhile.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::TestkitError;

/// A private mount namespace held open by a holder process; see the module doc.
pub struct MountNs {
    holder: Child,
    /// Open until [`MountNs::kill_all`] has ended every process: closing it ends the namespace.
    pinned: Option<PinnedNs>,
    inode: u64,
    log_dir: PathBuf,
}

/// A mount namespace held open by this process (an fd on `/proc/PID/ns/mnt`): its inode
/// number names it, and only it, while the fd is open.
pub(crate) struct PinnedNs {
    _fd: File,
    inode: u64,
}

impl PinnedNs {
    /// Pins the mount namespace `pid` is in now.
    pub(crate) fn of(pid: u32) -> Option<PinnedNs> {
        use std::os::unix::fs::MetadataExt;
        let fd = File::open(format!("/proc/{pid}/ns/mnt")).ok()?;
        let inode = fd.metadata().ok()?.ino();
        Some(PinnedNs { _fd: fd, inode })
    }

    /// The namespace's inode number.
    pub(crate) fn inode(&self) -> u64 {
        self.inode
    }
}

impl MountNs {
    /// Makes the namespace: a tmpfs on `/run` and on each of `tmpfs_dirs`, visible only inside.
    /// With `netns` (a name from `ip netns list`) the namespace's processes use that network
    /// namespace; otherwise the test's own. Logs of spawned processes go to `log_dir`.
    pub fn create(
        netns: Option<&str>,
        tmpfs_dirs: &[PathBuf],
        log_dir: &Path,
    ) -> Result<MountNs, TestkitError> {
        let mut script = String::from("set -e; mount -t tmpfs -o mode=0755 shoal-test-run /run");
        for d in tmpfs_dirs {
            script.push_str(&format!(
                "; mount -t tmpfs -o mode=0711 shoal-test-root '{}'",
                shell_path(d)?
            ));
        }
        script.push_str("; echo ready; exec sleep infinity");
        // Not `ip netns exec`: it mounts a fresh /sys, which hides the cgroup mounts runc needs.
        let mut cmd = match netns {
            Some(n) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{n}"))
                    .args(["--", "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut holder = cmd
            .spawn()
            .map_err(|e| TestkitError::Setup(format!("starting the namespace holder: {e}")))?;
        let ready = holder.stdout.take().map(|out| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(out).read_line(&mut line);
                let _ = tx.send(line);
            });
            rx
        });
        let line = ready
            .and_then(|rx| rx.recv_timeout(Duration::from_secs(10)).ok())
            .unwrap_or_default();
        if line.trim() != "ready" {
            let _ = holder.kill();
            let out = holder.wait_with_output();
            let err = out
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            return Err(TestkitError::Setup(format!(
                "the mount namespace holder did not come up: {}",
                err.trim()
            )));
        }
        let Some(pinned) = PinnedNs::of(holder.id()) else {
            let _ = holder.kill();
            let _ = holder.wait();
            return Err(TestkitError::Setup(
                "the namespace holder has no readable mount namespace".into(),
            ));
        };
        let inode = pinned.inode();
        let ns = MountNs {
            holder,
            pinned: Some(pinned),
            inode,
            log_dir: log_dir.to_path_buf(),
        };
        // A holder left in the host's namespace would make every host process a teardown target.
        if Some(inode) == mnt_ns(std::process::id()) || Some(inode) == mnt_ns(1) {
            return Err(TestkitError::Setup(
                "unshare --mount left the holder in the host's mount namespace".into(),
            ));
        }
        Ok(ns)
    }

    /// The holder's pid (the target of `nsenter`).
    pub fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// The namespace's inode number (as in `readlink /proc/PID/ns/mnt`).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// A `Command` that runs `program` inside the namespace (mount and network namespaces of
    /// the holder); add arguments and environment to it as usual.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("--target")
            .arg(self.holder.id().to_string())
            .args(["--mount", "--net", "--"])
            .arg(program);
        c
    }

    /// Starts `cmd` (program, arguments, environment and directory are taken from it) inside the
    /// namespace as `name`; stdout and stderr are appended to `<log dir>/<name>.log`.
    pub fn spawn(&self, name: &str, cmd: &Command) -> Result<NsProcess, TestkitError> {
        let mut c = self.command(cmd.get_program());
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        let log = self.log_dir.join(format!("{name}.log"));
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| TestkitError::Setup(format!("log file {}: {e}", log.display())))?;
        let line: Vec<OsString> = std::iter::once(cmd.get_program().to_owned())
            .chain(cmd.get_args().map(|a| a.to_owned()))
            .collect();
        let _ = writeln!(f, "==== start: {line:?}");
        let err = f
            .try_clone()
            .map_err(|e| TestkitError::Setup(format!("log file {}: {e}", log.display())))?;
        let child = c
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(err)
            .spawn()
            .map_err(|e| TestkitError::Setup(format!("starting {name} in the namespace: {e}")))?;
        Ok(NsProcess {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// `path` as seen inside the namespace, reachable from outside (`/proc/HOLDER/root/...`).
    pub fn path(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(rel)
    }

    /// The namespace's mount table (`/proc/HOLDER/mountinfo`), one line per mount.
    pub fn mounts(&self) -> Vec<String> {
        fs::read_to_string(format!("/proc/{}/mountinfo", self.holder.id()))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Kills every process of the namespace (and `cgroups`' processes), waits until they are
    /// gone (at most `timeout`), then lets the namespace go (its mounts with it). Returns what
    /// was still alive (`pid comm`); the namespace is kept then, so a second call can retry.
    pub fn kill_all(&mut self, cgroups: &CgroupScope, timeout: Duration) -> Vec<String> {
        let Some(pinned) = &self.pinned else {
            return Vec::new();
        };
        let left = kill_everything(pinned, cgroups, timeout);
        // Reaps the holder (our child), which kill_everything has killed.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if left.is_empty() {
            self.pinned = None;
        }
        left
    }

    /// The live processes of the namespace and of `cgroups` (`pid comm`); none once
    /// [`MountNs::kill_all`] has ended it.
    pub fn processes(&self, cgroups: &CgroupScope) -> Vec<String> {
        self.pinned
            .as_ref()
            .map(|p| targets(p, cgroups))
            .unwrap_or_default()
            .into_iter()
            .map(|(p, c)| format!("{p} {c}"))
            .collect()
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        if let Some(p) = &self.pinned {
            kill_everything(p, &CgroupScope::none(), Duration::from_secs(10));
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A process started in a [`MountNs`]: killed (SIGKILL) on drop.
pub struct NsProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl NsProcess {
    /// Its pid (the program's own: `nsenter` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name it was started as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file (stdout and stderr, appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// `Some(status)` once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        signal_pid(self.child.id(), signal);
    }

    /// SIGKILL, then waits for it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for it.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cgroup directories whose processes (and the directories themselves) belong to one test.
///
/// The CRI puts each pod under the `cgroup_parent` kubelet names. A relative parent makes runc
/// create it below the shim's own cgroup in every hierarchy (the test's cgroup), so the test's
/// containers stay inside the test's memory limits and are found again by name.
#[derive(Debug, Clone, Default)]
pub struct CgroupScope {
    dirs: Vec<PathBuf>,
}

impl CgroupScope {
    /// No cgroups.
    pub fn none() -> CgroupScope {
        CgroupScope::default()
    }

    /// `name` (a relative cgroup path) below this process's own cgroup in every mounted hierarchy.
    pub fn below_own(name: &str) -> CgroupScope {
        CgroupScope {
            dirs: own_cgroup_dirs()
                .into_iter()
                .map(|d| d.join(name))
                .collect(),
        }
    }

    /// These directories (as written down earlier by [`CgroupScope::dirs`]).
    pub fn from_dirs(dirs: Vec<PathBuf>) -> CgroupScope {
        CgroupScope { dirs }
    }

    /// The directories (some may not exist).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Pids in any of the directories or below.
    fn pids(&self) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for d in &self.dirs {
            for dir in subdirs_deepest_first(d) {
                if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
                    out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
                }
            }
        }
        out
    }

    /// Removes the directories (deepest first); returns those that are still there.
    pub fn remove(&self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        for d in &self.dirs {
            for dir in subdirs_deepest_first(d) {
                if fs::remove_dir(&dir).is_err() && dir.exists() {
                    left.push(dir);
                }
            }
        }
        left
    }
}

/// `dir` and every directory below it, children before parents.
fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), false)];
    while let Some((d, expanded)) = stack.pop() {
        if expanded {
            out.push(d);
            continue;
        }
        let Ok(rd) = fs::read_dir(&d) else { continue };
        stack.push((d, true));
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), false));
            }
        }
    }
    out
}

/// This process's cgroup directory in every mounted cgroup hierarchy (v1 and v2).
fn own_cgroup_dirs() -> Vec<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for m in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((pre, post)) = m.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let (Some(root), Some(mountpoint), Some(fstype)) = (pre.get(3), pre.get(4), post.first())
        else {
            continue;
        };
        let superopts: BTreeSet<&str> = post
            .get(2)
            .map_or(BTreeSet::new(), |o| o.split(',').collect());
        for line in own.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let matches = if *fstype == "cgroup2" {
                ctrls.is_empty()
            } else if *fstype == "cgroup" {
                !ctrls.is_empty() && ctrls.split(',').all(|c| superopts.contains(c))
            } else {
                false
            };
            if matches {
                let rel = path.strip_prefix(*root).unwrap_or(path);
                out.push(Path::new(mountpoint).join(rel.trim_start_matches('/')));
            }
        }
    }
    out
}

/// The mount namespace inode of `pid`, if readable.
pub(crate) fn mnt_ns(pid: u32) -> Option<u64> {
    let l = fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
    l.to_str()?
        .strip_prefix("mnt:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// (ppid, state, comm) of `pid`.
fn stat(pid: u32) -> Option<(u32, char, String)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let mut rest = s.get(close + 2..)?.split(' ');
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, state, comm))
}

/// The live (non-zombie) processes of namespace `ns`, their descendants, and the processes of
/// `cgroups`; never this process, its ancestors, or a process in the host's namespace.
fn targets(ns: &PinnedNs, cgroups: &CgroupScope) -> Vec<(u32, String)> {
    let inode = ns.inode();
    let me = std::process::id();
    let host = [mnt_ns(me), mnt_ns(1)];
    if host.contains(&Some(inode)) {
        // Only a namespace of the test's own making is ever a target.
        return Vec::new();
    }
    let mut table = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, state, comm)) = stat(pid) {
                table.push((pid, ppid, state, comm));
            }
        }
    }
    let mut mine: BTreeSet<u32> = table
        .iter()
        .filter(|(pid, ..)| mnt_ns(*pid) == Some(inode))
        .map(|(pid, ..)| *pid)
        .collect();
    mine.extend(cgroups.pids());
    // Descendants, to a fixed point.
    loop {
        let before = mine.len();
        for (pid, ppid, ..) in &table {
            if mine.contains(ppid) {
                mine.insert(*pid);
            }
        }
        if mine.len() == before {
            break;
        }
    }
    let mut ancestors = BTreeSet::from([me]);
    let mut p = me;
    while let Some((ppid, ..)) = stat(p) {
        if ppid == 0 || !ancestors.insert(ppid) {
            break;
        }
        p = ppid;
    }
    table
        .into_iter()
        .filter(|(pid, _, state, _)| mine.contains(pid) && *state != 'Z')
        .filter(|(pid, ..)| !ancestors.contains(pid))
        .filter(|(pid, ..)| {
            let ns = mnt_ns(*pid);
            ns.is_none() || !host.contains(&ns)
        })
        .map(|(pid, _, _, comm)| (pid, comm))
        .collect()
}

fn signal_pid(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) with a specific positive pid and a valid signal number.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// SIGKILLs the targets (see [`targets`]) until none is left or `timeout` passes; returns the
/// ones still alive (as `pid comm`).
pub(crate) fn kill_everything(
    ns: &PinnedNs,
    cgroups: &CgroupScope,
    timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let t = targets(ns, cgroups);
        if t.is_empty() {
            return Vec::new();
        }
        if Instant::now() > deadline {
            return t.into_iter().map(|(p, c)| format!("{p} {c}")).collect();
        }
        for (pid, _) in &t {
            signal_pid(*pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of a file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A path that can sit inside single quotes in a shell script.
fn shell_path(p: &Path) -> Result<String, TestkitError> {
    let s = p
        .to_str()
        .filter(|s| !s.contains('\''))
        .ok_or_else(|| TestkitError::Setup(format!("unusable path {}", p.display())))?;
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_namespace_is_never_a_target() {
        let own = PinnedNs::of(std::process::id()).expect("own mount namespace");
        assert_eq!(Some(own.inode()), mnt_ns(std::process::id()));
        assert!(targets(&own, &CgroupScope::none()).is_empty());
        if let Some(init) = PinnedNs::of(1) {
            assert!(targets(&init, &CgroupScope::none()).is_empty());
        }
    }

    #[test]
    fn subdirs_come_children_first() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        let got = subdirs_deepest_first(d.path());
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], d.path().join("a/b"));
        assert_eq!(got[2], d.path());
    }
}
