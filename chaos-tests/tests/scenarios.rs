//! Issue 8's chaos scenarios with real `shoal` processes: a scheduler, a seed and peers, each in
//! its own network namespace, a docker-registry behind a `FaultRelay` in the origin host, and
//! `shoal get` as the client. Each scenario asserts sha256-correct results (or a clear, bounded
//! failure where no correct source exists), that no wrong byte reaches the client, and that the
//! origin's egress (the relay's byte counters) stays bounded.
//!
//! Needs root (namespaces, tc, iptables) and Debian's docker-registry; prints `SKIP:` otherwise
//! (a failure under `CI=true`). The `shoal` binary is looked up next to the test executable
//! (`target/<profile>/shoal`) and built with `cargo build -p shoal-cli` when missing.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use shoal_chaos::{corrupt_byte, or_skip, Cmd, Fault, FaultRelay, Proc, TestNet};
use shoal_peer::PeerConfig;
use shoal_testkit::{Registry, RegistryOpts};
use shoal_tls::{ClusterCa, NodeCertRequest};

const MIB: usize = 1 << 20;
const REPO: &str = "chaos/app";
const RELAY_PORT: u16 = 5000;
const SCHED_PORT: u16 = 4471;
const PEER_PORT: u16 = 4470;
const METRICS_PORT: u16 = 4490;
const ORIGIN: usize = 0;
const SCHED: usize = 1;
const SEED: usize = 2;
const FIRST_PEER: usize = 3;
const PIECE: u32 = 1 << 20;
/// The longest one `shoal get` may take in any scenario before it counts as a hang.
const GET_BOUND: Duration = Duration::from_secs(25);

/// The `shoal` binary: next to the test executable's directory (`target/<profile>/shoal`),
/// built on demand. `None` (with a printed reason) when it cannot be had outside CI.
fn shoal_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/scenarios-<hash> -> target/<profile>/shoal
    let bin = exe.parent()?.parent()?.join("shoal");
    if bin.exists() {
        return Some(bin);
    }
    let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "-p", "shoal-cli", "--bin", "shoal"])
        .status();
    if bin.exists() {
        return Some(bin);
    }
    shoal_testkit::cannot_run(format!(
        "the shoal binary is not at {} and `cargo build -p shoal-cli` gave {built:?}",
        bin.display()
    ));
    None
}

/// A log line or error message without colour codes and backtrace, on one line.
fn brief(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in s.chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            _ => out.push(ch),
        }
    }
    out.lines()
        .take_while(|l| !l.to_lowercase().contains("stack backtrace"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// What one `shoal get` did.
struct Got {
    ok: bool,
    secs: f64,
    stderr: String,
    /// The output file's sha256, if the file exists.
    file_sha: Option<String>,
}

/// A running cluster: origin relay (h0), scheduler (h1), seed (h2), peers (h3..).
struct Cluster {
    // Field order is drop order: processes before the net that holds them.
    peers: Vec<Proc>,
    seed: Option<Proc>,
    schedulers: Vec<Proc>,
    relay: FaultRelay,
    registry: Registry,
    rt: tokio::runtime::Runtime,
    net: TestNet,
    bin: PathBuf,
    ca: ClusterCa,
    relay_host: String,
    sockets: Vec<PathBuf>,
    seed_socket: PathBuf,
    /// Hosts of the schedulers, in `schedulers` order.
    sched_hosts: Vec<usize>,
    /// The DHT bootstrap list when the nodes join the DHT.
    dht: Option<Vec<SocketAddr>>,
}

/// How a cluster is built.
struct Opts {
    name: &'static str,
    peers: usize,
    /// Extra hosts with no process, for a scenario's own nodes.
    spare: usize,
    /// Schedulers: the first in host 1, more in hosts after the peers and spares.
    schedulers: usize,
    /// Every node joins the DHT (bootstrapped through the seed and the peers).
    dht: bool,
    /// Changes every peer's config (the seed's too) before it starts.
    tweak: fn(&mut PeerConfig),
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            name: "",
            peers: 1,
            spare: 0,
            schedulers: 1,
            dht: false,
            tweak: |_| {},
        }
    }
}

impl Cluster {
    fn start(opts: Opts) -> Option<Cluster> {
        let bin = shoal_bin()?;
        let extra_scheds = opts.schedulers.saturating_sub(1);
        let net = or_skip(TestNet::create(
            opts.name,
            FIRST_PEER + opts.peers + opts.spare + extra_scheds,
        ))?;
        shoal_tls::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let registry = match rt.block_on(Registry::start(RegistryOpts::default())) {
            Ok(r) => r,
            Err(e) => {
                shoal_testkit::cannot_run(format!("docker-registry: {e}"));
                return None;
            }
        };
        let origin = net.host(ORIGIN);
        let listener = origin.tcp_listener(RELAY_PORT).expect("relay listener");
        let relay = {
            // The relay spawns its server on the current runtime.
            let _rt = rt.enter();
            FaultRelay::start_on(listener, &registry.url()).expect("fault relay")
        };
        let relay_host = format!("{}:{RELAY_PORT}", origin.addr());
        let dir = net.dir().to_path_buf();
        let ca = ClusterCa::init(&dir.join("ca"), "Shoal chaos CA", 1).expect("CA");

        let sched_hosts: Vec<usize> = std::iter::once(SCHED)
            .chain((0..extra_scheds).map(|k| FIRST_PEER + opts.peers + opts.spare + k))
            .collect();
        let schedulers = sched_hosts
            .iter()
            .enumerate()
            .map(|(k, &h)| {
                let host = net.host(h);
                let id = match k {
                    0 => "shoal-scheduler".to_string(),
                    _ => format!("shoal-scheduler-{k}"),
                };
                // Every scheduler answers to the TLS name the peers expect.
                let tls = dir.join("tls").join(&id);
                identity_named(&ca, &tls, "shoal-scheduler", host.addr());
                host.spawn(
                    &format!("scheduler-{k}"),
                    Cmd::new(&bin)
                        .args(["--log", "info", "scheduler", "--host-id", &id])
                        .args(["--listen", &format!("0.0.0.0:{SCHED_PORT}")])
                        .args(["--metrics-listen", &format!("0.0.0.0:{METRICS_PORT}")])
                        .args(["--allowed-origins", &relay_host])
                        .arg("--tls-dir")
                        .arg(&tls),
                )
                .expect("scheduler")
            })
            .collect();
        let mut c = Cluster {
            peers: Vec::new(),
            seed: None,
            schedulers,
            relay,
            registry,
            rt,
            net,
            bin,
            ca,
            relay_host,
            sockets: Vec::new(),
            seed_socket: PathBuf::new(),
            sched_hosts,
            dht: None,
        };
        if opts.dht {
            let nodes = std::iter::once(SEED).chain(FIRST_PEER..FIRST_PEER + opts.peers);
            c.dht = Some(nodes.map(|h| c.net.host(h).sock(PEER_PORT)).collect());
        }
        let (seed, seed_socket) = c.spawn_peer(SEED, "seed", true, &opts.tweak);
        c.seed = Some(seed);
        c.seed_socket = seed_socket;
        for i in 0..opts.peers {
            let (p, s) = c.spawn_peer(FIRST_PEER + i, &format!("peer-{i}"), false, &opts.tweak);
            c.peers.push(p);
            c.sockets.push(s);
        }
        for i in 0..opts.peers {
            c.wait_ready(FIRST_PEER + i);
        }
        c.wait_ready(SEED);
        // Registration with the scheduler follows readiness by a round trip or two.
        std::thread::sleep(Duration::from_millis(1500));
        Some(c)
    }

