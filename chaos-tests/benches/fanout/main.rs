//! Swarm fan-out benchmark (issue 4; issue 5's "schedulers killed halfway" with
//! `--kill-scheduler`). Run as root:
//!
//! ```sh
//! cargo bench -p shoal-chaos --bench fanout -- --peers 8 --mbit 100 --mib 256
//! ```
//!
//! N peers, a seed, a scheduler and an origin relay (in front of a real docker-registry), each
//! in its own network namespace with its link tbf-capped at B both ways. Every peer asks its
//! local API for the same S-byte blob at once. Printed: time until the last peer holds the
//! blob (sha256 checked by the bench) over the physical limit S/B; origin egress over S (the
//! relay's byte count); each node's CPU time per GiB it received (utime+stime of its process
//! from /proc/PID/stat); and, in the same run, the baseline of all N peer hosts pulling the blob
//! straight from the origin with curl through the same capped link.
//!
//! Flags (or env): `--peers N` (FANOUT_PEERS, 8), `--mbit B` (FANOUT_MBIT, 100), `--mib S`
//! (FANOUT_MIB, 256), `--piece-kib K` (FANOUT_PIECE_KIB, peer default), `--kill-scheduler`
//! (FANOUT_KILL_SCHEDULER=1), `--no-baseline`, `--tmpfs` (FANOUT_TMPFS=1: the nodes' data
//! directories on one tmpfs, because on one VM all hosts share one disk, where a real host has
//! its own). Not root or a tool missing: prints `SKIP:`.

mod cluster;
mod node;

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use sha2::Digest as _;
use shoal_api::Client as ApiClient;
use shoal_proto::Digest;

use cluster::{Swarm, REPO};

