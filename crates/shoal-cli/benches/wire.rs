//! CPU per byte on the data path (docs/benchmarks.md, "CPU per byte (issue 22)"): what each
//! process spends, in CPU seconds (utime + stime from /proc/PID/stat, or the child's rusage)
//! per GiB moved, for the same blob in the same run:
//! 1. a seed fetching the blob from docker-registry (seed and registry CPU);
//! 2. a peer downloading it from that seed over QUIC on loopback (peer, seed uploading; wall
//!    throughput peer <- seed);
//! 3. `shoal get` of the blob the peer now holds, into a file (the consumer and the peer
//!    serving it);
//! 4. the baseline: curl <- docker-registry into a file (curl and registry CPU);
//! 5. the floor on one core, on the same bytes: AES-128-GCM in 16 KiB records (ring, which
//!    Shoal's TLS and QUIC use), SHA-256, BLAKE3, and a page-cache write of the blob.
//!
//! Every round starts a fresh scheduler, seed and peer (real `shoal` processes, empty data
//! directories) so each stage moves the whole blob. Printed: the median and the range over the
//! rounds. Run: `cargo bench -p shoal-cli --bench wire`. SHOAL_BENCH_BLOB_MIB sets the blob
//! size (default 512), SHOAL_BENCH_ROUNDS the rounds (default 5), SHOAL_BENCH_DIR where data
//! goes (default the system temp dir), SHOAL_BENCH_PEER_ARGS extra `shoal peer` flags for the
//! seed and the peer (settings to compare). With SHOAL_BENCH_PERF=DIR one more round follows in
//! which `perf record -g` samples the peer and the seed during the download (DIR/peer.data,
//! DIR/seed.data) and the consumer's `shoal get` (DIR/get.data).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_api::Client as ApiClient;
use shoal_proto::Digest;
use shoal_testkit::{Registry, RegistryOpts};

// Each bench uses part of what the benches share.
#[allow(dead_code)]
mod common;
use common::{env_num, free_tcp, free_udp, issue, metric, s, shoal_ok, spawn, strings, Proc};

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
const SCHEDULER: &str = "shoal-scheduler";
const REPO: &str = "bench/wire";

/// User + system CPU seconds of process `pid` so far (fields 14 and 15 of /proc/PID/stat).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After ')': state is index 0, so utime (field 14) is index 11 and stime index 12.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

fn timeval_secs(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// User + system CPU seconds of this process's reaped children so far.
fn children_cpu() -> f64 {
    // SAFETY: a zeroed rusage is valid and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    timeval_secs(ru.ru_utime) + timeval_secs(ru.ru_stime)
}

/// CPU seconds the calling thread has used so far.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Runs `cmd` to the end; returns its CPU seconds (rusage of the reaped child) and wall seconds.
fn run_timed(mut cmd: Command, what: &str) -> (f64, f64) {
    let cpu0 = children_cpu();
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let wall = start.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu0;
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cpu, wall)
}

/// The figures of one round, CPU in seconds per GiB, wall in MiB/s.
#[derive(Default)]
struct Round {
    seed_from_origin: f64,
    registry_to_seed: f64,
    origin_mib_s: f64,
    peer_download: f64,
    seed_upload: f64,
    peer_mib_s: f64,
    get: f64,
    peer_serving_get: f64,
    get_mib_s: f64,
    curl: f64,
    registry_to_curl: f64,
    curl_mib_s: f64,
}

/// One round's processes: a scheduler, a seed and a peer with empty data directories.
struct Trio {
    dir: PathBuf,
    procs: Vec<Proc>,
    seed_pid: u32,
    seed_sock: PathBuf,
    peer_pid: u32,
    peer_sock: PathBuf,
    peer_metrics: SocketAddr,
}

