//! `Containerd::start`: Debian's containerd 1.6 with its CRI plugin and real runc, for one test.
//!
//! Everything of one instance is its own: a temp dir with the generated `config.toml`, the
//! sockets, the registry hosts dirs (`certs.d/HOST/hosts.toml`) and the pods' logs; containerd's
//! `root` and `state` on tmpfs (teardown in seconds); a private mount namespace with its own
//! `/run` ([`MountNs`]) in which containerd, its shims and any helper the test starts (a
//! snapshotter) run; and a cgroup parent for its pods below the test's own cgroup. No CNI: pods
//! use the host's network (the CRI reports `NetworkReady=false` and host-network pods run).
//!
//! [`Containerd::stop`] removes pods through the CRI, stops containerd, kills what is left of the
//! namespace and the cgroups, and checks nothing remains; `Drop` does the killing part when a test
//! fails. A test process killed outright leaves its instance behind; the next instance started on
//! the machine removes it (its holder process is still there to prove which namespace it was).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::cri::Cri;
use crate::mntns::{self, CgroupScope, MountNs, NsProcess, PinnedNs};
use crate::{need_binaries, TestkitError};

/// containerd's own snapshotter for plain OCI images.
pub const OVERLAYFS: &str = "overlayfs";
/// The name of Shoal's proxy snapshotter plugin (`[proxy_plugins.shoal]`).
pub const SHOAL: &str = "shoal";
/// The containerd namespace the CRI keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Prefix of every instance's temp dir (and how the sweep finds instances of killed tests).
const DIR_PREFIX: &str = "shoal-ctrd-";

static NEXT: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();

/// Options for [`Containerd::start`].
#[derive(Debug, Clone)]
pub struct ContainerdOpts {
    /// The CRI's snapshotter: [`OVERLAYFS`] or [`SHOAL`] (the sandbox image goes through it too).
    pub snapshotter: String,
    /// Socket of Shoal's snapshotter: adds `[proxy_plugins.shoal]` (type "snapshot") at it.
    /// A relative path is taken in the instance's dir ([`Containerd::shoal_socket`]).
    pub shoal_snapshotter: Option<PathBuf>,
    /// The CRI's `sandbox_image` (`host:port/repo:tag`), an image the test built and pushed.
    pub sandbox_image: String,
    /// A network namespace (`ip netns` name) for containerd and everything in its mount
    /// namespace, e.g. a shaped host of a chaos test net; `None`: the test's own.
    pub netns: Option<String>,
    /// containerd's `root` and `state` on tmpfs (default): teardown in seconds, not tens.
    pub tmpfs: bool,
}

impl ContainerdOpts {
    /// overlayfs, no proxy plugin, the test's network, roots on tmpfs.
    pub fn new(sandbox_image: impl Into<String>) -> ContainerdOpts {
        ContainerdOpts {
            snapshotter: OVERLAYFS.into(),
            shoal_snapshotter: None,
            sandbox_image: sandbox_image.into(),
            netns: None,
            tmpfs: true,
        }
    }

    /// The CRI uses Shoal's snapshotter, a proxy plugin at `socket` (relative: in the
    /// instance's dir, e.g. `"shoal-snapshotter.sock"`).
    pub fn with_shoal_snapshotter(mut self, socket: impl Into<PathBuf>) -> ContainerdOpts {
        self.snapshotter = SHOAL.into();
        self.shoal_snapshotter = Some(socket.into());
        self
    }
}

/// A running containerd of one test; see the module doc.
pub struct Containerd {
    containerd: Option<NsProcess>,
    ns: MountNs,
    cgroup_parent: String,
    cgroups: CgroupScope,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    opts: ContainerdOpts,
}

/// What [`Containerd::stop`] found when it tore the instance down.
#[derive(Debug, Default)]
pub struct Teardown {
    /// Processes still alive after the pods were removed and containerd had stopped (the
    /// namespace holder is not counted; a test stops what it spawned in the namespace first).
    pub lingering: Vec<String>,
    /// Errors of the CRI calls that removed the pods.
    pub cri_errors: Vec<String>,
}