/// What to run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Peers pulling the blob.
    pub peers: usize,
    /// Link cap of every host, both directions.
    pub bits_per_sec: u64,
    /// Blob size.
    pub blob_bytes: u64,
    /// Piece size for the seed's import (`None`: the peer default).
    pub piece_size: Option<u32>,
    /// Also run with the scheduler killed halfway.
    pub kill_scheduler: bool,
    /// Measure the straight-from-origin baseline.
    pub baseline: bool,
    /// Put the nodes' data directories on a tmpfs.
    pub tmpfs: bool,
    /// Print every node's held pieces once a second (seed first).
    pub trace: bool,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let env = |k: &str| std::env::var(k).ok();
        let mut peers = env("FANOUT_PEERS").unwrap_or_else(|| "8".into());
        let mut mbit = env("FANOUT_MBIT").unwrap_or_else(|| "100".into());
        let mut mib = env("FANOUT_MIB").unwrap_or_else(|| "256".into());
        let mut piece_kib = env("FANOUT_PIECE_KIB");
        let mut kill = env("FANOUT_KILL_SCHEDULER").is_some_and(|v| v == "1");
        let mut baseline = true;
        let mut tmpfs = env("FANOUT_TMPFS").is_some_and(|v| v == "1");
        let mut trace = env("FANOUT_TRACE").is_some_and(|v| v == "1");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--peers" => peers = val(a)?,
                "--mbit" => mbit = val(a)?,
                "--mib" => mib = val(a)?,
                "--piece-kib" => piece_kib = Some(val(a)?),
                "--kill-scheduler" => kill = true,
                "--no-baseline" => baseline = false,
                "--tmpfs" => tmpfs = true,
                "--trace" => trace = true,
                // cargo bench passes `--bench`; anything else is a mistake worth naming.
                "--bench" => {}
                other => return Err(format!("unknown argument {other}")),
            }
        }
        let num = |name: &str, v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} must be a positive integer, not {v:?}"))
        };
        let peers = num("peers", &peers)? as usize;
        if peers > 200 {
            return Err(format!("at most 200 peers, not {peers}"));
        }
        let piece_size = match piece_kib {
            Some(k) => Some(
                u32::try_from(num("piece-kib", &k)? * 1024)
                    .map_err(|_| "piece size too large".to_string())?,
            ),
            None => None,
        };
        Ok(Opts {
            peers,
            bits_per_sec: num("mbit", &mbit)? * 1_000_000,
            blob_bytes: num("mib", &mib)? << 20,
            piece_size,
            kill_scheduler: kill,
            baseline,
            tmpfs,
            trace,
        })
    }

    /// S/B: the time one link needs to carry the blob once.
    fn physical_limit(&self) -> Duration {
        Duration::from_secs_f64(self.blob_bytes as f64 * 8.0 / self.bits_per_sec as f64)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("node") {
        node::run(&args[1..]);
    }
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fanout: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = shoal_chaos::require_root_tools() {
        println!("SKIP: fan-out bench: {e}");
        return;
    }
    if let Err(e) = shoal_testkit::need_binaries(&["docker-registry", "curl", "sha256sum"]) {
        println!("SKIP: fan-out bench: {e}");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fanout: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(bench(opts)) {
        eprintln!("fanout: {e}");
        std::process::exit(1);
    }
}

/// Figures of one swarm run.
struct RunFigures {
    /// Per peer: time from the common start until it held the verified blob.
    done: Vec<Duration>,
    /// Blob bytes the origin relay sent.
    origin_bytes: u64,
    /// Per peer: CPU seconds (user + system) during the run.
    peer_cpu: Vec<f64>,
    /// The seed's CPU seconds during the run.
    seed_cpu: f64,
    /// The scheduler's CPU seconds during the run (until it was killed).
    sched_cpu: f64,
    /// Bytes the seed's host sent (its uploads to peers).
    seed_sent: u64,
    /// Bytes all peer hosts sent (their uploads to each other).
    peers_sent: u64,
    /// Packets the tbf caps of the seed and the peers dropped on the way out.
    dropped: u64,
    /// (seconds since start, percent of all peers' pieces held), every 5 s.
    samples: Vec<(u64, f64)>,
}

async fn bench(opts: Opts) -> Result<(), String> {
    shoal_tls::install_crypto_provider();
    let registry = shoal_testkit::Registry::start(shoal_testkit::RegistryOpts::default())
        .await
        .map_err(|e| format!("docker-registry: {e}"))?;
    let data = shoal_testkit::random_bytes(opts.blob_bytes as usize, 4);
    let digest = registry
        .push_blob(REPO, &data)
        .await
        .map_err(|e| format!("push blob: {e}"))?;
    drop(data);
    let blob = Digest::parse(&digest).map_err(|e| e.to_string())?;
    let limit = opts.physical_limit();
    println!(
        "fan-out: {} peers + 1 seed, every link {} Mbit/s both ways, blob {} MiB, piece size {}, S/B = {:.2} s",
        opts.peers,
        opts.bits_per_sec / 1_000_000,
        opts.blob_bytes >> 20,
        opts.piece_size
            .map_or("peer default".to_string(), |p| format!("{} KiB", p >> 10)),
        limit.as_secs_f64()
    );
    println!(
        "machine: {} cores, {}; node data on {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        if opts.tmpfs {
            "one tmpfs"
        } else {
            "the shared disk"
        }
    );

    let mut swarm = Swarm::start("fanout", &opts, &registry.url()).await?;
    let alive = swarm_run(&mut swarm, &opts, &blob, &digest, None).await?;
    report("scheduler alive", &opts, &alive);
    if opts.baseline {
        baseline(&swarm, &opts, &digest).await?;
    }
    drop(swarm);

    if opts.kill_scheduler {
        let last = alive.done.iter().max().copied().unwrap_or(limit);
        let mut swarm = Swarm::start("fanout-kill", &opts, &registry.url()).await?;
        let killed = swarm_run(&mut swarm, &opts, &blob, &digest, Some(last / 2)).await?;
        report(
            &format!(
                "scheduler killed at {:.1} s (half the alive run)",
                (last / 2).as_secs_f64()
            ),
            &opts,
            &killed,
        );
    }
    Ok(())
}

