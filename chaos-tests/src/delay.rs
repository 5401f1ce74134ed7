//! `DelayRelay`: a TCP relay that holds every byte for a fixed one-way delay in each direction,
//! for latency where the kernel has no netem. Bounded: at most `MAX_CONNS` connections and
//! `QUEUE` chunks of up to 64 KiB queued per direction (a full queue stops reading).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::netns::Netns;
use crate::{io_err, ChaosError, Result};

const MAX_CONNS: usize = 256;
const QUEUE: usize = 64;
const CHUNK: usize = 64 << 10;

struct Shared {
    delay_us: AtomicU64,
    conns: AtomicUsize,
    bytes: AtomicU64,
}

/// A running delay relay; its tasks stop on drop.
pub struct DelayRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl DelayRelay {
    /// Relays connections accepted on `listener` to `upstream` (connected from inside `from`
    /// when given), delaying each direction by `delay`. Call inside a tokio runtime.
    pub fn start(
        listener: std::net::TcpListener,
        upstream: SocketAddr,
        from: Option<Netns>,
        delay: Duration,
    ) -> Result<DelayRelay> {
        let addr = listener.local_addr().map_err(io_err("relay address"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("relay listener"))?;
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io_err("relay listener"))?;
        let shared = Arc::new(Shared {
            delay_us: AtomicU64::new(delay.as_micros() as u64),
            conns: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        });
        let s = shared.clone();
        let (stop, stopped) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(MAX_CONNS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (s, from, mut stopped) = (s.clone(), from.clone(), stopped.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    s.conns.fetch_add(1, Ordering::SeqCst);
                    // Dropping the relay ends open connections too.
                    tokio::select! {
                        r = relay_one(client, upstream, from, s) => {
                            if let Err(e) = r {
                                tracing::debug!(error = %e, "chaos: delay relay connection failed");
                            }
                        }
                        _ = stopped.changed() => {}
                    }
                });
            }
        });
        Ok(DelayRelay {
            addr,
            shared,
            task,
            stop,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the one-way delay for bytes read from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.conns.load(Ordering::SeqCst)
    }

    /// Bytes relayed so far (both directions).
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.stop.send(true);
    }
}

async fn connect(upstream: SocketAddr, from: Option<Netns>) -> Result<TcpStream> {
    let std_stream = match from {
        Some(ns) => {
            tokio::task::spawn_blocking(move || ns.tcp_connect(upstream, Duration::from_secs(10)))
                .await
                .map_err(|e| ChaosError::Setup(format!("connect task: {e}")))??
        }
        None => std::net::TcpStream::connect(upstream)
            .map_err(io_err(format!("connecting to {upstream}")))?,
    };
    std_stream
        .set_nonblocking(true)
        .map_err(io_err("upstream socket"))?;
    TcpStream::from_std(std_stream).map_err(io_err("upstream socket"))
}

async fn relay_one(
    client: TcpStream,
    upstream: SocketAddr,
    from: Option<Netns>,
    s: Arc<Shared>,
) -> Result<()> {
    let up = connect(upstream, from).await?;
    let _ = (client.set_nodelay(true), up.set_nodelay(true));
    let (cr, cw) = client.into_split();
    let (ur, uw) = up.into_split();
    tokio::join!(pipe(cr, uw, s.clone()), pipe(ur, cw, s));
    Ok(())
}

/// Reads into a bounded queue stamped with the release time; a writer sends each chunk when due.
async fn pipe(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, s: Arc<Shared>) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(QUEUE);
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            s.bytes.fetch_add(n as u64, Ordering::Relaxed);
            let due = Instant::now() + Duration::from_micros(s.delay_us.load(Ordering::SeqCst));
            let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
            if tx.send((due, chunk)).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(reader, writer);
}
