//! Round trip against umoci: a multi-layer OCI image built with umoci from files on this machine
//! (whiteouts, an opaque directory, hardlinks within and across layers, symlinks, xattrs, devices,
//! a fifo, odd owners/modes/mtimes, long names, an empty file, a sparse file over 4 GiB) is
//! converted, verified and unpacked by shoal; the result must equal `umoci unpack` of the original.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and two timespecs.
    assert_eq!(
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                t.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        0
    );
}

fn mknod(p: &Path, kind: u32, major: u32, minor: u32) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path.
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o640, libc::makedev(major, minor)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// Copies up to `max` regular files (each under 2 MiB) from `from` into `to`, keeping relative paths.
fn copy_some(from: &Path, to: &Path, max: usize) -> usize {
    let mut n = 0;
    let mut stack = vec![from.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        for p in names.into_iter().rev() {
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && md.len() < 2 << 20 && n < max {
                let dst = to.join(p.strip_prefix(from).unwrap());
                fs::create_dir_all(dst.parent().unwrap()).unwrap();
                if fs::copy(&p, &dst).is_ok() {
                    n += 1;
                }
            }
        }
    }
    n
}

fn umoci_unpack(img: &Path, bundle: &Path) {
    run(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:t", img.display()),
            &bundle.display().to_string(),
        ],
    );
}

fn umoci_repack(img: &Path, bundle: &Path) {
    run(
        "umoci",
        &[
            "repack",
            "--image",
            &format!("{}:t", img.display()),
            &bundle.display().to_string(),
        ],
    );
}