impl Drop for Trio {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Trio {
    fn start(dir: PathBuf, tls: &Path, registry: &Registry) -> Trio {
        std::fs::create_dir_all(&dir).expect("round dir");
        let mut procs = Vec::new();
        let scheduler = free_udp();
        let sched_metrics = free_tcp();
        let sched_args = strings(&[
            "--log",
            "warn",
            "scheduler",
            "--host-id",
            SCHEDULER,
            "--listen",
            &scheduler.to_string(),
            "--tls-dir",
            s(&tls.join(SCHEDULER)),
            "--metrics-listen",
            &sched_metrics.to_string(),
            "--allowed-origins",
            &registry.host(),
        ]);
        spawn(
            &mut procs,
            "scheduler",
            &sched_args,
            dir.join("scheduler.log"),
            sched_metrics,
        );
        let mut peer = |name: &str, seed: bool| -> (u32, PathBuf, SocketAddr) {
            let socket = dir.join(format!("{name}.sock"));
            let metrics = free_tcp();
            let mut args = strings(&[
                "--log",
                "warn",
                "peer",
                "--data-dir",
                s(&dir.join(format!("{name}-data"))),
                "--tls-dir",
                s(&tls.join(name)),
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
                "8589934592",
                "--dht=false",
                "--allowed-origins",
                &registry.host(),
            ]);
            if seed {
                args.push("--seed".into());
            }
            // Settings to compare (e.g. `--piece-size 8388608`), given to the seed and the peer.
            if let Ok(extra) = std::env::var("SHOAL_BENCH_PEER_ARGS") {
                args.extend(extra.split_whitespace().map(str::to_string));
            }
            spawn(
                &mut procs,
                name,
                &args,
                dir.join(format!("{name}.log")),
                metrics,
            );
            let pid = procs.last().map_or(0, Proc::pid);
            (pid, socket, metrics)
        };
        let (seed_pid, seed_sock, _) = peer("seed", true);
        let (peer_pid, peer_sock, peer_metrics) = peer("peer", false);
        // Registration with the scheduler follows readiness by a round trip or two.
        std::thread::sleep(Duration::from_secs(2));
        Trio {
            dir,
            procs,
            seed_pid,
            seed_sock,
            peer_pid,
            peer_sock,
            peer_metrics,
        }
    }
}

/// `perf record -g -p PID -o OUT`, stopped by SIGINT in [`perf_stop`].
fn perf_start(pid: u32, out: &Path) -> Child {
    let child = Command::new("perf")
        .args(["record", "-g", "-F", "999", "-p", &pid.to_string(), "-o"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("perf record (is perf installed?)");
    std::thread::sleep(Duration::from_millis(500));
    child
}

fn perf_stop(mut child: Child) {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let _ = child.wait();
}

/// One round; with `perf`, samples the download and the consumer into that directory instead
/// of measuring them.
#[allow(clippy::too_many_arguments)]
fn round(
    rt: &tokio::runtime::Runtime,
    work: &Path,
    tls: &Path,
    registry: &Registry,
    registry_pid: u32,
    blob: &Digest,
    size: u64,
    perf: Option<&Path>,
) -> Round {
    let gib = size as f64 / GIB;
    let mib = size as f64 / MIB as f64;
    let source = format!("docker://{}/{REPO}", registry.host());
    let mut r = Round::default();
    let trio = Trio::start(work.join("round"), tls, registry);

    // 1. Seed <- origin.
    let (seed0, reg0) = (cpu_secs(trio.seed_pid), cpu_secs(registry_pid));
    let start = Instant::now();
    rt.block_on(
        ApiClient::new(&trio.seed_sock)
            .blob(blob)
            .source(source.as_str())
            .fetch(),
    )
    .expect("the seed fetches the blob from the origin");
    let wall = start.elapsed().as_secs_f64();
    r.seed_from_origin = (cpu_secs(trio.seed_pid) - seed0) / gib;
    r.registry_to_seed = (cpu_secs(registry_pid) - reg0) / gib;
    r.origin_mib_s = mib / wall;

    // 2. Peer <- seed.
    let perfs = perf.map(|d| {
        (
            perf_start(trio.peer_pid, &d.join("peer.data")),
            perf_start(trio.seed_pid, &d.join("seed.data")),
        )
    });
    let (peer0, seed0) = (cpu_secs(trio.peer_pid), cpu_secs(trio.seed_pid));
    let start = Instant::now();
    rt.block_on(
        ApiClient::new(&trio.peer_sock)
            .blob(blob)
            .source(source.as_str())
            .fetch(),
    )
    .expect("the peer fetches the blob");
    let wall = start.elapsed().as_secs_f64();
    r.peer_download = (cpu_secs(trio.peer_pid) - peer0) / gib;
    r.seed_upload = (cpu_secs(trio.seed_pid) - seed0) / gib;
    r.peer_mib_s = mib / wall;
    if let Some((p, s)) = perfs {
        perf_stop(p);
        perf_stop(s);
    }
    let from = |src: &str| {
        let series = format!("shoal_peer_download_bytes_total{{source=\"{src}\"}}");
        metric(trio.peer_metrics, &series).unwrap_or(0.0)
    };
    let (from_peers, from_origin) = (from("peer"), from("origin"));
    assert!(
        from_origin < size as f64 * 0.01 && from_peers >= size as f64,
        "the peer should take the blob from the seed: {from_peers} bytes from peers, {from_origin} from the origin"
    );

    // 3. `shoal get` of the held blob into a file.
    let out = work.join("got.blob");
    let mut get = Command::new(env!("CARGO_BIN_EXE_shoal"));
    get.args(["--log", "warn", "get", "--api"])
        .arg(&trio.peer_sock)
        .arg(format!("{source}@{blob}"))
        .arg("-o")
        .arg(&out);
    let get_perf = perf.map(|d| perf_start(trio.peer_pid, &d.join("peer-serving-get.data")));
    let peer0 = cpu_secs(trio.peer_pid);
    let (cpu, wall) = match perf {
        Some(d) => {
            // The consumer itself under perf: its pid is only known once started.
            let mut p = Command::new("perf");
            p.args(["record", "-g", "-F", "999", "-o"])
                .arg(d.join("get.data"))
                .arg("--")
                .arg(get.get_program())
                .args(get.get_args());
            run_timed(p, "perf record shoal get")
        }
        None => run_timed(get, "shoal get"),
    };
    r.peer_serving_get = (cpu_secs(trio.peer_pid) - peer0) / gib;
    if let Some(p) = get_perf {
        perf_stop(p);
    }
    r.get = cpu / gib;
    r.get_mib_s = mib / wall;
    let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    assert_eq!(got, size, "shoal get wrote {got} of {size} bytes");
    let _ = std::fs::remove_file(&out);
    drop(trio);

    // 4. Baseline: curl <- docker-registry into a file.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--fail", "-o"])
        .arg(&out)
        .arg(format!("{}/v2/{REPO}/blobs/{blob}", registry.url()));
    let reg0 = cpu_secs(registry_pid);
    let (cpu, wall) = run_timed(curl, "curl");
    r.registry_to_curl = (cpu_secs(registry_pid) - reg0) / gib;
    r.curl = cpu / gib;
    r.curl_mib_s = mib / wall;
    let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    assert_eq!(got, size, "curl wrote {got} of {size} bytes");
    let _ = std::fs::remove_file(&out);
    r
}

/// The floor on one core (this thread), CPU seconds per GiB of `data`: AES-128-GCM in 16 KiB
/// records (ring), SHA-256, BLAKE3, and writing it into the page cache (no fsync).
fn floor(data: &mut [u8], dir: &Path) -> [(&'static str, f64); 4] {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    use sha2::Digest as _;
    let gib = data.len() as f64 / GIB;
    let timed = |f: &mut dyn FnMut()| {
        let c0 = thread_cpu();
        f();
        (thread_cpu() - c0) / gib
    };
    let sha = timed(&mut || {
        std::hint::black_box(sha2::Sha256::digest(&*data));
    });
    let b3 = timed(&mut || {
        std::hint::black_box(blake3::hash(data));
    });
    let path = dir.join("floor.blob");
    let write = timed(&mut || {
        let mut f = std::fs::File::create(&path).expect("floor file");
        for c in data.chunks(MIB as usize) {
            f.write_all(c).expect("page-cache write");
        }
    });
    let _ = std::fs::remove_file(&path);
    // Last: it encrypts `data` in place.
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).expect("AES key"));
    let aes = timed(&mut || {
        for (i, rec) in data.chunks_mut(16 * 1024).enumerate() {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), rec)
                .expect("seal");
            let _ = std::hint::black_box(tag);
        }
    });
    [
        ("AES-128-GCM, 16 KiB records (ring)", aes),
        ("SHA-256", sha),
        ("BLAKE3 (one thread)", b3),
        ("page-cache write, 1 MiB writes", write),
    ]
}

