//! `shoal snapshotter` over its gRPC socket, driven the way containerd drives a proxy snapshotter:
//! plain layers behave as with containerd's overlayfs snapshotter (the returned mounts are really
//! mounted), Shoal layers are committed without a download and the image is mounted lazily, and
//! the snapshotter can be killed and restarted under a mounted container.
//! Needs root (mounts), /dev/fuse, docker-registry; skipped with a reason otherwise, never under CI.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_fs::snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use shoal_fs::snapshotter::api::snapshots::{
    CommitSnapshotRequest, Kind, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest, UsageRequest,
    ViewSnapshotRequest,
};
use shoal_fs::snapshotter::api::types::Mount;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

use common::{is_root, run, shoal_ok};

/// Root, FUSE and the tools, or a printed reason (a failure under CI=true).
fn ready() -> bool {
    let tools =
        shoal_testkit::need_binaries(&["docker-registry", "fusermount3", "mount", "umount"]);
    let ok = tools.is_ok() && is_root() && Path::new("/dev/fuse").exists();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run the snapshotter tests: needs root, /dev/fuse and {tools:?}"
        );
        eprintln!("SKIP: the snapshotter tests need root and /dev/fuse");
    }
    ok
}

/// A running `shoal snapshotter` on a private socket and root.
struct Snapshotter {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
}

impl Snapshotter {
    fn start(dir: &Path, extra: &[&str]) -> Snapshotter {
        let root = dir.join("root");
        let socket = dir.join("snapshotter.sock");
        let mut args: Vec<String> = vec![
            "snapshotter".into(),
            "--root".into(),
            root.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--mount-log".into(),
            "info,shoal_fs=debug".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Snapshotter {
            child: None,
            root,
            socket,
            args,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(&self.args)
            .env("SHOAL_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting shoal snapshotter");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the snapshotter did not listen in 30 s"
            );
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the snapshotter exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or an OOM kill would.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn client(&self) -> SnapshotsClient<Channel> {
        let path = self.socket.clone();
        let channel = Endpoint::try_from("http://snapshotter")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .expect("connecting to the snapshotter");
        SnapshotsClient::new(channel)
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.kill();
        // Lazy mounts outlive the snapshotter by design: take them down with the test.
        if let Ok(entries) = std::fs::read_dir(self.root.join("images")) {
            for e in entries.flatten() {
                let _ = shoal_fs::umount(&e.path().join("mnt"));
            }
        }
    }
}

/// Mounts containerd would make, made at `target` (root).
fn mount_all(mounts: &[Mount], target: &Path) {
    std::fs::create_dir_all(target).unwrap();
    for m in mounts {
        let source = m.source.clone();
        let mut args = vec!["-t".to_string(), m.r#type.clone()];
        let opts: Vec<&str> = m
            .options
            .iter()
            .map(String::as_str)
            .filter(|o| *o != "rbind")
            .collect();
        if m.r#type == "bind" {
            args = vec!["--rbind".into()];
        }
        if !opts.is_empty() {
            args.push("-o".into());
            args.push(opts.join(","));
        }
        args.push(source);
        args.push(target.display().to_string());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run("mount", &a);
        if m.r#type == "bind" && m.options.iter().any(|o| o == "ro") {
            run(
                "mount",
                &["-o", "remount,bind,ro", &target.display().to_string()],
            );
        }
    }
}

fn umount(target: &Path) {
    run("umount", &[&target.display().to_string()]);
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn prepare(key: &str, parent: &str, l: HashMap<String, String>) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "shoal".into(),
        key: key.into(),
        parent: parent.into(),
        labels: l,
    }
}