/// Every peer fetches the blob at once; the scheduler is SIGKILLed at `kill_at` if given.
async fn swarm_run(
    swarm: &mut Swarm,
    opts: &Opts,
    blob: &Digest,
    digest: &str,
    kill_at: Option<Duration>,
) -> Result<RunFigures, String> {
    swarm.relay.reset_counters();
    let pids: Vec<u32> = swarm.peers.iter().filter_map(|p| p.pid()).collect();
    let seed_pid = swarm.seed.pid().unwrap_or(0);
    let sched_pid = swarm.scheduler.pid().unwrap_or(0);
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let (seed0, sched0) = (cpu_secs(seed_pid), cpu_secs(sched_pid));
    let egress_of = |swarm: &Swarm| -> Vec<(u64, u64)> {
        std::iter::once(swarm.seed_host())
            .chain((0..opts.peers).map(|i| swarm.peer_host(i)))
            .map(cluster::egress)
            .collect()
    };
    let eg0 = egress_of(swarm);
    let start = Instant::now();
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let trace = opts
        .trace
        .then(|| std::iter::once(swarm.seed_socket.clone()).chain(swarm.sockets.clone()));
    let progress = tokio::spawn(progress(
        swarm.sockets.clone(),
        trace.map(Iterator::collect),
        start,
        samples.clone(),
    ));
    let mut jobs = Vec::new();
    for sock in &swarm.sockets {
        let (sock, blob, origin) = (sock.clone(), *blob, swarm.origin_ref.clone());
        jobs.push(tokio::spawn(async move {
            let r = ApiClient::new(&sock)
                .blob(&blob)
                .source(origin)
                .fetch()
                .await;
            (r.map_err(|e| e.to_string()), start.elapsed())
        }));
    }
    let mut sched_cpu = None;
    if let Some(at) = kill_at {
        tokio::time::sleep(at).await;
        sched_cpu = Some(cpu_secs(sched_pid) - sched0);
        swarm.scheduler.kill().map_err(|e| e.to_string())?;
        println!(
            "  scheduler SIGKILLed at {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    let mut done = Vec::new();
    for (i, j) in jobs.into_iter().enumerate() {
        let (r, t) = j.await.map_err(|e| format!("peer-{i} job: {e}"))?;
        r.map_err(|e| {
            format!(
                "peer-{i} fetch failed: {e}\n--- log ---\n{}",
                swarm.peers[i].log_tail(30)
            )
        })?;
        done.push(t);
    }
    let peer_cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| cpu_secs(*p) - c0)
        .collect();
    let seed_cpu = cpu_secs(seed_pid) - seed0;
    let sched_cpu = sched_cpu.unwrap_or_else(|| cpu_secs(sched_pid) - sched0);
    let origin_bytes = swarm.relay.blob_bytes_served(digest);
    progress.abort();
    let samples = samples.lock().map(|v| v.clone()).unwrap_or_default();
    let eg: Vec<(u64, u64)> = egress_of(swarm)
        .iter()
        .zip(&eg0)
        .map(|(a, b)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)))
        .collect();
    let seed_sent = eg.first().map_or(0, |e| e.0);
    let peers_sent = eg.iter().skip(1).map(|e| e.0).sum();
    let dropped = eg.iter().map(|e| e.1).sum();
    // Every peer's copy, read back through its API and hashed here.
    for (i, sock) in swarm.sockets.iter().enumerate() {
        let got = sha256_via_api(sock, blob).await?;
        if got != digest {
            return Err(format!("peer-{i} holds other bytes: {got}, want {digest}"));
        }
    }
    println!(
        "  all {} copies verified (sha256 read back through each peer's API); logs in {}",
        opts.peers,
        swarm.dir().display()
    );
    // The run's directory goes with the run: its node logs are copied out first if asked.
    if let Some(to) = std::env::var_os("FANOUT_KEEP_LOGS") {
        keep_logs(swarm.dir(), std::path::Path::new(&to))?;
    }
    Ok(RunFigures {
        done,
        origin_bytes,
        peer_cpu,
        seed_cpu,
        sched_cpu,
        seed_sent,
        peers_sent,
        dropped,
        samples,
    })
}

/// Samples every 5 s how much of the blob the peers hold together (from their task status)
/// into `out` as (seconds, percent); with `trace` (seed and peers' sockets), also prints each
/// node's held pieces every second.
async fn progress(
    sockets: Vec<std::path::PathBuf>,
    trace: Option<Vec<std::path::PathBuf>>,
    start: Instant,
    out: std::sync::Arc<std::sync::Mutex<Vec<(u64, f64)>>>,
) {
    for tick in 1u64.. {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(nodes) = &trace {
            let mut line = format!("  t={:5.1} s held:", start.elapsed().as_secs_f64());
            for s in nodes {
                let tasks = ApiClient::new(s).tasks().await.unwrap_or_default();
                let held: u32 = tasks.iter().map(|t| t.held).sum();
                line.push_str(&format!(" {held:5}"));
            }
            println!("{line}");
        }
        if tick % 5 != 0 {
            continue;
        }
        let (mut held, mut total) = (0u64, 0u64);
        for s in &sockets {
            if let Ok(tasks) = ApiClient::new(s).tasks().await {
                for t in tasks {
                    held += u64::from(t.held);
                    total += u64::from(t.pieces.unwrap_or(0));
                }
            }
        }
        let pct = if total == 0 {
            0.0
        } else {
            held as f64 * 100.0 / total as f64
        };
        if let Ok(mut v) = out.lock() {
            v.push((start.elapsed().as_secs(), pct));
        }
    }
}

