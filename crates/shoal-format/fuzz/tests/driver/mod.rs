//! Stable-toolchain smoke of the fuzz target's body: every corpus input, then mutated copies
//! (bytes flipped, inserted, removed, spliced, truncated) for `SHOAL_FUZZ_SMOKE_SECS` seconds
//! (default 10). `cargo +nightly fuzz run` does the real, coverage-guided runs.

use std::path::Path;
use std::time::{Duration, Instant};

/// A small deterministic generator (xorshift64*), so a failure can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, base: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(8) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80, b'0', b'/'][rng.below(6)];
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(v.len() - i);
                v.drain(i..i + n);
            }
            4 if !other.is_empty() => {
                let i = rng.below(v.len() + 1);
                let j = rng.below(other.len());
                let n = 1 + rng.below(other.len() - j);
                v.splice(i..i, other[j..j + n].iter().copied());
            }
            _ => v.truncate(rng.below(v.len() + 1)),
        }
    }
    v.truncate(max_len);
    v
}

/// Runs `body` on every file in `corpus` (plus `extra` seeds), then on mutations of them until
/// the time is up; returns the number of inputs run.
pub fn run_smoke(corpus: &Path, extra: &[Vec<u8>], max_len: usize, body: impl Fn(&[u8])) -> u64 {
    let secs = std::env::var("SHOAL_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10u64);
    let seed = std::env::var("SHOAL_FUZZ_SMOKE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let mut inputs: Vec<Vec<u8>> = extra.to_vec();
    if let Ok(dir) = std::fs::read_dir(corpus) {
        let mut paths: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        inputs.extend(paths.iter().filter_map(|p| std::fs::read(p).ok()));
    }
    inputs.push(Vec::new());
    let mut runs = 0u64;
    for i in &inputs {
        body(i);
        runs += 1;
    }
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        for _ in 0..64 {
            let a = &inputs[rng.below(inputs.len())];
            let b = &inputs[rng.below(inputs.len())];
            body(&mutate(&mut rng, a, b, max_len));
            runs += 1;
        }
    }
    eprintln!(
        "fuzz smoke: {runs} inputs ({} from the corpus) in {secs} s, seed {seed}",
        inputs.len()
    );
    runs
}
