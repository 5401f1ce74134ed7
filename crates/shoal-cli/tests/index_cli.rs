//! `shoal image index` with real tools, on two images made from this machine's files:
//! - built with umoci: gzip layers with whiteouts, an opaque directory, hardlinks within and
//!   across layers, xattrs and devices;
//! - put together from GNU tar layers: zstd in several frames, zstd in one frame, and a plain
//!   tar holding a sparse file.
//!
//! For each: every layer's bootstrap unpacks (each chunk decoded from the ORIGINAL layer blob and
//! BLAKE3-checked) to what `tar -x` of that layer gives, in overlay form; the unpacked layers
//! stacked under a real overlayfs mount equal `umoci unpack` (or `tar -x` of every layer in
//! order); the index is pushed to docker-registry as a referrer (OCI 1.1 referrers tag) and
//! `inspect` finds it; the original image still copies out of the registry unchanged with skopeo.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use shoal_format::index::artifact;
use shoal_format::oci::{self, LayoutRef};
use shoal_testkit::{need_binaries, or_skip, Registry, RegistryOpts};

/// Copies up to `max` regular files (each under 1 MiB) from `from` into `to`.
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
            } else if md.is_file() && md.len() < 1 << 20 && n < max {
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

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The umoci image: three gzip layers (see the module doc).
fn umoci_image(t: &Path) -> PathBuf {
    let img = t.join("umoci");
    let image = format!("{}:t", img.display());
    run("umoci", &["init", "--layout", path(&img)]);
    run("umoci", &["new", "--image", &image]);
    let unpack = |b: &Path| run("umoci", &["unpack", "--image", &image, path(b)]);
    let repack = |b: &Path| run("umoci", &["repack", "--image", &image, path(b)]);

    let b1 = t.join("b1");
    unpack(&b1);
    let r = b1.join("rootfs");
    assert!(copy_some(Path::new("/usr/share/doc"), &r.join("usr/share/doc"), 200) > 50);
    assert!(copy_some(Path::new("/usr/bin"), &r.join("usr/bin"), 20) > 5);
    for d in ["etc/app", "data", "dev", "opaque/sub", "gone/deep"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    for (f, body) in [
        ("etc/app/a.conf", "a=1\n"),
        ("etc/app/b.conf", "b=2\n"),
        ("opaque/old", "old\n"),
        ("opaque/sub/old2", "old two\n"),
        ("gone/deep/file", "deleted with its directory\n"),
        ("data/h1", "hardlinked\n"),
    ] {
        fs::write(r.join(f), body).unwrap();
    }
    fs::hard_link(r.join("data/h1"), r.join("data/h2")).unwrap();
    symlink("../etc/app", r.join("data/rel-link")).unwrap();
    xattr::set(r.join("data/h1"), "user.shoal.test", b"value-1").unwrap();
    xattr::set(r.join("etc/app"), "user.dir", b"\x00\x01binary\xff").unwrap();
    let c = std::ffi::CString::new(path(&r.join("dev/null"))).unwrap();
    // SAFETY: a valid path; mknod creates one device node.
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) },
        0
    );
    repack(&b1);

    let b2 = t.join("b2");
    unpack(&b2);
    let r = b2.join("rootfs");
    fs::remove_file(r.join("etc/app/a.conf")).unwrap();
    fs::remove_dir_all(r.join("gone")).unwrap();
    fs::write(r.join("etc/app/b.conf"), "b=3\n").unwrap();
    fs::hard_link(r.join("data/h1"), r.join("data/h3")).unwrap();
    repack(&b2);

    // Layer 3 by hand: an opaque directory and a hardlink to a layer-1 file.
    let layer3 = t.join("layer3.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&layer3).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        b.append_data(&mut h.clone(), "opaque/", std::io::empty())
            .unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        b.append_data(&mut h.clone(), "opaque/.wh..wh..opq", std::io::empty())
            .unwrap();
        h.set_size(4);
        b.append_data(&mut h.clone(), "opaque/new", &b"new\n"[..])
            .unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Link);
        l.set_mode(0o644);
        l.set_size(0);
        l.set_mtime(1_600_000_000);
        b.append_link(&mut l, "data/h4", "data/h2").unwrap();
        b.finish().unwrap();
    }
    run(
        "umoci",
        &["raw", "add-layer", "--image", &image, path(&layer3)],
    );
    img
}

