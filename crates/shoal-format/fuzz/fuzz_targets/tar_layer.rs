//! Fuzz the tar layer reader: arbitrary bytes as one layer (plain tar, or gzip/zstd when the
//! bytes start with their magic) through `build::scan_layer`
//! (`shoal_format_fuzz::tar_layer`), which runs the builder's tar reader,
//! path checks and flattening rules and hashes file content into chunks in memory, writing
//! nothing (a full `convert` into an OCI layout managed only ~70 inputs per second).
//!
//! Any input must give `Ok` or a clean `Err`: never a panic, a hang or a huge allocation. What a
//! scan reports must be consistent. Seed the corpus with real layers in `corpus/tar_layer/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_format_fuzz::tar_layer(data));
