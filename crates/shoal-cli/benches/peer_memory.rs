//! Peer memory benchmark (docs/benchmarks.md, "Peer memory (issue 5)"): the resident memory
//! (VmRSS) of a real `shoal peer` process, and of the seed, idle after registration and while
//! 100 downloads are in flight through the peer's local API. Targets: 30 MB idle, 200 MB busy.
//!
//! Run: `cargo bench -p shoal-cli --bench peer_memory`. SHOAL_BENCH_BLOBS (default 100) sets the
//! number of distinct blobs (one download each, all at once), SHOAL_BENCH_BLOB_MIB (default 4)
//! their size, SHOAL_BENCH_SEED_RATE (bytes/s, default 48 MiB/s) the seed's upload cap that keeps
//! the downloads overlapping. Besides VmRSS it prints the most piece bytes the peer held
//! (its `shoal_peer_piece_memory_bytes` gauge), where its bytes came from, per-download times,
//! and the warnings each process logged (a stalled download shows there).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use shoal_api::Client as ApiClient;
use shoal_proto::Digest;
use shoal_testkit::{Registry, RegistryOpts};

// Each bench uses part of what the benches share.
#[allow(dead_code)]
mod common;
use common::{env_num, free_tcp, free_udp, issue, metric, s, shoal_ok, spawn, strings, Proc};

const MIB: u64 = 1 << 20;
const MB: f64 = 1e6;
const SCHEDULER: &str = "shoal-scheduler";
const REPO: &str = "bench/mem";
const IDLE_TARGET_MB: f64 = 30.0;
const BUSY_TARGET_MB: f64 = 200.0;

/// A field of /proc/PID/status in bytes (e.g. VmRSS, VmHWM), if readable.
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn rss(pid: u32) -> u64 {
    proc_kib(pid, "VmRSS:").unwrap_or(0)
}

fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Threads:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

struct Bench {
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
}

impl Bench {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn issue(&self, name: &str) -> PathBuf {
        let out = self.path(&format!("tls/{name}"));
        issue(&self.path("ca"), &out, name);
        out
    }

    /// Starts `shoal ARGS` (JSON logs: warnings are counted from them) and waits for
    /// `metrics/readyz`; returns its index in `procs`.
    fn spawn(&mut self, name: &str, args: &[String], metrics: SocketAddr) -> usize {
        let mut all = strings(&["--log", "warn", "--log-format", "json"]);
        all.extend(args.iter().cloned());
        let log = self.path(&format!("{name}.log"));
        spawn(&mut self.procs, name, &all, log, metrics);
        self.procs.len() - 1
    }