/// The second image: zstd in 4 frames, zstd in one frame, a plain tar with a sparse file.
fn zstd_image(t: &Path) -> PathBuf {
    let stage = |name: &str| {
        let d = t.join(name);
        fs::create_dir_all(&d).unwrap();
        d
    };
    let s1 = stage("s1");
    assert!(
        copy_some(
            Path::new("/usr/lib/python3"),
            &s1.join("usr/lib/python3"),
            300
        ) > 50
    );
    let s2 = stage("s2");
    copy_some(Path::new("/usr/share/doc"), &s2.join("usr/share/doc"), 40);
    fs::write(s2.join("usr/share/doc/extra"), b"second layer\n").unwrap();
    let s3 = stage("s3");
    let big = fs::File::create(s3.join("sparse")).unwrap();
    big.set_len(40 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&big, b"middle of a hole", 20 << 20).unwrap();
    drop(big);
    fs::write(s3.join("small"), b"plain tar\n").unwrap();
    let tar_of = |dir: &Path, out: &Path| {
        run(
            "tar",
            &[
                "--sparse",
                "--format=posix",
                "--numeric-owner",
                "--sort=name",
                "-C",
                path(dir),
                "-cf",
                path(out),
                ".",
            ],
        );
        fs::read(out).unwrap()
    };
    let t1 = tar_of(&s1, &t.join("t1.tar"));
    let t2 = tar_of(&s2, &t.join("t2.tar"));
    let t3 = tar_of(&s3, &t.join("t3.tar"));
    // Several frames, as zstd:chunked and seekable zstd have; and one frame.
    let z1: Vec<u8> = t1
        .chunks(t1.len().div_ceil(4))
        .flat_map(|c| zstd::bulk::compress(c, 3).unwrap())
        .collect();
    let z2 = zstd::bulk::compress(&t2, 3).unwrap();

    let img = t.join("zstd");
    oci::init_layout(&img).unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (blob, tar, media) in [
        (&z1, &t1, "application/vnd.oci.image.layer.v1.tar+zstd"),
        (&z2, &t2, "application/vnd.oci.image.layer.v1.tar+zstd"),
        (&t3, &t3, "application/vnd.oci.image.layer.v1.tar"),
    ] {
        layers.push(oci::write_blob(&img, media, blob).unwrap());
        diff_ids.push(shoal_testkit::sha256_digest(tar));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}
    });
    let config = oci::write_blob(
        &img,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    )
    .unwrap();
    let manifest = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(oci_spec::image::MediaType::ImageManifest)
        .config(config)
        .layers(layers)
        .build()
        .unwrap();
    oci::add_manifest(&img, &manifest, "t").unwrap();
    img
}

/// Kinds and metadata of a tree's entries, for comparing one layer with its tar extraction.
fn entries(root: &Path) -> BTreeMap<PathBuf, PathBuf> {
    walk(root)
}