impl Containerd {
    /// Starts containerd and waits until its CRI answers. `Missing` when not root or a tool is
    /// not installed.
    pub async fn start(opts: ContainerdOpts) -> Result<Containerd, TestkitError> {
        need_binaries(&[
            "containerd",
            "containerd-shim-runc-v2",
            "runc",
            "ctr",
            "unshare",
            "nsenter",
        ])
        .map_err(TestkitError::Missing)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let reason = "containerd's CRI needs root (mounts, runc)".to_string();
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI runs as root: {reason}");
            }
            return Err(TestkitError::Missing(reason));
        }
        SWEEP.call_once(sweep_stale);
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| TestkitError::Setup(format!("temp dir: {e}")))?;
        let path = dir.path().to_path_buf();
        for sub in ["root", "state", "certs.d", "opt", "cni", "pods"] {
            fs::create_dir_all(path.join(sub))
                .map_err(|e| TestkitError::Setup(format!("creating {sub}: {e}")))?;
        }
        fs::write(path.join("config.toml"), config_toml(&path, &opts))
            .map_err(|e| TestkitError::Setup(format!("writing config.toml: {e}")))?;
        let tmpfs: Vec<PathBuf> = if opts.tmpfs {
            vec![path.join("root"), path.join("state")]
        } else {
            Vec::new()
        };
        let ns = MountNs::create(opts.netns.as_deref(), &tmpfs, &path)?;
        let cgroup_parent = format!(
            "shoal-cri-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let cgroups = CgroupScope::below_own(&cgroup_parent);
        write_owner(&path, &ns, &cgroups)?;
        let mut c = Containerd {
            containerd: None,
            ns,
            cgroup_parent,
            cgroups,
            dir: Some(dir),
            path,
            opts,
        };
        c.containerd = Some(
            c.ns.spawn(
                "containerd",
                Command::new("containerd")
                    .arg("--config")
                    .arg(c.path.join("config.toml")),
            )?,
        );
        c.wait_ready().await?;
        Ok(c)
    }

    async fn wait_ready(&mut self) -> Result<(), TestkitError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(p) = self.containerd.as_mut() {
                if let Some(status) = p.try_wait() {
                    return Err(TestkitError::Setup(format!(
                        "containerd exited with {status}: {}",
                        p.log_tail(30)
                    )));
                }
            }
            if let Ok(cri) = self.cri().await {
                if cri.version().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Setup(format!(
                    "containerd's CRI did not answer within 30 s: {}",
                    self.log_tail(30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A CRI client on this containerd (pods log under [`Containerd::log_dir`], their cgroups
    /// below this instance's cgroup parent).
    pub async fn cri(&self) -> Result<Cri, TestkitError> {
        Cri::connect(&self.socket(), &self.log_dir(), &self.cgroup_parent).await
    }

    /// The socket containerd expects Shoal's snapshotter on, if it was configured.
    pub fn shoal_socket(&self) -> Option<PathBuf> {
        self.opts
            .shoal_snapshotter
            .as_ref()
            .map(|s| self.path.join(s))
    }

    /// containerd's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(NsProcess::pid)
    }

    /// containerd's gRPC socket (CRI and containerd's own API).
    pub fn socket(&self) -> PathBuf {
        self.path.join("containerd.sock")
    }

    /// The instance's temp dir (config, sockets, `certs.d`, pods' logs, process logs).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// containerd's `root` (on tmpfs inside the namespace unless `tmpfs` was off).
    pub fn root(&self) -> PathBuf {
        self.path.join("root")
    }

    /// containerd's `state`.
    pub fn state(&self) -> PathBuf {
        self.path.join("state")
    }

    /// Where snapshotter `name` keeps its data: `ROOT/io.containerd.snapshotter.v1.NAME`, the
    /// path containerd 1.6's CRI reports image-fs usage for.
    pub fn snapshotter_root(&self, name: &str) -> PathBuf {
        self.root()
            .join(format!("io.containerd.snapshotter.v1.{name}"))
    }

    /// Where the pods' log directories go (kubelet's `/var/log/pods`).
    pub fn log_dir(&self) -> PathBuf {
        self.path.join("pods")
    }

    /// The hosts dirs of the registry config (`config_path`).
    pub fn hosts_dir(&self) -> PathBuf {
        self.path.join("certs.d")
    }

    /// The options it was started with.
    pub fn opts(&self) -> &ContainerdOpts {
        &self.opts
    }

    /// The cgroup parent its pods get (relative: below the test's own cgroup).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The mount namespace containerd runs in: start helpers there with
    /// [`MountNs::spawn`] (`ctrd.ns().spawn("snapshotter", &cmd)`).
    pub fn ns(&self) -> &MountNs {
        &self.ns
    }

    /// Pulls of `registry` (`host:port`) go to `http://registry`, or first to `mirror` (a URL
    /// such as Shoal's registry proxy) when given. containerd reads this at each pull.
    pub fn add_registry(&self, registry: &str, mirror: Option<&str>) -> Result<(), TestkitError> {
        if registry.contains('/') || registry.contains("..") {
            return Err(TestkitError::Setup(format!(
                "registry {registry:?} must be host[:port]"
            )));
        }
        // containerd 1.6 refuses a hosts.toml without a `host` tree ("invalid `host` tree") and
        // then falls back to https: the registry itself is listed after the mirror.
        let mut toml = format!("server = \"http://{registry}\"\n");
        for h in mirror
            .into_iter()
            .map(str::to_string)
            .chain([format!("http://{registry}")])
        {
            toml.push_str(&format!(
                "\n[host.\"{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ));
        }
        let d = self.hosts_dir().join(registry);
        fs::create_dir_all(&d)
            .and_then(|()| fs::write(d.join("hosts.toml"), toml))
            .map_err(|e| TestkitError::Setup(format!("writing hosts.toml for {registry}: {e}")))
    }

    /// Runs `ctr --namespace k8s.io ARGS` on this containerd, inside its mount namespace (so
    /// `ctr run` and snapshot mounts work); stdout on success.
    pub fn ctr(&self, args: &[&str]) -> Result<String, TestkitError> {
        let out = self
            .ns
            .command("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", CRI_NAMESPACE])
            .args(args)
            .output()
            .map_err(|e| TestkitError::Setup(format!("running ctr: {e}")))?;
        if !out.status.success() {
            return Err(TestkitError::Setup(format!(
                "ctr {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr run --rm` of `image` (already in containerd, e.g. pulled through the CRI or by
    /// `shoal image pull`) on `snapshotter` as container `id`, running `args`; its stdout. The
    /// container's cgroup goes below this instance's cgroup parent, so teardown finds it.
    pub fn ctr_run(
        &self,
        snapshotter: &str,
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Result<String, TestkitError> {
        let cgroup = format!("{}/{id}", self.cgroup_parent);
        let mut all = vec![
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            "--cgroup",
            &cgroup,
            image,
            id,
        ];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// The last `n` lines containerd logged.
    pub fn log_tail(&self, n: usize) -> String {
        mntns::tail(&self.path.join("containerd.log"), n)
    }

    /// Mounts in containerd's namespace whose mount point or source is under this instance's
    /// dir (snapshot mounts, the tmpfs roots, containers' rootfs).
    pub fn mounts(&self) -> Vec<String> {
        let needle = self.path.to_string_lossy().into_owned();
        self.ns
            .mounts()
            .into_iter()
            .filter(|l| l.contains(&needle))
            .collect()
    }

    /// Removes every pod through the CRI, stops containerd (SIGTERM), kills what is left in
    /// its namespace and cgroups, removes them and the temp dir, then checks that no process,
    /// cgroup, mount or file of the instance remains (an error names what does).
    pub async fn stop(mut self) -> Result<Teardown, TestkitError> {
        let mut report = Teardown::default();
        match self.cri().await {
            Ok(cri) => report.cri_errors = cri.remove_all_pods().await,
            Err(e) => report.cri_errors.push(e.to_string()),
        }
        if let Some(mut p) = self.containerd.take() {
            let _ = tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(10))).await;
        }
        let holder = self.ns.holder_pid().to_string();
        report.lingering = self
            .ns
            .processes(&self.cgroups)
            .into_iter()
            .filter(|p| p.split(' ').next() != Some(holder.as_str()))
            .collect();
        let leftovers = tokio::task::spawn_blocking(move || self.teardown())
            .await
            .map_err(|e| TestkitError::Setup(format!("teardown task: {e}")))?;
        if leftovers.is_empty() {
            Ok(report)
        } else {
            Err(TestkitError::Setup(format!(
                "containerd teardown left: {}",
                leftovers.join("; ")
            )))
        }
    }

    /// Kills, unmounts (by ending the namespace) and removes; returns what is left.
    fn teardown(&mut self) -> Vec<String> {
        let mut left: Vec<String> = self
            .ns
            .kill_all(&self.cgroups, Duration::from_secs(15))
            .into_iter()
            .map(|p| format!("process {p}"))
            .collect();
        drop(self.containerd.take());
        left.extend(
            self.cgroups
                .remove()
                .into_iter()
                .map(|d| format!("cgroup {}", d.display())),
        );
        let needle = self.path.to_string_lossy().into_owned();
        if let Ok(m) = fs::read_to_string("/proc/self/mountinfo") {
            left.extend(
                m.lines()
                    .filter(|l| l.contains(&needle))
                    .map(|l| format!("mount {l}")),
            );
        }
        if let Some(d) = self.dir.take() {
            if let Err(e) = d.close() {
                left.push(format!("temp dir {}: {e}", self.path.display()));
            }
        }
        left
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.dir.is_some() {
            let left = self.teardown();
            if !left.is_empty() {
                eprintln!("containerd fixture teardown left: {}", left.join("; "));
            }
        }
    }
}

/// containerd's config (version 2) for an instance in `dir`.
fn config_toml(dir: &Path, o: &ContainerdOpts) -> String {
    let d = dir.display();
    let cri = "[plugins.\"io.containerd.grpc.v1.cri\"";
    let mut s = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters that cannot work here, disabled so their init errors do not blur the log.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

{cri}]
  sandbox_image = "{sandbox}"
  # runc cannot raise oom_score_adj without CAP_SYS_RESOURCE here.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Snapshot usage (ImageFsInfo) synced every second instead of ten.
  stats_collect_period = 1
{cri}.containerd]
  snapshotter = "{snap}"
  # The snapshot labels a remote snapshotter needs (containerd.io/snapshot/cri.*).
  disable_snapshot_annotations = false
  default_runtime_name = "runc"
{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
{cri}.cni]
  # No CNI: pods use the host's network.
  bin_dir = "{d}/cni"
  conf_dir = "{d}/cni"
{cri}.registry]
  config_path = "{d}/certs.d"
"#,
        sandbox = o.sandbox_image,
        snap = o.snapshotter,
    );
    if let Some(sock) = &o.shoal_snapshotter {
        s.push_str(&format!(
            "\n[proxy_plugins]\n  [proxy_plugins.{SHOAL}]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            dir.join(sock).display()
        ));
    }
    s
}

/// The marker that lets a later run find this instance if the test is killed outright.
fn write_owner(dir: &Path, ns: &MountNs, cgroups: &CgroupScope) -> Result<(), TestkitError> {
    let me = std::process::id();
    let holder = ns.holder_pid();
    let mut s = format!(
        "test {me} {}\nholder {holder} {}\nns {}\n",
        start_time(me).unwrap_or(0),
        start_time(holder).unwrap_or(0),
        ns.inode()
    );
    for d in cgroups.dirs() {
        s.push_str(&format!("cgroup {}\n", d.display()));
    }
    fs::write(dir.join("owner"), s)
        .map_err(|e| TestkitError::Setup(format!("writing the owner marker: {e}")))
}

/// Start time of `pid` (clock ticks after boot, field 22 of `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    rest.split(' ').nth(19)?.parse().ok()
}

/// Removes instances whose test process is gone. Their namespace is only a target while its
/// holder (same pid, same start time) is alive in it: namespace inodes are reused.
fn sweep_stale() {
    let Ok(rd) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = e.path();
        let Ok(owner) = fs::read_to_string(dir.join("owner")) else {
            continue;
        };
        let (mut test, mut holder, mut inode, mut cgroups) = (None, None, None, Vec::new());
        for l in owner.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match f.first() {
                Some(&"test") => test = num(1).zip(num(2)),
                Some(&"holder") => holder = num(1).zip(num(2)),
                Some(&"ns") => inode = num(1),
                Some(&"cgroup") => cgroups.push(PathBuf::from(l.trim_start_matches("cgroup "))),
                _ => {}
            }
        }
        let alive = |p: Option<(u64, u64)>| {
            p.is_some_and(|(pid, st)| {
                u32::try_from(pid).is_ok_and(|pid| start_time(pid) == Some(st))
            })
        };
        if test.is_none() || alive(test) {
            continue;
        }
        let scope = CgroupScope::from_dirs(cgroups);
        if let (Some((pid, _)), Some(inode)) = (holder, inode) {
            // Pin the holder's namespace first, then check it is still that holder in it.
            let pinned = u32::try_from(pid).ok().and_then(PinnedNs::of);
            if let Some(ns) = pinned.filter(|ns| ns.inode() == inode && alive(holder)) {
                eprintln!(
                    "removing a containerd test instance left by a killed test: {}",
                    dir.display()
                );
                mntns::kill_everything(&ns, &scope, Duration::from_secs(15));
            }
        }
        scope.remove();
        let _ = fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_proxy_plugin_only_when_asked() {
        let dir = Path::new("/t");
        let plain = config_toml(dir, &ContainerdOpts::new("reg/pause:1"));
        assert!(plain.contains("snapshotter = \"overlayfs\""));
        assert!(plain.contains("restrict_oom_score_adj = true"));
        assert!(plain.contains("disable_snapshot_annotations = false"));
        assert!(plain.contains("config_path = \"/t/certs.d\""));
        assert!(!plain.contains("proxy_plugins"));
        let shoal = config_toml(
            dir,
            &ContainerdOpts::new("reg/pause:1").with_shoal_snapshotter("/t/snap.sock"),
        );
        assert!(shoal.contains("snapshotter = \"shoal\""));
        assert!(shoal.contains("[proxy_plugins.shoal]"));
        assert!(shoal.contains("address = \"/t/snap.sock\""));
        let relative = config_toml(
            dir,
            &ContainerdOpts::new("reg/pause:1").with_shoal_snapshotter("s.sock"),
        );
        assert!(relative.contains("address = \"/t/s.sock\""));
    }

    #[test]
    fn start_time_of_self_is_known() {
        assert!(start_time(std::process::id()).is_some());
    }
}
