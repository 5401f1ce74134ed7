//! containerd's own overlayfs snapshotter: proves the test ground (the baseline every Shoal
//! snapshotter scenario is compared with).

use std::path::Path;
use std::time::{Duration, Instant};

use shoal_testkit::{RegistryAuth, OVERLAYFS};

use crate::node::{Node, NodeOpts, Workload, MINUTE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_image_runs_on_overlayfs() {
    let Some(node) = Node::start(NodeOpts::default()).await else {
        return;
    };
    let conditions = node.cri.conditions().await.expect("CRI status");
    assert!(
        conditions.contains(&("RuntimeReady".into(), true)),
        "{conditions:?}"
    );
    let work = Workload::standard();
    let image = node
        .push(&work.layout(node.dir(), "plain"), "shoal-test/plain", "1")
        .await;

    let pod = node.cri.run_pod("plain").await.expect("RunPodSandbox");
    assert!(
        node.cri
            .image_status(&node.sandbox)
            .await
            .expect("ImageStatus")
            .is_some(),
        "RunPodSandbox pulled the sandbox image"
    );
    let id = node.cri.pull(&image, None).await.expect("PullImage");
    assert!(id.starts_with("sha256:"), "{id}");
    let c = node
        .cri
        .create(&pod, work.spec(&image))
        .await
        .expect("CreateContainer");
    node.cri.start(&c).await.expect("StartContainer");
    let exit = node
        .cri
        .wait_exit(&c, MINUTE)
        .await
        .expect("the container exits");
    let log = node.cri.logs(&c).expect("the container's log");
    work.check(&exit, &log);
    assert!(
        exit.finished_at >= exit.started_at && exit.started_at > 0,
        "{exit:?}"
    );

    // The image and the container's rootfs are overlayfs snapshots, in containerd's namespace;
    // the CRI reports their usage (synced every second) for the snapshotter's root.
    let root = node.ctrd.snapshotter_root(OVERLAYFS);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fs = node.cri.image_fs_info().await.expect("ImageFsInfo");
        let usage = fs
            .iter()
            .find(|u| {
                u.fs_id
                    .as_ref()
                    .is_some_and(|f| root == Path::new(&f.mountpoint))
            })
            .unwrap_or_else(|| panic!("no image fs at {}: {fs:?}", root.display()));
        if usage.used_bytes.as_ref().is_some_and(|b| b.value > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "image fs usage stays 0: {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        node.ctrd.mounts().iter().any(|m| m.contains(" - overlay ")),
        "containers' rootfs are overlay mounts: {:?}",
        node.ctrd.mounts()
    );
    let ctr_images = node
        .ctrd
        .ctr(&["images", "ls", "-q"])
        .expect("ctr images ls");
    assert!(ctr_images.contains(&image), "{ctr_images}");

    node.cri.remove(&c).await.expect("RemoveContainer");
    node.cri.stop_pod(&pod).await.expect("StopPodSandbox");
    node.cri.remove_pod(&pod).await.expect("RemovePodSandbox");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registry_needs_credentials() {
    let Some(node) = Node::start(NodeOpts {
        auth: RegistryAuth::Basic {
            user: "shoal".into(),
            password: "s3cret-pass".into(),
        },
        ..NodeOpts::default()
    })
    .await
    else {
        return;
    };
    let auth = node.auth.clone().expect("the registry wants credentials");
    let work = Workload::standard();
    let image = node
        .push(
            &work.layout(node.dir(), "private"),
            "shoal-test/private",
            "1",
        )
        .await;

    let err = node
        .cri
        .pull(&image, None)
        .await
        .expect_err("a pull without credentials");
    assert!(
        err.message().contains("401 Unauthorized"),
        "the error names the refusal: {err}"
    );
    let wrong = shoal_testkit::Auth {
        password: "wrong".into(),
        ..auth.clone()
    };
    let err = node
        .cri
        .pull(&image, Some(&wrong))
        .await
        .expect_err("a wrong password");
    assert!(err.message().contains("401 Unauthorized"), "{err}");
    assert!(
        node.cri
            .image_status(&image)
            .await
            .expect("ImageStatus")
            .is_none(),
        "a refused pull leaves no image"
    );

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
    node.stop().await;
}
