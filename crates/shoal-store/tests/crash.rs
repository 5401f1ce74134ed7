//! Crash safety with real processes: a writer process is SIGKILLed at random moments, again and
//! again, on one store; after each kill the store is reopened and every byte it serves must verify
//! and equal what was written.
//!
//! The writer is this test binary re-executed with `SHOAL_STORE_CRASH_ROOT` set (the ignored test
//! `crash_writer_child`), so no separate binary has to be built.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;
use common::{test_blob, test_bytes};
use shoal_store::{Blake3Hash, PieceLayout, Store, StoreConfig};
use shoal_types::Digest;

const ROOT_ENV: &str = "SHOAL_STORE_CRASH_ROOT";
const BLOBS: u64 = 24;
const CHUNKS: u64 = 64;
const QUOTA: u64 = 6 << 20;

fn config(root: &Path) -> StoreConfig {
    let mut cfg = StoreConfig::new(root, QUOTA);
    cfg.low_watermark = 4 << 20;
    cfg
}

fn blob(seed: u64) -> (Vec<u8>, Digest, PieceLayout) {
    let len = 40_000 + (seed * 7919 % 400_000) as usize;
    test_blob(seed, len, 4096 << (seed % 3))
}

fn chunk(seed: u64) -> Vec<u8> {
    test_bytes(10_000 + seed, 1000 + (seed * 104_729 % 60_000) as usize)
}

fn random() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut x = nanos ^ 0x2545_F491_4F6C_DD1D;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// The writer: loops forever over blobs and chunks, putting pieces in scrambled order.
#[test]
#[ignore = "run by crash_kill_restart_never_serves_bad_bytes as a child process"]
fn crash_writer_child() {
    let Ok(root) = std::env::var(ROOT_ENV) else {
        return;
    };
    let store = Store::open(config(Path::new(&root))).expect("writer opens store");
    println!("opened");
    let mut round = random();
    loop {
        round = round.wrapping_add(1);
        let seed = round % BLOBS;
        let (data, d, layout) = blob(seed);
        if store.ensure_blob(&d, &layout).is_err() {
            continue;
        }
        let _pin = store.pin_blob(&d);
        let n = layout.piece_count();
        for k in 0..n {
            let i = (k * 7 + (round as u32 % n.max(1))) % n;
            let start = layout.piece_offset(i) as usize;
            let end = start + layout.piece_len(i).unwrap_or(0) as usize;
            let _ = store.put_piece(&d, i, &data[start..end]);
        }
        let _ = store.complete_blob(&d);
        let c = chunk(round % CHUNKS);
        let _ = store.put_chunk(&Blake3Hash::of(&c), &c);
        if round.is_multiple_of(5) {
            let _ = store.remove_blob(&blob((round / 5) % BLOBS).1);
        }
    }
}

#[test]
fn crash_kill_restart_never_serves_bad_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let blobs: HashMap<Digest, (Vec<u8>, PieceLayout)> = (0..BLOBS)
        .map(|s| {
            let (data, d, l) = blob(s);
            (d, (data, l))
        })
        .collect();
    let chunks: HashMap<Blake3Hash, Vec<u8>> = (0..CHUNKS)
        .map(|s| {
            let c = chunk(s);
            (Blake3Hash::of(&c), c)
        })
        .collect();
    let exe = std::env::current_exe().expect("test binary path");
    let mut pieces_seen = 0u64;
    let mut completes_seen = 0u64;
    for round in 0..8 {
        let mut child = Command::new(&exe)
            .args([
                "crash_writer_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROOT_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        if round % 3 != 0 {
            // Let it get going, then kill it at a random moment mid-write.
            let stdout = child.stdout.take().expect("child stdout");
            let mut lines = BufReader::new(stdout).lines();
            let deadline = Instant::now() + Duration::from_secs(60);
            while let Some(Ok(line)) = lines.next() {
                if line.contains("opened") || Instant::now() > deadline {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100 + random() % 900));
        } else {
            // Kill it early: during open and recovery, or its first writes.
            std::thread::sleep(Duration::from_millis(random() % 150));
        }
        child.kill().expect("SIGKILL writer");
        let status = child.wait().expect("reap writer");
        assert!(
            !status.success(),
            "writer must have been killed, not exited"
        );

        let store = Store::open(config(dir.path())).expect("reopen after kill");
        let stats = store.stats();
        assert!(
            stats.used_bytes <= QUOTA,
            "usage {} over quota after recovery",
            stats.used_bytes
        );
        let mut known = 0;
        for (d, (data, layout)) in &blobs {
            let Some(status) = store.blob_status(d) else {
                continue;
            };
            known += 1;
            assert_eq!(*status.layout, *layout);
            for i in status.held.iter() {
                let got = store
                    .read_piece(d, i)
                    .unwrap_or_else(|e| panic!("round {round}: held piece {i} of {d}: {e}"));
                let start = layout.piece_offset(i) as usize;
                assert_eq!(
                    &got[..],
                    &data[start..start + got.len()],
                    "round {round}: piece {i} of {d}"
                );
                pieces_seen += 1;
            }
            if status.complete {
                completes_seen += 1;
                assert_eq!(
                    &store
                        .read_range(d, 0, data.len() as u64)
                        .expect("complete blob")[..],
                    &data[..]
                );
            }
        }
        assert_eq!(
            known, stats.blobs,
            "round {round}: the store holds a blob nobody wrote"
        );
        let mut chunk_count = 0;
        for (h, c) in &chunks {
            if store.has_chunk(h) {
                chunk_count += 1;
                assert_eq!(
                    &store.get_chunk(h).expect("chunk")[..],
                    &c[..],
                    "round {round}: {h}"
                );
                // Its group hashes made it to the disk with its bytes: a part read checks.
                let from = c.len() as u64 / 2;
                let mut buf = Vec::new();
                let at = store
                    .read_chunk_part(h, from..c.len() as u64, &mut buf)
                    .expect("part of a chunk");
                assert_eq!(&buf[at], &c[from as usize..], "round {round}: part of {h}");
            }
        }
        assert_eq!(
            chunk_count, stats.chunks,
            "round {round}: unknown chunk in the store"
        );
        assert_eq!(
            store.stats().corruptions,
            0,
            "round {round}: a held item failed verification"
        );
        eprintln!(
            "round {round}: {} blobs ({} complete), {} pieces, {} chunks, {} bytes",
            stats.blobs, stats.complete_blobs, stats.pieces, stats.chunks, stats.used_bytes
        );
    }
    assert!(
        pieces_seen > 0 && completes_seen > 0,
        "the writer never got far enough to test anything"
    );
}
