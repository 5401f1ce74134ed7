//! A converted image in a real registry, seen by real clients that know nothing of Shoal:
//! - containerd 1.6 (Debian's, private root, state, sockets and /run) pulls it with `ctr` and its
//!   overlayfs snapshotter: it accepts the manifest, the OCI config and the layers, and the unpack
//!   fails with an error that names the Shoal layer media type; a plain image pulls and unpacks in
//!   the same containerd, so the failure is the format's answer and not the setup's;
//! - skopeo copies the converted image from one registry to another unchanged (manifest, config and
//!   every blob byte for byte).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_root, oci, run, shoal_ok};
use shoal_format::oci as layout;
use shoal_testkit::{need_binaries, or_skip, Registry, RegistryOpts};

/// A containerd started for one test: its own root, state and sockets under a temporary
/// directory, the CRI off, and a private mount namespace with its own /run (runc and shims keep
/// state under /run/containerd whatever the config says; mounts go with the namespace). Killed on
/// drop.
struct Containerd {
    child: Child,
    dir: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        fs::create_dir_all(dir).expect("containerd dir");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[metrics]
  address = ""
"#
        );
        fs::write(dir.join("config.toml"), config).expect("containerd config");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs tmpfs /run && exec containerd --config {d}/config.toml"
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Containerd {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// Runs `ctr` against this containerd in namespace `shoal-test`.
    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("c.sock"))
            .args(["--namespace", "shoal-test"])
            .args(args)
            .output()
            .expect("running ctr")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain OCI image built with umoci from this machine's busybox, with a runtime config.
fn source_image(work: &Path) -> PathBuf {
    let dir = work.join("src");
    let image = format!("{}:src", dir.display());
    run("umoci", &["init", "--layout", path(&dir)]);
    run("umoci", &["new", "--image", &image]);
    let bundle = work.join("bundle");
    run("umoci", &["unpack", "--image", &image, path(&bundle)]);
    let bin = bundle.join("rootfs/bin");
    fs::create_dir_all(&bin).expect("bin");
    fs::copy("/bin/busybox", bin.join("busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", bin.join("sh")).expect("symlink");
    fs::write(bundle.join("rootfs/motd"), b"converted by shoal\n").expect("motd");
    run("umoci", &["repack", "--image", &image, path(&bundle)]);
    run(
        "umoci",
        &[
            "config",
            "--image",
            &image,
            "--config.entrypoint",
            "/bin/sh",
            "--config.cmd=-c",
            "--config.cmd=cat /motd",
            "--config.env",
            "GREETING=hello",
            "--config.workingdir",
            "/",
        ],
    );
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn skopeo(args: &[&str]) -> String {
    let mut all = vec!["--insecure-policy"];
    all.extend_from_slice(args);
    run("skopeo", &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_refuses_to_unpack_a_converted_image_and_says_why() {
    if need_binaries(&["containerd", "ctr", "unshare", "umoci", "skopeo"]).is_err() {
        return;
    }
    if !is_root() {
        let reason = "needs root (a private mount namespace for containerd)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}");
        eprintln!("SKIP: {reason}");
        return;
    }
    let Some(reg) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let src = source_image(work.path());
    let host = reg.host();
    let plain = format!("{host}/plain:v1");
    let converted = format!("{host}/converted:v1");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &oci(&src, "src"),
        &format!("docker://{plain}"),
    ]);
    let out = work.path().join("shoal");
    shoal_ok(&[
        "image",
        "convert",
        "--source",
        &oci(&src, "src"),
        "--output",
        &oci(&out, "v1"),
        "--target",
        &format!("docker://{converted}"),
    ]);

    let ctrd = Containerd::start(&work.path().join("containerd"));
    let pulled = ctrd.ctr(&["image", "pull", "--plain-http", &plain]);
    assert!(
        pulled.status.success(),
        "the plain image must pull and unpack: {}\n{}",
        String::from_utf8_lossy(&pulled.stderr),
        ctrd.log()
    );

    let refused = ctrd.ctr(&["image", "pull", "--plain-http", &converted]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a converted image unpacked without the Shoal snapshotter"
    );
    assert!(
        stderr.contains(layout::MEDIA_BLOB),
        "the error must name the Shoal layer media type: {stderr}"
    );
    // containerd took the config and layers as an image (no unknown types, rootfs consistent):
    // only the unpack of a Shoal layer failed.
    let log = ctrd.log();
    for bad in ["reference for unknown type", "mismatched image rootfs"] {
        assert!(!log.contains(bad), "containerd logged {bad:?}: {log}");
    }
    let images = String::from_utf8_lossy(&ctrd.ctr(&["image", "ls", "-q"]).stdout).into_owned();
    assert!(
        images.contains(&converted),
        "image record missing: {images}"
    );
    eprintln!(
        "containerd without the Shoal snapshotter said: {}",
        stderr.trim()
    );
    drop(ctrd);

    // skopeo: registry to registry, unchanged.
    let Some(reg2) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    let copy = format!("{}/copied:v1", reg2.host());
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{converted}"),
        &format!("docker://{copy}"),
    ]);
    let raw = |r: &str, what: &[&str]| {
        let mut args = vec!["inspect", "--tls-verify=false", "--raw"];
        args.extend_from_slice(what);
        let r = format!("docker://{r}");
        args.push(&r);
        skopeo(&args)
    };
    let manifest = raw(&converted, &[]);
    assert_eq!(manifest, raw(&copy, &[]), "the manifest changed on the way");
    assert_eq!(
        raw(&converted, &["--config"]),
        raw(&copy, &["--config"]),
        "the config changed on the way"
    );
    let (desc, _) = layout::resolve(&layout::LayoutRef {
        dir: out.clone(),
        tag: Some("v1".into()),
    })
    .expect("converted layout");
    assert_eq!(
        shoal_testkit::sha256_digest(manifest.as_bytes()),
        desc.digest().to_string(),
        "the registry serves the manifest convert wrote"
    );
    let back = work.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{copy}"),
        &oci(&back, "v1"),
    ]);
    let mut compared = 0;
    for entry in fs::read_dir(back.join("blobs/sha256")).expect("copied blobs") {
        let entry = entry.expect("entry");
        let ours = fs::read(out.join("blobs/sha256").join(entry.file_name())).expect("our blob");
        assert_eq!(ours, fs::read(entry.path()).expect("copied blob"));
        compared += 1;
    }
    assert_eq!(compared, 4, "manifest, config, data blob and bootstrap");
    shoal_ok(&["image", "verify", &oci(&back, "v1")]);
}
