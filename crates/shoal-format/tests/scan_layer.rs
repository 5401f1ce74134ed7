//! `build::scan_layer` (the write-nothing layer check the tar fuzz target runs) agrees with a
//! full `convert` on real layers, and refuses what `convert` refuses.

use std::path::PathBuf;

use shoal_format::build::{convert, scan_layer, BuildOptions, Source};
use shoal_format::oci::LayoutRef;
use shoal_format::Error;

fn samples() -> Vec<PathBuf> {
    let dir = manifest_dir().join("fuzz/corpus/tar_layer");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("the tar layer samples")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("sample"))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn scan_counts_what_convert_builds() {
    let opts = BuildOptions {
        chunk_size: 64 << 10,
        ..BuildOptions::default()
    };
    let samples = samples();
    assert!(samples.len() >= 4, "samples: {samples:?}");
    for layer in samples {
        let tmp = tempfile::tempdir().expect("temp dir");
        let out = LayoutRef {
            dir: tmp.path().join("out"),
            tag: None,
        };
        let (_, stats) = convert(&Source::Tar(layer.clone()), &out, &opts).expect("convert");
        let f = std::fs::File::open(&layer).expect("open");
        let scan = scan_layer(f, &layer.display().to_string(), 64 << 10).expect("scan");
        let what = layer.display();
        assert_eq!(scan.bytes_in, stats.bytes_in, "{what}");
        assert_eq!(scan.files, stats.files, "{what}");
        assert_eq!(scan.file_bytes, stats.file_bytes, "{what}");
        assert_eq!(scan.chunks, stats.chunks, "{what}");
        assert_eq!(scan.unique_chunks, stats.unique_chunks, "{what}");
    }
}

/// One ustar header block for a regular file `name` of `size` bytes (content not included).
fn header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

#[test]
fn scan_refuses_an_escaping_path_and_a_short_body() {
    let mut evil = header("../evil", 0).to_vec();
    evil.extend_from_slice(&[0u8; 1024]);
    let err = scan_layer(&evil[..], "evil", 64 << 10).expect_err("an escaping path");
    assert!(matches!(err, Error::BadEntry { .. }), "{err}");

    // A file that claims 1 GiB but ends after one block: an error, no huge allocation.
    let mut short = header("big", 1 << 30).to_vec();
    short.extend_from_slice(&[7u8; 512]);
    assert!(scan_layer(&short[..], "short", 64 << 10).is_err());

    let mut ok = header("a", 3).to_vec();
    ok.extend_from_slice(&[b'x'; 512]);
    ok.extend_from_slice(&[0u8; 1024]);
    let s = scan_layer(&ok[..], "ok", 64 << 10).expect("a good layer");
    assert_eq!((s.files, s.file_bytes, s.chunks), (1, 3, 1));
    assert!(scan_layer(&ok[..], "ok", 1000).is_err(), "a bad chunk size");
}

/// The package's directory, as cargo gives it when it runs the test: a build dir shared between
/// checkouts at different paths may hold a binary compiled in another one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
