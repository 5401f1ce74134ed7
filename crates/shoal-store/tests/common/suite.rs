//! The behavioural test suite every [`ContentStore`] backend must pass (test code: it is not
//! part of the library).
//!
//! Each function takes a constructor that opens a backend on a config (called again on the same
//! root to simulate a restart, after the previous instance was dropped) and panics on a failed
//! expectation. `tests/conformance.rs` runs all of them against `shoal_store::Store`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use bytes::Bytes;

use shoal_store::{
    Blake3Hash, ContentStore, Error, FetchError, Item, PieceLayout, PutOutcome, Result, StoreConfig,
};
use shoal_types::Digest;

/// Opens a backend on a config.
pub type Open<'a, S> = &'a dyn Fn(StoreConfig) -> Result<S>;

/// Deterministic pseudo-random bytes (xorshift) for test blobs and chunks.
pub fn test_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A test blob: its bytes, digest and layout with `piece_size`.
pub fn test_blob(seed: u64, len: usize, piece_size: u32) -> (Vec<u8>, Digest, PieceLayout) {
    let data = test_bytes(seed, len);
    let digest = Digest::of(&data);
    let layout = PieceLayout::compute(&digest, &data, piece_size).expect("test layout");
    (data, digest, layout)
}

fn piece<'a>(data: &'a [u8], layout: &PieceLayout, index: u32) -> &'a [u8] {
    let start = layout.piece_offset(index) as usize;
    let len = layout.piece_len(index).expect("piece index") as usize;
    &data[start..start + len]
}

fn config(root: &Path, quota: u64) -> StoreConfig {
    StoreConfig::new(root, quota)
}

/// Pieces of a partly held blob round-trip; ranges over held pieces read exactly; the rest is refused.
pub fn pieces_and_ranges<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let s = open(config(root, 64 << 20)).expect("open");
    let (data, d, layout) = test_blob(1, 5 * 4096 + 100, 4096);
    assert!(matches!(
        s.put_piece(&d, 0, piece(&data, &layout, 0)),
        Err(Error::UnknownBlob { .. })
    ));
    s.ensure_blob(&d, &layout).expect("ensure");
    s.ensure_blob(&d, &layout).expect("ensure is idempotent");
    let (_, _, other) = test_blob(2, 5 * 4096 + 100, 4096);
    assert!(matches!(
        s.ensure_blob(&d, &other),
        Err(Error::LayoutMismatch { .. })
    ));
    for i in [0u32, 1, 2, 5] {
        assert_eq!(
            s.put_piece(&d, i, piece(&data, &layout, i)).expect("put"),
            PutOutcome::Stored
        );
    }
    assert_eq!(
        s.put_piece(&d, 1, piece(&data, &layout, 1))
            .expect("put again"),
        PutOutcome::AlreadyHeld
    );
    // Wrong bytes and wrong lengths are refused and not stored.
    assert!(matches!(
        s.put_piece(&d, 3, piece(&data, &layout, 4)),
        Err(Error::HashMismatch { .. })
    ));
    assert!(matches!(
        s.put_piece(&d, 3, &[0u8; 10]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        s.put_piece(&d, 9, &[0u8; 10]),
        Err(Error::OutOfRange { .. })
    ));
    let status = s.blob_status(&d).expect("status");
    assert_eq!(status.held.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5]);
    assert!(!status.complete);
    assert_eq!(
        s.read_piece(&d, 5).expect("last piece"),
        piece(&data, &layout, 5)
    );
    for (off, len) in [
        (0u64, 1u64),
        (100, 4096),
        (4000, 8000),
        (0, 3 * 4096),
        (5 * 4096, 100),
        (5 * 4096 + 99, 1),
    ] {
        let got = s.read_range(&d, off, len).expect("range");
        assert_eq!(
            &got[..],
            &data[off as usize..(off + len) as usize],
            "range {off}+{len}"
        );
    }
    assert!(s
        .read_range(&d, 3 * 4096 - 1, 2)
        .expect_err("gap")
        .is_not_present());
    assert!(s.read_piece(&d, 4).expect_err("missing").is_not_present());
    assert!(matches!(
        s.read_range(&d, data.len() as u64 - 1, 2),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        s.read_range(&d, u64::MAX, 2),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        s.complete_blob(&d),
        Err(Error::Incomplete { missing: 2, .. })
    ));
}

