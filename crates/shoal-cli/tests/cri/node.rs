//! The scenario harness of the CRI tests: a node (a registry, a containerd with its CRI, the
//! sandbox image pushed) and a workload image whose program prints the sha256 of its files.
//!
//! ```ignore
//! let Some(node) = Node::start(NodeOpts::default()).await else { return };
//! let image = node.push(&Workload::standard().layout(node.dir())?, "work/plain", "1").await;
//! let pod = node.cri.run_pod("plain").await?;
//! node.cri.pull(&image, None).await?;
//! let (exit, log) = node.cri.run(&pod, Workload::standard().spec(&image), MINUTE).await?;
//! Workload::standard().check(&exit, &log);
//! node.stop().await;
//! ```

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use shoal_testkit::ShoalNode;

/// The `shoal` binary under test.
pub fn shoal_bin() -> &'static str {
    env!("CARGO_BIN_EXE_shoal")
}
use shoal_testkit::{
    or_skip, sandbox_image, write_layout, Auth, ContainerLog, ContainerSpec, Containerd,
    ContainerdOpts, Cri, Exit, ImageConfig, LayerBuilder, OciLayout, Registry, RegistryAuth,
    RegistryOpts,
};

/// How long a container of these tests may run.
pub const MINUTE: Duration = Duration::from_secs(60);

/// What a node is made of.
#[derive(Default)]
pub struct NodeOpts {
    /// The registry's authentication (anonymous or htpasswd).
    pub auth: RegistryAuth,
    /// Changes to containerd's options (snapshotter, proxy plugin, network namespace);
    /// `None`: overlayfs.
    pub containerd: Option<Box<dyn FnOnce(ContainerdOpts) -> ContainerdOpts + Send>>,
    /// Run Shoal's node parts: the CRI's snapshotter is `shoal`, pulls go through a peer's
    /// registry proxy.
    pub shoal: bool,
}

/// A registry and a containerd whose CRI pulls from it (the sandbox image already pushed).
pub struct Node {
    /// The registry (htpasswd when `NodeOpts::auth` says so).
    pub registry: Registry,
    /// containerd, its namespace and its config.
    pub ctrd: Containerd,
    /// A CRI client on it.
    pub cri: Cri,
    /// The credentials the registry wants, if it wants any.
    pub auth: Option<Auth>,
    /// The sandbox image's reference.
    pub sandbox: String,
    /// The peer and the snapshotter, with `NodeOpts::shoal`.
    pub shoal: Option<ShoalNode>,
    dir: tempfile::TempDir,
}

impl Node {
    /// Starts the node, or prints why the test is skipped (not root, a tool missing) and
    /// returns `None`; never skips under `CI=true`.
    pub async fn start(opts: NodeOpts) -> Option<Node> {
        let registry = or_skip(
            Registry::start(RegistryOpts {
                auth: opts.auth.clone(),
            })
            .await,
        )?;
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = or_skip(sandbox_image(&dir.path().join("pause")))?;
        let sandbox = layout
            .push(&registry, "shoal-test/pause", "1")
            .await
            .expect("pushing the sandbox image");
        let mut co = ContainerdOpts::new(&sandbox);
        if opts.shoal {
            co = co.with_shoal_snapshotter("shoal-snapshotter.sock");
        }
        if let Some(f) = opts.containerd {
            co = f(co);
        }
        let ctrd = or_skip(Containerd::start(co).await)?;
        ctrd.add_registry(&registry.host(), None)
            .expect("hosts.toml for the registry");
        let shoal = opts.shoal.then(|| {
            ShoalNode::start(shoal_bin().as_ref(), dir.path(), &registry.host(), &ctrd)
                .expect("the node's shoal peer and snapshotter")
        });
        let cri = ctrd.cri().await.expect("CRI client");
        let auth = match &opts.auth {
            RegistryAuth::Basic { user, password } => Some(Auth {
                user: user.clone(),
                password: password.clone(),
            }),
            _ => None,
        };
        if auth.is_some() {
            // containerd pulls the sandbox image without credentials: a node with a private
            // registry has it already (kubelet's pull of it, or a node image).
            cri.pull(&sandbox, auth.as_ref())
                .await
                .expect("pulling the sandbox image with credentials");
        }
        Some(Node {
            registry,
            ctrd,
            cri,
            auth,
            sandbox,
            shoal,
            dir,
        })
    }

