//! Link shaping: tbf bandwidth caps, and loss and partitions as iptables rules in the hub.
//!
//! The kernel this was written on has no `sch_netem` (`tc qdisc add ... netem` answers "Specified
//! qdisc kind is unknown"), so loss uses iptables' `statistic --mode random` match and latency
//! uses [`crate::DelayRelay`]. Rules live in two chains of the hub's filter table, `SHOAL_PART`
//! and `SHOAL_LOSS`, jumped to from FORWARD; each change rewrites its chain from [`Rules`].

use std::collections::BTreeMap;

use crate::cmd::{on_path, run, run_in};
use crate::net::Host;
use crate::netns::Netns;
use crate::{ChaosError, Result};

/// Which iptables works in a namespace here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesBackend {
    /// `iptables-nft` (nf_tables kernel API).
    Nft,
    /// `iptables-legacy` (x_tables kernel API).
    Legacy,
}

impl IptablesBackend {
    /// The binary name.
    pub fn program(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "iptables-nft",
            IptablesBackend::Legacy => "iptables-legacy",
        }
    }
}

/// The loss and partition rules currently wanted.
#[derive(Debug, Default)]
pub(crate) struct Rules {
    /// Host index -> (egress, ingress) drop probability.
    pub loss: BTreeMap<usize, (f64, f64)>,
    /// Host pairs that cannot talk (each listed pair is cut both ways).
    pub parts: Vec<(usize, usize)>,
}

const PART: &str = "SHOAL_PART";
const LOSS: &str = "SHOAL_LOSS";

fn ipt(hub: &Netns, be: IptablesBackend, args: &[&str]) -> Result<String> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    run_in(hub.name(), be.program(), &all)
}

/// Makes bridged traffic in the hub pass iptables, then picks the iptables that can hold the
/// harness's rules (a physdev + statistic rule is added and removed as the probe).
pub(crate) fn init_iptables(hub: &Netns, probe_host: &Host) -> Result<IptablesBackend> {
    let sysctl = ["-qw", "net.bridge.bridge-nf-call-iptables=1"];
    if run_in(hub.name(), "sysctl", &sysctl).is_err() {
        // br_netfilter is not loaded: loading it is the one change outside the test namespaces.
        let _ = run("modprobe", &["br_netfilter"]);
        run_in(hub.name(), "sysctl", &sysctl).map_err(|e| {
            ChaosError::Missing(shoal_testkit::cannot_run(format!(
                "needs br_netfilter (bridged packets must pass iptables for loss and partitions): {e}"
            )))
        })?;
    }
    let mut errors = Vec::new();
    for be in [IptablesBackend::Nft, IptablesBackend::Legacy] {
        if !on_path(be.program()) {
            continue;
        }
        match probe(hub, be, probe_host.hub_interface()) {
            Ok(()) => {
                tracing::info!(backend = be.program(), "chaos: iptables backend");
                return Ok(be);
            }
            Err(e) => {
                let _ = ipt(hub, be, &["-F", "FORWARD"]);
                let _ = ipt(hub, be, &["-X"]);
                errors.push(e.to_string());
            }
        }
    }
    Err(ChaosError::Missing(shoal_testkit::cannot_run(format!(
        "no iptables backend takes physdev + statistic rules in a namespace: {}",
        errors.join("; ")
    ))))
}

fn probe(hub: &Netns, be: IptablesBackend, port: &str) -> Result<()> {
    for chain in [PART, LOSS] {
        ipt(hub, be, &["-N", chain])?;
        ipt(hub, be, &["-A", "FORWARD", "-j", chain])?;
    }
    let mut rule = vec!["-A", LOSS];
    rule.extend(loss_match(port, true));
    rule.extend([
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        "0.5",
    ]);
    rule.extend(["-j", "DROP"]);
    ipt(hub, be, &rule)?;
    ipt(hub, be, &["-F", LOSS])?;
    Ok(())
}

fn loss_match(port: &str, from_host: bool) -> [&str; 5] {
    let dir = if from_host {
        "--physdev-in"
    } else {
        "--physdev-out"
    };
    ["-m", "physdev", dir, port, "--physdev-is-bridged"]
}

/// Rewrites the loss chain from `rules`.
pub(crate) fn apply_loss(
    hub: &Netns,
    be: IptablesBackend,
    hosts: &[Host],
    rules: &Rules,
) -> Result<()> {
    ipt(hub, be, &["-F", LOSS])?;
    for (&i, &(egress, ingress)) in &rules.loss {
        let Some(h) = hosts.get(i) else { continue };
        for (p, from_host) in [(egress, true), (ingress, false)] {
            if p <= 0.0 {
                continue;
            }
            let prob = format!("{p:.6}");
            let mut rule = vec!["-A", LOSS];
            rule.extend(loss_match(h.hub_interface(), from_host));
            rule.extend([
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &prob,
            ]);
            rule.extend(["-j", "DROP"]);
            ipt(hub, be, &rule)?;
        }
    }
    Ok(())
}

/// Rewrites the partition chain from `rules`.
pub(crate) fn apply_partitions(
    hub: &Netns,
    be: IptablesBackend,
    hosts: &[Host],
    rules: &Rules,
) -> Result<()> {
    ipt(hub, be, &["-F", PART])?;
    for &(a, b) in &rules.parts {
        let (Some(a), Some(b)) = (hosts.get(a), hosts.get(b)) else {
            continue;
        };
        for (from, to) in [(a, b), (b, a)] {
            ipt(
                hub,
                be,
                &[
                    "-A",
                    PART,
                    "-m",
                    "physdev",
                    "--physdev-in",
                    from.hub_interface(),
                    "--physdev-out",
                    to.hub_interface(),
                    "--physdev-is-bridged",
                    "-j",
                    "DROP",
                ],
            )?;
        }
    }
    Ok(())
}

/// Sets (or with `None` removes) a tbf cap on `dev` in namespace `ns`.
pub(crate) fn set_tbf(ns: &str, dev: &str, bits_per_sec: Option<u64>) -> Result<()> {
    let Some(rate) = bits_per_sec else {
        // No qdisc to delete is fine: the link is already uncapped.
        let _ = run_in(ns, "tc", &["qdisc", "del", "dev", dev, "root"]);
        return Ok(());
    };
    if rate < 8_000 {
        return Err(ChaosError::Setup(format!(
            "a tbf cap of {rate} bit/s is too small (at least 8 kbit/s)"
        )));
    }
    // Burst: 5 ms at the rate, at least ten full frames, so the cap holds over short windows
    // while full-size (and GSO-split) packets still pass.
    let burst = (rate / 8 / 200).max(10 * 1514);
    let (rate, burst) = (format!("{rate}bit"), burst.to_string());
    run_in(
        ns,
        "tc",
        &[
            "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst,
            "latency", "50ms",
        ],
    )?;
    Ok(())
}

/// Whether `tc ... netem` works here (tried on `lo` of `ns`, then removed).
pub fn netem_available(ns: &Netns) -> bool {
    let ok = run_in(
        ns.name(),
        "tc",
        &["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
    )
    .is_ok();
    if ok {
        let _ = run_in(ns.name(), "tc", &["qdisc", "del", "dev", "lo", "root"]);
    }
    ok
}
