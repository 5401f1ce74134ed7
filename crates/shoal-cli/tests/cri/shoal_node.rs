//! The Shoal parts of a CRI node: a `shoal peer` with its registry proxy in front of the
//! registry (containerd's mirror), and `shoal snapshotter` inside containerd's mount namespace
//! as its proxy plugin, as a node runs them (the DaemonSet's two containers).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_testkit::{Containerd, NsProcess, Registry};

/// The `shoal` binary under test.
pub fn shoal_bin() -> &'static str {
    env!("CARGO_BIN_EXE_shoal")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|u| u.local_addr())
        .expect("a free UDP port")
}

fn shoal_ok(args: &[&str]) {
    let out = Command::new(shoal_bin())
        .args(args)
        .output()
        .expect("shoal runs");
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The peer (root namespace) and the snapshotter (containerd's namespace) of a node.
pub struct ShoalParts {
    dir: PathBuf,
    peer: Child,
    /// The peer's registry proxy, as containerd's mirror reaches it.
    pub proxy: String,
    /// The peer's local API socket.
    pub peer_socket: PathBuf,
    snapshotter: Option<NsProcess>,
    socket: PathBuf,
    root: PathBuf,
}

impl ShoalParts {
    /// Starts the peer with its proxy (origin-only: no scheduler, no DHT) and the snapshotter,
    /// and points containerd's pulls from `registry` at the proxy.
    pub fn start(dir: &Path, registry: &Registry, ctrd: &Containerd) -> ShoalParts {
        let dir = dir.join("shoal");
        std::fs::create_dir_all(&dir).unwrap();
        shoal_ok(&["ca", "init", "--dir", &s(&dir.join("ca"))]);
        let tls = dir.join("tls");
        shoal_ok(&[
            "ca",
            "issue",
            "--name",
            "node-1",
            "--dir",
            &s(&dir.join("ca")),
            "--out",
            &s(&tls),
            "--ip",
            "127.0.0.1",
        ]);
        let proxy = free_tcp();
        let peer_socket = dir.join("peer.sock");
        let peer_data = dir.join("peer-data");
        let log = std::fs::File::create(dir.join("peer.log")).unwrap();
        let peer = Command::new(shoal_bin())
            .args(["--log", "info", "peer", "--dht=false", "--proxy-enabled"])
            .args(["--data-dir", &s(&peer_data), "--tls-dir", &s(&tls)])
            .args(["--listen", &free_udp().to_string()])
            .args(["--metrics-listen", &free_tcp().to_string()])
            .args(["--api-socket", &s(&peer_socket)])
            .args(["--proxy-listen", &proxy.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting shoal peer");
        let mut parts = ShoalParts {
            dir,
            peer,
            proxy: format!("http://{proxy}"),
            peer_socket,
            snapshotter: None,
            socket: ctrd
                .shoal_socket()
                .expect("containerd configured for the shoal snapshotter"),
            root: ctrd.snapshotter_root("shoal"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(proxy).is_err() || !parts.peer_socket.exists() {
            if let Ok(Some(status)) = parts.peer.try_wait() {
                panic!("the peer exited ({status}): {}", parts.peer_log());
            }
            assert!(
                Instant::now() < deadline,
                "the peer did not listen: {}",
                parts.peer_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ctrd.add_registry(&registry.host(), Some(&parts.proxy))
            .expect("hosts.toml: the registry through the peer's proxy");
        parts.start_snapshotter(ctrd);
        parts
    }

    /// The peer's log.
    pub fn peer_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("peer.log")).unwrap_or_default()
    }

    /// Starts (or restarts) `shoal snapshotter` in containerd's namespace and waits for its socket.
    pub fn start_snapshotter(&mut self, ctrd: &Containerd) {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(shoal_bin());
        cmd.args(["--log", "info", "snapshotter"])
            .args(["--socket", &s(&self.socket), "--root", &s(&self.root)])
            .args(["--peer-socket", &s(&self.peer_socket)])
            .args(["--metrics-addr", "127.0.0.1:0", "--mount-log", "info"]);
        let proc = ctrd
            .ns()
            .spawn("shoal-snapshotter", &cmd)
            .expect("starting the snapshotter");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the snapshotter did not listen: {}",
                proc.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.snapshotter = Some(proc);
    }

    /// SIGTERM to the snapshotter; it must exit cleanly within 10 s.
    pub fn stop_snapshotter(&mut self) {
        if let Some(mut p) = self.snapshotter.take() {
            let status = p.terminate(Duration::from_secs(10));
            assert!(
                status.is_some_and(|s| s.success()),
                "the snapshotter did not exit cleanly on SIGTERM ({status:?}): {}",
                p.log_tail(30)
            );
        }
    }

    /// SIGKILL to the snapshotter (a crash; its mounts stay).
    pub fn kill_snapshotter(&mut self) {
        if let Some(mut p) = self.snapshotter.take() {
            p.kill();
        }
    }

    /// The snapshotter's log.
    pub fn snapshotter_log(&self) -> String {
        self.snapshotter
            .as_ref()
            .map(|p| p.log_tail(60))
            .unwrap_or_default()
    }

    /// The snapshotter's root as the test reads it (it is on containerd's tmpfs).
    pub fn root(&self, ctrd: &Containerd) -> PathBuf {
        ctrd.ns().path(&self.root)
    }

    /// Counters of every lazily mounted image (from the mounts' stats files).
    pub fn image_stats(
        &self,
        ctrd: &Containerd,
    ) -> Vec<(shoal_fs::snapshotter::ImageInfo, shoal_fs::MetricsSnapshot)> {
        shoal_fs::snapshotter::read_stats(&self.root(ctrd).join("images"))
    }

    /// Waits until the mounts' stats files show `pred` (they are written once a second).
    pub fn wait_stats(
        &self,
        ctrd: &Containerd,
        pred: impl Fn(&shoal_fs::MetricsSnapshot) -> bool,
    ) -> shoal_fs::MetricsSnapshot {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.image_stats(ctrd);
            if let Some((_, s)) = stats.iter().find(|(_, s)| pred(s)) {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "image stats never matched: {stats:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl ShoalParts {
    /// Every lazy image is unmounted, its process gone and its directory removed.
    pub fn assert_no_lazy_images(&self, ctrd: &Containerd) {
        let images = self.root(ctrd).join("images");
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
    }
}

impl Drop for ShoalParts {
    fn drop(&mut self) {
        let _ = self.peer.kill();
        let _ = self.peer.wait();
    }
}