#[test]
fn shoal_unpack_equals_umoci_unpack() {
    // Root for device nodes and owners.
    if shoal_testkit::require(shoal_testkit::Needs::root(&["umoci"])).is_err() {
        return;
    }
    let clock = std::time::Instant::now();
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("img");
    run("umoci", &["init", "--layout", &img.display().to_string()]);
    run(
        "umoci",
        &["new", "--image", &format!("{}:t", img.display())],
    );

    // Layer 1: real files and every kind of entry.
    let b1 = t.path().join("b1");
    umoci_unpack(&img, &b1);
    let r = b1.join("rootfs");
    assert!(copy_some(Path::new("/usr/share/doc"), &r.join("usr/share/doc"), 300) > 50);
    assert!(copy_some(Path::new("/usr/bin"), &r.join("usr/bin"), 40) > 5);
    for d in ["etc/app/conf.d", "data", "dev", "opaque/sub", "gone/deep"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    for (f, body) in [
        ("etc/app/conf.d/a.conf", "a=1\n"),
        ("etc/app/conf.d/b.conf", "b=2\n"),
        ("opaque/old1", "old one\n"),
        ("opaque/sub/old2", "old two\n"),
        ("gone/deep/file", "will be deleted with its directory\n"),
        ("data/h1", "hardlinked content\n"),
        ("data/owned", "odd owner\n"),
        ("data/suid", "#!/bin/sh\n"),
        ("data/sgid", "#!/bin/sh\n"),
        ("data/old", "old mtime\n"),
    ] {
        fs::write(r.join(f), body).unwrap();
    }
    fs::write(r.join("data/empty"), "").unwrap();
    fs::hard_link(r.join("data/h1"), r.join("data/h2")).unwrap();
    symlink("../etc/app", r.join("data/rel-link")).unwrap();
    symlink("/usr/bin", r.join("data/abs-link")).unwrap();
    xattr::set(r.join("data/h1"), "user.shoal.test", b"value-1").unwrap();
    xattr::set(r.join("etc/app"), "user.dir", b"\x00\x01binary\xff").unwrap();
    mknod(&r.join("dev/null"), libc::S_IFCHR, 1, 3);
    mknod(&r.join("dev/loop9"), libc::S_IFBLK, 7, 9);
    mknod(&r.join("dev/fifo"), libc::S_IFIFO, 0, 0);
    chown(&r.join("data/owned"), 1234, 5678);
    chown(&r.join("dev/loop9"), 0, 6);
    fs::set_permissions(r.join("data/suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(r.join("data/sgid"), fs::Permissions::from_mode(0o2711)).unwrap();
    fs::create_dir(r.join("data/sticky")).unwrap();
    fs::set_permissions(r.join("data/sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    let long_dir = r.join("long").join("d".repeat(150));
    fs::create_dir_all(&long_dir).unwrap();
    fs::write(
        long_dir.join(format!("{}.txt", "n".repeat(200))),
        "long name\n",
    )
    .unwrap();
    set_mtime(&r.join("data/old"), 1_000_000_000, 123_456_789);
    umoci_repack(&img, &b1);
    eprintln!("{:?}: layer 1 repacked", clock.elapsed());

    // Layer 2: deletions (whiteouts), changes, a hardlink to a file of layer 1, a big sparse file.
    let b2 = t.path().join("b2");
    umoci_unpack(&img, &b2);
    let r = b2.join("rootfs");
    fs::remove_file(r.join("etc/app/conf.d/a.conf")).unwrap();
    fs::remove_dir_all(r.join("gone")).unwrap();
    fs::write(r.join("etc/app/conf.d/b.conf"), "b=3\n").unwrap();
    fs::hard_link(r.join("data/h1"), r.join("data/h3")).unwrap();
    fs::set_permissions(r.join("data/owned"), fs::Permissions::from_mode(0o600)).unwrap();
    umoci_repack(&img, &b2);
    eprintln!("{:?}: layer 2 repacked", clock.elapsed());

    // Layer 3, written by hand: an opaque directory and a hardlink to a layer-1 file.
    let layer3 = t.path().join("layer3.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&layer3).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        b.append_data(&mut h.clone(), "opaque/", std::io::empty())
            .unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        b.append_data(&mut h.clone(), "opaque/.wh..wh..opq", std::io::empty())
            .unwrap();
        h.set_size(4);
        b.append_data(&mut h.clone(), "opaque/new", &b"new\n"[..])
            .unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Link);
        l.set_mode(0o644);
        l.set_size(0);
        l.set_uid(0);
        l.set_gid(0);
        l.set_mtime(1_600_000_000);
        b.append_link(&mut l, "data/h4", "data/h2").unwrap();
        b.finish().unwrap();
    }
    run(
        "umoci",
        &[
            "raw",
            "add-layer",
            "--image",
            &format!("{}:t", img.display()),
            &layer3.display().to_string(),
        ],
    );

    // Layer 4, written by GNU tar: a sparse file over 4 GiB (PAX sparse 1.0, holes not stored).
    let stage = t.path().join("stage");
    fs::create_dir_all(stage.join("data")).unwrap();
    let big = fs::File::create(stage.join("data/sparse")).unwrap();
    big.set_len((4 << 30) + (3 << 20)).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&big, b"start of data", 1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&big, b"past four GiB", (4 << 30) + (1 << 20))
        .unwrap();
    drop(big);
    set_mtime(&stage.join("data/sparse"), 1_500_000_000, 0);
    let layer4 = t.path().join("layer4.tar");
    run(
        "tar",
        &[
            "--sparse",
            "--format=posix",
            "--numeric-owner",
            "-C",
            &stage.display().to_string(),
            "-cf",
            &layer4.display().to_string(),
            "data/sparse",
        ],
    );
    assert!(
        fs::metadata(&layer4).unwrap().len() < 1 << 20,
        "GNU tar did not store the file sparse"
    );
    run(
        "umoci",
        &[
            "raw",
            "add-layer",
            "--image",
            &format!("{}:t", img.display()),
            &layer4.display().to_string(),
        ],
    );

    // What umoci makes of the image, and what shoal makes of it.
    let expected = t.path().join("expected");
    umoci_unpack(&img, &expected);
    eprintln!("{:?}: umoci unpacked the image", clock.elapsed());
    let out = t.path().join("out");
    let stats = shoal_ok(&[
        "image",
        "convert",
        "--source",
        &oci(&img, "t"),
        "--output",
        &oci(&out, "s"),
        "--json",
    ]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["layers"], 4, "{stats}"); // `umoci new` starts with no layer
    shoal_ok(&["image", "verify", &oci(&out, "s")]);
    eprintln!("{:?}: shoal converted and verified", clock.elapsed());
    let actual = t.path().join("actual");
    shoal_ok(&[
        "image",
        "unpack",
        &oci(&out, "s"),
        "--to",
        &actual.display().to_string(),
    ]);
    eprintln!("{:?}: shoal unpacked", clock.elapsed());

    let n = assert_same_tree(&expected.join("rootfs"), &actual);
    assert!(n > 100, "only {n} paths compared");
    // Spot checks that the cases were really exercised.
    assert!(!actual.join("gone").exists() && !actual.join("etc/app/conf.d/a.conf").exists());
    assert!(!actual.join("opaque/old1").exists() && actual.join("opaque/new").exists());
    let ino = |p: &str| fs::metadata(actual.join(p)).unwrap().ino();
    assert_eq!(ino("data/h1"), ino("data/h4"));
    assert_eq!(ino("data/h1"), ino("data/h3"));
    let sparse = fs::metadata(actual.join("data/sparse")).unwrap();
    assert_eq!(sparse.len(), (4 << 30) + (3 << 20));
    assert!(
        sparse.blocks() * 512 < 64 << 20,
        "unpacked sparse file is not sparse: {} blocks",
        sparse.blocks()
    );
}