    fn start_peer(
        &mut self,
        name: &str,
        scheduler: SocketAddr,
        extra: &[String],
    ) -> (u32, PathBuf, SocketAddr) {
        let tls = self.issue(name);
        let socket = self.path(&format!("{name}/peer.sock"));
        let metrics = free_tcp();
        let mut args: Vec<String> = [
            "peer",
            "--data-dir",
            s(&self.path(&format!("{name}/data"))),
            "--tls-dir",
            s(&tls),
            "--listen",
            &free_udp().to_string(),
            "--scheduler",
            &scheduler.to_string(),
            "--scheduler-name",
            SCHEDULER,
            "--api-socket",
            s(&socket),
            "--metrics-listen",
            &metrics.to_string(),
            "--cache-bytes",
            "4294967296",
            "--dht=false",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let i = self.spawn(name, &args, metrics);
        (self.procs[i].pid(), socket, metrics)
    }
}

/// Max VmRSS of each pid over `dur`, sampled every 50 ms.
fn sample_idle(pids: &[u32], dur: Duration) -> Vec<u64> {
    let mut max = vec![0u64; pids.len()];
    let start = Instant::now();
    while start.elapsed() < dur {
        for (m, &pid) in max.iter_mut().zip(pids) {
            *m = (*m).max(rss(pid));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    max
}

fn verdict(mb: f64, target: f64) -> &'static str {
    if mb <= target {
        "meets"
    } else {
        "MISSES"
    }
}

fn main() {
    let blobs = env_num("SHOAL_BENCH_BLOBS", 100) as usize;
    let blob_mib = env_num("SHOAL_BENCH_BLOB_MIB", 4);
    let seed_rate = env_num("SHOAL_BENCH_SEED_RATE", 48 * MIB);
    shoal_tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let registry = match rt.block_on(Registry::start(RegistryOpts::default())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skipping the peer memory benchmark: {e}");
            return;
        }
    };
    let mut digests = Vec::with_capacity(blobs);
    for i in 0..blobs {
        let data = shoal_testkit::random_bytes((blob_mib * MIB) as usize, 1000 + i as u64);
        let d = rt
            .block_on(registry.push_blob(REPO, &data))
            .expect("pushing a blob");
        digests.push(d);
    }
    let source = format!("docker://{}/{REPO}", registry.host());

    let mut bench = Bench {
        dir: tempfile::tempdir().expect("temp dir"),
        procs: Vec::new(),
    };
    shoal_ok(&["ca", "init", "--dir", s(&bench.path("ca"))]);
    let sched_tls = bench.issue(SCHEDULER);
    let scheduler = free_udp();
    let sched_metrics = free_tcp();
    let sched_args: Vec<String> = [
        "scheduler",
        "--host-id",
        SCHEDULER,
        "--listen",
        &scheduler.to_string(),
        "--tls-dir",
        s(&sched_tls),
        "--metrics-listen",
        &sched_metrics.to_string(),
        "--allowed-origins",
        &registry.host(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    bench.spawn("scheduler", &sched_args, sched_metrics);
    let (seed_pid, _, _) = bench.start_peer(
        "seed-1",
        scheduler,
        &[
            "--seed".to_string(),
            "--upload-bytes-per-sec".to_string(),
            seed_rate.to_string(),
            "--allowed-origins".to_string(),
            registry.host(),
        ],
    );
    let allowed = ["--allowed-origins".to_string(), registry.host()];
    let (peer_pid, socket, peer_metrics) = bench.start_peer("peer-1", scheduler, &allowed);

    // Idle: registered, nothing asked yet.
    std::thread::sleep(Duration::from_secs(2));
    let idle = sample_idle(&[peer_pid, seed_pid], Duration::from_secs(5));

    // Busy: every blob at once through the peer's local API.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (in_flight, done) = (in_flight.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut peer_max, mut seed_max, mut flight_at_peak, mut max_flight) = (0, 0, 0, 0);
            let (mut peer_threads, mut piece_max) = (0, 0);
            while !done.load(Ordering::Relaxed) {
                let piece =
                    metric(peer_metrics, "shoal_peer_piece_memory_bytes").map_or(0, |v| v as u64);
                piece_max = u64::max(piece_max, piece);
                let n = in_flight.load(Ordering::Relaxed);
                let p = rss(peer_pid);
                if p > peer_max {
                    peer_max = p;
                    flight_at_peak = n;
                }
                seed_max = seed_max.max(rss(seed_pid));
                max_flight = max_flight.max(n);
                peer_threads = peer_threads.max(threads(peer_pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            (
                peer_max,
                seed_max,
                flight_at_peak,
                max_flight,
                peer_threads,
                piece_max,
            )
        })
    };
    let start = Instant::now();
    let results: Vec<(String, String, u64, f64)> = rt.block_on(async {
        let tasks: Vec<_> = digests
            .iter()
            .map(|d| {
                let (api, src, d) = (ApiClient::new(&socket), source.clone(), d.clone());
                let in_flight = in_flight.clone();
                tokio::spawn(async move {
                    let began = Instant::now();
                    let digest = Digest::parse(&d).expect("pushed digests parse");
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let resp = api
                        .blob(&digest)
                        .source(src)
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("GET {d}: {e}"));
                    let mut h = Sha256::new();
                    let mut n = 0u64;
                    let mut body = resp.body;
                    while let Some(c) = body.next().await {
                        let c = c.unwrap_or_else(|e| panic!("body of {d}: {e}"));
                        n += c.len() as u64;
                        h.update(&c);
                    }
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    let secs = began.elapsed().as_secs_f64();
                    (d, format!("sha256:{}", hex::encode(h.finalize())), n, secs)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("download task"));
        }
        out
    });
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let (peer_busy, seed_busy, flight_at_peak, max_flight, peer_threads, piece_max) =
        sampler.join().expect("sampler");
    for (want, got, n, _) in &results {
        assert_eq!(want, got, "the peer delivered other bytes ({n} bytes)");
        assert_eq!(*n, blob_mib * MIB, "{want}: short body");
    }
    for p in &mut bench.procs {
        p.check_running();
    }
    let hwm = |pid| proc_kib(pid, "VmHWM:").unwrap_or(0) as f64 / MB;

    println!(
        "peer memory: {blobs} blobs x {blob_mib} MiB, seed upload cap {:.0} MiB/s; all {} sha256 verified; {:.1} s for all downloads ({max_flight} in flight at most, {flight_at_peak} when the peer peaked; peer threads at most {peer_threads})",
        seed_rate as f64 / MIB as f64,
        results.len(),
        secs
    );
    let budget =
        metric(peer_metrics, "shoal_peer_piece_memory_budget_bytes").map_or(0, |v| v as u64);
    let from = |source: &str| {
        let series = format!("shoal_peer_download_bytes_total{{source=\"{source}\"}}");
        metric(peer_metrics, &series).map_or(0, |v| v as u64) as f64 / MIB as f64
    };
    println!(
        "peer  received {:.0} MiB from peers, {:.0} MiB from the origin",
        from("peer"),
        from("origin")
    );
    println!(
        "peer  piece bytes in memory at most {:.1} MB of its {:.1} MB budget (piece_memory_bytes)",
        piece_max as f64 / MB,
        budget as f64 / MB
    );
    let (pi, si) = (idle[0] as f64 / MB, idle[1] as f64 / MB);
    let (pb, sb) = (peer_busy as f64 / MB, seed_busy as f64 / MB);
    println!(
        "peer  idle VmRSS max {pi:7.1} MB  (target {IDLE_TARGET_MB} MB: {})",
        verdict(pi, IDLE_TARGET_MB)
    );
    println!(
        "peer  busy VmRSS max {pb:7.1} MB  (target {BUSY_TARGET_MB} MB: {}); VmHWM {:.1} MB",
        verdict(pb, BUSY_TARGET_MB),
        hwm(peer_pid)
    );
    println!(
        "seed  idle VmRSS max {si:7.1} MB  (target {IDLE_TARGET_MB} MB: {})",
        verdict(si, IDLE_TARGET_MB)
    );
    println!(
        "seed  busy VmRSS max {sb:7.1} MB  (target {BUSY_TARGET_MB} MB: {}); VmHWM {:.1} MB",
        verdict(sb, BUSY_TARGET_MB),
        hwm(seed_pid)
    );
    let mut took: Vec<f64> = results.iter().map(|r| r.3).collect();
    took.sort_by(f64::total_cmp);
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize];
    println!(
        "per download: median {:.1} s, p90 {:.1} s, slowest {:.1} s",
        at(0.5),
        at(0.9),
        at(1.0)
    );
    for p in &bench.procs {
        for (n, msg) in warnings(&p.log) {
            println!("{} logged {n} x \"{msg}\"", p.name);
        }
    }
    drop(bench);
    drop(registry);
}

/// Warnings and errors a process logged (JSON lines), counted by message.
fn warnings(log: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // Fields are flattened into the event object (shoal-telemetry's JSON format).
        let field = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let (level, msg, reason, detail) = (
            field("level"),
            field("message"),
            field("reason"),
            field("detail"),
        );
        let key = format!("{level} {msg} {reason} {detail}");
        *counts.entry(key.trim().to_string()).or_default() += 1;
    }
    let mut out: Vec<(usize, String)> = counts.into_iter().map(|(k, n)| (n, k)).collect();
    out.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    out.truncate(8);
    out
}
