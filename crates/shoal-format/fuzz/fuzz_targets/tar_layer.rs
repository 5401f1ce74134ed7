//! Fuzz the tar layer reader through the builder: arbitrary bytes as one layer file (plain tar,
//! or gzip/zstd when the bytes start with their magic), converted into a temp OCI layout.
//!
//! Any input must give `Ok` or a clean `Err`: never a panic, a hang, a huge allocation, or a
//! write outside the output directory. When the build succeeds, the image it wrote must verify
//! (a built image that fails its own verification is a builder bug). Seed the corpus with real
//! layers in `corpus/tar_layer/` (e.g. `tar -cf` of a few small files, links and a whiteout).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_format::build::{convert, BuildOptions, Source};
use shoal_format::oci::LayoutRef;

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else {
        return;
    };
    let layer = tmp.path().join("layer.tar");
    if std::fs::write(&layer, data).is_err() {
        return;
    }
    let out = LayoutRef {
        dir: tmp.path().join("out"),
        tag: None,
    };
    // Smallest chunks and fastest compression: more inputs per second, same code paths.
    let opts = BuildOptions {
        chunk_size: 64 << 10,
        piece_size: 64 << 10,
        level: 1,
        ..BuildOptions::default()
    };
    if convert(&Source::Tar(layer), &out, &opts).is_ok() {
        if let Err(e) = shoal_format::verify::verify(&out) {
            panic!("a freshly built image does not verify: {e}");
        }
    }
    // Nothing may be written beside the layer and the output layout.
    for entry in std::fs::read_dir(tmp.path()).into_iter().flatten().flatten() {
        let name = entry.file_name();
        assert!(
            name == "layer.tar" || name == "out",
            "the builder wrote {name:?} outside its output directory"
        );
    }
});
