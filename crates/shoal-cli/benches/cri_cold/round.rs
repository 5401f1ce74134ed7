//! One round: a fresh containerd in the client host, a pod, then the timed cold start and the
//! start with the image already local.

use std::io::Read;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use shoal_chaos::TestNet;
use shoal_testkit::{ContainerLog, ContainerSpec, Containerd, ContainerdOpts, Cri, Exit, Pod};

use crate::image;
use crate::relay::Relay;
use crate::variant::{Helpers, Images, Variant};
use crate::Res;

/// The startup workload: `busybox sha256sum` of the startup list, and what it must print.
pub struct Workload {
    /// Absolute paths in the image.
    pub files: Vec<String>,
    /// `sha256  path` lines of the machine's files (the image's source).
    expected: String,
    /// Bytes the workload reads (the files' sizes).
    pub bytes: u64,
}

impl Workload {
    /// The lazy fs bench's startup list, hashed from this machine's files.
    pub fn startup() -> Res<Workload> {
        let files: Vec<String> = image::startup_list()
            .into_iter()
            .map(|p| format!("/{p}"))
            .collect();
        let (mut lines, mut bytes) = (Vec::new(), 0);
        let mut buf = vec![0u8; 1 << 20];
        for f in &files {
            let mut h = Sha256::new();
            let mut file = std::fs::File::open(f).map_err(|e| format!("{f}: {e}"))?;
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(buf.get(..n).ok_or("short read")?);
                bytes += n as u64;
            }
            lines.push(format!("{}  {f}", hex::encode(h.finalize())));
        }
        Ok(Workload {
            files,
            expected: lines.join("\n"),
            bytes,
        })
    }

    fn spec(&self, image: &str) -> ContainerSpec {
        ContainerSpec::new(image)
            .command(["/bin/busybox", "sha256sum"])
            .args(self.files.iter().cloned())
    }

    fn check(&self, exit: &Exit, log: &ContainerLog) -> Res<()> {
        if exit.code != 0 {
            return Err(format!("workload exited {exit:?}: {}", log.stderr()).into());
        }
        if log.stdout() != self.expected {
            return Err("the workload's sha256 differ from the source files'".into());
        }
        Ok(())
    }
}