    /// A scratch directory for image layouts.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Pushes a layout to `repo:tag`; returns its CRI reference.
    pub async fn push(&self, layout: &OciLayout, repo: &str, tag: &str) -> String {
        layout
            .push(&self.registry, repo, tag)
            .await
            .unwrap_or_else(|e| panic!("pushing {repo}:{tag}: {e}"))
    }

    /// Stops containerd and checks that nothing of it is left (processes, namespace, cgroups,
    /// mounts, files), and that no shim or container outlived its pod.
    pub async fn stop(self) {
        let Node {
            ctrd,
            registry,
            shoal,
            cri,
            ..
        } = self;
        if let Some(shoal) = shoal.as_ref() {
            // As kubelet's image GC would: pods, then images. containerd's CRI deletes images with
            // a synchronous GC, so each lazy image's snapshots reach the snapshotter's Remove and
            // its mount goes with the last of them; no mount process may outlive that.
            let errors = cri.remove_all_pods().await;
            assert!(errors.is_empty(), "removing pods: {errors:?}");
            for image in cri.list_images().await.expect("ListImages") {
                cri.remove_image(&image.id).await.expect("RemoveImage");
            }
            assert_no_lazy_images(shoal, &ctrd);
        }
        if let Some(s) = shoal {
            s.stop()
                .expect("the snapshotter and the peer stop on SIGTERM");
        }
        let log = ctrd.log_tail(100_000);
        assert!(
            !log.contains("failed to decode hosts.toml"),
            "containerd refused the registry config: {log}"
        );
        let report = ctrd.stop().await.expect("a clean containerd teardown");
        assert!(
            report.cri_errors.is_empty(),
            "removing pods: {:?}",
            report.cri_errors
        );
        assert!(
            report.lingering.is_empty(),
            "processes outlived their pods and containerd: {:?}",
            report.lingering
        );
        drop(registry);
    }
}

/// A workload image: busybox and some files; its program prints their sha256.
pub struct Workload {
    /// (absolute path in the image, content).
    pub files: Vec<(String, Vec<u8>)>,
}

impl Workload {
    /// Files of several shapes: empty, small, just over 1 MiB, a few MiB of noise, nested.
    pub fn standard() -> Workload {
        let files = vec![
            ("/data/empty".into(), Vec::new()),
            (
                "/data/hello.txt".into(),
                b"hello from a CRI container\n".to_vec(),
            ),
            (
                "/data/one-mib-and-one".into(),
                shoal_testkit::random_bytes((1 << 20) + 1, 1),
            ),
            (
                "/data/deep/a/b/c/noise.bin".into(),
                shoal_testkit::random_bytes(3 << 20, 2),
            ),
            ("/etc/shoal-test.conf".into(), b"key = value\n".repeat(100)),
        ];
        Workload { files }
    }

    /// The image as an OCI layout in `base/NAME`: busybox in one layer, the files in another.
    pub fn layout(&self, base: &Path, name: &str) -> OciLayout {
        let bb = LayerBuilder::busybox()
            .and_then(|b| b.finish())
            .expect("busybox layer");
        let mut files = LayerBuilder::new();
        for (p, data) in &self.files {
            files.file(p, data, 0o644).expect("tar entry");
        }
        let files = files.finish().expect("files layer");
        let cfg = ImageConfig {
            entrypoint: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into()],
            ..ImageConfig::default()
        };
        write_layout(&base.join(name), &[bb, files], &cfg, true, "1").expect("image layout")
    }

    /// The container: `busybox sha256sum FILES...`.
    pub fn spec(&self, image: &str) -> ContainerSpec {
        ContainerSpec::new(image)
            .command(["/bin/busybox", "sha256sum"])
            .args(self.files.iter().map(|(p, _)| p.clone()))
    }

    /// What the program must print.
    pub fn expected(&self) -> String {
        self.files
            .iter()
            .map(|(p, d)| format!("{}  {p}", hex::encode(Sha256::digest(d))))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asserts the container exited 0 and printed the files' sha256.
    pub fn check(&self, exit: &Exit, log: &ContainerLog) {
        assert_eq!(
            exit.code,
            0,
            "workload exited {exit:?}; stderr: {}",
            log.stderr()
        );
        assert_eq!(
            log.stdout(),
            self.expected(),
            "the files' sha256 in the image"
        );
    }
}