/// A blob is complete only once every piece is held and its sha256 matched; a wrong table is dropped.
pub fn blob_completion<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let s = open(config(root, 64 << 20)).expect("open");
    let (data, d, layout) = test_blob(3, 3 * 8192, 8192);
    s.ensure_blob(&d, &layout).expect("ensure");
    for i in (0..layout.piece_count()).rev() {
        s.put_piece(&d, i, piece(&data, &layout, i)).expect("put");
    }
    s.complete_blob(&d).expect("complete");
    assert!(s.blob_status(&d).expect("status").complete);
    assert_eq!(
        &s.read_range(&d, 0, data.len() as u64).expect("all")[..],
        &data[..]
    );
    // A piece table that is self-consistent but not of this blob: caught by the sha256.
    let (fake, _, _) = test_blob(4, 8192, 8192);
    let wrong = Digest::of(b"some other blob");
    let fake_layout = PieceLayout::compute(&wrong, &fake, 8192).expect("layout");
    s.ensure_blob(&wrong, &fake_layout).expect("ensure");
    s.put_piece(&wrong, 0, &fake).expect("put");
    assert!(matches!(
        s.complete_blob(&wrong),
        Err(Error::BlobDigestMismatch { .. })
    ));
    assert!(
        s.blob_status(&wrong).is_none(),
        "a blob failing its digest must be dropped"
    );
    // The empty blob has no pieces and completes at once.
    let empty = Digest::of(b"");
    s.ensure_blob(
        &empty,
        &PieceLayout::new(&empty, 0, 4096, vec![]).expect("layout"),
    )
    .expect("ensure");
    s.complete_blob(&empty).expect("complete empty");
}

/// A streamed import becomes visible, complete, only when its sha256 matches.
pub fn import_whole_blob<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let s = open(config(root, 64 << 20)).expect("open");
    let (data, d, expected) = test_blob(5, 100_000, 16384);
    let layout = s.import_blob(&d, 16384, &mut &data[..]).expect("import");
    assert_eq!(layout, expected);
    let status = s.blob_status(&d).expect("status");
    assert!(status.complete && status.held.is_complete());
    assert_eq!(
        &s.read_range(&d, 12345, 50_000).expect("range")[..],
        &data[12345..62345]
    );
    let lie = Digest::of(b"not this");
    assert!(matches!(
        s.import_blob(&lie, 16384, &mut &data[..]),
        Err(Error::BlobDigestMismatch { .. })
    ));
    assert!(s.blob_status(&lie).is_none());
}

/// Chunks round-trip by hash; wrong bytes are refused.
pub fn chunks<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let s = open(config(root, 64 << 20)).expect("open");
    let bytes = test_bytes(6, 70_000);
    let h = Blake3Hash::of(&bytes);
    assert!(!s.has_chunk(&h));
    assert!(s.get_chunk(&h).expect_err("absent").is_not_present());
    assert!(matches!(
        s.put_chunk(&h, &bytes[1..]),
        Err(Error::HashMismatch { .. })
    ));
    assert_eq!(s.put_chunk(&h, &bytes).expect("put"), PutOutcome::Stored);
    assert_eq!(
        s.put_chunk(&h, &bytes).expect("put"),
        PutOutcome::AlreadyHeld
    );
    assert_eq!(&s.get_chunk(&h).expect("get")[..], &bytes[..]);
    let empty = Blake3Hash::of(b"");
    s.put_chunk(&empty, b"").expect("empty chunk");
    assert!(s.get_chunk(&empty).expect("get empty").is_empty());
    s.remove_chunk(&h).expect("remove");
    assert!(!s.has_chunk(&h));
    let st = s.stats();
    assert!(st.hits >= 2 && st.misses >= 1, "{st:?}");
}

