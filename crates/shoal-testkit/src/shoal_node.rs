//! A node's Shoal processes beside a test's containerd, as the DaemonSet runs them: `shoal peer`
//! with its registry proxy (containerd's mirror for the registry) and `shoal snapshotter`
//! (containerd's `shoal` proxy plugin). Both run in containerd's mount (and network) namespace;
//! the snapshotter's lazy mounts must be there, and in a shaped test net the peer is on the
//! client host. The `shoal` binary is the caller's (a test's `CARGO_BIN_EXE_shoal`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Containerd, NsProcess, TestkitError};

/// Ports the peer takes in the namespace's network (free ones of the test's network when the
/// namespace shares it; in a test net's host every port is free).
fn free_tcp() -> Result<SocketAddr, TestkitError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| TestkitError::Setup(format!("a free TCP port: {e}")))
}

fn free_udp() -> Result<SocketAddr, TestkitError> {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|u| u.local_addr())
        .map_err(|e| TestkitError::Setup(format!("a free UDP port: {e}")))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The peer and the snapshotter of a test node.
pub struct ShoalNode {
    bin: PathBuf,
    peer: Option<NsProcess>,
    /// The peer's registry proxy (`http://ADDR`), containerd's mirror.
    pub proxy: String,
    /// The peer's local API socket.
    pub peer_socket: PathBuf,
    snapshotter: Option<NsProcess>,
    socket: PathBuf,
    root: PathBuf,
    snapshotter_args: Vec<String>,
}

impl ShoalNode {
    /// Starts the peer (origin only: no scheduler, no DHT; `registry` allowed) and the
    /// snapshotter, and sends containerd's pulls from `registry` through the peer's proxy.
    /// `dir` holds the certificates and the peer's data.
    pub fn start(
        bin: &Path,
        dir: &Path,
        registry: &str,
        ctrd: &Containerd,
    ) -> Result<ShoalNode, TestkitError> {
        let dir = dir.join("shoal");
        std::fs::create_dir_all(&dir).map_err(|e| TestkitError::Setup(e.to_string()))?;
        run(bin, &["ca", "init", "--dir", &s(&dir.join("ca"))])?;
        let tls = dir.join("tls");
        run(
            bin,
            &[
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
            ],
        )?;
        let proxy = SocketAddr::from(([127, 0, 0, 1], free_tcp()?.port()));
        let peer_socket = dir.join("peer.sock");
        let mut cmd = Command::new(bin);
        cmd.args(["--log", "info", "peer", "--dht=false", "--proxy-enabled"])
            .args([
                "--data-dir",
                &s(&dir.join("peer-data")),
                "--tls-dir",
                &s(&tls),
            ])
            .args(["--listen", &free_udp()?.to_string()])
            .args(["--metrics-listen", &free_tcp()?.to_string()])
            .args(["--api-socket", &s(&peer_socket)])
            .args(["--proxy-listen", &proxy.to_string()])
            .args(["--allowed-origins", registry])
            .args(["--plain-http-registries", registry]);
        let peer = ctrd.ns().spawn("shoal-peer", &cmd)?;
        let mut node = ShoalNode {
            bin: bin.to_path_buf(),
            peer: Some(peer),
            proxy: format!("http://{proxy}"),
            peer_socket,
            snapshotter: None,
            socket: ctrd.shoal_socket().ok_or_else(|| {
                TestkitError::Setup("containerd is not configured for the shoal snapshotter".into())
            })?,
            root: ctrd.snapshotter_root("shoal"),
            snapshotter_args: vec!["--plain-http".into(), registry.to_string()],
        };
        node.wait_peer()?;
        ctrd.add_registry(registry, Some(&node.proxy))?;
        node.start_snapshotter(ctrd)?;
        Ok(node)
    }

