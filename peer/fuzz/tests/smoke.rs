//! Stable smoke of the Range header target: corpus plus mutations, with a few sizes in front.

#[path = "../../../crates/shoal-format/fuzz/tests/driver/mod.rs"]
mod driver;

#[test]
fn range_header_smoke() {
    let corpus = manifest_dir().join("corpus/range_header");
    let mut seeds = Vec::new();
    for size in [0u64, 1, 1000, 1 << 20, u64::MAX] {
        for h in [
            "bytes=0-",
            "bytes=-500",
            "bytes=10-20",
            "bytes=5-1",
            "bytes=0-0,2-3",
        ] {
            let mut v = size.to_le_bytes().to_vec();
            v.extend_from_slice(h.as_bytes());
            seeds.push(v);
        }
    }
    let runs = driver::run_smoke(&corpus, &seeds, 4096, shoal_peer_fuzz::range_header_bytes);
    assert!(runs > 0);
}

/// The package's directory, as cargo gives it when it runs the test: a build dir shared between
/// checkouts at different paths may hold a binary compiled in another one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
