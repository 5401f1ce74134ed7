//! Stable smoke of both targets: corpus plus mutations (see `driver/mod.rs`).

mod driver;


fn corpus(target: &str) -> std::path::PathBuf {
    manifest_dir()
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

/// The package's directory, as cargo gives it when it runs the test: a build dir shared between
/// checkouts at different paths may hold a binary compiled in another one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
