//! The containerd fixture's namespace: helpers started in it share containerd's mounts, nothing of
//! it is seen outside, and stop or drop leaves no process, cgroup, mount or file behind.

use std::process::Command;
use std::time::{Duration, Instant};

use shoal_testkit::{or_skip, sandbox_image, CgroupScope, Containerd, ContainerdOpts, Registry};

/// A sandbox image that is never pulled here (no pod is started).
const NO_SANDBOX: &str = "127.0.0.1:1/none/pause:1";

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helpers_share_containerds_mounts_and_stop_leaves_nothing() {
    let Some(ctrd) = or_skip(Containerd::start(ContainerdOpts::new(NO_SANDBOX)).await) else {
        return;
    };
    let dir = ctrd.dir().to_path_buf();
    let mnt = dir.join("helper-mnt");
    let script = format!(
        "mkdir -p {m} && mount -t tmpfs helper {m} && echo hi > {m}/f && exec sleep 600",
        m = mnt.display()
    );
    let mut helper = ctrd
        .ns()
        .spawn("helper", Command::new("/bin/sh").args(["-c", &script]))
        .expect("a helper in containerd's namespace");
    let inside = ctrd.ns().path(&mnt.join("f"));
    wait_for("the helper's mount", || inside.exists());
    assert_eq!(std::fs::read_to_string(&inside).unwrap(), "hi\n");
    assert!(
        !mnt.join("f").exists(),
        "the helper's mount is not seen outside the namespace"
    );
    assert!(
        ctrd.mounts().iter().any(|m| m.contains("helper-mnt")),
        "containerd's namespace has the helper's mount: {:?}",
        ctrd.mounts()
    );
    assert!(
        ctrd.ns()
            .mounts()
            .iter()
            .any(|m| m.contains(" /run ") && m.contains("shoal-test-run")),
        "its own tmpfs on /run"
    );
    // containerd's root is a tmpfs of its own namespace.
    assert!(ctrd.mounts().iter().any(|m| m.contains("/root ")));

    // Killed and started again (a snapshotter restart): one log, two starts.
    let first = helper.pid();
    helper.kill();
    assert!(!alive(first));
    let helper = ctrd
        .ns()
        .spawn("helper", Command::new("/bin/sleep").arg("600"))
        .expect("the helper again");
    let log = std::fs::read_to_string(helper.log_path()).unwrap();
    assert_eq!(log.matches("==== start").count(), 2, "{log}");
    let pid = helper.pid();
    std::mem::forget(helper); // stop() must find and kill it by its namespace.

    let report = ctrd.stop().await.expect("a clean teardown");
    assert_eq!(report.lingering.len(), 1, "the helper: {report:?}");
    assert!(!alive(pid), "the helper is gone");
    assert!(!dir.exists(), "the temp dir is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_kills_pods_and_helpers() {
    let Some(reg) = or_skip(Registry::start(Default::default()).await) else {
        return;
    };
    let layouts = tempfile::tempdir().unwrap();
    let Some(pause) = or_skip(sandbox_image(layouts.path())) else {
        return;
    };
    let sandbox = pause.push(&reg, "t/pause", "1").await.unwrap();
    let Some(ctrd) = or_skip(Containerd::start(ContainerdOpts::new(&sandbox)).await) else {
        return;
    };
    ctrd.add_registry(&reg.host(), None).unwrap();
    let cri = ctrd.cri().await.unwrap();
    let pod = cri.run_pod("dropped").await.expect("RunPodSandbox");
    let helper = ctrd
        .ns()
        .spawn("sleeper", Command::new("/bin/sleep").arg("600"))
        .expect("a helper");
    let pid = helper.pid();
    std::mem::forget(helper);
    let dir = ctrd.dir().to_path_buf();
    let holder = ctrd.ns().holder_pid();
    let cgroups: Vec<_> = CgroupScope::below_own(ctrd.cgroup_parent()).dirs().to_vec();
    assert!(
        cgroups
            .iter()
            .any(|d| d.join(&pod.id).exists() || d.exists()),
        "the pod has cgroups below the test's: {cgroups:?}"
    );
    let pause_pids: Vec<u32> = cgroups
        .iter()
        .flat_map(|d| std::fs::read_to_string(d.join(&pod.id).join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    assert!(
        !pause_pids.is_empty(),
        "the pause process is in the pod's cgroup, below the test's own"
    );

    drop(ctrd); // as when a test panics

    assert!(!alive(pid) && !alive(holder), "helper and holder are gone");
    assert!(
        pause_pids.iter().all(|p| !alive(*p)),
        "the pod's processes are gone"
    );
    assert!(!dir.exists(), "the temp dir is gone");
    assert!(cgroups.iter().all(|d| !d.exists()), "the cgroups are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_toml_sends_pulls_through_the_mirror() {
    let Some(reg) = or_skip(Registry::start(Default::default()).await) else {
        return;
    };
    let layouts = tempfile::tempdir().unwrap();
    let Some(pause) = or_skip(sandbox_image(layouts.path())) else {
        return;
    };
    pause.push(&reg, "t/pause", "1").await.unwrap();
    let Some(ctrd) = or_skip(Containerd::start(ContainerdOpts::new(NO_SANDBOX)).await) else {
        return;
    };
    // Nothing listens on the registry named in the reference: only the mirror can answer.
    let nobody = format!("127.0.0.1:{}", shoal_testkit::free_port().unwrap());
    ctrd.add_registry(&nobody, Some(&reg.url())).unwrap();
    let cri = ctrd.cri().await.unwrap();
    cri.pull(&format!("{nobody}/t/pause:1"), None)
        .await
        .expect("pulled through the mirror");
    assert!(
        !ctrd.log_tail(1000).contains("hosts.toml"),
        "containerd took the hosts.toml: {}",
        ctrd.log_tail(20)
    );
    let log = reg.access_log().await;
    assert!(
        log.iter()
            .any(|e| e.path.contains("/v2/t/pause/manifests/1")),
        "{log:?}"
    );
    ctrd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shoal_proxy_plugin_is_configured_before_the_snapshotter_runs() {
    let opts = ContainerdOpts::new(NO_SANDBOX).with_shoal_snapshotter("snap.sock");
    let Some(ctrd) = or_skip(Containerd::start(opts).await) else {
        return;
    };
    assert_eq!(ctrd.shoal_socket(), Some(ctrd.dir().join("snap.sock")));
    let plugins = ctrd.ctr(&["plugins", "ls"]).expect("ctr plugins ls");
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1") && l.contains(" shoal ")),
        "{plugins}"
    );
    let cri = ctrd
        .cri()
        .await
        .expect("the CRI answers without the snapshotter");
    cri.version().await.expect("CRI Version");
    ctrd.stop().await.expect("a clean teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_namespace_keeps_the_cgroup_mounts() {
    if or_skip(Containerd::start(ContainerdOpts::new(NO_SANDBOX)).await).is_none() {
        return; // not root or no containerd: skipped with the reason printed
    }
    let name = format!("shoal-tk-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip netns add {name}");
    let ctrd = Containerd::start(ContainerdOpts {
        netns: Some(name.clone()),
        ..ContainerdOpts::new(NO_SANDBOX)
    })
    .await;
    let probe = ctrd.as_ref().map_err(|e| e.to_string()).map(|c| {
        let out = |args: &[&str]| {
            let o = c.ns().command(args[0]).args(&args[1..]).output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        (
            out(&["ip", "-o", "link"]),
            out(&["cat", "/proc/self/mountinfo"]),
        )
    });
    if let Ok(c) = ctrd {
        c.stop().await.expect("a clean teardown");
    }
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    let (links, mounts) = probe.expect("containerd in a network namespace");
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    // runc needs them ("no cgroup mount found in mountinfo" under `ip netns exec`).
    assert!(mounts.contains(" - cgroup"), "{mounts}");
}
