//! Scheduler benchmark (issue 5): 10,000 simulated hosts and 1,000 blobs with realistic piece
//! holdings; measures parent-selection decisions per second on one thread and heap bytes per
//! peer-task (counted by a counting global allocator). The baseline in the same run scores every
//! holder instead of sampling (`candidate_limit` = unlimited).
//!
//! Run: `cargo bench -p shoal-scheduler --bench decisions` (add `-- --quick` for a short run).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use shoal_scheduler::{
    Decision, Held, HostRegistration, Locality, Scheduler, SchedulerConfig, SystemClock,
    TaskAnnouncement,
};
use shoal_types::{Digest, HostId, PieceSet};

/// Counts live heap bytes and allocation calls.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const HOSTS: usize = 10_000;
const SEEDS: usize = 10;
const TASKS: usize = 1_000;
/// Blobs each ordinary host takes part in, drawn by Zipf popularity.
const TASKS_PER_HOST: usize = 30;
const PIECE_SIZE: u32 = 4 * 1024 * 1024;
const ZONES: usize = 3;
const RACKS_PER_ZONE: usize = 20;
const UPLOAD_SLOTS: u32 = 50;

struct World {
    s: Scheduler<SystemClock>,
    /// (host, task) pairs still downloading: the askers.
    askers: Vec<(HostId, Digest)>,
    peer_tasks: usize,
    bytes_per_peer_task: f64,
    total_bytes_per_peer_task: f64,
}

fn host_id(i: usize) -> HostId {
    let name = if i < SEEDS {
        format!("seed-{i}")
    } else {
        format!("node-{i:05}.pool")
    };
    HostId::new(&name).unwrap_or_else(|e| panic!("{e}"))
}

fn task_id(i: usize) -> Digest {
    let hex = format!("{:064x}", (i as u128 + 1) * 0x9e37_79b9_7f4a_7c15);
    Digest::parse(&format!("sha256:{hex}")).unwrap_or_else(|e| panic!("{e}"))
}

/// Layer sizes log-uniform from 512 KiB to 1 GiB: 1 to 256 pieces of 4 MiB.
fn blob_size(rng: &mut fastrand::Rng) -> u64 {
    let exp = 19.0 + rng.f64() * 11.0;
    2f64.powf(exp) as u64
}

fn bitmap(rng: &mut fastrand::Rng, pieces: u32) -> Held {
    // Most hosts that know a blob hold all of it (their cache); a fifth are starting, a fifth
    // are part way through with a random share of pieces.
    match rng.u8(..10) {
        0..=5 => Held::All,
        6..=7 => Held::Nothing,
        _ => {
            let mut set = PieceSet::empty(pieces);
            let share = rng.f64();
            for p in 0..pieces {
                if rng.f64() < share {
                    set.insert(p);
                }
            }
            Held::Set(set)
        }
    }
}

fn build(config: SchedulerConfig) -> World {
    let mut rng = fastrand::Rng::with_seed(5);
    let mut registry = Registry::default();
    let mut s = Scheduler::new(config, SystemClock, &mut registry)
        .unwrap_or_else(|e| panic!("scheduler: {e}"));
    s.seed_rng(11);
    for i in 0..HOSTS {
        let zone = i % ZONES;
        let rack = (i / ZONES) % RACKS_PER_ZONE;
        s.register_host(HostRegistration {
            id: host_id(i),
            addresses: vec![format!("10.{}.{}.{}:4470", zone, rack, i % 250)
                .parse()
                .unwrap_or_else(|e| panic!("{e}"))],
            locality: Locality {
                zone: format!("zone-{zone}"),
                rack: format!("rack-{rack}"),
            },
            upload_slots: if i < SEEDS { 256 } else { UPLOAD_SLOTS },
            upload_limit: 0,
            is_seed: i < SEEDS,
        })
        .unwrap_or_else(|e| panic!("register: {e}"));
    }
    let sizes: Vec<u64> = (0..TASKS).map(|_| blob_size(&mut rng)).collect();
    // Zipf(1) popularity: cumulative weights for sampling.
    let mut cum = Vec::with_capacity(TASKS);
    let mut total = 0.0;
    for i in 0..TASKS {
        total += 1.0 / (i as f64 + 1.0);
        cum.push(total);
    }
    let live_before = LIVE.load(Ordering::Relaxed);
    let mut askers = Vec::new();
    let mut peer_tasks = 0;
    for i in 0..HOSTS {
        let host = host_id(i);
        let mut chosen: Vec<usize> = if i < SEEDS {
            (0..TASKS).collect()
        } else {
            let mut set = Vec::with_capacity(TASKS_PER_HOST);
            while set.len() < TASKS_PER_HOST {
                let x = rng.f64() * total;
                let t = cum.partition_point(|&c| c < x).min(TASKS - 1);
                if !set.contains(&t) {
                    set.push(t);
                }
            }
            set
        };
        chosen.sort_unstable();
        for t in chosen {
            let pieces = sizes[t].div_ceil(u64::from(PIECE_SIZE)) as u32;
            let held = if i < SEEDS {
                if rng.bool() {
                    Held::All
                } else {
                    continue;
                }
            } else {
                bitmap(&mut rng, pieces)
            };
            if held != Held::All {
                askers.push((host.clone(), task_id(t)));
            }
            s.announce_task(
                &host,
                TaskAnnouncement {
                    task: task_id(t),
                    size: sizes[t],
                    piece_size: PIECE_SIZE,
                    held,
                },
            )
            .unwrap_or_else(|e| panic!("announce: {e}"));
            peer_tasks += 1;
        }
    }
    let live_after = LIVE.load(Ordering::Relaxed);
    assert_eq!(peer_tasks, s.peer_task_count());
    let bytes_per_peer_task = (live_after - live_before) as f64 / peer_tasks as f64;
    let total_bytes_per_peer_task = live_after as f64 / peer_tasks as f64;
    rng.shuffle(&mut askers);
    World {
        s,
        askers,
        peer_tasks,
        bytes_per_peer_task,
        total_bytes_per_peer_task,
    }
}