/// Layer `i` of `image` (index in layout `index_dir`) unpacked from its bootstrap into `to`,
/// compared with `tar -x` of the layer blob: every entry of the tar is there with the same
/// metadata and content (directories the layer only implies aside); whiteouts are character
/// devices 0/0, opaque markers the xattr; anything else extra is a copied-up hardlink target.
fn check_layer(
    image: &LayoutRef,
    index_dir: &Path,
    index: &oci_spec::image::ImageManifest,
    i: usize,
    to: &Path,
    work: &Path,
) {
    let layer = artifact::open_layer(image, index_dir, index, i).expect("open layer");
    let files = layer
        .blob_paths
        .iter()
        .map(|p| fs::File::open(p).unwrap())
        .collect();
    shoal_format::unpack::unpack_meta(&layer.meta, files, to).expect("unpack layer");
    let (_, manifest) = oci::resolve(image).unwrap();
    let blob = oci::blob_path(
        &image.dir,
        &oci::parse_digest(manifest.layers()[i].digest()).unwrap(),
    );
    let x = work.join(format!("tar-x-{i}"));
    fs::create_dir_all(&x).unwrap();
    // A hardlink to a lower layer's file cannot be made from this layer alone: tar says so and
    // goes on; the bootstrap has the target copied up (checked below).
    let _ = std::process::Command::new("tar")
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-C",
            path(&x),
            "-xf",
            path(&blob),
        ])
        .output()
        .expect("running tar");
    let (ours, theirs) = (entries(to), entries(&x));
    let mut compared = 0;
    for (rel, p) in &theirs {
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == ".wh..wh..opq" {
            let dir = to.join(rel.parent().unwrap());
            assert_eq!(
                xattr::get(&dir, "trusted.overlay.opaque")
                    .unwrap()
                    .as_deref(),
                Some(&b"y"[..]),
                "layer {i}: {} is not opaque",
                dir.display()
            );
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let w = to.join(rel.parent().unwrap()).join(hidden);
            let md = fs::symlink_metadata(&w)
                .unwrap_or_else(|e| panic!("layer {i}: whiteout {}: {e}", w.display()));
            assert!(
                md.file_type().is_char_device() && md.rdev() == 0,
                "layer {i}: {} is not a whiteout",
                w.display()
            );
            continue;
        }
        let q = ours
            .get(rel)
            .unwrap_or_else(|| panic!("layer {i}: /{} missing", rel.display()));
        if fs::symlink_metadata(p).unwrap().is_dir() {
            continue;
        }
        assert_eq!(
            facts(p),
            facts(q),
            "layer {i}: metadata of /{}",
            rel.display()
        );
        if fs::symlink_metadata(p).unwrap().is_file() {
            assert!(
                same_content(p, q),
                "layer {i}: content of /{}",
                rel.display()
            );
        }
        compared += 1;
    }
    for rel in ours.keys() {
        if theirs.contains_key(rel) {
            continue;
        }
        let md = fs::symlink_metadata(to.join(rel)).unwrap();
        let whiteout = md.file_type().is_char_device() && md.rdev() == 0;
        assert!(
            whiteout || md.is_dir() || md.nlink() > 1,
            "layer {i}: /{} is not in the layer",
            rel.display()
        );
    }
    assert!(compared > 0, "layer {i}: nothing compared");
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts the unpacked layers (bottom first) as the lower layers of a read-only overlayfs.
fn overlay(layers: &[PathBuf], mnt: &Path) -> Mounted {
    fs::create_dir_all(mnt).unwrap();
    let lower: Vec<&str> = layers.iter().rev().map(|p| path(p)).collect();
    run(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &format!("ro,lowerdir={}", lower.join(":")),
            path(mnt),
        ],
    );
    Mounted(mnt.to_path_buf())
}

/// Pushes image layout `img` (tag `t`) to `target` byte for byte (skopeo would gzip a plain tar
/// layer on the way), then indexes it from the layout (`--span 256K --chunk-size 256K`: many
/// checkpoints) and pushes the index beside it; returns the index report.
async fn push_and_index(reg: &Registry, name: &str, img: &Path, target: &str) -> serde_json::Value {
    let (mdesc, manifest) = oci::resolve(&LayoutRef {
        dir: img.to_path_buf(),
        tag: Some("t".into()),
    })
    .unwrap();
    for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let blob = fs::read(oci::blob_path(img, &oci::parse_digest(d.digest()).unwrap())).unwrap();
        reg.push_blob(name, &blob).await.expect("pushing a blob");
    }
    let mbytes = oci::read_blob(img, &mdesc, 1 << 20).unwrap();
    reg.push_manifest(
        name,
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &mbytes,
    )
    .await
    .expect("pushing the manifest");
    let report = json(&shoal_ok(&[
        "image",
        "index",
        &oci(img, "t"),
        "--target",
        target,
        "--span",
        "256K",
        "--chunk-size",
        "256K",
        "--json",
    ]));
    eprintln!("{name}: {report}");
    assert!(
        report["pushed"].as_str().unwrap().contains("referrers tag"),
        "{report}"
    );
    let ratio = report["ratio"].as_f64().unwrap();
    assert!(
        ratio > 0.0 && ratio < 0.2,
        "{name}: index is {ratio} of the image"
    );
    report
}

