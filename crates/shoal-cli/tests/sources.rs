//! Raw tar.gz / tar.zst / GNU-sparse tar / directory sources round-trip through convert + unpack;
//! path-traversal layers are refused with an error naming the entry and nothing is written
//! outside the output.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;

use common::*;

/// A small tree of real files from this machine plus a symlink and a hardlink.
fn make_tree(dir: &Path) {
    fs::create_dir_all(dir.join("doc")).unwrap();
    let mut n = 0;
    for e in fs::read_dir("/usr/share/doc").unwrap().flatten().take(40) {
        let p = e.path().join("copyright");
        if p.is_file() {
            fs::copy(&p, dir.join("doc").join(e.file_name())).unwrap();
            n += 1;
        }
    }
    assert!(n > 5);
    fs::write(dir.join("hello"), "hello\n").unwrap();
    fs::write(dir.join("empty"), "").unwrap();
    fs::hard_link(dir.join("hello"), dir.join("hello-again")).unwrap();
    std::os::unix::fs::symlink("doc", dir.join("link")).unwrap();
}

#[test]
fn tar_gz_tar_zst_and_directory_sources() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    make_tree(&tree);
    let plain = t.path().join("layer.tar");
    run(
        "tar",
        &[
            "--format=posix",
            "--numeric-owner",
            "-C",
            &tree.display().to_string(),
            "-cf",
            &plain.display().to_string(),
            ".",
        ],
    );
    let gz = t.path().join("layer.tar.gz");
    let zst = t.path().join("layer.tar.zst");
    {
        let data = fs::read(&plain).unwrap();
        let mut e = flate2::write::GzEncoder::new(
            fs::File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        e.write_all(&data).unwrap();
        e.finish().unwrap();
        fs::write(&zst, zstd::encode_all(&data[..], 3).unwrap()).unwrap();
    }
    for (i, src) in [&plain, &gz, &zst, &tree].iter().enumerate() {
        let out = t.path().join(format!("out{i}"));
        let to = t.path().join(format!("unpacked{i}"));
        shoal_ok(&[
            "image",
            "convert",
            "--source",
            &src.display().to_string(),
            "--output",
            &oci(&out, "x"),
        ]);
        shoal_ok(&["image", "verify", &oci(&out, "x")]);
        shoal_ok(&[
            "image",
            "unpack",
            &oci(&out, "x"),
            "--to",
            &to.display().to_string(),
        ]);
        assert_same_tree(&tree, &to);
    }
    // inspect takes a raw source too (converted on the fly) and prints the same root hash.
    let a: serde_json::Value = serde_json::from_str(&shoal_ok(&[
        "image",
        "inspect",
        &gz.display().to_string(),
        "--json",
    ]))
    .unwrap();
    let b: serde_json::Value = serde_json::from_str(&shoal_ok(&[
        "image",
        "inspect",
        &oci(&t.path().join("out0"), "x"),
        "--json",
    ]))
    .unwrap();
    assert_eq!(a["root"], b["root"]);
    assert!(a["files"].as_u64().unwrap() > 5);
}

#[test]
fn gnu_sparse_tar_source_stays_sparse() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let f = fs::File::create(tree.join("sparse")).unwrap();
    f.set_len(300 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"in the middle", 150 << 20).unwrap();
    drop(f);
    let layer = t.path().join("sparse.tar");
    run(
        "tar",
        &[
            "--sparse",
            "--format=gnu",
            "-C",
            &tree.display().to_string(),
            "-cf",
            &layer.display().to_string(),
            "sparse",
        ],
    );
    let out = t.path().join("out");
    let to = t.path().join("to");
    shoal_ok(&[
        "image",
        "convert",
        "--source",
        &layer.display().to_string(),
        "--output",
        &oci(&out, "x"),
        "--chunk-size",
        "64K",
    ]);
    shoal_ok(&[
        "image",
        "unpack",
        &oci(&out, "x"),
        "--to",
        &to.display().to_string(),
    ]);
    assert_eq!(
        fs::read(tree.join("sparse")).unwrap(),
        fs::read(to.join("sparse")).unwrap()
    );
    let s: serde_json::Value =
        serde_json::from_str(&shoal_ok(&["image", "inspect", &oci(&out, "x"), "--json"])).unwrap();
    assert_eq!(s["unique_chunks"], 2, "zero chunk and the data chunk: {s}");
}

/// One tar entry: path, type, link target.
type TarSpec<'a> = (&'a str, tar::EntryType, &'a str);

/// A tar with the given entries.
fn evil_tar(path: &Path, entries: &[TarSpec]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, ty, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*ty);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(if *ty == tar::EntryType::Regular { 4 } else { 0 });
        // Written byte for byte: the tar crate's safe setters refuse these names, as they should.
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        let data: &[u8] = if *ty == tar::EntryType::Regular {
            b"evil"
        } else {
            b""
        };
        b.append(&h, data).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn path_traversal_is_refused_naming_the_entry() {
    use tar::EntryType::{Link, Regular, Symlink};
    let t = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[TarSpec], &str)] = &[
        ("dotdot", &[("../x", Regular, "")], "../x"),
        ("absolute", &[("/etc/x", Regular, "")], "/etc/x"),
        (
            "through-symlink",
            &[("link", Symlink, "/etc"), ("link/x", Regular, "")],
            "link/x",
        ),
        ("hardlink-out", &[("h", Link, "../../etc/passwd")], "h"),
        (
            "hardlink-via-symlink",
            &[("link", Symlink, "/etc"), ("h", Link, "link/passwd")],
            "h",
        ),
    ];
    for (name, entries, bad) in cases {
        let layer = t.path().join(format!("{name}.tar"));
        evil_tar(&layer, entries);
        let out = t.path().join(format!("out-{name}"));
        let err = shoal_err(&[
            "image",
            "convert",
            "--source",
            &layer.display().to_string(),
            "--output",
            &oci(&out, "x"),
        ]);
        assert!(
            err.contains(&format!("entry {bad:?}")),
            "{name}: error does not name {bad:?}: {err}"
        );
        // Nothing but the (empty) layout was written.
        let stray: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n == "x" || n == "passwd")
            .collect();
        assert!(stray.is_empty(), "{name}: wrote {stray:?}");
    }
    // unpack never writes into a non-empty directory.
    let tree = t.path().join("tree");
    make_tree(&tree);
    let out = t.path().join("good");
    shoal_ok(&[
        "image",
        "convert",
        "--source",
        &tree.display().to_string(),
        "--output",
        &oci(&out, "x"),
    ]);
    let err = shoal_err(&[
        "image",
        "unpack",
        &oci(&out, "x"),
        "--to",
        &tree.display().to_string(),
    ]);
    assert!(err.contains("not empty"), "{err}");
}
