//! Stable smoke of the frame decoder target: corpus plus mutations.

#[path = "../../../crates/shoal-format/fuzz/tests/driver/mod.rs"]
mod driver;

#[test]
fn frame_decoder_smoke() {
    let corpus = manifest_dir().join("corpus/frame_decoder");
    let runs = driver::run_smoke(&corpus, &[], 1 << 16, shoal_proto_fuzz::frame_decoder);
    assert!(runs > 0);
}

/// The package's directory, as cargo gives it when it runs the test: a build dir shared between
/// checkouts at different paths may hold a binary compiled in another one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
