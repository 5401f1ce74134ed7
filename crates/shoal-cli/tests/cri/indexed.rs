//! The Shoal snapshotter with an unconverted image that has a Shoal index (`shoal image index`):
//! every layer is its own lazy mount, the container's overlay stacks them, the registry serves
//! a small part of the image; a plain image sharing a layer with it runs beside it; a span the
//! registry serves corrupted never reaches a reader.

use std::process::Command;

use shoal_testkit::{ContainerSpec, Containerd, LayerBuilder, OciLayout, Registry, ShoalNode};

use crate::node::{
    image_of, image_stats, image_with_unread_bytes, layers_with_unread_bytes, shoal_bin,
    wait_stats, Node, NodeOpts, Workload, MINUTE,
};

/// Indexes `reference` with `shoal image index` (the index pushed beside it as a referrer);
/// returns its report.
fn index_image(reference: &str) -> serde_json::Value {
    let out = Command::new(shoal_bin())
        .args(["image", "index", &format!("docker://{reference}")])
        .args(["--span", "1M", "--json"])
        .output()
        .expect("running shoal image index");
    assert!(
        out.status.success(),
        "shoal image index failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the index report")
}

/// Flips one byte of `file` at `at`.
fn flip_byte(file: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x55], at).unwrap();
}

/// Bytes the registry sent for repository `repo` in successful GETs.
async fn served(reg: &Registry, repo: &str) -> u64 {
    let needle = format!("/v2/{repo}/");
    reg.access_log()
        .await
        .iter()
        .filter(|e| e.method == "GET" && (200..300).contains(&e.status) && e.path.contains(&needle))
        .map(|e| e.bytes)
        .sum()
}

