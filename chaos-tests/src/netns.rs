//! `Netns`: a named network namespace, and sockets made inside it from the test process.
//!
//! A socket keeps the namespace it was created in, so a short-lived thread enters the namespace
//! (`setns` changes only the calling thread), creates the socket and hands it back; the test
//! process itself stays in its own namespace. Child processes use `ip netns exec`.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{io_err, ChaosError, Result};

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// A named network namespace (created and removed by [`crate::TestNet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Refers to the namespace `name` (as listed by `ip netns list`).
    pub fn new(name: impl Into<String>) -> Netns {
        Netns { name: name.into() }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    pub fn run<T, F>(&self, what: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let path: PathBuf = [NETNS_DIR, &self.name].iter().collect();
        let what = format!("{what} in network namespace {}", self.name);
        let handle = std::thread::spawn(move || -> std::io::Result<T> {
            let ns = File::open(&path)?;
            // SAFETY: setns on a valid fd; it only changes this thread's network namespace,
            // and the thread ends right after `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        });
        match handle.join() {
            Ok(r) => r.map_err(io_err(what)),
            Err(_) => Err(ChaosError::Setup(format!("{what}: the thread panicked"))),
        }
    }

    /// A TCP listener bound to `addr` inside the namespace (use port 0 for any free port).
    pub fn tcp_listener(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.run(&format!("binding TCP {addr}"), move || {
            TcpListener::bind(addr)
        })
    }

    /// A TCP connection to `addr` opened from inside the namespace, within `timeout`.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.run(&format!("connecting to {addr}"), move || {
            TcpStream::connect_timeout(&addr, timeout)
        })
    }

    /// A UDP socket bound to `addr` inside the namespace.
    pub fn udp_socket(&self, addr: SocketAddr) -> Result<UdpSocket> {
        self.run(&format!("binding UDP {addr}"), move || {
            UdpSocket::bind(addr)
        })
    }
}
