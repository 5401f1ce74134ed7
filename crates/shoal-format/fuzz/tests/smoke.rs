//! Stable smoke of both targets: corpus plus mutations (see `driver/mod.rs`).

mod driver;

use std::path::Path;

fn corpus(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

#[test]
fn bootstrap_load_smoke() {
    let runs = driver::run_smoke(
        &corpus("bootstrap_load"),
        &[],
        1 << 16,
        shoal_format_fuzz::bootstrap_load,
    );
    assert!(runs > 0);
}

#[test]
fn tar_layer_smoke() {
    let runs = driver::run_smoke(
        &corpus("tar_layer"),
        &[],
        1 << 16,
        shoal_format_fuzz::tar_layer,
    );
    assert!(runs > 0);
}