/// Counters of every lazily mounted image of `shoal`'s snapshotter (the mounts' stats files).
pub fn image_stats(
    shoal: &ShoalNode,
    ctrd: &Containerd,
) -> Vec<(shoal_fs::snapshotter::ImageInfo, shoal_fs::MetricsSnapshot)> {
    shoal_fs::snapshotter::read_stats(&shoal.root(ctrd).join("images"))
}

/// Waits until a lazy image's counters show `pred` (mounts write them once a second).
pub fn wait_stats(
    shoal: &ShoalNode,
    ctrd: &Containerd,
    pred: impl Fn(&shoal_fs::MetricsSnapshot) -> bool,
) -> shoal_fs::MetricsSnapshot {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = image_stats(shoal, ctrd);
        if let Some((_, s)) = stats.iter().find(|(_, s)| pred(s)) {
            return s.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "image stats never matched: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every lazy image is unmounted, its process gone and its directory removed.
fn assert_no_lazy_images(shoal: &ShoalNode, ctrd: &Containerd) {
    let images = shoal.root(ctrd).join("images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "lazy images left after their snapshots went: {left:?}"
    );
    let mounts: Vec<String> = ctrd
        .mounts()
        .into_iter()
        .filter(|m| m.contains("fuse.shoal"))
        .collect();
    assert!(mounts.is_empty(), "FUSE mounts left: {mounts:?}");
    let procs: Vec<_> = shoal
        .pids()
        .into_iter()
        .filter(|(n, _)| n == "shoal-fs-mount")
        .collect();
    assert!(procs.is_empty(), "mount processes left: {procs:?}");
}

/// Bytes of the image no workload reads: a lazy start must not fetch them.
pub const UNREAD: usize = 48 << 20;

/// The workload's image with a large file nobody reads, as an OCI layout.
pub fn image_with_unread_bytes(work: &Workload, base: &Path, name: &str) -> OciLayout {
    image_of(base, name, &layers_with_unread_bytes(work))
}

/// The layers of [`image_with_unread_bytes`] (tars): busybox, then the files and the big one.
pub fn layers_with_unread_bytes(work: &Workload) -> Vec<Vec<u8>> {
    let bb = LayerBuilder::busybox()
        .and_then(|b| b.finish())
        .expect("busybox layer");
    let mut files = LayerBuilder::new();
    for (p, data) in &work.files {
        files.file(p, data, 0o644).expect("tar entry");
    }
    files
        .file(
            "/opt/unread.bin",
            &shoal_testkit::random_bytes(UNREAD, 9),
            0o644,
        )
        .expect("tar entry");
    vec![bb, files.finish().expect("files layer")]
}

/// An image of these layers (tars, base first) whose entrypoint is busybox's shell.
pub fn image_of(base: &Path, name: &str, layers: &[Vec<u8>]) -> OciLayout {
    let cfg = ImageConfig {
        entrypoint: vec!["/bin/sh".into()],
        env: vec!["PATH=/bin".into()],
        ..ImageConfig::default()
    };
    write_layout(&base.join(name), layers, &cfg, true, "1").expect("image layout")
}

/// Flips bytes of every chunk the lazy mounts cached on disk (every 256 KiB of their packs).
pub fn flip_cached_chunks(images: &Path) -> usize {
    use std::os::unix::fs::FileExt;
    let mut flipped = 0;
    let mut stack = vec![images.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "pack") {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&p)
                    .unwrap();
                let len = f.metadata().unwrap().len();
                let mut off = 0;
                while off < len {
                    let mut b = [0u8; 1];
                    f.read_exact_at(&mut b, off).unwrap();
                    f.write_all_at(&[b[0] ^ 0x40], off).unwrap();
                    flipped += 1;
                    off += 256 << 10;
                }
            }
        }
    }
    flipped
}
