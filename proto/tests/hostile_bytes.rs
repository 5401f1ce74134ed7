//! Random and hostile bytes: decoding never panics, and a declared length over the limit is
//! refused before anything is allocated for it (measured with a counting allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use shoal_proto::*;

/// Records the largest single allocation made on a thread while tracking is on.
struct PeakAlloc;

// Per thread, so tests running in parallel do not see each other's allocations.
thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    if TRACKING.with(Cell::get) {
        PEAK.with(|p| p.set(p.get().max(size)));
    }
}

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Runs `f` and returns its result with the largest single allocation it made.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, PEAK.with(Cell::get))
}

/// Drives a future over in-memory bytes, which never waits, without a runtime (whose own
/// allocations would blur the measurement).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

fn decode_all(bytes: &[u8]) {
    let c = Codec::default();
    let _ = c.decode::<SchedulerRequest>(bytes);
    let _ = c.decode::<SchedulerReply>(bytes);
    let _ = c.decode::<SchedulerPush>(bytes);
    let _ = c.decode::<PushReply>(bytes);
    let _ = c.decode::<PieceRequest>(bytes);
    let _ = c.decode::<PieceReply>(bytes);
    let _ = Codec::handshake().decode::<Hello>(bytes);
    let _ = Codec::handshake().decode::<HelloReply>(bytes);
}

fn header(len: u32) -> Vec<u8> {
    let mut h = vec![MAGIC[0], MAGIC[1], MAX_VERSION, 0];
    h.extend_from_slice(&len.to_le_bytes());
    h
}

fn sample_request() -> Vec<u8> {
    let mut wanted = PieceSet::empty(100);
    wanted.insert(42);
    Codec::default()
        .encode(&SchedulerRequest::RequestParents(RequestParents {
            blob: Digest::from_bytes([3; 32]),
            wanted,
            exclude: vec![HostId::new("node-1").unwrap()],
        }))
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&bytes);
        // Behind a valid header, too: the payload decoders see the random bytes.
        let mut framed = header(bytes.len() as u32);
        framed.extend_from_slice(&bytes);
        decode_all(&framed);
        let mut r: &[u8] = &framed;
        let _ = block_on(Codec::default().read::<_, SchedulerRequest>(&mut r));
    }

    #[test]
    fn mutated_frames_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut f = sample_request();
        for (i, b) in flips {
            let at = i.index(f.len());
            f[at] = b;
        }
        decode_all(&f);
    }

    #[test]
    fn oversize_length_is_refused_before_allocation(len in (MAX_FRAME_LEN + 1)..=u32::MAX, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut f = header(len);
        f.extend_from_slice(&tail);
        let (res, peak) = peak_alloc(|| Codec::default().decode::<SchedulerRequest>(&f));
        let is_too_large = matches!(res, Err(ProtoError::FrameTooLarge { .. }));
        prop_assert!(is_too_large);
        prop_assert!(peak < 4096, "allocated {peak} bytes for a refused frame");
        let (res, peak) = peak_alloc(|| {
            let mut r: &[u8] = &f;
            block_on(Codec::default().read::<_, SchedulerRequest>(&mut r))
        });
        let is_too_large = matches!(res, Err(ProtoError::FrameTooLarge { .. }));
        prop_assert!(is_too_large);
        prop_assert!(peak < 4096, "allocated {peak} bytes for a refused frame");
    }

    #[test]
    fn declared_but_missing_payload_costs_only_what_arrived(len in 1024u32..=MAX_FRAME_LEN, sent in 0usize..1000) {
        let mut f = header(len);
        f.extend(std::iter::repeat_n(0u8, sent));
        let (res, peak) = peak_alloc(|| {
            let mut r: &[u8] = &f;
            block_on(Codec::default().read::<_, SchedulerRequest>(&mut r))
        });
        let is_eof = matches!(res, Err(ProtoError::UnexpectedEof { what: "frame payload" }));
        prop_assert!(is_eof);
        prop_assert!(peak <= 128 * 1024, "allocated {peak} bytes for {sent} received");
    }
}