fn report(what: &str, opts: &Opts, f: &RunFigures) {
    let limit = opts.physical_limit().as_secs_f64();
    let mut sorted: Vec<f64> = f.done.iter().map(Duration::as_secs_f64).collect();
    sorted.sort_by(f64::total_cmp);
    let first = sorted.first().copied().unwrap_or(0.0);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let last = sorted.last().copied().unwrap_or(0.0);
    let gib = opts.blob_bytes as f64 / f64::from(1u32 << 30);
    let per_gib: Vec<f64> = f.peer_cpu.iter().map(|c| c / gib).collect();
    let mean = per_gib.iter().sum::<f64>() / per_gib.len().max(1) as f64;
    let max = per_gib.iter().copied().fold(0.0, f64::max);
    println!("swarm, {what}:");
    println!(
        "  last peer {last:.2} s = {:.2} x S/B (first {first:.2} s, median {median:.2} s)   target <= 1.25",
        last / limit
    );
    println!(
        "  origin egress {} MiB = {:.3} x S   target <= 1.05",
        f.origin_bytes >> 20,
        f.origin_bytes as f64 / opts.blob_bytes as f64
    );
    let timeline: Vec<String> = f
        .samples
        .iter()
        .map(|(t, p)| format!("{t}s:{p:.0}%"))
        .collect();
    println!("  pieces held, all peers: {}", timeline.join(" "));
    println!(
        "  uploads: seed {:.2} x S, peers {:.2} x S; packets dropped by the tbf caps: {}",
        f.seed_sent as f64 / opts.blob_bytes as f64,
        f.peers_sent as f64 / opts.blob_bytes as f64,
        f.dropped
    );
    println!(
        "  peer CPU per GiB received: mean {mean:.2} s, max {max:.2} s; seed {:.2} s/GiB; scheduler {:.2} s total",
        f.seed_cpu / gib,
        f.sched_cpu
    );
}

/// All peer hosts GET the blob from the origin relay at once with curl (sha256 checked).
async fn baseline(swarm: &Swarm, opts: &Opts, digest: &str) -> Result<(), String> {
    swarm.relay.reset_counters();
    let url = format!("http://{}/v2/{REPO}/blobs/{digest}", swarm.relay_addr());
    let script = format!("curl -sS --fail '{url}' | sha256sum");
    let start = Instant::now();
    let mut jobs = Vec::new();
    for i in 0..opts.peers {
        let mut cmd = tokio::process::Command::from(swarm.peer_host(i).command("sh"));
        cmd.args(["-c", &script]).kill_on_drop(true);
        jobs.push(async move {
            let out = cmd.output().await;
            (out, start.elapsed())
        });
    }
    let results = futures::future::join_all(jobs).await;
    let want = digest.trim_start_matches("sha256:");
    let mut times = Vec::new();
    for (i, (out, t)) in results.into_iter().enumerate() {
        let out = out.map_err(|e| format!("baseline curl on peer host {i}: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.starts_with(want) {
            return Err(format!(
                "baseline curl on peer host {i}: {} {text} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        times.push(t.as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let limit = opts.physical_limit().as_secs_f64();
    let last = times.last().copied().unwrap_or(0.0);
    let served = swarm.relay.blob_bytes_served(digest);
    println!(
        "baseline, {} hosts straight from the origin (curl):",
        opts.peers
    );
    println!(
        "  last host {last:.2} s = {:.2} x S/B (first {:.2} s); origin egress {} MiB = {:.3} x S",
        last / limit,
        times.first().copied().unwrap_or(0.0),
        served >> 20,
        served as f64 / opts.blob_bytes as f64
    );
    Ok(())
}

async fn sha256_via_api(sock: &std::path::Path, blob: &Digest) -> Result<String, String> {
    let resp = ApiClient::new(sock)
        .blob(blob)
        .send()
        .await
        .map_err(|e| format!("read back from {}: {e}", sock.display()))?;
    let mut h = sha2::Sha256::new();
    let mut body = resp.body;
    while let Some(chunk) = body.next().await {
        h.update(&chunk.map_err(|e| format!("read back from {}: {e}", sock.display()))?);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// User + system CPU seconds of process `pid` so far (fields 14 and 15 of /proc/PID/stat);
/// 0 when it is gone.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After ')': state is index 0, so utime (field 14) is index 11 and stime index 12.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Copies the `*.log` files of `from` into `to` (created if needed).
fn keep_logs(from: &std::path::Path, to: &std::path::Path) -> Result<(), String> {
    let fail = |what: &str, e: std::io::Error| format!("keeping node logs: {what}: {e}");
    std::fs::create_dir_all(to).map_err(|e| fail("create the target directory", e))?;
    let entries = std::fs::read_dir(from).map_err(|e| fail("list the run directory", e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "log") {
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, to.join(name)).map_err(|e| fail("copy a log", e))?;
            }
        }
    }
    println!("  node logs copied to {}", to.display());
    Ok(())
}
