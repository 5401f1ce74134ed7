//! Stable smoke of the frame decoder target: corpus plus mutations.

#[path = "../../../crates/shoal-format/fuzz/tests/driver/mod.rs"]
mod driver;

#[test]
fn frame_decoder_smoke() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/frame_decoder");
    let runs = driver::run_smoke(&corpus, &[], 1 << 16, shoal_proto_fuzz::frame_decoder);
    assert!(runs > 0);
}