/// The layers the snapshotter mounted lazily, once `n` of them are.
fn wait_layers(shoal: &ShoalNode, ctrd: &Containerd, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut layers: Vec<String> = image_stats(shoal, ctrd)
            .into_iter()
            .filter_map(|(info, _)| info.layer)
            .collect();
        if layers.len() >= n || std::time::Instant::now() > deadline {
            layers.sort();
            return layers;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Bytes of the image's layers.
fn image_bytes(layout: &OciLayout) -> u64 {
    layout.layers.iter().map(|l| l.size).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_plain_images_start_lazily_and_bad_spans_are_not_served() {
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
    let layout = image_with_unread_bytes(&work, node.dir(), "indexed");
    let repo = "shoal-test/indexed";
    let image = node.push(&layout, repo, "1").await;
    tokio::task::block_in_place(|| index_image(&image));
    let total = image_bytes(&layout);
    let before = served(&node.registry, repo).await;

    let pod = node.cri.run_pod("indexed").await.expect("RunPodSandbox");
    node.cri
        .pull(&image, None)
        .await
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", shoal.snapshotter_log()));
    let pulled = served(&node.registry, repo).await - before;
    // The files layer is its own lazy mount (the busybox layer below it is the sandbox
    // image's too: that one was unpacked already, and its chain id is simply reused).
    let lazy = wait_layers(shoal, &node.ctrd, 1);
    assert_eq!(
        lazy,
        [layout.layers[1].digest.clone()],
        "the files layer is mounted lazily\n{}",
        shoal.snapshotter_log()
    );
    assert!(
        pulled * 20 < total,
        "the pull of an indexed image fetched {pulled} of {total} bytes"
    );

    let (exit, log) = node
        .cri
        .run(&pod, work.spec(&image), MINUTE)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "running on the layer mounts: {e}\n{}",
                shoal.snapshotter_log()
            )
        });
    work.check(&exit, &log);
    let ran = served(&node.registry, repo).await - before;
    eprintln!(
        "indexed lazy start: the registry served {pulled} bytes for the pull, {ran} after the run, of {total} bytes of layers ({:.1}%)",
        100.0 * ran as f64 / total as f64
    );
    assert!(
        ran * 4 < total,
        "a lazy start of an indexed image fetched {ran} of {total} bytes"
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
        text.contains("shoal-test/indexed:1") && text.contains("(layer sha256:"),
        "{text}"
    );

    // A plain image without an index whose lower layers are the indexed image's: their chain
    // ids are the same, so it stacks its own unpacked layer (which hides one of the files and
    // adds one) on the same lazy mounts.
    let mut tars = layers_with_unread_bytes(&work);
    let mut top = LayerBuilder::new();
    top.file("/data/.wh.hello.txt", b"", 0o644)
        .expect("whiteout");
    top.file("/data/added.txt", b"added on top\n", 0o644)
        .expect("tar entry");
    tars.push(top.finish().expect("top layer"));
    let plain_layout = image_of(node.dir(), "plain", &tars);
    let digests =
        |l: &[shoal_testkit::LayerDesc]| l.iter().map(|d| d.digest.clone()).collect::<Vec<_>>();
    assert_eq!(
        digests(&plain_layout.layers[..2]),
        digests(&layout.layers),
        "the plain image's lower layers are the indexed image's"
    );
    let plain = node.push(&plain_layout, "shoal-test/plain", "1").await;
    node.cri
        .pull(&plain, None)
        .await
        .expect("PullImage of a plain image");
    let mut on_top = Workload {
        files: work
            .files
            .iter()
            .filter(|(p, _)| p != "/data/hello.txt")
            .cloned()
            .collect(),
    };
    on_top
        .files
        .push(("/data/added.txt".into(), b"added on top\n".to_vec()));
    let (exit, log) = node
        .cri
        .run(&pod, on_top.spec(&plain), MINUTE)
        .await
        .expect("plain run");
    on_top.check(&exit, &log);
    let spec = ContainerSpec::new(&plain).command(["/bin/busybox", "ls", "/data"]);
    let (exit, log) = node.cri.run(&pod, spec, MINUTE).await.expect("ls run");
    assert_eq!(exit.code, 0, "{}", log.stderr());
    assert!(
        !log.stdout().contains("hello.txt") && log.stdout().contains("added.txt"),
        "the top layer's whiteout and file over the lazy layers: {}",
        log.stdout()
    );
    assert_eq!(
        wait_layers(shoal, &node.ctrd, 1),
        [layout.layers[1].digest.clone()],
        "the shared layer is the same lazy mount"
    );
    let plain_top = &plain_layout.layers[2];
    assert!(
        node.registry.blob_bytes_served(&plain_top.digest).await >= plain_top.size,
        "the plain image's own layer is pulled the ordinary way"
    );

    // A flipped byte in the registry's copy of the big file's span: the peer's piece check
    // and the chunk's BLAKE3 refuse it, the reader gets an error, never the wrong bytes.
    let files = &layout.layers[1];
    let blob = node
        .registry
        .blob_file(&files.digest)
        .expect("the registry's file of the layer");
    flip_byte(&blob, files.size - (8 << 20));
    let spec = ContainerSpec::new(&image).command(["/bin/busybox", "sha256sum", "/opt/unread.bin"]);
    let (exit, log) = node
        .cri
        .run(&pod, spec, MINUTE)
        .await
        .expect("the reading container runs");
    eprintln!(
        "reading a corrupted span: exit {:?}, stderr {:?}",
        exit.code,
        log.stderr()
    );
    assert_ne!(exit.code, 0, "a corrupted span was read: {}", log.stdout());
    assert!(
        !log.stdout().contains("/opt/unread.bin"),
        "a checksum of corrupted bytes: {}",
        log.stdout()
    );
    let s = wait_stats(shoal, &node.ctrd, |s| {
        s.verify_failures > 0 || s.read_errors > 0
    });
    assert!(
        s.verify_failures > 0 || s.read_errors > 0,
        "the corruption shows in the counters: {s:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_index_falls_back_to_the_ordinary_pull() {
    let Some(node) = Node::start(NodeOpts {
        shoal: true,
        ..NodeOpts::default()
    })
    .await
    else {
        return;
    };
    let shoal = node.shoal.as_ref().expect("shoal parts");
    let work = Workload {
        files: vec![(
            "/data/bad-index.bin".into(),
            shoal_testkit::random_bytes(2 << 20, 30),
        )],
    };
    let layout = work.layout(node.dir(), "bad-index");
    let image = node.push(&layout, "shoal-test/bad-index", "1").await;
    let report = tokio::task::block_in_place(|| index_image(&image));
    // The files layer's bootstrap as the registry serves it: one byte off.
    let boot = report["layers"][1]["bootstrap"][0]
        .as_str()
        .expect("the layer's bootstrap in the report")
        .to_string();
    let file = node
        .registry
        .blob_file(&boot)
        .expect("the registry's file of the bootstrap");
    flip_byte(&file, 100);

    let pod = node.cri.run_pod("bad-index").await.expect("RunPodSandbox");
    node.cri
        .pull(&image, None)
        .await
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", shoal.snapshotter_log()));
    let (exit, log) = node
        .cri
        .run(&pod, work.spec(&image), MINUTE)
        .await
        .expect("run");
    work.check(&exit, &log);
    let lazy: Vec<_> = image_stats(shoal, &node.ctrd)
        .into_iter()
        .filter_map(|(info, _)| info.layer)
        .collect();
    assert!(
        lazy.is_empty(),
        "a layer mounted from a bad bootstrap: {lazy:?}"
    );
    let files = &layout.layers[1];
    assert!(
        node.registry.blob_bytes_served(&files.digest).await >= files.size,
        "the layer is pulled the ordinary way"
    );
    let log = shoal.snapshotter_log();
    assert!(
        log.contains("unpacking it the ordinary way") && log.contains("sha256"),
        "the snapshotter says why: {log}"
    );
    node.stop().await;
}