/// Reopening the same root gives back the same index, and the bytes still verify.
pub fn restart_keeps_index<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let (data, d, layout) = test_blob(7, 10 * 4096, 4096);
    let (whole, wd, wl) = test_blob(8, 3 * 4096, 4096);
    let chunk = test_bytes(9, 5000);
    let h = Blake3Hash::of(&chunk);
    {
        let s = open(config(root, 64 << 20)).expect("open");
        s.ensure_blob(&d, &layout).expect("ensure");
        for i in [1u32, 3, 9] {
            s.put_piece(&d, i, piece(&data, &layout, i)).expect("put");
        }
        s.ensure_blob(&wd, &wl).expect("ensure");
        for i in 0..wl.piece_count() {
            s.put_piece(&wd, i, piece(&whole, &wl, i)).expect("put");
        }
        s.complete_blob(&wd).expect("complete");
        s.put_chunk(&h, &chunk).expect("chunk");
    }
    let s = open(config(root, 64 << 20)).expect("reopen");
    let status = s.blob_status(&d).expect("partial blob survives");
    assert_eq!(status.held.iter().collect::<Vec<_>>(), vec![1, 3, 9]);
    assert_eq!(*status.layout, layout);
    assert!(!status.complete);
    assert_eq!(
        s.read_piece(&d, 9).expect("piece"),
        piece(&data, &layout, 9)
    );
    assert!(s.blob_status(&wd).expect("complete blob survives").complete);
    assert_eq!(
        &s.read_range(&wd, 0, whole.len() as u64).expect("whole")[..],
        &whole[..]
    );
    assert_eq!(&s.get_chunk(&h).expect("chunk")[..], &chunk[..]);
    let st = s.stats();
    assert_eq!(
        (st.blobs, st.complete_blobs, st.chunks, st.pieces),
        (2, 1, 1, 6),
        "{st:?}"
    );
    // Writing continues where it stopped.
    s.put_piece(&d, 0, piece(&data, &layout, 0))
        .expect("put after restart");
}

/// Usage never passes the high watermark; the least recently used go first, down to the low one.
pub fn quota_eviction<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let mut cfg = config(root, 1 << 20);
    cfg.low_watermark = 600 << 10;
    let s = open(cfg).expect("open");
    let mut hashes = Vec::new();
    for i in 0..40u64 {
        let bytes = test_bytes(100 + i, 64 << 10);
        let h = Blake3Hash::of(&bytes);
        s.put_chunk(&h, &bytes).expect("put under quota");
        hashes.push(h);
        // Keep the first chunk hot: LRU must spare it.
        s.get_chunk(&hashes[0]).expect("hot chunk stays");
        let used = s.stats().used_bytes;
        assert!(used <= 1 << 20, "usage {used} passed the high watermark");
    }
    let st = s.stats();
    assert!(st.evictions > 0, "{st:?}");
    assert!(!s.has_chunk(&hashes[1]), "the coldest chunk should be gone");
    assert!(s.has_chunk(&hashes[39]));
    // Blobs count too, pieces and metadata alike.
    let (data, d, layout) = test_blob(200, 900 << 10, 64 << 10);
    s.ensure_blob(&d, &layout).expect("ensure");
    for i in 0..layout.piece_count() {
        s.put_piece(&d, i, piece(&data, &layout, i))
            .expect("put piece");
        assert!(s.stats().used_bytes <= 1 << 20);
    }
    // Bigger than the whole quota: refused, not written.
    let huge = test_bytes(201, (1 << 20) + 1);
    assert!(s
        .put_chunk(&Blake3Hash::of(&huge), &huge)
        .expect_err("over quota")
        .is_out_of_space());
}

/// Pinned blobs and chunks survive eviction; with everything pinned a put is a clear quota error.
pub fn pinned_survive<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let mut cfg = config(root, 512 << 10);
    cfg.low_watermark = 256 << 10;
    let s = open(cfg).expect("open");
    let (data, d, layout) = test_blob(300, 128 << 10, 32 << 10);
    s.ensure_blob(&d, &layout).expect("ensure");
    for i in 0..layout.piece_count() {
        s.put_piece(&d, i, piece(&data, &layout, i)).expect("put");
    }
    let chunk = test_bytes(301, 100 << 10);
    let h = Blake3Hash::of(&chunk);
    s.put_chunk(&h, &chunk).expect("chunk");
    let blob_pin = s.pin_blob(&d).expect("pin blob");
    let chunk_pin = s.pin_chunk(&h).expect("pin chunk");
    assert!(matches!(s.remove_blob(&d), Err(Error::Pinned { .. })));
    for i in 0..20u64 {
        let bytes = test_bytes(400 + i, 60 << 10);
        s.put_chunk(&Blake3Hash::of(&bytes), &bytes).expect("put");
    }
    assert!(s.stats().evictions > 0);
    assert_eq!(
        &s.read_range(&d, 0, data.len() as u64).expect("pinned blob")[..],
        &data[..]
    );
    assert_eq!(&s.get_chunk(&h).expect("pinned chunk")[..], &chunk[..]);
    assert_eq!(s.stats().pinned, 2);
    // Pin everything else too; then nothing can make room.
    let bytes = test_bytes(500, 200 << 10);
    let big = Blake3Hash::of(&bytes);
    let _pins: Vec<_> = (0..20u64)
        .filter_map(|i| {
            s.pin_chunk(&Blake3Hash::of(&test_bytes(400 + i, 60 << 10)))
                .ok()
        })
        .collect();
    let err = s.put_chunk(&big, &bytes).expect_err("all pinned");
    assert!(matches!(err, Error::QuotaFull { .. }), "{err}");
    drop((blob_pin, chunk_pin));
    drop(_pins);
    s.put_chunk(&big, &bytes).expect("room after unpinning");
    assert!(s.stats().used_bytes <= 512 << 10);
}

