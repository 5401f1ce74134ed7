//! What the benches that run real `shoal` processes share: free ports, the `shoal` binary,
//! process lifetimes, and readiness and metrics read over plain HTTP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The number in environment variable `name`, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `shoal` process, killed and reaped on drop; its stderr goes to a log file.
pub struct Proc {
    /// The name it was started under (for messages).
    pub name: String,
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the tail of its log if the process has exited.
    pub fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            panic!("{} exited with {status}:\n{tail}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

pub fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|u| u.local_addr())
        .expect("a free UDP port")
}

pub fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
}

/// Runs `shoal ARGS` to the end; panics with its stderr if it fails.
pub fn shoal_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .expect("the shoal binary runs");
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issues `name`'s certificate from the CA in `ca` into `out`.
pub fn issue(ca: &Path, out: &Path, name: &str) {
    shoal_ok(&[
        "ca",
        "issue",
        "--name",
        name,
        "--dir",
        s(ca),
        "--out",
        s(out),
        "--ip",
        "127.0.0.1",
    ]);
}

/// The answer of `GET addr/path` (plain HTTP/1.1, `Connection: close`), if it answered.
fn http_get(addr: SocketAddr, path: &str, read_timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(read_timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf)
}

/// The status code of `GET addr/path`, if it answered.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let answer = http_get(addr, path, Duration::from_secs(5))?;
    answer.split(' ').nth(1)?.parse().ok()
}

/// The value of one series (`name` or `name{labels}`) from `GET addr/metrics` (Prometheus
/// text), if it answered.
pub fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let answer = http_get(addr, "/metrics", Duration::from_secs(2))?;
    let line = answer
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Starts `shoal` with `args` (its stderr to `log`), adds it to `procs` and waits until its
/// `metrics/readyz` answers 200; panics if it or another of `procs` exits meanwhile.
pub fn spawn(
    procs: &mut Vec<Proc>,
    name: &str,
    args: &[String],
    log: PathBuf,
    metrics: SocketAddr,
) {
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("starting shoal");
    procs.push(Proc {
        name: name.to_string(),
        child,
        log,
    });
    let start = Instant::now();
    while http_status(metrics, "/readyz") != Some(200) {
        for p in procs.iter_mut() {
            p.check_running();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} not ready in 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `a` as owned strings (argument lists).
pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|a| a.to_string()).collect()
}