    fn wait_peer(&mut self) -> Result<(), TestkitError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.peer_socket.exists() {
            let peer = self
                .peer
                .as_mut()
                .ok_or_else(|| TestkitError::Setup("no peer".into()))?;
            if let Some(status) = peer.try_wait() {
                return Err(TestkitError::Setup(format!(
                    "shoal peer exited ({status}): {}",
                    peer.log_tail(30)
                )));
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Setup(format!(
                    "shoal peer did not listen within 30 s: {}",
                    peer.log_tail(30)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts (or restarts) the snapshotter in containerd's namespace; waits for its socket.
    pub fn start_snapshotter(&mut self, ctrd: &Containerd) -> Result<(), TestkitError> {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--log", "info", "snapshotter"])
            .args(["--socket", &s(&self.socket), "--root", &s(&self.root)])
            .args(["--peer-socket", &s(&self.peer_socket)])
            .args(["--metrics-addr", "127.0.0.1:0", "--mount-log", "info"])
            .args(&self.snapshotter_args);
        let mut proc = ctrd.ns().spawn("shoal-snapshotter", &cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(status) = proc.try_wait() {
                return Err(TestkitError::Setup(format!(
                    "shoal snapshotter exited ({status}): {}",
                    proc.log_tail(30)
                )));
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Setup(format!(
                    "shoal snapshotter did not listen within 30 s: {}",
                    proc.log_tail(30)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.snapshotter = Some(proc);
        Ok(())
    }

    /// SIGTERM to the snapshotter; `Err` unless it exits cleanly within 10 s.
    pub fn stop_snapshotter(&mut self) -> Result<(), TestkitError> {
        let Some(mut p) = self.snapshotter.take() else {
            return Ok(());
        };
        match p.terminate(Duration::from_secs(10)) {
            Some(s) if s.success() => Ok(()),
            other => Err(TestkitError::Setup(format!(
                "the snapshotter did not exit cleanly on SIGTERM ({other:?}): {}",
                p.log_tail(30)
            ))),
        }
    }

    /// Stops the snapshotter, then the peer (SIGTERM); `Err` unless both exit cleanly. Lazy
    /// mounts still up stay (they outlive the snapshotter by design).
    pub fn stop(mut self) -> Result<(), TestkitError> {
        self.stop_snapshotter()?;
        if let Some(mut p) = self.peer.take() {
            match p.terminate(Duration::from_secs(15)) {
                Some(s) if s.success() => {}
                other => {
                    return Err(TestkitError::Setup(format!(
                        "the peer did not exit cleanly on SIGTERM ({other:?}): {}",
                        p.log_tail(30)
                    )))
                }
            }
        }
        Ok(())
    }

    /// SIGKILL to the snapshotter (a crash; its lazy mounts stay).
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

    /// The peer's log.
    pub fn peer_log(&self) -> String {
        self.peer
            .as_ref()
            .map(|p| p.log_tail(60))
            .unwrap_or_default()
    }

    /// The snapshotter's root as its processes name it (inside containerd's namespace).
    pub fn root_inside(&self) -> &Path {
        &self.root
    }

    /// The snapshotter's root as the test reads it (containerd's root is on the namespace's
    /// tmpfs).
    pub fn root(&self, ctrd: &Containerd) -> PathBuf {
        ctrd.ns().path(&self.root)
    }

    /// Pids of the peer, the snapshotter and every lazy mount process, by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .peer
            .iter()
            .chain(self.snapshotter.iter())
            .map(|p| (p.name().to_string(), p.pid()))
            .collect();
        let root = s(&self.root);
        for pid in std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = c
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.iter().any(|a| a == "mount")
                && args
                    .iter()
                    .any(|a| a.starts_with(&root) && a.ends_with("/mnt"))
            {
                out.push(("shoal-fs-mount".into(), pid));
            }
        }
        out
    }
}

fn run(bin: &Path, args: &[&str]) -> Result<(), TestkitError> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| TestkitError::Setup(format!("{}: {e}", bin.display())))?;
    if !out.status.success() {
        return Err(TestkitError::Setup(format!(
            "shoal {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}