/// Median, min and max of `v`.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (med, v[0], v[v.len() - 1])
}

fn main() {
    let size = env_num("SHOAL_BENCH_BLOB_MIB", 512) * MIB;
    let rounds = env_num("SHOAL_BENCH_ROUNDS", 5).max(1) as usize;
    let perf = std::env::var_os("SHOAL_BENCH_PERF").map(PathBuf::from);
    shoal_tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let registry = match rt.block_on(Registry::start(RegistryOpts::default())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skipping the CPU-per-byte benchmark: {e}");
            return;
        }
    };
    let registry_pid = registry.pid();
    let mut data = shoal_testkit::random_bytes(size as usize, 22);
    let digest = rt
        .block_on(registry.push_blob(REPO, &data))
        .expect("pushing the blob");
    let blob = Digest::parse(&digest).expect("pushed digests parse");

    let work = match std::env::var_os("SHOAL_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("bench dir");
    let tls = work.path().join("tls");
    let ca = work.path().join("ca");
    shoal_ok(&["ca", "init", "--dir", s(&ca)]);
    for name in [SCHEDULER, "seed", "peer"] {
        issue(&ca, &tls.join(name), name);
    }
    let floor = floor(&mut data, work.path());
    drop(data);

    let mut all = Vec::new();
    for i in 0..rounds {
        let r = round(
            &rt,
            work.path(),
            &tls,
            &registry,
            registry_pid,
            &blob,
            size,
            None,
        );
        println!(
            "round {}: peer <- seed {:.0} MiB/s, peer {:.2} s/GiB, seed up {:.2}, get {:.2}, curl {:.2}",
            i + 1,
            r.peer_mib_s,
            r.peer_download,
            r.seed_upload,
            r.get,
            r.curl
        );
        all.push(r);
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nCPU per byte: blob {} MiB, {rounds} rounds (median [min..max]); loopback; load average {}",
        size / MIB,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let line = |what: &str, unit: &str, f: &dyn Fn(&Round) -> f64| {
        let (m, lo, hi) = stats(all.iter().map(f).collect());
        println!("  {what:<44} {m:8.2} [{lo:.2}..{hi:.2}] {unit}");
    };
    println!("seed <- origin (docker-registry):");
    line("seed", "CPU s/GiB", &|r| r.seed_from_origin);
    line("docker-registry serving it", "CPU s/GiB", &|r| {
        r.registry_to_seed
    });
    line("wall", "MiB/s", &|r| r.origin_mib_s);
    println!("peer <- seed (QUIC, loopback):");
    line("downloading peer (target <= 2.0)", "CPU s/GiB", &|r| {
        r.peer_download
    });
    line("uploading seed (target <= 1.0)", "CPU s/GiB", &|r| {
        r.seed_upload
    });
    line("wall (target >= 400)", "MiB/s", &|r| r.peer_mib_s);
    println!("local consumer: `shoal get` of the held blob into a file:");
    line("shoal get", "CPU s/GiB", &|r| r.get);
    line("peer serving it", "CPU s/GiB", &|r| r.peer_serving_get);
    line(
        "both (target <= 0.5 beyond the peer's download)",
        "CPU s/GiB",
        &|r| r.get + r.peer_serving_get,
    );
    line("wall", "MiB/s", &|r| r.get_mib_s);
    println!("baseline: curl <- docker-registry into a file:");
    line("curl", "CPU s/GiB", &|r| r.curl);
    line("docker-registry", "CPU s/GiB", &|r| r.registry_to_curl);
    line("both", "CPU s/GiB", &|r| r.curl + r.registry_to_curl);
    line("wall", "MiB/s", &|r| r.curl_mib_s);
    line(
        "peer + seed + consumer over curl + registry (target <= 2)",
        "x",
        &|r| {
            (r.peer_download + r.seed_upload + r.get + r.peer_serving_get)
                / (r.curl + r.registry_to_curl)
        },
    );
    println!("floor, one core, the same bytes:");
    for (what, v) in floor {
        println!("  {what:<44} {v:8.2} CPU s/GiB");
    }

    if let Some(dir) = perf {
        std::fs::create_dir_all(&dir).expect("perf output dir");
        round(
            &rt,
            work.path(),
            &tls,
            &registry,
            registry_pid,
            &blob,
            size,
            Some(&dir),
        );
        println!(
            "perf: peer.data, seed.data (download), get.data and peer-serving-get.data in {}",
            dir.display()
        );
    }
}