/// The image unpacked whole: `umoci unpack` of the umoci image, `tar -x` of every layer in
/// order for the other; returns its root.
fn expected_rootfs(
    name: &str,
    img: &Path,
    manifest: &oci_spec::image::ImageManifest,
    work: &Path,
) -> PathBuf {
    let expected = work.join(format!("{name}-expected"));
    if expected.exists() {
        return expected.join("rootfs");
    }
    if name == "umoci" {
        run(
            "umoci",
            &[
                "unpack",
                "--image",
                oci(img, "t").trim_start_matches("oci:"),
                path(&expected),
            ],
        );
    } else {
        let rootfs = expected.join("rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        for l in manifest.layers() {
            let blob = oci::blob_path(img, &oci::parse_digest(l.digest()).unwrap());
            run(
                "tar",
                &[
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "-C",
                    path(&rootfs),
                    "-xf",
                    path(&blob),
                ],
            );
        }
    }
    expected.join("rootfs")
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_layers_stack_to_the_image_and_the_image_is_unchanged() {
    if !is_root() {
        let reason = "needs root (device nodes, trusted xattrs, overlayfs)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}");
        eprintln!("SKIP: {reason}");
        return;
    }
    if need_binaries(&["umoci", "skopeo", "tar", "mount"]).is_err() {
        return;
    }
    let Some(reg) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    for (name, img) in [("umoci", umoci_image(work)), ("zstd", zstd_image(work))] {
        let image = LayoutRef {
            dir: img.clone(),
            tag: Some("t".into()),
        };
        let (mdesc, manifest) = oci::resolve(&image).unwrap();
        let n = manifest.layers().len();
        let target = format!("docker://{}/{name}:v1", reg.host());
        let report = push_and_index(&reg, name, &img, &target).await;
        let layers = report["layers"].as_array().unwrap();
        assert_eq!(layers.len(), n);
        if name == "umoci" {
            for l in layers {
                assert_eq!(l["compression"], "gzip", "{l}");
                assert_eq!(l["lazy"], true, "{l}");
            }
            assert!(layers[0]["checkpoints"].as_u64().unwrap() > 1, "{report}");
            assert!(layers[1]["whiteouts"].as_u64().unwrap() >= 2, "{report}");
            assert_eq!(layers[2]["opaque_dirs"], 1, "{report}");
        } else {
            assert_eq!(layers[0]["compression"], "zstd");
            assert!(
                layers[0]["lazy"].as_bool().unwrap()
                    && layers[0]["checkpoints"].as_u64().unwrap() >= 2,
                "{report}"
            );
            assert_eq!(layers[1]["lazy"], false, "one zstd frame: whole layer");
            assert_eq!(layers[2]["compression"], "none");
            assert!(
                layers[2]["side_chunks"].as_u64().unwrap() > 0,
                "the sparse file's chunks: {report}"
            );
        }
        let (_, index) = artifact::find(&img, mdesc.digest().as_ref())
            .unwrap()
            .expect("the index is listed in the layout");

        // Each layer alone, against tar -x of its blob.
        let unpacked: Vec<PathBuf> = (0..n)
            .map(|i| {
                let to = work.join(format!("{name}-layer{i}"));
                check_layer(&image, &img, &index, i, &to, &work.join(name));
                to
            })
            .collect();

        // The layers stacked by the kernel's overlayfs, against the image unpacked whole.
        let expected = expected_rootfs(name, &img, &manifest, work);
        let mnt = work.join(format!("{name}-mnt"));
        let m = overlay(&unpacked, &mnt);
        let compared = assert_same_files(&expected, &mnt);
        assert!(compared > 50, "{name}: only {compared} paths");
        drop(m);

        // inspect finds the index through the registry's referrers tag.
        let inspect = shoal_ok(&["image", "inspect", &target]);
        assert!(
            inspect.contains("a Shoal index") && inspect.contains("checkpoints"),
            "{inspect}"
        );

        // The original image is untouched: the registry serves the same manifest, and skopeo
        // copies it out byte for byte (--preserve-digests: skopeo would otherwise gzip a plain
        // tar layer on the way, index or not).
        let raw = run(
            "skopeo",
            &["inspect", "--tls-verify=false", "--raw", &target],
        );
        assert_eq!(
            shoal_testkit::sha256_digest(raw.as_bytes()),
            mdesc.digest().to_string(),
            "{name}: the tag moved"
        );
        let back = work.join(format!("{name}-back"));
        run(
            "skopeo",
            &[
                "--insecure-policy",
                "copy",
                "--preserve-digests",
                "--src-tls-verify=false",
                &target,
                &format!("oci:{}:v1", back.display()),
            ],
        );
        let (bdesc, bman) = oci::resolve(&LayoutRef {
            dir: back.clone(),
            tag: Some("v1".into()),
        })
        .unwrap();
        assert_eq!(
            bdesc.digest(),
            mdesc.digest(),
            "{name}: skopeo changed the image"
        );
        for d in std::iter::once(bman.config()).chain(bman.layers()) {
            let digest = oci::parse_digest(d.digest()).unwrap();
            assert_eq!(
                fs::read(oci::blob_path(&back, &digest)).unwrap(),
                fs::read(oci::blob_path(&img, &digest)).unwrap()
            );
        }
    }
    let _ = std::io::stdout().flush();
}

