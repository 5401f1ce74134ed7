//! Shoal's snapshotter under containerd's CRI: converted images start on their lazy mount (their
//! data blobs never downloaded by containerd), plain images run through the same snapshotter, a
//! flipped byte in the node's cache never reaches a container, a killed snapshotter leaves
//! running containers reading, private images start with credentials, and `shoal image pull`
//! serves `ctr run --snapshotter shoal`.

use std::process::Command;
use std::time::Duration;

use shoal_testkit::{Auth, ContainerSpec, OciLayout, RegistryAuth};

use crate::node::{
    flip_cached_chunks, image_with_unread_bytes, shoal_bin, wait_stats, Node, NodeOpts, Workload,
    MINUTE, UNREAD,
};

/// Converts `layout` with `shoal image convert` and pushes it as `reference`.
fn convert_and_push(layout: &OciLayout, reference: &str) {
    convert_and_push_as(layout, reference, None)
}

/// Like [`convert_and_push`], to a registry that wants `auth`.
fn convert_and_push_as(layout: &OciLayout, reference: &str, auth: Option<&Auth>) {
    let mut cmd = Command::new(shoal_bin());
    cmd.args(["image", "convert", "--source"])
        .arg(format!("oci:{}:1", layout.dir.display()))
        .args(["--target", &format!("docker://{reference}")]);
    if let Some(a) = auth {
        cmd.args([
            "--registry-user",
            &a.user,
            "--registry-password",
            &a.password,
        ]);
    }
    let out = cmd.output().expect("shoal image convert");
    assert!(
        out.status.success(),
        "converting: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_images_start_lazily_and_plain_ones_run_beside_them() {
    let Some(node) = Node::start(NodeOpts {
        shoal: true,
        ..NodeOpts::default()
    })
    .await
    else {
        return;
    };
    let shoal = node.shoal.as_ref().expect("shoal parts");
    let work = Workload::standard();
    let layout = image_with_unread_bytes(&work, node.dir(), "lazy");
    let image = format!("{}/shoal-test/lazy:1", node.registry.host());
    tokio::task::block_in_place(|| convert_and_push(&layout, &image));

    // The sandbox (a plain image) already goes through the Shoal snapshotter.
    let pod = node.cri.run_pod("lazy").await.expect("RunPodSandbox");
    node.cri
        .pull(&image, None)
        .await
        .expect("PullImage of a converted image");
    let (exit, log) = node
        .cri
        .run(&pod, work.spec(&image), MINUTE)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "running on the lazy mount: {e}\n{}",
                shoal.snapshotter_log()
            )
        });
    work.check(&exit, &log);
    let s = wait_stats(shoal, &node.ctrd, |s| s.read_bytes > 0);
    let fetched = s.fetched_peer + s.fetched_origin;
    eprintln!(
        "lazy start: read {} bytes, fetched {fetched} of {} stored ({:.1}%)",
        s.read_bytes,
        s.image_stored_bytes,
        100.0 * s.image_fetched_ratio
    );
    assert!(
        s.image_fetched_ratio < 0.5 && s.image_stored_bytes > UNREAD as u64,
        "a lazy start fetches a small share of the image: {s:?}"
    );
    assert!(fetched > 0, "{s:?}");
    // What the node took from the registry: the peer fetched only the pieces the reads covered
    // (their piece table from the bootstrap), never the data blob whole.
    let served: u64 = node
        .registry
        .access_log()
        .await
        .iter()
        .filter(|e| e.path.contains("/blobs/"))
        .map(|e| e.bytes)
        .sum();
    eprintln!("the registry served {served} bytes of blobs for the pull and the run");
    assert!(
        served < s.image_stored_bytes / 2,
        "the node fetched {served} bytes of a {}-byte image: not lazy",
        s.image_stored_bytes
    );
    let status = Command::new(shoal_bin())
        .args(["status", "--api"])
        .arg(&shoal.peer_socket)
        .arg("--snapshotter-root")
        .arg(shoal.root(&node.ctrd))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("lazy images: 1") && text.contains("shoal-test/lazy:1"),
        "{text}"
    );

    // A plain OCI image through the same snapshotter: containerd unpacks it.
    let plain = node
        .push(&work.layout(node.dir(), "plain"), "shoal-test/plain", "1")
        .await;
    node.cri
        .pull(&plain, None)
        .await
        .expect("PullImage of a plain image");
    let (exit, log) = node
        .cri
        .run(&pod, work.spec(&plain), MINUTE)
        .await
        .expect("plain run");
    work.check(&exit, &log);

    // A flipped byte in the node's cache: the mount process is gone (its memory cache with it),
    // the next container gets a new mount over the same disk cache, and still reads right bytes.
    let root = shoal.root(&node.ctrd);
    let flipped = flip_cached_chunks(&root.join("images"));
    assert!(flipped > 0, "no cached chunk found to corrupt");
    for (_, pid) in shoal
        .pids()
        .into_iter()
        .filter(|(n, _)| n == "shoal-fs-mount")
    {
        // SAFETY: kill(2) on a mount process of this test's snapshotter.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let (exit, log) = node
        .cri
        .run(&pod, work.spec(&image), MINUTE)
        .await
        .expect("run after corruption");
    work.check(&exit, &log);
    let s = wait_stats(shoal, &node.ctrd, |s| {
        s.verify_failures > 0 && s.read_bytes > 0
    });
    eprintln!("after flipping {flipped} cached bytes: {} chunks failed verification and were fetched again", s.verify_failures);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_snapshotter_leaves_running_containers_reading() {
    let Some(mut node) = Node::start(NodeOpts {
        shoal: true,
        ..NodeOpts::default()
    })
    .await
    else {
        return;
    };
    // Ten files of 2 MiB, read one every 400 ms: the reads span the snapshotter's death.
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| {
            (
                format!("/data/f{i}"),
                shoal_testkit::random_bytes(2 << 20, 100 + i),
            )
        })
        .collect();
    let work = Workload { files };
    let layout = image_with_unread_bytes(&work, node.dir(), "slow");
    let image = format!("{}/shoal-test/slow:1", node.registry.host());
    tokio::task::block_in_place(|| convert_and_push(&layout, &image));
    let pod = node.cri.run_pod("slow").await.expect("RunPodSandbox");
    node.cri.pull(&image, None).await.expect("PullImage");
    let script = work
        .files
        .iter()
        .map(|(p, _)| format!("/bin/busybox sha256sum {p}; /bin/busybox sleep 0.4"))
        .collect::<Vec<_>>()
        .join("; ");
    let spec = ContainerSpec::new(&image).command(["/bin/sh", "-c", &script]);
    let c = node.cri.create(&pod, spec).await.expect("CreateContainer");
    node.cri.start(&c).await.expect("StartContainer");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let ctrd = &node.ctrd;
    let shoal = node.shoal.as_mut().expect("shoal parts");
    shoal.kill_snapshotter();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    shoal
        .start_snapshotter(ctrd)
        .expect("restarting the snapshotter");
    let exit = node
        .cri
        .wait_exit(&c, MINUTE)
        .await
        .expect("the container exits");
    let log = node.cri.logs(&c).expect("its log");
    work.check(&exit, &log);
    // New containers start after the restart (state and mount adopted).
    let (exit, log) = node
        .cri
        .run(&pod, work.spec(&image), MINUTE)
        .await
        .expect("a new container");
    work.check(&exit, &log);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_image_pull_serves_ctr_run() {
    let Some(node) = Node::start(NodeOpts {
        shoal: true,
        ..NodeOpts::default()
    })
    .await
    else {
        return;
    };
    let work = Workload::standard();
    let layout = image_with_unread_bytes(&work, node.dir(), "ctr");
    let image = format!("{}/shoal-test/ctr:1", node.registry.host());
    tokio::task::block_in_place(|| convert_and_push(&layout, &image));
    let out = Command::new(shoal_bin())
        .args([
            "image",
            "pull",
            &image,
            "--namespace",
            "k8s.io",
            "--containerd",
        ])
        .arg(node.ctrd.socket())
        .output()
        .expect("shoal image pull");
    assert!(
        out.status.success(),
        "shoal image pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut args = vec![
        "run",
        "--rm",
        "--snapshotter",
        "shoal",
        &image,
        "shoal-pull-1",
    ];
    args.push("/bin/busybox");
    args.push("sha256sum");
    let paths: Vec<&str> = work.files.iter().map(|(p, _)| p.as_str()).collect();
    args.extend(paths);
    let printed = node.ctrd.ctr(&args).expect("ctr run --snapshotter shoal");
    assert_eq!(
        printed.trim_end(),
        work.expected(),
        "the files' sha256 in the image"
    );
    let s = wait_stats(node.shoal.as_ref().expect("shoal parts"), &node.ctrd, |s| {
        s.read_bytes > 0
    });
    assert!(s.image_fetched_ratio < 0.5, "{s:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_starts_lazily_with_credentials_and_fails_cleanly_without() {
    let Some(node) = Node::start(NodeOpts {
        auth: RegistryAuth::Basic {
            user: "shoal".into(),
            password: "s3cret-pass".into(),
        },
        shoal: true,
        ..NodeOpts::default()
    })
    .await
    else {
        return;
    };
    let auth = node.auth.clone().expect("the registry wants credentials");
    let work = Workload::standard();
    let layout = image_with_unread_bytes(&work, node.dir(), "private");
    let image = format!("{}/shoal-test/private:1", node.registry.host());
    tokio::task::block_in_place(|| convert_and_push_as(&layout, &image, Some(&auth)));

    let err = node
        .cri
        .pull(&image, None)
        .await
        .expect_err("a pull without credentials");
    assert!(
        err.message().contains("401"),
        "the error names the refusal: {err}"
    );
    assert!(
        node.cri
            .image_status(&image)
            .await
            .expect("ImageStatus")
            .is_none(),
        "a refused pull leaves no image"
    );
    // With credentials: the bootstrap and every chunk are fetched with what containerd sent the
    // proxy (Kubernetes pull secrets never reach the snapshotter).
    node.cri
        .pull(&image, Some(&auth))
        .await
        .expect("PullImage with credentials");
    let pod = node.cri.run_pod("private").await.expect("RunPodSandbox");
    let (exit, log) = node
        .cri
        .run(&pod, work.spec(&image), MINUTE)
        .await
        .expect("the container runs");
    work.check(&exit, &log);
    let s = wait_stats(node.shoal.as_ref().expect("shoal parts"), &node.ctrd, |s| {
        s.read_bytes > 0
    });
    assert!(s.image_fetched_ratio < 0.5 && s.read_errors == 0, "{s:?}");
    node.stop().await;
}
