//! `FaultRelay`: an HTTP relay put in front of a registry that injects faults into its answers
//! and counts the body bytes it served per path (origin egress as clients saw it).
//!
//! Faults ([`Fault`]) switch at runtime and hit blob GETs (`/v2/<repo>/blobs/<digest>`) by
//! default, or every request with [`FaultScope::All`]. Headers (including Content-Length) pass
//! unchanged, so a client sees a short body as truncation and a flipped byte only by hashing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{io_err, ChaosError, Result};

/// What the relay does to the answers it forwards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Forward unchanged.
    Pass,
    /// Answer this percentage of requests (0..=100) with 500 instead of forwarding.
    Errors {
        /// Share of requests failed, in percent.
        percent: u8,
    },
    /// Send the first `after` body bytes, then break the connection.
    Truncate {
        /// Body bytes sent before the break.
        after: u64,
    },
    /// Send the body at no more than `bytes_per_sec`.
    Slow {
        /// Body rate cap.
        bytes_per_sec: u64,
    },
    /// Invert the body bytes at offsets 0, `every`, 2·`every`, ... (at least one per body).
    FlipBytes {
        /// Distance between flipped bytes.
        every: u64,
    },
}

/// Which requests a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultScope {
    /// Only GETs of blobs by digest (manifests and uploads pass).
    BlobGets,
    /// Every request.
    All,
}

/// What the relay did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests received.
    pub requests: u64,
    /// 500 answers injected.
    pub errors: u64,
    /// Bodies broken off.
    pub truncated: u64,
    /// Bodies slowed down.
    pub slowed: u64,
    /// Bytes flipped.
    pub flipped_bytes: u64,
    /// Body bytes sent to clients (all paths).
    pub body_bytes: u64,
}

struct State {
    fault: Fault,
    scope: FaultScope,
    stats: FaultStats,
    /// Path (without query) -> body bytes sent.
    served: HashMap<String, u64>,
}

type Shared = Arc<Mutex<State>>;
type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    // Plain counters: a panic elsewhere does not make them unusable.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fault relay; stops listening and ends its connections on drop.
pub struct FaultRelay {
    addr: SocketAddr,
    shared: Shared,
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl FaultRelay {
    /// Starts a relay on a fresh loopback port in front of `upstream` (`http://HOST:PORT`).
    pub async fn start(upstream: &str) -> Result<FaultRelay> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("relay listen"))?;
        FaultRelay::start_on(l, upstream)
    }

    /// Starts a relay on `listener` (e.g. one made inside a host with
    /// [`crate::Host::tcp_listener`]) in front of `upstream`. Call inside a tokio runtime.
    pub fn start_on(listener: std::net::TcpListener, upstream: &str) -> Result<FaultRelay> {
        let addr = listener.local_addr().map_err(io_err("relay address"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("relay listener"))?;
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io_err("relay listener"))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ChaosError::Setup(format!("relay HTTP client: {e}")))?;
        let shared: Shared = Arc::new(Mutex::new(State {
            fault: Fault::Pass,
            scope: FaultScope::BlobGets,
            stats: FaultStats::default(),
            served: HashMap::new(),
        }));
        let up = upstream.trim_end_matches('/').to_string();
        let (stop, stopped) = watch::channel(false);
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, client, up, mut stopped) =
                    (s.clone(), client.clone(), up.clone(), stopped.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (s, client, up) = (s.clone(), client.clone(), up.clone());
                        async move { Ok::<_, Infallible>(handle(s, client, up, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped.changed() => {}
                    }
                });
            }
        });
        Ok(FaultRelay {
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

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the fault for requests from now on.
    pub fn set_fault(&self, fault: Fault) {
        lock(&self.shared).fault = fault;
        tracing::info!(?fault, relay = %self.addr, "chaos: relay fault");
    }

    /// Switches which requests faults hit.
    pub fn set_scope(&self, scope: FaultScope) {
        lock(&self.shared).scope = scope;
    }

    /// Counters so far.
    pub fn stats(&self) -> FaultStats {
        lock(&self.shared).stats
    }

    /// Body bytes sent for `path` (without query).
    pub fn bytes_served(&self, path: &str) -> u64 {
        lock(&self.shared).served.get(path).copied().unwrap_or(0)
    }

    /// Body bytes sent for blob `digest` (`sha256:...`) of any repository.
    pub fn blob_bytes_served(&self, digest: &str) -> u64 {
        let needle = format!("/blobs/{digest}");
        lock(&self.shared)
            .served
            .iter()
            .filter(|(p, _)| p.ends_with(&needle))
            .map(|(_, n)| n)
            .sum()
    }

    /// Every path with the body bytes sent for it.
    pub fn served(&self) -> HashMap<String, u64> {
        lock(&self.shared).served.clone()
    }

    /// Zeroes the counters (the fault stays).
    pub fn reset_counters(&self) {
        let mut st = lock(&self.shared);
        st.stats = FaultStats::default();
        st.served.clear();
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.stop.send(true);
    }
}

fn is_blob_get(req: &Request<Incoming>) -> bool {
    let p = req.uri().path();
    req.method() == hyper::Method::GET && p.contains("/blobs/") && !p.contains("/uploads/")
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
            | "te"
            | "trailer"
    )
}