/// Entries unused for longer than the TTL go at the next sweep, unless pinned.
pub fn ttl_sweep<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let mut cfg = config(root, 64 << 20);
    cfg.ttl = Some(Duration::from_millis(300));
    let s = open(cfg).expect("open");
    let (a, b, c) = (
        test_bytes(600, 1000),
        test_bytes(601, 1000),
        test_bytes(602, 1000),
    );
    let (ha, hb, hc) = (Blake3Hash::of(&a), Blake3Hash::of(&b), Blake3Hash::of(&c));
    s.put_chunk(&ha, &a).expect("put");
    s.put_chunk(&hb, &b).expect("put");
    let pin = s.pin_chunk(&hb).expect("pin");
    assert_eq!(s.sweep(), 0, "nothing is old yet");
    thread::sleep(Duration::from_millis(400));
    s.put_chunk(&hc, &c).expect("put");
    assert!(s.sweep() >= 1000);
    assert!(!s.has_chunk(&ha), "expired chunk must go");
    assert!(s.has_chunk(&hb), "pinned chunk must stay");
    assert!(s.has_chunk(&hc), "fresh chunk must stay");
    drop(pin);
}

/// Ten threads missing the same item run one fetch; a failed or bad fetch reaches every caller.
pub fn single_flight<S: ContentStore>(root: &Path, open: Open<'_, S>) {
    let s = open(config(root, 64 << 20)).expect("open");
    let (data, d, layout) = test_blob(700, 4 * 4096, 4096);
    s.ensure_blob(&d, &layout).expect("ensure");
    let fetches = AtomicUsize::new(0);
    let barrier = Barrier::new(10);
    let expected = piece(&data, &layout, 2).to_vec();
    thread::scope(|scope| {
        for _ in 0..10 {
            scope.spawn(|| {
                barrier.wait();
                let got = s
                    .get_or_fetch_blocking(Item::Piece(d, 2), &mut || {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(200));
                        Ok(Bytes::from(expected.clone()))
                    })
                    .expect("fetched");
                assert_eq!(&got[..], &expected[..]);
            });
        }
    });
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "10 concurrent misses must run one fetch"
    );
    assert!(s.blob_status(&d).expect("status").held.contains(2));
    // Now it is a hit: no fetch at all.
    s.get_or_fetch_blocking(Item::Piece(d, 2), &mut || {
        Err::<Bytes, FetchError>("must not run".into())
    })
    .expect("hit");
    // Bad bytes from the source: every caller sees the mismatch, nothing is stored.
    let bad = AtomicUsize::new(0);
    thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                barrier_free_sleep();
                let err = s
                    .get_or_fetch_blocking(Item::Piece(d, 3), &mut || {
                        bad.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(200));
                        Ok(Bytes::from(vec![0u8; 4096]))
                    })
                    .expect_err("bad bytes");
                assert!(matches!(err.root(), Error::HashMismatch { .. }), "{err}");
            });
        }
    });
    assert_eq!(bad.load(Ordering::SeqCst), 1);
    assert!(!s.blob_status(&d).expect("status").held.contains(3));
    // A chunk through the same path.
    let chunk = test_bytes(701, 3000);
    let h = Blake3Hash::of(&chunk);
    let got = s
        .get_or_fetch_blocking(Item::Chunk(h), &mut || Ok(Bytes::from(chunk.clone())))
        .expect("chunk");
    assert_eq!(&got[..], &chunk[..]);
    assert!(s.has_chunk(&h));
}

fn barrier_free_sleep() {
    thread::sleep(Duration::from_millis(5));
}