/// A `shoal fs mount` process; detached and killed if the test fails.
struct Served {
    child: std::process::Child,
    mountpoint: PathBuf,
}

impl Drop for Served {
    /// SIGTERM first: the process unmounts the overlay and every layer itself (a SIGKILL would
    /// leave the layers' FUSE mounts behind); SIGKILL only if it is still there 10 s later.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mount entries (mountpoints) in this process's mount table under `prefix`.
fn mounts_under(prefix: &str) -> Vec<String> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
        .filter(|m| m.starts_with(prefix))
        .collect()
}

fn mounted(mnt: &Path) -> bool {
    mounts_under(path(mnt)).iter().any(|m| m == path(mnt))
}

/// `shoal fs mount SRC MNT` (origin only), until the image is up.
fn serve(src: &str, mnt: &Path, cache: &Path, stats: &Path) -> Served {
    serve_in(src, mnt, cache, stats, &std::env::temp_dir())
}

/// `serve` with the layer mounts' temporary directory under `tmp` (out of sight of a test that
/// counts those in the system's).
fn serve_in(src: &str, mnt: &Path, cache: &Path, stats: &Path, tmp: &Path) -> Served {
    fs::create_dir_all(mnt).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .env("TMPDIR", tmp)
        .args(["fs", "mount", "--no-peer", "--cache-dir"])
        .arg(cache)
        .arg("--stats-file")
        .arg(stats)
        .arg(src)
        .arg(mnt)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting shoal fs mount");
    let mut served = Served {
        child,
        mountpoint: mnt.to_path_buf(),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !mounted(mnt) {
        if let Some(status) = served.child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = served.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("shoal fs mount {src} exited ({status}) before mounting: {err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{src}: no mount after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    served
}

/// The mount's counters, once its stats file shows `ok`.
fn stats(path: &Path, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(v) = fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(&ok)
        {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stats {} never got there",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexed_image_mounts_lazily_and_equals_umoci_unpack() {
    let fuse = Path::new("/dev/fuse").exists() && have("fusermount3");
    if !(is_root() && fuse) {
        let reason = "needs root, /dev/fuse and fusermount3 (FUSE and overlayfs mounts)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}");
        eprintln!("SKIP: {reason}");
        return;
    }
    if need_binaries(&["umoci", "tar", "umount"]).is_err() {
        return;
    }
    let Some(reg) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    for (name, img) in [("umoci", umoci_image(work)), ("zstd", zstd_image(work))] {
        let (_, manifest) = oci::resolve(&LayoutRef {
            dir: img.clone(),
            tag: Some("t".into()),
        })
        .unwrap();
        let image_bytes: u64 = manifest.layers().iter().map(|l| l.size()).sum();
        let target = format!("docker://{}/{name}:v1", reg.host());
        push_and_index(&reg, name, &img, &target).await;
        let expected = expected_rootfs(name, &img, &manifest, work);
        // From the registry (the index found through its referrers tag) and from the layout
        // (listed in its index.json).
        for (how, src) in [("registry", target.clone()), ("layout", oci(&img, "t"))] {
            let mnt = work.join(format!("{name}-{how}-mnt"));
            let stats_file = work.join(format!("{name}-{how}.json"));
            let served = tokio::task::block_in_place(|| {
                serve(
                    &src,
                    &mnt,
                    &work.join(format!("{name}-{how}-cache")),
                    &stats_file,
                )
            });
            // Lazy: one small file fetches a part of the image.
            let small = if name == "umoci" {
                "etc/app/b.conf"
            } else {
                "usr/share/doc/extra"
            };
            assert_eq!(
                fs::read(mnt.join(small)).unwrap(),
                fs::read(expected.join(small)).unwrap()
            );
            let s = stats(&stats_file, |v| v["read_bytes"].as_u64() > Some(0));
            let fetched =
                s["fetched_peer"].as_u64().unwrap() + s["fetched_origin"].as_u64().unwrap();
            eprintln!("{name} from the {how}: one small file fetched {fetched} of {image_bytes} bytes: {s}");
            assert!(
                fetched > 0 && fetched < image_bytes / 2,
                "{name} from the {how}: one small file fetched {fetched} of {image_bytes} bytes"
            );
            // The whole tree: what umoci unpack (or tar -x of every layer) gives.
            let compared = assert_same_files(&expected, &mnt);
            assert!(
                compared > 50,
                "{name} from the {how}: only {compared} paths"
            );
            let s = stats(&stats_file, |v| v["read_bytes"].as_u64() > Some(1 << 20));
            assert_eq!(s["verify_failures"], 0, "{s}");
            assert_eq!(s["read_errors"], 0, "{s}");
            assert!(
                fs::write(mnt.join("new-file"), b"x").is_err(),
                "the stack is read-only"
            );
            // One umount takes the overlay and every layer down, and the process ends.
            let layers_before = mounts_under(
                &std::env::temp_dir()
                    .join("shoal-layers-")
                    .display()
                    .to_string(),
            );
            assert_eq!(
                layers_before.len(),
                manifest.layers().len(),
                "{layers_before:?}"
            );
            shoal_ok(&["fs", "umount", path(&mnt)]);
            let mut served = served;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let status = loop {
                if let Some(s) = served.child.try_wait().unwrap() {
                    break s;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "still serving after umount"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            assert!(status.success(), "shoal fs mount exited with {status}");
            assert!(!mounted(&mnt));
            let left: Vec<String> = mounts_under(
                &std::env::temp_dir()
                    .join("shoal-layers-")
                    .display()
                    .to_string(),
            )
            .into_iter()
            .filter(|m| layers_before.contains(m))
            .collect();
            assert!(left.is_empty(), "layer mounts left: {left:?}");
        }
    }

    // A plain image without an index: the mount says why, and what to run.
    let plain = work.join("plain");
    run("umoci", &["init", "--layout", path(&plain)]);
    run(
        "umoci",
        &["new", "--image", &format!("{}:t", plain.display())],
    );
    let mnt = work.join("plain-mnt");
    fs::create_dir_all(&mnt).unwrap();
    let err = common::shoal_err(&[
        "fs",
        "mount",
        "--no-peer",
        "--cache-dir",
        path(&work.join("plain-cache")),
        &oci(&plain, "t"),
        path(&mnt),
    ]);
    assert!(
        err.contains("without a Shoal index") && err.contains("shoal image index"),
        "{err}"
    );
}

/// The mount's counters once they have not changed over two and a half stats intervals (its
/// background work is done).
fn settled_stats(path: &Path) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = stats(path, |_| true);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(2500));
        let now = stats(path, |_| true);
        if now == last {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stats {} still moving after 30 s: {now}",
            path.display()
        );
        last = now;
    }
}

fn fetched(s: &serde_json::Value) -> u64 {
    s["fetched_peer"].as_u64().unwrap() + s["fetched_origin"].as_u64().unwrap()
}

#[test]
fn a_prefetch_list_is_fetched_at_mount_before_any_read() {
    let fuse = Path::new("/dev/fuse").exists() && have("fusermount3");
    if !(is_root() && fuse) {
        let reason = "needs root, /dev/fuse and fusermount3 (FUSE and overlayfs mounts)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}");
        eprintln!("SKIP: {reason}");
        return;
    }
    if need_binaries(&["umoci", "cp", "umount"]).is_err() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    let img = umoci_image(work);
    let (_, manifest) = oci::resolve(&LayoutRef {
        dir: img.clone(),
        tag: Some("t".into()),
    })
    .unwrap();
    let expected = expected_rootfs("umoci", &img, &manifest, work);
    // The largest files of the image's usr/bin, and one a later layer rewrote.
    let mut bins: Vec<(u64, String)> = fs::read_dir(expected.join("usr/bin"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let name = e.file_name().into_string().unwrap();
            (e.metadata().unwrap().len(), format!("usr/bin/{name}"))
        })
        .collect();
    bins.sort();
    let mut listed: Vec<String> = bins.iter().rev().take(3).map(|b| b.1.clone()).collect();
    listed.push("etc/app/b.conf".into());
    let list_bytes: u64 = bins.iter().rev().take(3).map(|b| b.0).sum();
    let list_file = work.join("prefetch.txt");
    fs::write(&list_file, format!("# startup\n/{}\n", listed.join("\n"))).unwrap();

    // Two copies of the image: one indexed with the list, one without.
    let plain = work.join("umoci-plain");
    run("cp", &["-a", path(&img), path(&plain)]);
    let with = json(&shoal_ok(&[
        "image",
        "index",
        &oci(&img, "t"),
        "--span",
        "256K",
        "--chunk-size",
        "256K",
        "--prefetch",
        path(&list_file),
        "--json",
    ]));
    let counts: Vec<u64> = with["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["prefetch"].as_u64().unwrap())
        .collect();
    // usr/bin and etc/app/b.conf come with the first layer; the second rewrites b.conf.
    assert!(counts[0] >= 4 && counts[1] >= 1, "{counts:?}");
    let without = json(&shoal_ok(&[
        "image",
        "index",
        &oci(&plain, "t"),
        "--span",
        "256K",
        "--chunk-size",
        "256K",
        "--json",
    ]));
    assert!(without["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["prefetch"] == 0));

    // A listed path in no layer: a clear error, and no index written.
    let bad_list = work.join("bad.txt");
    fs::write(&bad_list, "usr/bin/no-such-tool\n").unwrap();
    let err = common::shoal_err(&[
        "image",
        "index",
        &oci(&plain, "t"),
        "--output",
        &format!("oci:{}", path(&work.join("bad-out"))),
        "--prefetch",
        path(&bad_list),
    ]);
    assert!(
        err.contains("usr/bin/no-such-tool") && err.contains("in no layer"),
        "{err}"
    );

    let mount = |name: &str, layout: &Path| {
        let mnt = work.join(format!("{name}-mnt"));
        let stats_file = work.join(format!("{name}.json"));
        let tmp = work.join(format!("{name}-tmp"));
        fs::create_dir_all(&tmp).unwrap();
        let served = serve_in(
            &oci(layout, "t"),
            &mnt,
            &work.join(format!("{name}-cache")),
            &stats_file,
            &tmp,
        );
        (served, mnt, stats_file)
    };
    // With the list: its files' spans are fetched at mount, before anything is read.
    let (served, mnt, stats_file) = mount("listed", &img);
    stats(&stats_file, |v| fetched(v) > 0);
    let s = settled_stats(&stats_file);
    eprintln!("with a prefetch list, before any read: {s}");
    assert_eq!(s["read_bytes"], 0, "{s}");
    assert!(
        fetched(&s) > list_bytes / 4,
        "listed files of {list_bytes} bytes, fetched {}: {s}",
        fetched(&s)
    );
    // Reading the listed files then fetches nothing more.
    for f in &listed {
        assert_eq!(
            fs::read(mnt.join(f)).unwrap(),
            fs::read(expected.join(f)).unwrap(),
            "{f}"
        );
    }
    let after = settled_stats(&stats_file);
    assert!(after["read_bytes"].as_u64() >= Some(list_bytes), "{after}");
    assert_eq!(fetched(&after), fetched(&s), "{after}");
    assert_eq!(after["verify_failures"], 0, "{after}");
    drop(served);
    let left = mounts_under(path(&work.join("listed-tmp")));
    assert!(left.is_empty(), "layer mounts left: {left:?}");

    // Without the list: nothing is fetched until something is read.
    let (served, mnt, stats_file) = mount("unlisted", &plain);
    let s = settled_stats(&stats_file);
    eprintln!("without a prefetch list, before any read: {s}");
    assert_eq!(fetched(&s), 0, "{s}");
    assert_eq!(
        fs::read(mnt.join(&listed[0])).unwrap(),
        fs::read(expected.join(&listed[0])).unwrap()
    );
    let s = settled_stats(&stats_file);
    assert!(fetched(&s) > 0, "{s}");
    drop(served);
}