/// What one round measured.
pub struct Round {
    /// The PullImage call.
    pub pull: Duration,
    /// PullImage called -> the workload's exit (containerd's `finished_at`).
    pub cold: Duration,
    /// The workload's own run (`started_at` -> `finished_at`) in the cold start.
    pub cold_run: Duration,
    /// CreateContainer called -> exit, with the image already local.
    pub local: Duration,
    /// Bytes the relay sent over the link during the cold start (HTTP headers included).
    pub link_bytes: u64,
    /// CPU time containerd spent from PullImage to the workload's exit (gunzip and unpack run
    /// in containerd itself).
    pub containerd_cpu: Duration,
    /// containerd's peak RSS (KiB).
    pub containerd_rss: u64,
    /// Each helper's peak RSS (KiB).
    pub helpers_rss: Vec<(String, u64)>,
    /// Lazy variants: (bytes the workloads read, stored bytes the mounts fetched).
    pub lazy_bytes: Option<(u64, u64)>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn since(t0_ns: i64, t_ns: i64) -> Duration {
    Duration::from_nanos(u64::try_from(t_ns - t0_ns).unwrap_or(0))
}

/// Peak RSS (`VmHWM`, KiB) of `pid`, 0 when unknown.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.get(s.rfind(')')? + 2..)?.to_string();
            let f: Vec<u64> = rest
                .split(' ')
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(f.iter().sum::<u64>())
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// Create, start, wait, check; returns (time from the create call to the exit, the exit).
async fn start_and_wait(
    cri: &Cri,
    pod: &Pod,
    workload: &Workload,
    image: &str,
) -> Res<(Duration, Exit)> {
    let t0 = now_ns();
    let c = cri.create(pod, workload.spec(image)).await?;
    cri.start(&c).await?;
    let exit = cri.wait_exit(&c, Duration::from_secs(600)).await?;
    workload.check(&exit, &cri.logs(&c)?)?;
    Ok((since(t0, exit.finished_at), exit))
}

/// Runs one round of `variant` in the client host (host 1) of `net`.
pub async fn run(
    variant: Variant,
    images: &Images,
    net: &TestNet,
    relay: &Relay,
    workload: &Workload,
    tmpfs: bool,
) -> Res<Round> {
    let opts = variant.containerd_opts(ContainerdOpts {
        netns: Some(net.host(1).netns().name().to_string()),
        tmpfs,
        ..ContainerdOpts::new(&images.sandbox)
    });
    let ctrd = Containerd::start(opts).await?;
    let helpers = variant.start_helpers(&ctrd, images).await?;
    let round = timed(variant, images, relay, workload, &ctrd, &helpers)
        .await
        .map_err(|e| {
            // What the snapshotter said is the first thing to read when a lazy round fails.
            let log = helpers
                .shoal
                .as_ref()
                .map(|s| {
                    let alive: Vec<String> = s
                        .pids()
                        .into_iter()
                        .map(|(n, pid)| {
                            let st = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                                .unwrap_or_else(|e| e.to_string());
                            format!("{n} {pid}: {}", st.chars().take(60).collect::<String>())
                        })
                        .collect();
                    format!(
                        "\nprocesses: {alive:?}\nsnapshotter log:\n{}",
                        s.snapshotter_log()
                    )
                })
                .unwrap_or_default();
            format!("{e}{log}\ncontainerd log:\n{}", ctrd.log_tail(40))
        });
    drop(helpers);
    let stopped = ctrd.stop().await;
    let round = round?;
    stopped?;
    Ok(round)
}

/// The timed part of a round, on a started containerd and its helpers.
async fn timed(
    variant: Variant,
    images: &Images,
    relay: &Relay,
    workload: &Workload,
    ctrd: &Containerd,
    helpers: &Helpers,
) -> Res<Round> {
    let cri = ctrd.cri().await?;
    // Not timed. containerd dials the snapshotter's socket when it starts, before the
    // snapshotter listens, and its gRPC client then waits out a reconnect backoff (a second or
    // more): a pod in that window fails with Unavailable, so it is tried again.
    let mut attempt = 0;
    let pod = loop {
        match cri.run_pod("bench").await {
            Ok(p) => break p,
            Err(e) if attempt < 10 && e.to_string().contains("snapshotter.sock") => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let image = variant.image(images);

    let before = relay.bytes();
    let cpu0 = ctrd.pid().map_or(Duration::ZERO, cpu_time);
    let t0 = now_ns();
    let t = Instant::now();
    cri.pull(&image, None).await?;
    let pull = t.elapsed();
    let (_, exit) = start_and_wait(&cri, &pod, workload, &image).await?;
    let cold = since(t0, exit.finished_at);
    let cold_run = since(exit.started_at, exit.finished_at);
    let link_bytes = relay.bytes() - before;
    let containerd_cpu = ctrd
        .pid()
        .map_or(Duration::ZERO, cpu_time)
        .saturating_sub(cpu0);

    let (local, _) = start_and_wait(&cri, &pod, workload, &image).await?;
    let containerd_rss = ctrd.pid().map_or(0, peak_rss_kib);
    let helpers_rss = helpers.rss();
    let lazy_bytes = helpers.lazy_bytes(ctrd);
    Ok(Round {
        pull,
        cold,
        cold_run,
        local,
        link_bytes,
        containerd_cpu,
        containerd_rss,
        helpers_rss,
        lazy_bytes,
    })
}

/// Workload bytes at the link rate plus the local start: what no implementation can beat.
fn physical_limit(workload: &Workload, mbit: u64, local: Duration) -> Duration {
    Duration::from_secs_f64(workload.bytes as f64 * 8.0 / (mbit as f64 * 1e6)) + local
}

impl Round {
    /// One line of figures.
    pub fn line(&self, mbit: u64, workload: &Workload) -> String {
        let limit = physical_limit(workload, mbit, self.local);
        let helpers: String = self
            .helpers_rss
            .iter()
            .map(|(n, kib)| format!(", {n} peak RSS {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        let lazy = match self.lazy_bytes {
            Some((read, fetched)) if read > 0 => format!(
                "; lazy mounts read {:.1} MB, fetched {:.1} MB (fetched/read {:.2})",
                read as f64 / 1e6,
                fetched as f64 / 1e6,
                fetched as f64 / read as f64
            ),
            _ => String::new(),
        };
        format!(
            "cold {:.2} s (PullImage {:.2} s, then create..exit {:.2} s, workload run {:.3} s); \
             local start {:.3} s; physical limit {:.3} s (cold/limit {:.1}); \
             {:.1} MB over the link; containerd CPU {:.2} s, peak RSS {:.1} MiB{helpers}{lazy}",
            self.cold.as_secs_f64(),
            self.pull.as_secs_f64(),
            (self.cold - self.pull.min(self.cold)).as_secs_f64(),
            self.cold_run.as_secs_f64(),
            self.local.as_secs_f64(),
            limit.as_secs_f64(),
            self.cold.as_secs_f64() / limit.as_secs_f64(),
            self.link_bytes as f64 / 1e6,
            self.containerd_cpu.as_secs_f64(),
            self.containerd_rss as f64 / 1024.0,
        )
    }
}

/// Medians (and spread) over rounds.
pub fn summary(rounds: &[Round], mbit: u64, workload: &Workload) -> String {
    let stat = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let med = v.get(v.len() / 2).copied().unwrap_or(0.0);
        let (lo, hi) = (
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0),
        );
        format!("{med:.3} s ({lo:.3}..{hi:.3})")
    };
    format!(
        "cold {}, PullImage {}, containerd CPU {}, local start {}, physical limit {}",
        stat(&|r| r.cold.as_secs_f64()),
        stat(&|r| r.pull.as_secs_f64()),
        stat(&|r| r.containerd_cpu.as_secs_f64()),
        stat(&|r| r.local.as_secs_f64()),
        stat(&|r| physical_limit(workload, mbit, r.local).as_secs_f64()),
    )
}

/// The targets for a lazy variant, from the baseline's medians: at most 5 % of its cold
/// start, and at most 1.3 × the physical limit.
pub fn targets(baseline: &[Round], mbit: u64, workload: &Workload) -> String {
    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = baseline.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    format!(
        "a lazy start must end within {:.3} s (5 % of the overlayfs cold start) and {:.3} s \
         (1.3 x the physical limit)",
        0.05 * median(&|r| r.cold.as_secs_f64()),
        1.3 * median(&|r| physical_limit(workload, mbit, r.local).as_secs_f64()),
    )
}

/// The lazy variant against the baseline of the same run: cold start ÷ overlayfs cold start
/// (target 0.05) and ÷ its physical limit (target 1.3), by medians.
pub fn compare(baseline: &[Round], lazy: &[Round], mbit: u64, workload: &Workload) -> String {
    let median = |rs: &[Round], f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let cold = median(lazy, &|r| r.cold.as_secs_f64());
    let base = median(baseline, &|r| r.cold.as_secs_f64());
    let limit = median(lazy, &|r| {
        physical_limit(workload, mbit, r.local).as_secs_f64()
    });
    format!(
        "shoal against overlayfs, same run: cold {cold:.3} s = {:.3} x the overlayfs cold start \
         (target <= 0.05) and {:.2} x its physical limit {limit:.3} s (target <= 1.3)",
        cold / base,
        cold / limit
    )
}

/// An index variant against the baseline and the converted image of the same run, by medians:
/// cold start ÷ overlayfs cold start (target 0.15) and ÷ the converted image's (target 1.5).
pub fn compare_index(
    name: &str,
    index: &[Round],
    overlayfs: Option<&Vec<Round>>,
    shoal: Option<&Vec<Round>>,
) -> String {
    let median = |rs: &[Round]| {
        let mut v: Vec<f64> = rs.iter().map(|r| r.cold.as_secs_f64()).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let cold = median(index);
    let mut out =
        format!("{name} (unconverted image with a Shoal index), same run: cold {cold:.3} s");
    if let Some(base) = overlayfs {
        out += &format!(
            " = {:.3} x the overlayfs cold start (target <= 0.15)",
            cold / median(base)
        );
    }
    if let Some(conv) = shoal {
        out += &format!(
            ", {:.2} x the converted image's {:.3} s (target <= 1.5)",
            cold / median(conv),
            median(conv)
        );
    }
    out
}
