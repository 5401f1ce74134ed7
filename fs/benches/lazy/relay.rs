//! The origin host's relay in front of the registry, and its byte counter ("over the link").
//!
//! `tcp` (default): a plain TCP relay with TCP_NODELAY on both legs, like a registry's own front
//! end (Go's net/http sets it on every connection). `http` (`LAZY_RELAY=http`): the chaos crate's
//! HTTP `FaultRelay`, which leaves Nagle on towards the client, so a small response written in
//! two pieces can wait for the client's delayed ACK; kept for comparison.
//!
//! Shared with the CRI cold-start bench (`crates/shoal-cli/benches/cri_cold`, through `#[path]`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shoal_chaos::FaultRelay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Res;

/// A running relay.
pub enum Relay {
    /// Plain TCP, TCP_NODELAY.
    Tcp {
        /// Bytes sent towards the client (headers included).
        down: Arc<AtomicU64>,
        /// The accept loop.
        task: tokio::task::JoinHandle<()>,
    },
    /// The chaos crate's HTTP relay.
    Http(FaultRelay),
}

impl Relay {
    /// Starts the relay kind `LAZY_RELAY` names on `listener`, in front of `upstream`
    /// (`http://HOST:PORT`). Call inside a tokio runtime.
    pub fn start(listener: std::net::TcpListener, upstream: &str) -> Res<Relay> {
        if std::env::var("LAZY_RELAY").is_ok_and(|v| v == "http") {
            return Ok(Relay::Http(FaultRelay::start_on(listener, upstream)?));
        }
        let up: SocketAddr = upstream.trim_start_matches("http://").parse()?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let down = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&down);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let Ok(upstream) = tokio::net::TcpStream::connect(up).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = upstream.into_split();
                    let upward = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut uw).await;
                        let _ = uw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 256 << 10];
                    loop {
                        match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                                count.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    let _ = cw.shutdown().await;
                    upward.abort();
                });
            }
        });
        Ok(Relay::Tcp { down, task })
    }

    /// What it is, for the report.
    pub fn kind(&self) -> &'static str {
        match self {
            Relay::Tcp { .. } => "TCP relay, TCP_NODELAY (bytes counted with HTTP headers)",
            Relay::Http(_) => "HTTP FaultRelay (body bytes counted)",
        }
    }

    /// Bytes sent towards the client so far.
    pub fn bytes(&self) -> u64 {
        match self {
            Relay::Tcp { down, .. } => down.load(Ordering::Relaxed),
            Relay::Http(r) => r.stats().body_bytes,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Relay::Tcp { task, .. } = self {
            task.abort();
        }
    }
}
