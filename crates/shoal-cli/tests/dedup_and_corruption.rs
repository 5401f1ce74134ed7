//! Chunk dictionaries (a second image stores only its new chunks) and corruption (a flipped byte in
//! any blob or the bootstrap makes `verify` fail naming that object).

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// Deterministic pseudo-random bytes (incompressible, so sizes are easy to reason about).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn stats(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap()
}

#[test]
fn chunk_dict_second_image_stores_only_new_chunks() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    fs::create_dir(&a).unwrap();
    for i in 0..20 {
        fs::write(
            a.join(format!("f{i}")),
            noise(i, 200_000 + i as usize * 1000),
        )
        .unwrap();
    }
    // Image B: the same files, one changed, two added.
    let b = t.path().join("b");
    fs::create_dir(&b).unwrap();
    for i in 0..20 {
        fs::copy(a.join(format!("f{i}")), b.join(format!("f{i}"))).unwrap();
    }
    fs::write(b.join("f3"), noise(1003, 150_000)).unwrap();
    fs::write(b.join("new1"), noise(2001, 300_000)).unwrap();
    fs::write(b.join("new2"), noise(2002, 100_000)).unwrap();

    let layout = t.path().join("layout");
    let cs = ["--chunk-size", "64K"];
    let sa = stats(&shoal_ok(
        &[
            &[
                "image",
                "convert",
                "--json",
                "--source",
                a.to_str().unwrap(),
                "--output",
                &oci(&layout, "a"),
            ][..],
            &cs,
        ]
        .concat(),
    ));
    let alone = stats(&shoal_ok(
        &[
            &[
                "image",
                "convert",
                "--json",
                "--source",
                b.to_str().unwrap(),
                "--output",
                &oci(&t.path().join("alone"), "b"),
            ][..],
            &cs,
        ]
        .concat(),
    ));
    let other = t.path().join("other");
    let sb = stats(&shoal_ok(
        &[
            &[
                "image",
                "convert",
                "--json",
                "--source",
                b.to_str().unwrap(),
                "--output",
                &oci(&other, "b"),
                "--chunk-dict",
                &oci(&layout, "a"),
            ][..],
            &cs,
        ]
        .concat(),
    ));
    // New chunks: f3 (150 000 B -> 3 chunks) + new1 (5) + new2 (2) of 64 KiB.
    assert_eq!(sb["new_chunks"], 10, "{sb}");
    assert_eq!(
        sb["unique_chunks"], alone["unique_chunks"],
        "{sb} vs {alone}"
    );
    assert_eq!(
        sb["dict_chunks"].as_u64().unwrap() + 10,
        alone["unique_chunks"].as_u64().unwrap()
    );
    let (new_bytes, full) = (
        sb["blob_bytes"].as_u64().unwrap(),
        alone["blob_bytes"].as_u64().unwrap(),
    );
    assert!(
        (550_000..560_000).contains(&new_bytes),
        "new blob holds {new_bytes} bytes"
    );
    assert!(full > 4_000_000 && sa["blob_bytes"].as_u64().unwrap() > 4_000_000);
    // The second layout is self-contained: the dictionary blob was linked in, verify and unpack work.
    shoal_ok(&["image", "verify", &oci(&other, "b")]);
    let inspect = stats(&shoal_ok(&[
        "image",
        "inspect",
        "--json",
        &oci(&other, "b"),
    ]));
    assert_eq!(inspect["blobs"].as_array().unwrap().len(), 2, "{inspect}");
    let to = t.path().join("to");
    shoal_ok(&[
        "image",
        "unpack",
        &oci(&other, "b"),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_same_tree(&b, &to);
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    let i = (at as usize).min(bytes.len() - 1);
    bytes[i] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

#[test]
fn verify_names_each_corrupted_object() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..8 {
        fs::write(src.join(format!("f{i}")), noise(i, 300_000)).unwrap();
    }
    let dict = t.path().join("dict");
    shoal_ok(&[
        "image",
        "convert",
        "--source",
        src.to_str().unwrap(),
        "--output",
        &oci(&dict, "d"),
    ]);
    fs::write(src.join("extra"), noise(99, 500_000)).unwrap();
    let img = t.path().join("img");
    shoal_ok(&[
        "image",
        "convert",
        "--source",
        src.to_str().unwrap(),
        "--output",
        &oci(&img, "i"),
        "--chunk-dict",
        &oci(&dict, "d"),
    ]);
    shoal_ok(&["image", "verify", &oci(&img, "i")]);
    let info = stats(&shoal_ok(&["image", "inspect", "--json", &oci(&img, "i")]));
    let mut objects: Vec<String> = info["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(objects.len(), 2, "{info}");
    objects.push(info["bootstrap"].as_str().unwrap().to_string());
    for digest in objects {
        let path = img
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        // Break the link to the dictionary's copy before corrupting it.
        let original = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, &original).unwrap();
        flip_byte(&path, original.len() as u64 / 2);
        let err = shoal_err(&["image", "verify", &oci(&img, "i")]);
        assert!(
            err.contains(&digest),
            "verify error does not name {digest}: {err}"
        );
        fs::write(&path, &original).unwrap();
        shoal_ok(&["image", "verify", &oci(&img, "i")]);
    }
}
