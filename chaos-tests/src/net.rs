//! `TestNet`: K hosts as network namespaces on one bridge, and everything to undo it.
//!
//! ```text
//!   host ns "<prefix>-h0"          hub ns "<prefix>-hub"            host ns "<prefix>-h1"
//!   eth0 10.77.0.1 ──veth── h0 ─┐                        ┌─ h1 ──veth── eth0 10.77.0.2
//!        tbf (egress)      tbf  ├─ br0 (iptables FORWARD ┤  tbf      tbf (egress)
//!                               │  loss + partitions)    │
//! ```
//! tbf on the host's `eth0` caps what the host sends; tbf on the hub's `hN` caps what it receives.
//! Loss and partitions are iptables rules in the hub (bridged traffic passes its FORWARD chain via
//! br_netfilter, matched per port with `physdev`), so host namespaces hold no rules at all.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use crate::cmd::{run, run_in};
use crate::netns::Netns;
use crate::process::{Cmd, Proc};
use crate::shape::{self, IptablesBackend, Rules};
use crate::{io_err, require_root_tools, ChaosError, Result};

/// Prefix of every namespace the harness creates: `shc-<pid>-<n>-<name>`.
const PREFIX: &str = "shc-";
/// Hosts get `10.77.0.(i+1)/24`; the namespaces are isolated, so this never meets a real network.
const SUBNET: [u8; 3] = [10, 77, 0];
/// At most this many hosts per net (one /24).
pub const MAX_HOSTS: usize = 250;

static NEXT: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();

/// One host: a network namespace with one interface on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    index: usize,
    ns: Netns,
    addr: Ipv4Addr,
    hub_if: String,
    log_dir: PathBuf,
}

impl Host {
    /// Position in the net (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The host's address on the bridge.
    pub fn addr(&self) -> IpAddr {
        IpAddr::V4(self.addr)
    }

    /// `addr():port`.
    pub fn sock(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.addr(), port)
    }

    /// The host's network namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Name of the host's port on the hub's bridge (`hN`).
    pub fn hub_interface(&self) -> &str {
        &self.hub_if
    }

    /// A `std::process::Command` running `program` in this host (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        self.ns.command(program)
    }

    /// Runs `program args...` in this host to completion and returns its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        run_in(self.ns.name(), program, args)
    }

    /// Starts `cmd` in this host as `name`, logging to `<test dir>/<name>.log`.
    pub fn spawn(&self, name: &str, cmd: Cmd) -> Result<Proc> {
        Proc::spawn(name, cmd.in_netns(self.ns.clone()), &self.log_dir)
    }

    /// A TCP listener on `0.0.0.0:port` in this host (port 0: any free port).
    pub fn tcp_listener(&self, port: u16) -> Result<TcpListener> {
        self.ns
            .tcp_listener(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
    }

    /// A TCP connection from this host to `addr`, within `timeout`.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.ns.tcp_connect(addr, timeout)
    }

    /// A UDP socket on `0.0.0.0:port` in this host.
    pub fn udp_socket(&self, port: u16) -> Result<UdpSocket> {
        self.ns
            .udp_socket(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
    }
}

/// K hosts on one bridge; every namespace, link and rule is removed on drop.
pub struct TestNet {
    prefix: String,
    hub: Netns,
    hosts: Vec<Host>,
    ipt: Option<IptablesBackend>,
    rules: Mutex<Rules>,
    dir: tempfile::TempDir,
}