async fn list(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Vec<String> {
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "shoal".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layers_behave_like_containerds_overlayfs_snapshotter() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshotter::start(dir.path(), &["--no-peer"]);
    let mut c = snap.client().await;
    let mnt = dir.path().join("m");

    // Layer 1: a bind mount of an empty directory, "unpacked" into, committed.
    let m = c
        .prepare(prepare("ns/1/extract-a", "", labels(&[])))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].r#type.as_str(), m[0].options[0].as_str()),
        ("bind", "rw")
    );
    mount_all(&m, &mnt);
    std::fs::write(mnt.join("base.txt"), "base").unwrap();
    std::fs::write(mnt.join("gone.txt"), "deleted above").unwrap();
    umount(&mnt);
    c.commit(CommitSnapshotRequest {
        snapshotter: "shoal".into(),
        name: "ns/2/base".into(),
        key: "ns/1/extract-a".into(),
        labels: labels(&[("containerd.io/snapshot.ref", "sha256:base")]),
    })
    .await
    .unwrap();

    // Layer 2 on it: an overlay; a delete becomes a whiteout in the upper directory.
    let m = c
        .prepare(prepare("ns/3/extract-b", "ns/2/base", labels(&[])))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");
    mount_all(&m, &mnt);
    assert_eq!(
        std::fs::read_to_string(mnt.join("base.txt")).unwrap(),
        "base"
    );
    std::fs::remove_file(mnt.join("gone.txt")).unwrap();
    std::fs::write(mnt.join("top.txt"), "top").unwrap();
    umount(&mnt);
    let again = c
        .mounts(MountsRequest {
            snapshotter: "shoal".into(),
            key: "ns/3/extract-b".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m, "Mounts repeats what Prepare returned");
    c.commit(CommitSnapshotRequest {
        snapshotter: "shoal".into(),
        name: "ns/4/top".into(),
        key: "ns/3/extract-b".into(),
        labels: labels(&[]),
    })
    .await
    .unwrap();

    // A view of both layers: read-only, the delete applied.
    let m = c
        .view(ViewSnapshotRequest {
            snapshotter: "shoal".into(),
            key: "ns/5/view".into(),
            parent: "ns/4/top".into(),
            labels: labels(&[]),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    mount_all(&m, &mnt);
    assert_eq!(std::fs::read_to_string(mnt.join("top.txt")).unwrap(), "top");
    assert_eq!(
        std::fs::read_to_string(mnt.join("base.txt")).unwrap(),
        "base"
    );
    assert!(!mnt.join("gone.txt").exists());
    assert!(
        std::fs::write(mnt.join("x"), "no").is_err(),
        "a view is read-only"
    );
    umount(&mnt);

    let info = c
        .stat(StatSnapshotRequest {
            snapshotter: "shoal".into(),
            key: "ns/4/top".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(
        (info.kind, info.parent.as_str()),
        (Kind::Committed as i32, "ns/2/base")
    );
    assert_eq!(
        list(&mut c, &[]).await,
        ["ns/2/base", "ns/4/top", "ns/5/view"]
    );
    assert_eq!(
        list(&mut c, &[r#"parent=="ns/2/base""#]).await,
        ["ns/4/top"]
    );
    assert_eq!(
        list(
            &mut c,
            &[
                r#"labels."containerd.io/snapshot.ref"==sha256:base"#,
                "kind==view"
            ]
        )
        .await,
        ["ns/2/base", "ns/5/view"]
    );
    let mut info = info;
    info.labels = labels(&[("a", "1")]);
    let updated = c
        .update(UpdateSnapshotRequest {
            snapshotter: "shoal".into(),
            info: Some(info),
            update_mask: Some(prost_types_mask(&["labels.a"])),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated.labels.get("a").map(String::as_str), Some("1"));
    let usage = c
        .usage(UsageRequest {
            snapshotter: "shoal".into(),
            key: "ns/2/base".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(usage.size > 0 && usage.inodes >= 3, "{usage:?}");

    // What containerd must not be allowed to do, and bad input: clear codes, no panics.
    let err = |r: Result<tonic::Response<()>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        err(c
            .remove(RemoveSnapshotRequest {
                snapshotter: "shoal".into(),
                key: "ns/2/base".into()
            })
            .await
            .map(|_| tonic::Response::new(()))),
        Code::FailedPrecondition
    );
    assert_eq!(
        c.prepare(prepare("ns/6/x", "ns/9/none", labels(&[])))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        c.prepare(prepare("ns/5/view", "", labels(&[])))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    let bad = ListSnapshotsRequest {
        snapshotter: "shoal".into(),
        filters: vec!["labels.\"open".into()],
    };
    assert_eq!(c.list(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let huge = labels(&[("k", &"v".repeat(20 << 10))]);
    assert_eq!(
        c.prepare(prepare("ns/7/x", "", huge))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let unknown = labels(&[
        ("containerd.io/snapshot.ref", "c"),
        ("containerd.io/snapshot/shoal.layer", "nonsense"),
    ]);
    assert_eq!(
        c.prepare(prepare("ns/8/x", "", unknown))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Children first, then the base; every directory goes.
    for key in ["ns/5/view", "ns/4/top", "ns/2/base"] {
        c.remove(RemoveSnapshotRequest {
            snapshotter: "shoal".into(),
            key: key.into(),
        })
        .await
        .unwrap();
    }
    assert!(list(&mut c, &[]).await.is_empty());
    let left: Vec<_> = std::fs::read_dir(snap.root.join("snapshots"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "snapshot directories left: {left:?}");
}

fn prost_types_mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|s| s.to_string()).collect(),
    }
}

/// A small converted image pushed to `reg`: returns (layer digests in manifest order, kinds).
fn push_converted(dir: &Path, reference: &str) -> (PathBuf, Vec<(String, String)>) {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/msg"), "hello from a lazy image\n").unwrap();
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(tree.join("big.bin"), &big).unwrap();
    let layout = dir.join("layout");
    shoal_ok(&[
        "image",
        "convert",
        "--source",
        &tree.display().to_string(),
        "--output",
        &format!("oci:{}:v1", layout.display()),
        "--chunk-size",
        "256K",
    ]);
    shoal_ok(&[
        "image",
        "convert",
        "--source",
        &tree.display().to_string(),
        "--target",
        &format!("docker://{reference}"),
        "--chunk-size",
        "256K",
    ]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(mdigest)).unwrap())
            .unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let mt = l["mediaType"].as_str().unwrap();
            let kind = if mt.contains("bootstrap") {
                "bootstrap"
            } else {
                "blob"
            };
            (l["digest"].as_str().unwrap().to_string(), kind.to_string())
        })
        .collect();
    (tree, layers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_layers_are_never_downloaded_and_the_image_mounts_lazily() {
    if !ready() {
        return;
    }
    let reg = shoal_testkit::Registry::start(Default::default())
        .await
        .expect("docker-registry");
    let dir = tempfile::tempdir().unwrap();
    let reference = format!("{}/lazy/app:v1", reg.host());
    let (tree, mut layers) = tokio::task::block_in_place(|| push_converted(dir.path(), &reference));
    // Blobs below, the bootstrap on top (the image format's order).
    layers.sort_by_key(|(_, kind)| kind == "bootstrap");
    let digests: Vec<String> = layers.iter().map(|(d, _)| d.clone()).collect();
    let chain = shoal_fs::snapshotter::chain_ids(&digests);
    let mut snap = Snapshotter::start(dir.path(), &["--no-peer"]);
    let mut c = snap.client().await;

    let mut parent = String::new();
    for (i, (digest, kind)) in layers.iter().enumerate() {
        let mut l = labels(&[
            ("containerd.io/snapshot.ref", &chain[i]),
            ("containerd.io/snapshot/shoal.layer", kind),
            ("containerd.io/snapshot/cri.layer-digest", digest),
            ("containerd.io/snapshot/cri.image-ref", &reference),
        ]);
        l.insert(
            "containerd.io/snapshot/cri.manifest-digest".into(),
            "sha256:0".into(),
        );
        let e = c
            .prepare(prepare(&format!("k8s.io/{i}/extract-{i}"), &parent, l))
            .await
            .expect_err("a Shoal layer is never unpacked");
        assert_eq!(e.code(), Code::AlreadyExists, "{e}");
        let info = c
            .stat(StatSnapshotRequest {
                snapshotter: "shoal".into(),
                key: chain[i].clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.kind, Kind::Committed as i32);
        parent = chain[i].clone();
    }
    let blob_bytes: u64 = reg
        .access_log()
        .await
        .iter()
        .filter(|e| e.path.contains("/blobs/"))
        .map(|e| e.bytes)
        .sum();

    // A container on the image: an overlay whose lower directory is the lazy mount.
    let m = c
        .prepare(prepare("k8s.io/9/ctr", &parent, labels(&[])))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let lower = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .to_string();
    assert!(
        lower.ends_with("/mnt") && !lower.contains(':'),
        "one lower directory, the image mount: {lower}"
    );
    let rootfs = dir.path().join("rootfs");
    mount_all(&m, &rootfs);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/msg")).unwrap(),
        "hello from a lazy image\n"
    );
    std::fs::write(rootfs.join("etc/written"), "upper").unwrap();
    let served_after_msg: u64 = reg
        .access_log()
        .await
        .iter()
        .filter(|e| e.path.contains("/blobs/"))
        .map(|e| e.bytes)
        .sum();
    eprintln!("registry served {blob_bytes} bytes for the pull (bootstrap only) and {served_after_msg} after reading one small file");
    let stats = shoal_fs::snapshotter::read_stats(&snap.root.join("images"));
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].0.reference, reference);

    // The snapshotter dies with the container's rootfs mounted: the container keeps reading.
    snap.kill();
    let big = tokio::task::block_in_place(|| std::fs::read(rootfs.join("big.bin"))).unwrap();
    assert_eq!(big, std::fs::read(tree.join("big.bin")).unwrap());
    snap.spawn();
    let mut c = snap.client().await;
    let again = c
        .mounts(MountsRequest {
            snapshotter: "shoal".into(),
            key: "k8s.io/9/ctr".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m, "state and mounts survive the restart");
    let m2 = c
        .prepare(prepare("k8s.io/10/ctr2", &parent, labels(&[])))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let lower2 = m2[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lower2, lower, "containers of one image share its mount");
    umount(&rootfs);

    // The mount goes with the image's last snapshot.
    for key in ["k8s.io/9/ctr", "k8s.io/10/ctr2"]
        .into_iter()
        .map(String::from)
        .chain(chain.iter().rev().cloned())
    {
        c.remove(RemoveSnapshotRequest {
            snapshotter: "shoal".into(),
            key,
        })
        .await
        .unwrap();
    }
    assert!(
        !Path::new(&lower).exists(),
        "the image's mount and directory are gone"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&snap.root.display().to_string()),
        "mounts left under the root"
    );
}
