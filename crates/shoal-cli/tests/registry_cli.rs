//! `docker://` sources and targets of `shoal image` against a real docker-registry: convert a plain
//! OCI image straight from the registry, push the result, push it again (nothing re-sent), then
//! verify, unpack and copy it back out with skopeo, byte for byte.

mod common;

use std::fs;
use std::path::Path;

use common::{assert_same_tree, oci, run, shoal_err, shoal_ok};
use shoal_testkit::{need_binaries, or_skip, Registry, RegistryAuth, RegistryOpts};

/// A plain (uncompressed) tar layer of a small tree with a multi-chunk file.
fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).expect("append");
    };
    add("etc/hostname", b"shoal\n", 0o644);
    add("bin/tool", &shoal_testkit::random_bytes(3 << 20, 7), 0o755);
    add("usr/share/doc/readme", &[b'x'; 70_000], 0o644);
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_mtime(1_700_000_000);
    b.append_link(&mut h, "bin/alias", "tool").expect("symlink");
    b.into_inner().expect("finish tar")
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_from_registry_push_and_pull_back() {
    let Some(reg) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    if need_binaries(&["skopeo"]).is_err() {
        return;
    }
    let layer = layer();
    reg.push_image_for("plain", "v1", layer.clone(), "linux", "amd64")
        .await
        .expect("pushing the source image");
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = reg.host();
    let source = format!("docker://{host}/plain:v1");
    let target = format!("docker://{host}/converted:v1");
    let layout = tmp.path().join("layout");

    let first = json(&shoal_ok(&[
        "image",
        "convert",
        "--source",
        &source,
        "--output",
        &oci(&layout, "v1"),
        "--target",
        &target,
        "--json",
    ]));
    let pushed = &first["pushed"];
    assert_eq!(pushed["skipped"], 0, "{first}");
    // config + bootstrap + one data blob
    assert_eq!(pushed["uploaded"], 3, "{first}");

    // Converting and pushing again: the conversion is deterministic, so nothing is re-sent.
    let second = json(&shoal_ok(&[
        "image", "convert", "--source", &source, "--target", &target, "--json",
    ]));
    assert_eq!(second["pushed"]["uploaded"], 0, "{second}");
    assert_eq!(second["pushed"]["skipped"], 3, "{second}");
    assert_eq!(second["pushed"]["manifest"], first["pushed"]["manifest"]);

    // The pushed image verifies and unpacks from the registry like the local source does.
    shoal_ok(&["image", "verify", &target]);
    let tar_path = tmp.path().join("layer.tar");
    fs::write(&tar_path, &layer).expect("write layer");
    let (from_registry, from_tar) = (tmp.path().join("a"), tmp.path().join("b"));
    shoal_ok(&["image", "unpack", &target, "--to", path(&from_registry)]);
    shoal_ok(&["image", "unpack", path(&tar_path), "--to", path(&from_tar)]);
    assert!(assert_same_tree(&from_tar, &from_registry) >= 6);

    // A real client copies it back out: every blob is byte for byte what convert wrote.
    let copied = tmp.path().join("copied");
    run(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &target,
            &format!("oci:{}:v1", copied.display()),
        ],
    );
    let blobs = layout.join("blobs/sha256");
    let mut compared = 0;
    for entry in fs::read_dir(copied.join("blobs/sha256")).expect("copied blobs") {
        let entry = entry.expect("entry");
        let ours = fs::read(blobs.join(entry.file_name())).expect("blob in our layout");
        assert_eq!(ours, fs::read(entry.path()).expect("copied blob"));
        compared += 1;
    }
    assert_eq!(compared, 4, "manifest, config, bootstrap and data blob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_credentials_come_from_flags() {
    let auth = RegistryAuth::Basic {
        user: "alice".into(),
        password: "s3cret".into(),
    };
    let Some(reg) = or_skip(Registry::start(RegistryOpts { auth }).await) else {
        return;
    };
    reg.push_image_for("private", "v1", layer(), "linux", "amd64")
        .await
        .expect("pushing the source image");
    let source = format!("docker://{}/private:v1", reg.host());
    let anonymous = shoal_err(&["image", "inspect", &source]);
    assert!(
        anonymous.contains("credentials") || anonymous.contains("401"),
        "{anonymous}"
    );
    let wrong = shoal_err(&[
        "image",
        "inspect",
        &source,
        "--registry-user",
        "alice",
        "--registry-password",
        "nope",
    ]);
    assert!(
        wrong.contains("401") || wrong.contains("rejected"),
        "{wrong}"
    );
    let out = shoal_ok(&[
        "image",
        "inspect",
        &source,
        "--registry-user",
        "alice",
        "--registry-password",
        "s3cret",
    ]);
    assert!(out.contains("files"), "{out}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