    fn dir(&self) -> &Path {
        self.net.dir()
    }

    /// Starts `shoal peer` as `name` in host `h`; `tweak` changes its config (its own TLS
    /// directory, say) before it is written.
    fn spawn_peer(
        &self,
        h: usize,
        name: &str,
        seed: bool,
        tweak: &dyn Fn(&mut PeerConfig),
    ) -> (Proc, PathBuf) {
        let host = self.net.host(h);
        let home = self.dir().join("nodes").join(name);
        let mut cfg = PeerConfig {
            host_id: name.into(),
            data_dir: home.join("data"),
            tls_dir: self.dir().join("tls").join(name),
            listen: SocketAddr::from(([0, 0, 0, 0], PEER_PORT)),
            advertise: vec![host.sock(PEER_PORT)],
            scheduler: Some(self.net.host(SCHED).sock(SCHED_PORT)),
            schedulers: self.sched_hosts[1..]
                .iter()
                .map(|&h| self.net.host(h).sock(SCHED_PORT))
                .collect(),
            scheduler_name: "shoal-scheduler".into(),
            api_socket: home.join("peer.sock"),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], METRICS_PORT)),
            seed,
            dht: false,
            cache_bytes: Some(1 << 30),
            piece_size: Some(PIECE),
            piece_timeout_ms: 2_000,
            connect_timeout_ms: 1_000,
            scheduler_timeout_ms: 2_000,
            piece_table_wait_ms: 3_000,
            plain_http_registries: vec![self.relay_host.clone()],
            allowed_origins: vec![self.relay_host.clone()],
            ..PeerConfig::default()
        };
        if let Some(all) = &self.dht {
            cfg.dht = true;
            cfg.dht_bootstrap = all
                .iter()
                .filter(|a| !cfg.advertise.contains(a))
                .copied()
                .collect();
        }
        tweak(&mut cfg);
        if !cfg.tls_dir.join("tls.crt").exists() {
            identity(&self.ca, &self.dir().join("tls"), name, host.addr());
        }
        std::fs::create_dir_all(&home).expect("node dir");
        let file = home.join("peer.toml");
        std::fs::write(&file, toml::to_string(&cfg).expect("peer config")).expect("write config");
        let proc = host
            .spawn(
                name,
                Cmd::new(&self.bin)
                    .args(["--log", "info", "peer", "--config"])
                    .arg(&file),
            )
            .expect("peer");
        (proc, cfg.api_socket)
    }

    /// Waits for host `h`'s /readyz (metrics port) to answer 200.
    fn wait_ready(&self, h: usize) {
        let start = Instant::now();
        loop {
            if let Some((200, _)) = self.http(h, "/readyz") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "host {h} not ready within 20 s; logs in {}",
                self.dir().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A plain HTTP/1.1 GET to host `h`'s metrics port, made from inside the host's network.
    fn http(&self, h: usize, path: &str) -> Option<(u16, String)> {
        let host = self.net.host(h);
        let mut s = host
            .tcp_connect(host.sock(METRICS_PORT), Duration::from_secs(1))
            .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split(' ').nth(1)?.parse().ok()?;
        Some((status, buf.split_once("\r\n\r\n")?.1.to_string()))
    }

    /// The sum of every sample of metric `name` on host `h` (0 when absent or unreachable).
    fn metric(&self, h: usize, name: &str) -> f64 {
        let Some((_, text)) = self.http(h, "/metrics") else {
            return 0.0;
        };
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn push(&self, len: usize, seed: u64) -> (Vec<u8>, String) {
        let data = shoal_testkit::random_bytes(len, seed);
        let digest = self
            .rt
            .block_on(self.registry.push_blob(REPO, &data))
            .expect("push blob");
        (data, digest)
    }

    fn blob_ref(&self, digest: &str) -> String {
        format!("docker://{}/{REPO}@{digest}", self.relay_host)
    }

    /// `shoal get` of `digest` through the peer API `socket` into `out`, killed after `bound`.
    fn get(&self, socket: &Path, digest: &str, out: &Path, bound: Duration) -> Got {
        get_with(&self.bin, &self.blob_ref(digest), socket, out, bound)
    }

    /// `shoal get` of `digest` through peer `i` into `<dir>/<out>`, on a thread.
    fn pull_async(&self, i: usize, digest: &str, out: &str) -> std::thread::JoinHandle<Got> {
        let (bin, blob, sock) = (
            self.bin.clone(),
            self.blob_ref(digest),
            self.sockets[i].clone(),
        );
        let out = self.dir().join(out);
        std::thread::spawn(move || get_with(&bin, &blob, &sock, &out, GET_BOUND))
    }

    /// Bytes peer `i` kept from `source` (`peer` or `origin`).
    fn downloaded(&self, i: usize, source: &str) -> f64 {
        self.metric(
            FIRST_PEER + i,
            &format!("shoal_peer_download_bytes_total{{source=\"{source}\"}}"),
        )
    }

    /// Bytes the first `n` peers received from `source` ("peer" or "origin"), together.
    fn downloaded_by(&self, n: usize, source: &str) -> f64 {
        (0..n).map(|i| self.downloaded(i, source)).sum()
    }

    fn origin_bytes(&self, digest: &str) -> u64 {
        self.relay.blob_bytes_served(digest)
    }

    /// A peer's data file of `digest` (`<data>/store/blobs/<h2>/<hex>.data`).
    fn data_file(&self, name: &str, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir()
            .join("nodes")
            .join(name)
            .join("data/store/blobs")
            .join(&hex[..2])
            .join(format!("{hex}.data"))
    }

    fn seed(&mut self) -> &mut Proc {
        self.seed.as_mut().expect("the seed was started")
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(seed) = &self.seed {
            s += &format!("seed:\n{}\n", seed.log_tail(15));
        }
        for p in &self.peers {
            s += &format!("{}:\n{}\n", p.name(), p.log_tail(15));
        }
        s
    }
}

fn get_with(bin: &Path, blob: &str, socket: &Path, out: &Path, bound: Duration) -> Got {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .arg("get")
        .arg(blob)
        .arg("-o")
        .arg(out)
        .arg("--api")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shoal get");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let ok = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.success();
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            let err = reader.join().unwrap_or_default();
            panic!("`shoal get {blob}` still running after {bound:?} (a hang): {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = start.elapsed().as_secs_f64();
    let stderr = reader.join().unwrap_or_default();
    // The client checks the sha256 itself; this message means a wrong byte reached it.
    assert!(
        !stderr.contains("the peer sent bytes with"),
        "a wrong byte reached the client: {stderr}"
    );
    let file_sha = std::fs::read(out).ok().map(|b| sha256(&b));
    Got {
        ok,
        secs,
        stderr,
        file_sha,
    }
}

/// Issues `name`'s certificate (DNS `name`, IP `ip`) from `ca` into `<dir>/<name>`.
fn identity(ca: &ClusterCa, dir: &Path, name: &str, ip: IpAddr) -> PathBuf {
    let out = dir.join(name);
    identity_named(ca, &out, name, ip);
    out
}

/// Issues a certificate for `name` (and IP `ip`) from `ca` into `out` itself.
fn identity_named(ca: &ClusterCa, out: &Path, name: &str, ip: IpAddr) {
    let mut req = NodeCertRequest::new(name, 1);
    req.ips.push(ip);
    ca.issue(&req)
        .and_then(|c| c.write_to(out))
        .expect("certificate");
}

fn assert_ok(got: &Got, digest: &str, what: &str, c: &Cluster) {
    assert!(
        got.ok,
        "{what} failed after {:.1} s: {}\n{}",
        got.secs,
        got.stderr,
        c.logs()
    );
    assert_eq!(got.file_sha.as_deref(), Some(digest), "{what}: wrong bytes");
}

/// Scenario 5: the seed killed while three peers pull from it; every pull completes from the
/// other peers or the origin with the right sha256, and the origin serves the blob at most twice.
#[test]
fn seed_killed_mid_pull_peers_complete_from_peers_or_origin() {
    let Some(mut c) = Cluster::start(Opts {
        name: "seedkill",
        peers: 3,
        spare: 0,
        tweak: |cfg| cfg.piece_timeout_ms = 5_000,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 24 * MIB;
    // The seed sends (only) at 40 Mbit/s: serving three peers takes several seconds. With 12
    // pieces in flight on that link one piece takes ~2.5 s, so the piece timeout is 5 s here
    // (at 2 s every piece times out and nothing the seed sends is kept; see the report).
    c.net
        .set_bandwidth_dirs(SEED, Some(40_000_000), None)
        .expect("tbf");
    let (_, digest) = c.push(len, 5);
    let pulls: Vec<_> = (0..3)
        .map(|i| {
            let (bin, blob, sock) = (c.bin.clone(), c.blob_ref(&digest), c.sockets[i].clone());
            let out = c.dir().join(format!("out-{i}"));
            std::thread::spawn(move || get_with(&bin, &blob, &sock, &out, GET_BOUND))
        })
        .collect();
    // Kill once the peers have kept some pieces from the seed, well before they have all.
    wait_for(Duration::from_secs(15), "6 MiB kept from the seed", || {
        c.downloaded_by(3, "peer") >= (6 * MIB) as f64
    });
    let kept_before = c.downloaded_by(3, "peer");
    let from_seed = c.metric(SEED, "shoal_peer_upload_bytes_total");
    c.seed().kill().expect("kill the seed");
    let killed = Instant::now();
    let mut recover = 0.0f64;
    for (i, p) in pulls.into_iter().enumerate() {
        let got = p.join().expect("pull thread");
        assert_ok(&got, &digest, &format!("peer-{i}"), &c);
        recover = recover.max(killed.elapsed().as_secs_f64());
    }
    let origin = c.origin_bytes(&digest);
    let from_origin = c.downloaded_by(3, "origin");
    let from_swarm = c.downloaded_by(3, "peer");
    eprintln!(
        "FIGURES seed-killed: peers kept {kept_before} B (seed sent {from_seed} B) before the kill, all pulls done {recover:.1} s after it, origin egress {origin} B ({:.2} x blob), peers got {from_origin} B from origin and {from_swarm} B from peers",
        origin as f64 / len as f64
    );
    for p in &c.peers {
        let log = std::fs::read_to_string(p.log_path()).unwrap_or_default();
        for l in log.lines().filter(|l| l.contains("back to source")) {
            eprintln!("FIGURES seed-killed {}: {}", p.name(), brief(l));
        }
    }
    assert!(
        kept_before < (3 * len) as f64,
        "the pulls were complete before the kill"
    );
    // At most one copy per node (seed + 3 peers): no retry loop against the origin.
    assert!(
        origin <= 4 * len as u64,
        "origin egress {origin} B for a {len} B blob"
    );
}

/// Scenario 8: every piece corrupted on both stored copies (seed and a peer); a third peer
/// pulling detects it, never hands a wrong byte to the client and gets the right bytes.
#[test]
fn piece_corrupted_on_parents_disk_child_detects_and_gets_right_bytes() {
    let Some(c) = Cluster::start(Opts {
        name: "corrupt",
        peers: 2,
        spare: 0,
        tweak: |_| {},
        ..Opts::default()
    }) else {
        return;
    };
    let len = 8 * MIB;
    let (_, digest) = c.push(len, 8);
    let got = c.get(&c.sockets[0], &digest, &c.dir().join("out-0"), GET_BOUND);
    assert_ok(&got, &digest, "first pull", &c);
    // One flipped byte in every piece of both copies the swarm holds.
    let mut flipped = 0;
    for name in ["seed", "peer-0"] {
        let file = c.data_file(name, &digest);
        for p in 0..(len / PIECE as usize) as u64 {
            corrupt_byte(&file, p * u64::from(PIECE) + 777).expect("corrupt a stored byte");
            flipped += 1;
        }
    }
    let before = c.origin_bytes(&digest);
    let got = c.get(&c.sockets[1], &digest, &c.dir().join("out-1"), GET_BOUND);
    assert_ok(&got, &digest, "pull after corruption", &c);
    let refetched = c.origin_bytes(&digest) - before;
    let detected = c.metric(FIRST_PEER + 1, "shoal_peer_corrupt_pieces_total")
        + c.metric(SEED, "shoal_peer_cache_corruptions_total")
        + c.metric(FIRST_PEER, "shoal_peer_cache_corruptions_total");
    eprintln!(
        "FIGURES corrupt: {flipped} bytes flipped, pull {:.1} s, {detected} corruptions detected, origin refetch {refetched} B (first fetch {before} B)",
        got.secs
    );
    assert!(detected >= 1.0, "nobody counted a corrupt piece");
    assert!(before <= len as u64 + MIB as u64, "first fetch {before} B");
    assert!(
        refetched <= len as u64,
        "refetched {refetched} B\n{}",
        c.logs()
    );
}

/// Scenario 9: the registry behind the relay returns 500s, truncated bodies, flipped bytes and
/// slow bodies. Every pull ends with the right sha256 or a clear failure within the bound; no
/// wrong byte.
#[test]
fn registry_faults_end_in_right_bytes_or_a_clear_bounded_failure() {
    let Some(c) = Cluster::start(Opts {
        name: "origin",
        peers: 1,
        spare: 0,
        tweak: |_| {},
        ..Opts::default()
    }) else {
        return;
    };
    let len = 4 * MIB;
    let cases = [
        ("errors50", Fault::Errors { percent: 50 }),
        ("truncate", Fault::Truncate { after: 300_000 }),
        ("flip", Fault::FlipBytes { every: 65_536 }),
        // 4 MiB at 1 MB/s: a slow body that keeps coming is waited for, not abandoned.
        (
            "slow",
            Fault::Slow {
                bytes_per_sec: 1_000_000,
            },
        ),
    ];
    for (i, (name, fault)) in cases.into_iter().enumerate() {
        let (_, digest) = c.push(len, 90 + i as u64);
        c.relay.set_fault(fault);
        let out = c.dir().join(format!("out-{name}"));
        let got = c.get(&c.sockets[0], &digest, &out, GET_BOUND);
        let egress = c.origin_bytes(&digest);
        eprintln!(
            "FIGURES origin {name}: ok={} in {:.1} s, origin egress {egress} B, stderr: {}",
            got.ok,
            got.secs,
            brief(&got.stderr)
        );
        if got.ok {
            assert_eq!(got.file_sha.as_deref(), Some(digest.as_str()), "{name}");
        } else {
            assert!(got.file_sha.is_none(), "{name}: a failed get left a file");
            assert!(!got.stderr.trim().is_empty(), "{name}: no reason given");
        }
        // Flipped bytes and truncation at a fixed offset leave no correct source.
        if matches!(name, "truncate" | "flip") {
            assert!(
                !got.ok,
                "{name}: no correct source exists, yet the get succeeded"
            );
        } else if name == "slow" {
            assert_ok(&got, &digest, "a slow origin body", &c);
        }
        // Wrong bytes from the origin are fetched whole at most twice by the seed (two orders
        // from the scheduler) and once by the peer (its get then fails), not again and again
        // (peer/src/download/driver.rs, `ORIGIN_MISMATCH_ATTEMPTS`).
        let bound = match name {
            "flip" => 3 * len as u64 + MIB as u64,
            _ => 40 * len as u64,
        };
        assert!(egress <= bound, "{name}: origin egress {egress} B");
        if name == "flip" {
            assert!(
                got.stderr
                    .contains("the origin's bytes do not match the digest")
                    && got.stderr.contains(&digest),
                "flip: the failure does not say the origin's bytes are wrong: {}",
                brief(&got.stderr)
            );
        }
        // The fault lifted, the same blob arrives intact.
        c.relay.set_fault(Fault::Pass);
        let got = c.get(&c.sockets[0], &digest, &out, GET_BOUND);
        assert_ok(&got, &digest, &format!("{name} after the fault lifted"), &c);
    }
}

/// Scenario 6: a partition cuts peers 1 and 2 off from the scheduler, the seed and peer 0 (the
/// origin stays reachable from both halves). Both halves complete their pulls.
#[test]
fn partition_each_half_completes_from_what_it_can_reach() {
    let Some(c) = Cluster::start(Opts {
        name: "part",
        peers: 3,
        spare: 0,
        tweak: |_| {},
        ..Opts::default()
    }) else {
        return;
    };
    let len = 8 * MIB;
    let (_, digest) = c.push(len, 6);
    c.net
        .partition(
            &[SCHED, SEED, FIRST_PEER],
            &[FIRST_PEER + 1, FIRST_PEER + 2],
        )
        .expect("partition");
    let start = Instant::now();
    let pulls: Vec<_> = (0..3)
        .map(|i| {
            let (bin, blob, sock) = (c.bin.clone(), c.blob_ref(&digest), c.sockets[i].clone());
            let out = c.dir().join(format!("out-{i}"));
            std::thread::spawn(move || get_with(&bin, &blob, &sock, &out, GET_BOUND))
        })
        .collect();
    let mut worst = 0.0f64;
    for (i, p) in pulls.into_iter().enumerate() {
        let got = p.join().expect("pull");
        assert_ok(&got, &digest, &format!("peer-{i} (partitioned)"), &c);
        worst = worst.max(got.secs);
    }
    let origin = c.origin_bytes(&digest);
    eprintln!(
        "FIGURES partition: all done in {:.1} s (slowest {worst:.1} s), origin egress {origin} B ({:.2} x blob)",
        start.elapsed().as_secs_f64(),
        origin as f64 / len as f64
    );
    // One copy for the seed's half, at most one per cut-off peer.
    assert!(
        origin <= 3 * len as u64 + MIB as u64,
        "origin egress {origin} B"
    );
    c.net.heal().expect("heal");
}

/// Scenario 2: the parent serving a pull SIGSTOPped (hung, not dead) mid-transfer; the pull
/// completes within the bound from the other holder or the origin.
#[test]
fn parent_sigstopped_download_completes_within_a_bound() {
    parent_fault_mid_pull("pause", 2, ParentFault::Stop);
}

/// Scenario 13: nodes without a valid cluster certificate get nothing: one whose certificate
/// comes from another CA (while it trusts the cluster's CA), one whose cluster certificate has
/// expired, and one with no certificate at all. The origin then fails every blob request, so the
/// swarm is the only source: a member that joins now gets the blob from it (the control); each
/// outsider (pointed at the members through the DHT as well as the scheduler) is refused at start
/// or gets a clear failure within the bound, and no member uploads a byte to it.
#[test]
fn peers_without_a_valid_certificate_get_nothing() {
    let Some(mut c) = Cluster::start(Opts {
        name: "rogue",
        peers: 1,
        spare: 4,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 4 * MIB;
    let (_, digest) = c.push(len, 13);
    let got = c.get(&c.sockets[0], &digest, &c.dir().join("out-0"), GET_BOUND);
    assert_ok(&got, &digest, "peer-0", &c);
    c.relay.set_fault(Fault::Errors { percent: 100 });
    let member_host = FIRST_PEER + 1;

    // The control: a member started now gets the blob from the swarm alone.
    let (member, member_sock) = c.spawn_peer(member_host, "member", false, &|_| {});
    c.peers.push(member);
    c.wait_ready(member_host);
    std::thread::sleep(Duration::from_millis(1500));
    let got = c.get(&member_sock, &digest, &c.dir().join("out-m"), GET_BOUND);
    assert_ok(&got, &digest, "a member while the origin fails", &c);

    let members = [SEED, FIRST_PEER, member_host];
    let uploaded = |c: &Cluster| -> f64 {
        members
            .iter()
            .map(|&h| c.metric(h, "shoal_peer_upload_bytes_total"))
            .sum()
    };
    let bootstrap: Vec<SocketAddr> = members
        .iter()
        .map(|&h| c.net.host(h).sock(PEER_PORT))
        .collect();
    let cluster_ca = c.dir().join("tls/peer-0/ca.crt");
    for (k, kind) in ["other-ca", "expired", "no-cert"].into_iter().enumerate() {
        let h = member_host + 1 + k;
        let addr = c.net.host(h).addr();
        let tls = c.dir().join("outsider-tls").join(kind);
        match kind {
            "other-ca" => {
                let other =
                    ClusterCa::init(&c.dir().join("other-ca"), "Another CA", 1).expect("other CA");
                identity_named(&other, &tls, kind, addr);
                // Trusts the cluster (so it could talk to it) but holds a certificate it
                // does not sign.
                std::fs::copy(&cluster_ca, tls.join("ca.crt")).expect("cluster CA");
            }
            "expired" => {
                let mut req = NodeCertRequest::new(kind, 1);
                req.ips.push(addr);
                req.not_before -= Duration::from_secs(3 * 86_400);
                req.not_after = req.not_before + Duration::from_secs(86_400);
                c.ca.issue(&req)
                    .and_then(|cert| cert.write_to(&tls))
                    .expect("expired certificate");
            }
            _ => {
                // The cluster's CA only: no certificate and key of its own.
                std::fs::create_dir_all(&tls).expect("tls dir");
                std::fs::copy(&cluster_ca, tls.join("ca.crt")).expect("cluster CA");
            }
        }
        let before = uploaded(&c);
        let (mut outsider, sock) = c.spawn_peer(h, kind, false, &|cfg| {
            cfg.tls_dir = tls.clone();
            cfg.dht = true;
            cfg.dht_bootstrap = bootstrap.clone();
        });
        // Either it refuses to start (with a reason in its log), or its get fails.
        let start = Instant::now();
        let mut exited = None;
        while !sock.exists() && start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = outsider.wait_timeout(Duration::from_millis(100)) {
                exited = Some(st);
                break;
            }
        }
        let result = if let Some(st) = exited {
            let log = std::fs::read_to_string(outsider.log_path()).unwrap_or_default();
            let reason = log
                .lines()
                .skip_while(|l| !l.starts_with("Error"))
                .collect::<Vec<_>>()
                .join("\n");
            assert!(!st.success(), "{kind}: exited 0 without serving");
            assert!(
                !reason.trim().is_empty(),
                "{kind}: exited with no reason: {log}"
            );
            format!("refused to start ({st}): {}", brief(&reason))
        } else {
            std::thread::sleep(Duration::from_millis(1500));
            let out = c.dir().join(format!("out-{kind}"));
            let got = c.get(&sock, &digest, &out, GET_BOUND);
            assert!(!got.ok, "{kind}: the outsider got the blob");
            assert!(got.file_sha.is_none(), "{kind}: a failed get left a file");
            assert!(!got.stderr.trim().is_empty(), "{kind}: no reason given");
            format!("get failed in {:.1} s: {}", got.secs, brief(&got.stderr))
        };
        let refused: f64 = members
            .iter()
            .map(|&h| c.metric(h, "shoal_peer_connections_refused_total"))
            .sum();
        eprintln!(
            "FIGURES outsider {kind}: {result}; members refused {refused} connections so far"
        );
        assert_eq!(
            uploaded(&c),
            before,
            "{kind}: a member uploaded bytes to the outsider"
        );
        c.peers.push(outsider);
    }
}

/// The host of whichever of the seed and peer-0 uploaded more since `before` (seed, peer-0).
fn busier_parent(c: &Cluster, before: (f64, f64)) -> (usize, f64, f64) {
    let seed = c.metric(SEED, "shoal_peer_upload_bytes_total") - before.0;
    let peer0 = c.metric(FIRST_PEER, "shoal_peer_upload_bytes_total") - before.1;
    let h = if peer0 >= seed { FIRST_PEER } else { SEED };
    (h, seed, peer0)
}

/// Waits up to `bound` for `cond`, polling every 50 ms; panics with `what` otherwise.
fn wait_for(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Scenario 1: the parent serving a pull SIGKILLed mid-transfer; the pull completes within the
/// bound from the other holder or the origin, with at most one blob refetched from the origin.
#[test]
fn parent_killed_mid_transfer_download_completes() {
    parent_fault_mid_pull("pkill", 1, ParentFault::Kill);
}

/// What happens to the parent in scenarios 1 and 2.
#[derive(Clone, Copy, PartialEq)]
enum ParentFault {
    /// SIGKILL: dead, its connections reset.
    Kill,
    /// SIGSTOP: hung, its connections silent (resumed at the end).
    Stop,
}

/// Scenarios 1 and 2: peer-0 and the seed hold a 16 MiB blob behind capped links; while peer-1
/// pulls it, the holder serving it most is killed or stopped; the pull must end sha256-correct
/// within 15 s of the fault with at most one blob refetched from the origin.
fn parent_fault_mid_pull(name: &'static str, seed: u64, fault: ParentFault) {
    let Some(mut c) = Cluster::start(Opts {
        name,
        peers: 2,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 16 * MIB;
    let (_, digest) = c.push(len, seed);
    let got = c.get(&c.sockets[0], &digest, &c.dir().join("out-0"), GET_BOUND);
    assert_ok(&got, &digest, "peer-0", &c);
    let before = c.origin_bytes(&digest);
    let up_before = (
        c.metric(SEED, "shoal_peer_upload_bytes_total"),
        c.metric(FIRST_PEER, "shoal_peer_upload_bytes_total"),
    );
    // Both holders capped so peer-1's pull is in flight when its parent fails.
    c.net.set_bandwidth(SEED, Some(24_000_000)).expect("tbf");
    c.net
        .set_bandwidth(FIRST_PEER, Some(24_000_000))
        .expect("tbf");
    let pull = c.pull_async(1, &digest, "out-1");
    std::thread::sleep(Duration::from_millis(1500));
    let (h, seed_sent, peer0_sent) = busier_parent(&c, up_before);
    assert!(seed_sent + peer0_sent > 0.0, "nobody served peer-1 yet");
    let victim = if h == SEED { c.seed() } else { &mut c.peers[0] };
    let victim_name = victim.name().to_string();
    match fault {
        ParentFault::Kill => victim.kill().expect("SIGKILL the parent"),
        ParentFault::Stop => victim.pause().expect("SIGSTOP the parent"),
    }
    let at = Instant::now();
    let got = pull.join().expect("pull");
    let after = at.elapsed().as_secs_f64();
    if fault == ParentFault::Stop {
        let victim = if h == SEED { c.seed() } else { &mut c.peers[0] };
        victim.resume().expect("SIGCONT");
    }
    let what = match fault {
        ParentFault::Kill => "killed",
        ParentFault::Stop => "hung",
    };
    assert_ok(
        &got,
        &digest,
        &format!("peer-1 with {victim_name} {what}"),
        &c,
    );
    let refetched = c.origin_bytes(&digest) - before;
    let dropped = c.metric(FIRST_PEER + 1, "shoal_peer_parents_dropped_total");
    eprintln!(
        "FIGURES {name}: {victim_name} {what}, pull {:.1} s, done {after:.1} s after the fault, before it the seed sent {seed_sent} B and peer-0 {peer0_sent} B, {dropped} parents dropped, peer-1 got {} B from peers and {} B from origin, origin refetch {refetched} B",
        got.secs,
        c.downloaded(1, "peer"),
        c.downloaded(1, "origin"),
    );
    assert!(
        after < 15.0,
        "took {after:.1} s after the parent was {what}"
    );
    assert!(refetched <= len as u64, "refetched {refetched} B");
}

/// Scenario 3: every scheduler (two) killed while two pulls are in flight, then new pulls
/// (the same blob on a third peer, a fresh blob) started while they are down. The nodes find
/// each other through the DHT or go to the origin; every pull ends sha256-correct in the bound.
#[test]
fn every_scheduler_killed_pulls_in_flight_and_new_pulls_complete() {
    let Some(mut c) = Cluster::start(Opts {
        name: "schedkill",
        peers: 3,
        schedulers: 2,
        dht: true,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 16 * MIB;
    let (_, a) = c.push(len, 3);
    let (_, b) = c.push(8 * MIB, 33);
    // The seed's uplink capped so the first pulls are in flight when the schedulers die.
    c.net
        .set_bandwidth_dirs(SEED, Some(40_000_000), None)
        .expect("tbf");
    let first: Vec<_> = (0..2)
        .map(|i| c.pull_async(i, &a, &format!("out-a{i}")))
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    for s in &mut c.schedulers {
        s.kill().expect("kill a scheduler");
    }
    let killed = Instant::now();
    let new_a = c.pull_async(2, &a, "out-a2");
    let new_b = c.pull_async(0, &b, "out-b0");
    let mut in_flight = 0.0f64;
    for (i, p) in first.into_iter().enumerate() {
        let got = p.join().expect("pull");
        assert_ok(&got, &a, &format!("peer-{i}, in flight at the kill"), &c);
        in_flight = in_flight.max(killed.elapsed().as_secs_f64());
    }
    let got_a = new_a.join().expect("pull");
    assert_ok(&got_a, &a, "peer-2, started with no scheduler", &c);
    let got_b = new_b.join().expect("pull");
    assert_ok(&got_b, &b, "peer-0, a new blob with no scheduler", &c);
    let (oa, ob) = (c.origin_bytes(&a), c.origin_bytes(&b));
    eprintln!(
        "FIGURES schedulers-killed: in-flight pulls done {in_flight:.1} s after the kill; new pulls: same blob {:.1} s ({} B from peers), fresh blob {:.1} s; origin egress {oa} B ({:.2} x blob) and {ob} B ({:.2} x blob)",
        got_a.secs,
        c.downloaded(2, "peer"),
        got_b.secs,
        oa as f64 / len as f64,
        ob as f64 / (8 * MIB) as f64,
    );
    // At most one copy per node (seed + 3 peers).
    assert!(oa <= 4 * len as u64, "origin egress {oa} B");
    assert!(ob <= 4 * 8 * MIB as u64, "origin egress {ob} B");
}

/// The schedulers die while the seed is still importing a plain blob, so the peers hold only
/// pieces whose hashes were streamed to them and no whole piece table. They wait for the
/// seed's table through the DHT (up to `piece_table_wait_ms`) instead of each importing the
/// blob from the origin again: the origin sends the blob once.
#[test]
fn every_scheduler_killed_while_the_seed_imports_the_origin_still_sends_it_once() {
    let Some(mut c) = Cluster::start(Opts {
        name: "schedimport",
        peers: 3,
        schedulers: 2,
        dht: true,
        // As long as by default, not the 3 s the other scenarios use: a download whose piece
        // table has not come within this imports the blob itself, which is what this checks
        // does not happen while the seed's import is on its way.
        tweak: |cfg| cfg.piece_table_wait_ms = 60_000,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 24 * MIB;
    let (_, digest) = c.push(len, 34);
    // The origin sends at 40 Mbit/s: the seed's import takes about 5 s.
    c.net
        .set_bandwidth_dirs(ORIGIN, Some(40_000_000), None)
        .expect("tbf");
    let pulls: Vec<_> = (0..3)
        .map(|i| c.pull_async(i, &digest, &format!("out-{i}")))
        .collect();
    wait_for(Duration::from_secs(15), "2 MiB from the swarm", || {
        c.downloaded_by(3, "peer") >= (2 * MIB) as f64
    });
    for s in &mut c.schedulers {
        s.kill().expect("kill a scheduler");
    }
    let at_kill = c.origin_bytes(&digest);
    let killed = Instant::now();
    let mut done = 0.0f64;
    for (i, p) in pulls.into_iter().enumerate() {
        let got = p.join().expect("pull");
        assert_ok(&got, &digest, &format!("peer-{i}"), &c);
        done = done.max(killed.elapsed().as_secs_f64());
    }
    let origin = c.origin_bytes(&digest);
    eprintln!(
        "FIGURES schedulers-killed-mid-import: the origin had sent {at_kill} B at the kill; pulls done {done:.1} s after it; origin egress {origin} B ({:.2} x blob)",
        origin as f64 / len as f64
    );
    assert!(at_kill < len as u64, "the import was over before the kill");
    assert!(
        origin <= (len + len / 4) as u64,
        "the origin sent {origin} B for a {len} B blob: a peer imported it again\n{}",
        c.logs()
    );
}

/// Issue 26, DHT off: the scheduler is SIGKILLed while the seed still imports a plain blob and
/// its piece table only streams to the peers. They ask the parents they already have (the seed
/// among them) for the table, so no pull stalls and none imports the blob again.
#[test]
fn scheduler_lost_while_the_table_streams_without_a_dht() {
    scheduler_lost_while_the_table_streams("tablekill", |cfg| {
        cfg.piece_table_wait_ms = 60_000;
    });
}

/// Issue 26, DHT on without a bootstrap list: the DHT forms from the peers the scheduler named
/// before it died, and the pulls complete as above.
#[test]
fn scheduler_lost_while_the_table_streams_with_a_dht_and_no_bootstrap_list() {
    scheduler_lost_while_the_table_streams("tablekilldht", |cfg| {
        cfg.piece_table_wait_ms = 60_000;
        cfg.dht = true;
        cfg.dht_bootstrap.clear();
    });
}

/// Three peers pull a plain blob the seed imports at 40 Mbit/s, first with the scheduler alive
/// (the baseline), then another one with the scheduler killed once the peers hold part of it:
/// every pull ends with the right sha256 and the origin sends the killed run's blob at most
/// 1.05 times (a stalled pull would import it again after `piece_table_wait_ms`).
fn scheduler_lost_while_the_table_streams(name: &'static str, tweak: fn(&mut PeerConfig)) {
    let Some(mut c) = Cluster::start(Opts {
        name,
        peers: 3,
        tweak,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 24 * MIB;
    let (_, alive) = c.push(len, 41);
    let (_, digest) = c.push(len, 42);
    c.net
        .set_bandwidth_dirs(ORIGIN, Some(40_000_000), None)
        .expect("tbf");
    let pull_all = |c: &Cluster, digest: &str, what: &str| -> Vec<std::thread::JoinHandle<Got>> {
        (0..3)
            .map(|i| c.pull_async(i, digest, &format!("{what}-{i}")))
            .collect()
    };
    let started = Instant::now();
    for (i, p) in pull_all(&c, &alive, "alive").into_iter().enumerate() {
        assert_ok(
            &p.join().expect("pull"),
            &alive,
            &format!("peer-{i}, alive"),
            &c,
        );
    }
    let baseline = started.elapsed().as_secs_f64();

    let before = c.downloaded_by(3, "peer");
    let pulls = pull_all(&c, &digest, "killed");
    wait_for(Duration::from_secs(20), "2 MiB from the swarm", || {
        c.downloaded_by(3, "peer") >= before + (2 * MIB) as f64
    });
    for s in &mut c.schedulers {
        s.kill().expect("kill the scheduler");
    }
    let at_kill = c.origin_bytes(&digest);
    let killed = Instant::now();
    let mut after = 0.0f64;
    for (i, p) in pulls.into_iter().enumerate() {
        assert_ok(
            &p.join().expect("pull"),
            &digest,
            &format!("peer-{i}, killed"),
            &c,
        );
        after = after.max(killed.elapsed().as_secs_f64());
    }
    let origin = c.origin_bytes(&digest);
    eprintln!(
        "FIGURES {name}: pulls with the scheduler alive {baseline:.1} s; the scheduler killed when the origin had sent {at_kill} B of {len} B, pulls done {after:.1} s after the kill ({:.2} x the alive pull); origin egress {origin} B ({:.3} x blob)",
        after / baseline,
        origin as f64 / len as f64
    );
    assert!(at_kill < len as u64, "the import was over before the kill");
    assert!(
        origin <= (len + len / 20) as u64,
        "the origin sent {origin} B for a {len} B blob: a peer imported it again\n{}",
        c.logs()
    );
}

/// Scenario 4: the scheduler restarted with empty state. Peers register again and announce
/// what they hold; a new pull of a blob only peer-0 holds (the seed is dead) comes from peer-0,
/// not the origin.
#[test]
fn scheduler_restarted_rebuilds_state_from_announcements() {
    let Some(mut c) = Cluster::start(Opts {
        name: "schedrst",
        peers: 2,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 8 * MIB;
    let (_, digest) = c.push(len, 4);
    let got = c.get(&c.sockets[0], &digest, &c.dir().join("out-0"), GET_BOUND);
    assert_ok(&got, &digest, "peer-0", &c);
    let before = c.origin_bytes(&digest);
    c.seed().kill().expect("kill the seed");
    let tasks_before = c.metric(SCHED, "shoal_scheduler_peer_tasks");
    c.schedulers[0].restart().expect("restart the scheduler");
    let restarted = Instant::now();
    c.wait_ready(SCHED);
    let ready = restarted.elapsed().as_secs_f64();
    wait_for(
        Duration::from_secs(20),
        "peer-0 announcing its blob to the restarted scheduler",
        || c.metric(SCHED, "shoal_scheduler_peer_tasks") >= 1.0,
    );
    let rebuilt = restarted.elapsed().as_secs_f64();
    // peer-1 must be registered again too, or its request goes nowhere and it uses the origin.
    wait_for(
        Duration::from_secs(20),
        "both peers registered again",
        || c.metric(SCHED, "shoal_scheduler_hosts") >= 2.0,
    );
    let hosts = restarted.elapsed().as_secs_f64();
    let got = c.get(&c.sockets[1], &digest, &c.dir().join("out-1"), GET_BOUND);
    assert_ok(&got, &digest, "peer-1 after the restart", &c);
    let refetched = c.origin_bytes(&digest) - before;
    let from_peer = c.downloaded(1, "peer");
    eprintln!(
        "FIGURES scheduler-restarted: {tasks_before} peer-tasks before; ready {ready:.1} s after the restart, peer-0's blob announced after {rebuilt:.1} s, both peers registered after {hosts:.1} s; peer-1's pull {:.1} s, {from_peer} B from peers, origin refetch {refetched} B",
        got.secs
    );
    assert_eq!(
        refetched, 0,
        "the restarted scheduler sent peer-1 to the origin"
    );
    assert!(
        from_peer >= len as f64,
        "peer-1 got {from_peer} B from peers"
    );
}

/// Scenario 7: 1 % random packet loss on every link (both directions, links capped at
/// 80 Mbit/s). Three peers pull at once;
/// every pull ends sha256-correct, the origin serves at most one copy per node. A run without
/// loss first gives the baseline.
#[test]
fn one_percent_packet_loss_on_every_link() {
    let Some(c) = Cluster::start(Opts {
        name: "loss",
        peers: 3,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 16 * MIB;
    // Every link capped at 80 Mbit/s, so transfers last long enough for loss to cost something.
    for h in 0..c.net.hosts().len() {
        c.net.set_bandwidth(h, Some(80_000_000)).expect("tbf");
    }
    let round = |seed: u64, what: &str| -> (f64, u64) {
        let (_, digest) = c.push(len, seed);
        let start = Instant::now();
        let pulls: Vec<_> = (0..3)
            .map(|i| c.pull_async(i, &digest, &format!("out-{what}-{i}")))
            .collect();
        for (i, p) in pulls.into_iter().enumerate() {
            let got = p.join().expect("pull");
            assert_ok(&got, &digest, &format!("peer-{i} ({what})"), &c);
        }
        (start.elapsed().as_secs_f64(), c.origin_bytes(&digest))
    };
    let (base, base_origin) = round(70, "no-loss");
    for h in 0..c.net.hosts().len() {
        c.net.set_loss(h, 0.01).expect("loss");
    }
    let (lossy, origin) = round(71, "loss");
    eprintln!(
        "FIGURES loss: 3 pulls of {len} B in {lossy:.1} s with 1 % loss on every link ({base:.1} s without), origin egress {origin} B ({:.2} x blob; {base_origin} B without loss)",
        origin as f64 / len as f64
    );
    assert!(origin <= 4 * len as u64, "origin egress {origin} B");
}

/// Scenario 11: a peer SIGKILLed while it writes a blob into its store, then restarted. The
/// interrupted get fails without leaving a file; after the restart the pull completes, the
/// stored copy has the right sha256, and a second peer pulling from it gets no corrupt piece.
#[test]
fn peer_killed_while_writing_then_restarted_recovers() {
    let Some(mut c) = Cluster::start(Opts {
        name: "crash",
        peers: 2,
        ..Opts::default()
    }) else {
        return;
    };
    let len = 16 * MIB;
    let (_, digest) = c.push(len, 11);
    // peer-0 receives at 24 Mbit/s: its pull is still writing when it dies.
    c.net
        .set_bandwidth(FIRST_PEER, Some(24_000_000))
        .expect("tbf");
    let pull = c.pull_async(0, &digest, "out-0");
    let kept = |c: &Cluster| c.downloaded(0, "peer") + c.downloaded(0, "origin");
    wait_for(Duration::from_secs(15), "peer-0 keeping 4 MiB", || {
        kept(&c) >= (4 * MIB) as f64
    });
    let before_kill = kept(&c);
    c.peers[0].kill().expect("SIGKILL peer-0");
    let got = pull.join().expect("pull");
    assert!(!got.ok, "the get through a killed peer succeeded");
    assert!(got.file_sha.is_none(), "the interrupted get left a file");
    let restarted = Instant::now();
    c.peers[0].restart().expect("restart peer-0");
    c.wait_ready(FIRST_PEER);
    let ready = restarted.elapsed().as_secs_f64();
    c.net.set_bandwidth(FIRST_PEER, None).expect("tbf off");
    let got = c.get(&c.sockets[0], &digest, &c.dir().join("out-0b"), GET_BOUND);
    assert_ok(&got, &digest, "peer-0 after its restart", &c);
    let refetched = kept(&c);
    let stored = std::fs::read(c.data_file("peer-0", &digest)).expect("peer-0's stored copy");
    assert_eq!(sha256(&stored), digest, "peer-0 stored wrong bytes");
    // peer-0 is now the only live holder besides the origin: the seed dies.
    let origin_before = c.origin_bytes(&digest);
    c.seed().kill().expect("kill the seed");
    let got1 = c.get(&c.sockets[1], &digest, &c.dir().join("out-1"), GET_BOUND);
    assert_ok(&got1, &digest, "peer-1 from the restarted peer", &c);
    let corrupt = c.metric(FIRST_PEER + 1, "shoal_peer_corrupt_pieces_total");
    let from_peer = c.downloaded(1, "peer");
    let origin_after = c.origin_bytes(&digest) - origin_before;
    eprintln!(
        "FIGURES crash: peer-0 had kept {before_kill} B when killed; ready {ready:.1} s after the restart; its pull then took {:.1} s and fetched {refetched} B again; peer-1 got {from_peer} B from peers and the origin sent {origin_after} B more, {corrupt} corrupt pieces; origin egress in all {} B",
        got.secs,
        c.origin_bytes(&digest)
    );
    assert_eq!(corrupt, 0.0, "a corrupt piece was served after the crash");
    assert!(refetched <= len as f64, "refetched {refetched} B");
}

/// Scenario 12: a peer whose data directory is a small tmpfs that fills up. A pull either
/// completes with the right bytes (eviction) or fails with a message and no file; the peer
/// keeps running, serves what it holds correctly, and pulls again once space is free.
#[test]
fn peer_disk_full_gives_a_clear_error_or_evicts_never_wrong_bytes() {
    let Some(mut c) = Cluster::start(Opts {
        name: "diskfull",
        peers: 2,
        ..Opts::default()
    }) else {
        return;
    };
    // peer-0's data directory becomes a 24 MiB tmpfs; its quota (1 GiB) is no help.
    c.peers[0].kill().expect("stop peer-0");
    let data = c.dir().join("nodes/peer-0/data");
    let _ = std::fs::remove_dir_all(&data);
    let disk = or_skip(shoal_chaos::Tmpfs::mount(&data, 24 * MIB as u64)).expect("tmpfs");
    c.peers[0].restart().expect("restart peer-0");
    c.wait_ready(FIRST_PEER);
    std::thread::sleep(Duration::from_millis(1000));
    let len = 6 * MIB;
    let (_, a) = c.push(len, 12);
    let (_, b) = c.push(len, 120);
    let got = c.get(&c.sockets[0], &a, &c.dir().join("out-a"), GET_BOUND);
    assert_ok(&got, &a, "peer-0 with room", &c);
    let filled = disk.fill(512 << 10).expect("fill the disk");
    let got = c.get(&c.sockets[0], &b, &c.dir().join("out-b"), GET_BOUND);
    let outcome = if got.ok {
        assert_eq!(got.file_sha.as_deref(), Some(b.as_str()), "wrong bytes");
        "completed".to_string()
    } else {
        assert!(got.file_sha.is_none(), "a failed get left a file");
        assert!(!got.stderr.trim().is_empty(), "no reason given");
        format!("failed: {}", brief(&got.stderr))
    };
    assert!(c.peers[0].is_running(), "peer-0 died on a full disk");
    let log = std::fs::read_to_string(c.peers[0].log_path()).unwrap_or_default();
    let space_lines: Vec<String> = log
        .lines()
        .filter(|l| {
            l.contains("No space left")
                || l.contains("ENOSPC")
                || l.contains("quota")
                || l.contains("evict")
        })
        .map(brief)
        .collect();
    let a_still_held = c.data_file("peer-0", &a).exists();
    // Evictions reach the scheduler within a few seconds (the peer's dropped-piece reports).
    std::thread::sleep(Duration::from_secs(4));
    // The first blob is still served right, from the swarm: by peer-0 if it kept it, else by
    // the seed, never the origin (the scheduler was told what peer-0 dropped).
    let got_a = c.get(&c.sockets[1], &a, &c.dir().join("out-a1"), GET_BOUND);
    assert_ok(&got_a, &a, "peer-1 pulling a blob peer-0 holds", &c);
    let corrupt = c.metric(FIRST_PEER + 1, "shoal_peer_corrupt_pieces_total");
    let (a_peer, a_origin) = (c.downloaded(1, "peer"), c.downloaded(1, "origin"));
    assert_eq!(
        a_origin, 0.0,
        "peer-1 went to the origin for a blob the swarm holds (peer-0 kept it: {a_still_held})"
    );
    std::fs::remove_file(data.join("shoal-chaos-filler")).expect("free the space");
    let again = c.get(&c.sockets[0], &b, &c.dir().join("out-b2"), GET_BOUND);
    assert_ok(&again, &b, "peer-0 once space is free", &c);
    eprintln!(
        "FIGURES disk-full: {filled} B of filler; the pull {outcome} in {:.1} s; peer-0 still holds the first blob: {a_still_held}; log about space: {space_lines:?}; peer-1 got the first blob right ({a_peer} B from peers, {a_origin} B from origin, {corrupt} corrupt pieces); after freeing space the pull took {:.1} s; origin egress {} B and {} B",
        got.secs,
        again.secs,
        c.origin_bytes(&a),
        c.origin_bytes(&b)
    );
    assert_eq!(corrupt, 0.0, "a corrupt piece was served");
    drop(c);
    drop(disk);
}

/// Unmounts a FUSE mount (lazily) when dropped, also after a panic.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// Scenario 10: the registry down under a `shoal fs mount` (origin only, through a relay).
/// Reads of cached files keep working; uncached reads fail with EIO within the configured
/// fetch timeout, first with the origin hung (a body that never comes), then with it gone.
#[test]
fn registry_down_under_a_fuse_mount_cached_reads_work_uncached_fail_in_bound() {
    let Some(bin) = shoal_bin() else {
        return;
    };
    if or_skip(shoal_chaos::require_root_tools()).is_none() {
        return;
    }
    let fuse = shoal_testkit::Needs::tools(&["fusermount3"]).and_paths(&["/dev/fuse"]);
    if shoal_testkit::require(fuse).is_err() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let registry = match rt.block_on(Registry::start(RegistryOpts::default())) {
        Ok(r) => r,
        Err(e) => panic!("docker-registry: {e}"),
    };
    let relay = rt
        .block_on(FaultRelay::start(&registry.url()))
        .expect("relay");
    let work = tempfile::tempdir().expect("temp dir");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    let files = ["cached.bin", "hung.bin", "gone.bin"];
    let mut want = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let data = shoal_testkit::random_bytes(2 * MIB, 100 + i as u64);
        std::fs::write(tree.join(f), &data).expect("write");
        want.push(data);
    }
    let target = format!("docker://{}/chaos/fs:v1", registry.host());
    let out = Command::new(&bin)
        .args(["image", "convert", "--chunk-size", "64K", "--source"])
        .arg(&tree)
        .args(["--target", &target])
        .output()
        .expect("shoal image convert");
    assert!(
        out.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    let timeout = 3u64;
    let _fs = Proc::spawn(
        "fs",
        Cmd::new(&bin)
            .args(["--log", "info", "fs", "mount"])
            .arg(format!("docker://{}/chaos/fs:v1", relay.addr()))
            .arg(&mnt)
            .args(["--no-peer", "--no-prefetch", "--cache-dir"])
            .arg(work.path().join("cache"))
            .args(["--fetch-timeout-secs", &timeout.to_string()]),
        work.path(),
    )
    .expect("shoal fs mount");
    let _unmount = Unmount(mnt.clone());
    wait_for(Duration::from_secs(20), "the mount", || {
        mnt.join("cached.bin").exists()
    });
    let first = Instant::now();
    assert_eq!(
        std::fs::read(mnt.join("cached.bin")).expect("read"),
        want[0],
        "first read"
    );
    let first_secs = first.elapsed().as_secs_f64();
    let egress = relay.stats().body_bytes;

    // A hung origin: bodies that never come (1 byte/s).
    relay.set_scope(shoal_chaos::FaultScope::All);
    relay.set_fault(Fault::Slow { bytes_per_sec: 1 });
    let check = |what: &str, name: &str, data: &[u8]| -> (f64, f64) {
        let t = Instant::now();
        let cached = std::fs::read(mnt.join("cached.bin")).expect("a cached read");
        let cached_secs = t.elapsed().as_secs_f64();
        assert!(cached == want[0], "{what}: a cached read gave wrong bytes");
        let t = Instant::now();
        let r = std::fs::read(mnt.join(name));
        let secs = t.elapsed().as_secs_f64();
        match r {
            Ok(got) if got == data => panic!("{what}: an uncached read succeeded"),
            Ok(_) => panic!("{what}: an uncached read gave wrong bytes"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
        }
        // One fetch timeout, not two: the kernel's retry of the failed readahead (a 4 KiB read
        // of the same chunk) fails at once (fs/src/read.rs remembers the timed-out chunk).
        assert!(
            secs <= timeout as f64 + 1.0,
            "{what}: the uncached read took {secs:.1} s (fetch timeout {timeout} s)"
        );
        // Metadata comes from the bootstrap: listing and stat still work.
        let names: Vec<_> = std::fs::read_dir(&mnt)
            .expect("readdir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), files.len(), "{what}: listing");
        (cached_secs, secs)
    };
    let log_before = std::fs::read_to_string(work.path().join("fs.log")).unwrap_or_default();
    let (c1, hung) = check("origin hung", "hung.bin", &want[1]);
    let log = std::fs::read_to_string(work.path().join("fs.log")).unwrap_or_default();
    // The kernel asks again (a smaller read) after a failed one: each waits the full timeout.
    let failed_reads = log[log_before.len().min(log.len())..]
        .lines()
        .filter(|l| l.contains("read failed"))
        .count();
    // The registry gone: connections refused behind the relay.
    relay.set_fault(Fault::Pass);
    drop(registry);
    let (c2, gone) = check("registry gone", "gone.bin", &want[2]);
    eprintln!(
        "FIGURES fuse: first read of 2 MiB {first_secs:.2} s ({egress} B from origin); origin hung: cached read {c1:.3} s, uncached EIO after {hung:.1} s ({failed_reads} FUSE reads failed); registry gone: cached read {c2:.3} s, uncached EIO after {gone:.1} s (fetch timeout {timeout} s)"
    );
}