fn text(status: u16, msg: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(msg.to_string()))
        .map_err(|e: Infallible| match e {})
        .boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

async fn handle(
    s: Shared,
    client: reqwest::Client,
    up: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let path_q = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let fault = {
        let mut st = lock(&s);
        st.stats.requests += 1;
        let hit = st.scope == FaultScope::All || is_blob_get(&req);
        if hit {
            st.fault
        } else {
            Fault::Pass
        }
    };
    if let Fault::Errors { percent } = fault {
        if fastrand::u8(0..100) < percent {
            lock(&s).stats.errors += 1;
            return text(500, "shoal-chaos: injected error");
        }
    }
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(400, &format!("shoal-chaos relay: request body: {e}")),
    };
    let mut rb = client.request(method, format!("{up}{path_q}")).body(body);
    for (k, v) in headers.iter() {
        if !is_hop_by_hop(k.as_str()) {
            rb = rb.header(k, v);
        }
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return text(502, &format!("shoal-chaos relay: upstream {up}: {e}")),
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if !is_hop_by_hop(k.as_str()) {
            out = out.header(k.as_str(), v.as_bytes());
        }
    }
    {
        let mut st = lock(&s);
        match fault {
            Fault::Truncate { .. } => st.stats.truncated += 1,
            Fault::Slow { .. } => st.stats.slowed += 1,
            _ => {}
        }
    }
    let stream = faulty_body(Box::pin(resp.bytes_stream()), fault, s, path);
    out.body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .unwrap_or_else(|_| text(502, "shoal-chaos relay: bad upstream headers"))
}

type Upstream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

struct BodyState {
    up: Upstream,
    pending: Bytes,
    sent: u64,
    start: Instant,
    fault: Fault,
    shared: Shared,
    path: String,
    done: bool,
}

/// The upstream body with `fault` applied, counting what goes out.
fn faulty_body(
    up: Upstream,
    fault: Fault,
    shared: Shared,
    path: String,
) -> impl Stream<Item = std::io::Result<Frame<Bytes>>> + Send {
    let st = BodyState {
        up,
        pending: Bytes::new(),
        sent: 0,
        start: Instant::now(),
        fault,
        shared,
        path,
        done: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if st.pending.is_empty() {
            match st.up.next().await {
                None => return None,
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(std::io::Error::other(e)), st));
                }
                Some(Ok(b)) => st.pending = b,
            }
        }
        let mut take = st.pending.len();
        match st.fault {
            Fault::Truncate { after } => {
                if st.sent >= after {
                    st.done = true;
                    // Let hyper flush what was sent (headers included) before the break.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let e = std::io::Error::other("shoal-chaos: injected truncation");
                    return Some((Err(e), st));
                }
                take = take.min((after - st.sent) as usize);
            }
            Fault::Slow { bytes_per_sec } => {
                let rate = bytes_per_sec.max(1);
                // Pieces of about 20 ms each, released on schedule.
                take = take.min((rate / 50).max(1) as usize);
                let due = Duration::from_secs_f64((st.sent + take as u64) as f64 / rate as f64);
                tokio::time::sleep_until(st.start + due).await;
            }
            _ => {}
        }
        let mut piece = st.pending.split_to(take);
        if let Fault::FlipBytes { every } = st.fault {
            let every = every.max(1);
            let mut m = BytesMut::from(&piece[..]);
            let mut flipped = 0;
            let first = st.sent.div_ceil(every) * every;
            let mut off = first;
            while off < st.sent + take as u64 {
                if let Some(b) = m.get_mut((off - st.sent) as usize) {
                    *b ^= 0xFF;
                    flipped += 1;
                }
                off += every;
            }
            lock(&st.shared).stats.flipped_bytes += flipped;
            piece = m.freeze();
        }
        st.sent += take as u64;
        {
            let mut g = lock(&st.shared);
            g.stats.body_bytes += take as u64;
            *g.served.entry(st.path.clone()).or_insert(0) += take as u64;
        }
        Some((Ok(Frame::data(piece)), st))
    })
}