impl TestNet {
    /// Creates `k` hosts named after `name`; `Missing` when not root or a tool is absent.
    pub fn create(name: &str, k: usize) -> Result<TestNet> {
        require_root_tools()?;
        if k == 0 || k > MAX_HOSTS {
            return Err(ChaosError::Setup(format!(
                "a test net has 1 to {MAX_HOSTS} hosts, not {k}"
            )));
        }
        SWEEP.call_once(sweep_stale);
        let clean: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(20)
            .collect();
        let prefix = format!(
            "{PREFIX}{}-{}-{clean}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .map_err(io_err("creating the test directory"))?;
        let hub = Netns::new(format!("{prefix}-hub"));
        let mut net = TestNet {
            prefix,
            hub,
            hosts: Vec::with_capacity(k),
            ipt: None,
            rules: Mutex::new(Rules::default()),
            dir,
        };
        // From here on, Drop removes whatever was made if a step fails.
        net.build_hub()?;
        for i in 0..k {
            net.add_host(i)?;
        }
        net.ipt = Some(shape::init_iptables(&net.hub, &net.hosts[0])?);
        tracing::info!(prefix = %net.prefix, hosts = k, "chaos: test net up");
        Ok(net)
    }

    fn build_hub(&self) -> Result<()> {
        let hub = self.hub.name();
        run("ip", &["netns", "add", hub])?;
        run("ip", &["-n", hub, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                hub,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        )?;
        run("ip", &["-n", hub, "link", "set", "br0", "up"])?;
        Ok(())
    }

    fn add_host(&mut self, i: usize) -> Result<()> {
        let ns = Netns::new(format!("{}-h{i}", self.prefix));
        let hub = self.hub.name().to_string();
        let name = ns.name().to_string();
        run("ip", &["netns", "add", &name])?;
        let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], (i + 1) as u8);
        let host = Host {
            index: i,
            ns,
            addr,
            hub_if: format!("h{i}"),
            log_dir: self.dir.path().to_path_buf(),
        };
        let hub_if = host.hub_if.clone();
        self.hosts.push(host);
        // Both ends are made inside namespaces: nothing appears in the root namespace.
        run(
            "ip",
            &[
                "-n", &hub, "link", "add", &hub_if, "type", "veth", "peer", "name", "eth0",
                "netns", &name,
            ],
        )?;
        run(
            "ip",
            &["-n", &hub, "link", "set", &hub_if, "master", "br0", "up"],
        )?;
        run("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        let cidr = format!("{addr}/24");
        run("ip", &["-n", &name, "addr", "add", &cidr, "dev", "eth0"])?;
        run("ip", &["-n", &name, "link", "set", "eth0", "up"])?;
        // IPv6 autoconfiguration chatter would only blur loss counts.
        let _ = run_in(
            &name,
            "sysctl",
            &["-qw", "net.ipv6.conf.all.disable_ipv6=1"],
        );
        Ok(())
    }

    /// Host `i`. Panics when `i` is out of range: that is a bug in the test, not bad input.
    pub fn host(&self, i: usize) -> &Host {
        match self.hosts.get(i) {
            Some(h) => h,
            None => panic!("test net has {} hosts, no host {i}", self.hosts.len()),
        }
    }

    /// All hosts in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The hub namespace holding the bridge (and the loss/partition rules).
    pub fn hub(&self) -> &Netns {
        &self.hub
    }

    /// The per-run name prefix of every namespace of this net.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The test directory: process logs and anything else a scenario writes.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Which iptables the net uses (probed at create).
    pub fn iptables(&self) -> IptablesBackend {
        self.ipt.unwrap_or(IptablesBackend::Nft)
    }

    /// Caps host `i`'s link at `bits_per_sec` in both directions (tbf); `None` removes the cap.
    pub fn set_bandwidth(&self, i: usize, bits_per_sec: Option<u64>) -> Result<()> {
        self.set_bandwidth_dirs(i, bits_per_sec, bits_per_sec)
    }

    /// Caps what host `i` sends (`egress`) and receives (`ingress`) separately.
    pub fn set_bandwidth_dirs(
        &self,
        i: usize,
        egress: Option<u64>,
        ingress: Option<u64>,
    ) -> Result<()> {
        let h = self.host(i);
        shape::set_tbf(h.ns.name(), "eth0", egress)?;
        shape::set_tbf(self.hub.name(), &h.hub_if, ingress)
    }

    /// Drops each packet host `i` sends or receives with probability `p` (0 removes the loss).
    /// Between two hosts that both have loss `p`, a packet is lost with `1 - (1-p)^2`.
    pub fn set_loss(&self, i: usize, p: f64) -> Result<()> {
        self.set_loss_dirs(i, p, p)
    }

    /// Loss on what host `i` sends (`egress`) and receives (`ingress`) separately.
    pub fn set_loss_dirs(&self, i: usize, egress: f64, ingress: f64) -> Result<()> {
        for p in [egress, ingress] {
            if !(0.0..=1.0).contains(&p) {
                return Err(ChaosError::Setup(format!(
                    "loss probability {p} is outside 0..=1"
                )));
            }
        }
        let _ = self.host(i);
        let mut rules = self.lock_rules();
        if egress == 0.0 && ingress == 0.0 {
            rules.loss.remove(&i);
        } else {
            rules.loss.insert(i, (egress, ingress));
        }
        shape::apply_loss(&self.hub, self.iptables(), &self.hosts, &rules)
    }

    /// Cuts every IP packet between hosts in `a` and hosts in `b` (both ways) until [`heal`].
    ///
    /// [`heal`]: TestNet::heal
    pub fn partition(&self, a: &[usize], b: &[usize]) -> Result<()> {
        let mut rules = self.lock_rules();
        for &x in a {
            for &y in b {
                let _ = (self.host(x), self.host(y));
                if x != y && !rules.parts.contains(&(x, y)) {
                    rules.parts.push((x, y));
                }
            }
        }
        shape::apply_partitions(&self.hub, self.iptables(), &self.hosts, &rules)
    }

    /// Removes every partition (loss and bandwidth caps stay).
    pub fn heal(&self) -> Result<()> {
        let mut rules = self.lock_rules();
        rules.parts.clear();
        shape::apply_partitions(&self.hub, self.iptables(), &self.hosts, &rules)
    }

    fn lock_rules(&self) -> std::sync::MutexGuard<'_, Rules> {
        // A poisoned lock only means another test thread panicked; the rules are still plain data.
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let mut names: Vec<String> = self.hosts.iter().map(|h| h.ns.name().to_string()).collect();
        names.push(self.hub.name().to_string());
        for n in &names {
            remove_netns(n);
        }
        tracing::info!(prefix = %self.prefix, "chaos: test net removed");
    }
}

/// Kills every process still in namespace `name`, then deletes it (its links and rules go too).
fn remove_netns(name: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Err(e) = run("ip", &["netns", "del", name]) {
        tracing::warn!(netns = name, error = %e, "chaos: could not delete namespace");
    }
}

/// Removes namespaces named `shc-<pid>-...` whose process no longer runs (a killed earlier run).
fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(
                netns = name,
                "chaos: removing stale namespace of a dead run"
            );
            remove_netns(name);
        }
    }
}

/// Namespaces of this process still present (for leak checks in tests).
pub fn leftover_namespaces(prefix: &str) -> Result<Vec<String>> {
    Ok(run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect())
}