struct Run {
    decisions: u64,
    elapsed: Duration,
    allocs: u64,
    outcomes: [u64; 5],
    refusals: u64,
}

fn run(world: &mut World, decisions: u64) -> Run {
    let mut outcomes = [0u64; 5];
    let allocs_before = ALLOCS.load(Ordering::Relaxed);
    let refusals_before = world.s.metrics().cycle_refusals.get();
    let start = Instant::now();
    let n = world.askers.len();
    for i in 0..decisions {
        let (h, t) = &world.askers[i as usize % n];
        let d = world
            .s
            .decide(black_box(h), black_box(t))
            .unwrap_or_else(|e| panic!("decide: {e}"));
        let k = match &d {
            Decision::Parents(_) => 0,
            Decision::SeedFetch { .. } => 1,
            Decision::BackToSource => 2,
            Decision::Wait { .. } => 3,
            Decision::Done => 4,
        };
        outcomes[k] += 1;
        black_box(d);
    }
    Run {
        decisions,
        elapsed: start.elapsed(),
        allocs: ALLOCS.load(Ordering::Relaxed) - allocs_before,
        outcomes,
        refusals: world.s.metrics().cycle_refusals.get() - refusals_before,
    }
}

fn report(name: &str, r: &Run) {
    let per_sec = r.decisions as f64 / r.elapsed.as_secs_f64();
    println!(
        "{name}: {} decisions in {:.3} s = {:.0} decisions/s/core ({:.2} us each), {:.2} allocations/decision",
        r.decisions,
        r.elapsed.as_secs_f64(),
        per_sec,
        1e6 / per_sec,
        r.allocs as f64 / r.decisions as f64
    );
    println!(
        "  outcomes: parents {} seed_fetch {} back_to_source {} wait {} done {}",
        r.outcomes[0], r.outcomes[1], r.outcomes[2], r.outcomes[3], r.outcomes[4]
    );
    println!(
        "  parents refused by the cycle check: {:.3} per decision",
        r.refusals as f64 / r.decisions as f64
    );
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let decisions: u64 = if quick { 50_000 } else { 1_000_000 };
    println!(
        "machine: {} cpus, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let t0 = Instant::now();
    let mut world = build(SchedulerConfig::default());
    println!(
        "setup: {HOSTS} hosts ({SEEDS} seeds), {TASKS} blobs, {} peer-tasks, {} askers, built in {:.2} s",
        world.peer_tasks,
        world.askers.len(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "memory: {:.0} heap bytes per peer-task (announcements only), {:.0} including hosts and maps (target < 1024)",
        world.bytes_per_peer_task, world.total_bytes_per_peer_task
    );
    let sampled = run(&mut world, decisions);
    report("sampled (candidate_limit 64)", &sampled);
    drop(world);

    let mut baseline = build(SchedulerConfig {
        candidate_limit: usize::MAX,
        scan_limit: usize::MAX,
        ..SchedulerConfig::default()
    });
    let full = run(&mut baseline, decisions / 10);
    report("baseline: score every holder", &full);
}
