//! The README demo's last stage: a container started by containerd's CRI, the way kubelet starts
//! it, on a lazily mounted Shoal image. A private containerd 1.6 with its CRI plugin and the
//! `shoal` snapshotter, a `shoal peer` whose registry proxy is containerd's mirror, then
//! RunPodSandbox, PullImage, CreateContainer, StartContainer of IMAGE, its log, what the lazy
//! mount read and fetched, and a teardown that removes the image (and with it the mount).
//!
//! ```sh
//! cri_demo SHOAL_BIN REGISTRY IMAGE -- COMMAND...   # as root
//! ```

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_testkit::{sandbox_image, ContainerSpec, Containerd, ContainerdOpts, ShoalNode};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(split) = args.iter().position(|a| a == "--") else {
        eprintln!("usage: cri_demo SHOAL_BIN REGISTRY IMAGE -- COMMAND...");
        std::process::exit(2);
    };
    let (head, cmd) = (&args[..split], &args[split + 1..]);
    let [bin, registry, image] = head else {
        eprintln!("usage: cri_demo SHOAL_BIN REGISTRY IMAGE -- COMMAND...");
        std::process::exit(2);
    };
    if let Err(e) = run(Path::new(bin), registry, image, cmd).await {
        eprintln!("the CRI demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run(bin: &Path, registry: &str, image: &str, cmd: &[String]) -> Res<()> {
    let dir = tempfile::tempdir()?;
    let pause = sandbox_image(&dir.path().join("pause"))?;
    let sandbox = push(&pause, registry)?;
    let ctrd = Containerd::start(
        ContainerdOpts::new(&sandbox).with_shoal_snapshotter("shoal-snapshotter.sock"),
    )
    .await?;
    let shoal = ShoalNode::start(bin, dir.path(), registry, &ctrd)?;
    let cri = ctrd.cri().await?;
    let pod = cri.run_pod("demo").await?;
    println!(
        "containerd {} with its CRI plugin and the `shoal` snapshotter; pod {} (host network)",
        cri.version().await?.runtime_version,
        pod.id
    );
    let t = Instant::now();
    cri.pull(image, None).await?;
    let pulled = t.elapsed();
    let (exit, log) = cri
        .run(
            &pod,
            ContainerSpec::new(image).command(cmd.iter().cloned()),
            Duration::from_secs(120),
        )
        .await?;
    let total = t.elapsed();
    for line in log.stdout().lines() {
        println!("  container: {line}");
    }
    println!(
        "PullImage {:.2} s (manifest, config and bootstrap only), container exited {} after {:.2} s in all",
        pulled.as_secs_f64(),
        exit.code,
        total.as_secs_f64()
    );
    // Mount processes write their counters once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = Command::new(bin)
        .args(["status", "--api"])
        .arg(&shoal.peer_socket)
        .arg("--snapshotter-root")
        .arg(shoal.root(&ctrd))
        .output()?;
    print!("{}", String::from_utf8_lossy(&status.stdout));

    // As kubelet's GC would: the pod, then the image; the lazy mount goes with its snapshots.
    let errors = cri.remove_all_pods().await;
    for i in cri.list_images().await? {
        cri.remove_image(&i.id).await?;
    }
    let left = shoal
        .pids()
        .into_iter()
        .filter(|(n, _)| n == "shoal-fs-mount")
        .count();
    shoal.stop()?;
    let report = ctrd.stop().await?;
    if exit.code != 0 || !errors.is_empty() || left != 0 || !report.lingering.is_empty() {
        return Err(format!(
            "exit {} (stderr: {}), pod removal errors {errors:?}, {left} mount processes left, lingering {:?}",
            exit.code,
            log.stderr(),
            report.lingering
        )
        .into());
    }
    println!("removed the pod and the image: the lazy mount went with them");
    Ok(())
}

/// Pushes the sandbox image's layout to the registry as demo/pause:1 (skopeo).
fn push(layout: &shoal_testkit::OciLayout, registry: &str) -> Res<String> {
    let reference = format!("{registry}/demo/pause:1");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:pause", layout.dir.display()))
        .arg(format!("docker://{reference}"))
        .output()?;
    if !out.status.success() {
        return Err(format!("skopeo: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(reference)
}
