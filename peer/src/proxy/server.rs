//! The proxy's listener: HTTP/1.1 and h2c on one port (hyper-util's auto builder), or HTTPS with
//! ALPN h2/http1.1 when `tls` is set; keep-alive, bounded request heads and bodies, a header
//! timeout, and a graceful shutdown that lets requests in flight finish within a grace period.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use shoal_origin::AllowedOrigins;
use shoal_store::AsyncStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::authz::Authz;
use super::mirror::{blob_route, Upstream};
use super::pinned::PinSlot;
use super::{blobs, passthrough, registry_error, Body, ProxyConfig, ProxyStats};
use crate::download::Downloader;
use crate::error::PeerError;

/// The User-Agent of the proxy's own upstream requests (the client's is forwarded as it is).
pub(crate) const USER_AGENT: &str = concat!("shoal-proxy/", env!("CARGO_PKG_VERSION"));

/// Largest request head (HTTP/1 read buffer, HTTP/2 header list) accepted.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// A TLS handshake must finish within this long.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every request of the proxy shares.
pub(crate) struct State {
    pub cfg: ProxyConfig,
    pub downloader: Arc<Downloader>,
    /// The node's store: blobs it holds are served straight from it (api/cached.rs).
    pub store: AsyncStore,
    /// Upstream client for pass-through and permission checks: redirects go back to the client.
    pub http: reqwest::Client,
    /// Upstream client for the swarm's fallback reads: follows redirects to blob storage
    /// (reqwest drops the Authorization header on a redirect to another host).
    pub http_follow: reqwest::Client,
    pub plain_http: HashSet<String>,
    /// The registries this node may reach; others are answered 403 before anything else.
    pub allowed: Arc<AllowedOrigins>,
    pub authz: Authz,
    pub stats: ProxyStats,
}

/// A running proxy.
#[derive(Debug)]
pub struct ProxyServer {
    addr: SocketAddr,
    stats: ProxyStats,
    stop: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    /// Closed once every connection task has ended.
    drained: tokio::sync::Mutex<mpsc::Receiver<()>>,
    grace: Duration,
}

impl ProxyServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The request counters (for `/metrics`).
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// Stops accepting, asks every connection to finish its requests in flight, and waits for
    /// them up to the configured grace period.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let mut drained = self.drained.lock().await;
        if tokio::time::timeout(self.grace, drained.recv())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "proxy connections still open after the grace period");
        }
        self.accept.abort();
    }

    /// Stops at once.
    pub fn abort(&self) {
        let _ = self.stop.send(true);
        self.accept.abort();
    }
}

/// Binds the proxy and serves it until shut down.
pub(crate) async fn start(
    cfg: ProxyConfig,
    plain_http: &[String],
    allowed: Arc<AllowedOrigins>,
    downloader: Arc<Downloader>,
    store: AsyncStore,
    identity: &Arc<shoal_tls::NodeIdentity>,
) -> Result<ProxyServer, PeerError> {
    let tls = if cfg.tls {
        let c = shoal_tls::https_server_config(identity)?;
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(c)))
    } else {
        None
    };
    if let Some(d) = cfg.default_upstream.as_deref() {
        if !allowed.allows_registry(d) {
            tracing::warn!(default_upstream = d, "proxy.default_upstream is not in allowed_origins: requests naming no registry will be refused (403)");
        }
    }
    let client = |follow: bool| {
        reqwest::Client::builder()
            .redirect(if follow {
                follow_allowed(Arc::clone(&allowed))
            } else {
                reqwest::redirect::Policy::none()
            })
            // Names resolving to loopback or link-local addresses reach only listed hosts.
            .dns_resolver(allowed.resolver())
            .connect_timeout(Duration::from_millis(cfg.upstream_connect_timeout_ms))
            .read_timeout(Duration::from_millis(cfg.upstream_read_timeout_ms))
            .pool_max_idle_per_host(256)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| PeerError::Config(format!("proxy upstream HTTP client: {e}")))
    };
    let state = Arc::new(State {
        http: client(false)?,
        http_follow: client(true)?,
        plain_http: plain_http.iter().cloned().collect(),
        allowed,
        authz: Authz::new(Duration::from_secs(cfg.authz_cache_secs)),
        downloader,
        store,
        cfg: cfg.clone(),
        stats: ProxyStats::default(),
    });
    let stats = state.stats.clone();
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| PeerError::io("bind registry proxy on", cfg.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| PeerError::io("read address of", cfg.listen, e))?;
    let (stop, stop_rx) = watch::channel(false);
    let (alive, drained) = mpsc::channel::<()>(1);
    let accept = tokio::spawn(accept_loop(listener, state, tls, stop_rx, alive));
    tracing::info!(%addr, tls = cfg.tls, "registry proxy listening");
    Ok(ProxyServer {
        addr,
        stats,
        stop,
        accept,
        drained: tokio::sync::Mutex::new(drained),
        grace: Duration::from_millis(cfg.shutdown_grace_ms),
    })
}

/// Redirects of the swarm's fallback reads: at most 10, never to an unlisted loopback or
/// link-local IP (names that resolve there are stopped by the client's resolver).
fn follow_allowed(allowed: Arc<AllowedOrigins>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("more than 10 redirects");
        }
        let from = match attempt.previous().first().and_then(|u| u.host_str()) {
            Some(h) => format!("registry {h} redirected a blob request to"),
            None => "a redirect went to".to_string(),
        };
        match allowed.check_target_literal(attempt.url(), &from) {
            Ok(()) => attempt.follow(),
            Err(refusal) => attempt.error(refusal),
        }
    })
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (state, tls, stop, alive) =
            (Arc::clone(&state), tls.clone(), stop.clone(), alive.clone());
        tokio::spawn(async move {
            connection(tcp, peer, state, tls, stop).await;
            drop(alive);
        });
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
) {
    match tls {
        None => serve(TokioIo::new(tcp), peer, state, stop).await,
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => serve(TokioIo::new(s), peer, state, stop).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "proxy TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "proxy TLS handshake timed out"),
            }
        }
    }
}

async fn serve<I>(io: I, peer: SocketAddr, state: Arc<State>, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let header_timeout = Duration::from_millis(state.cfg.header_timeout_ms);
    // This connection's pinned upstream connection (pinned.rs), found by pass-through.
    let pin: Arc<PinSlot> = Arc::default();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let state = Arc::clone(&state);
        req.extensions_mut().insert(Arc::clone(&pin));
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Some(header_timeout))
        .keep_alive_timeout(header_timeout);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    if *stop.borrow() {
        conn.as_mut().graceful_shutdown();
    }
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "proxy connection ended with an error");
    }
}

/// Routes one request: blobs by digest through the swarm, everything else to the upstream.
async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let entered = Instant::now();
    let up = match Upstream::of(
        req.uri().query(),
        req.headers(),
        state.cfg.default_upstream.as_deref(),
        &state.plain_http,
    ) {
        Ok(u) => u,
        Err(why) => {
            state.stats.record("invalid", StatusCode::BAD_REQUEST);
            return registry_error(StatusCode::BAD_REQUEST, "UNSUPPORTED", &why);
        }
    };
    // Before any connection (upstream, scheduler, peers): only registries the operator listed.
    if let Err(refusal) = state.allowed.check_registry(&up.host) {
        tracing::info!(upstream = %up.host, path = %req.uri().path(), "proxy request refused: registry not allowed");
        state.stats.record("refused", StatusCode::FORBIDDEN);
        return registry_error(StatusCode::FORBIDDEN, "DENIED", &refusal.message);
    }
    let is_read = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
    let path = req.uri().path().to_string();
    let (route, mut resp) = match blob_route(&path) {
        Some((name, blob)) if is_read => ("blob", blobs::serve(state, req, &up, name, blob).await),
        _ => ("passthrough", passthrough::forward(state, req, &up).await),
    };
    state.stats.record(route, resp.status());
    if state.cfg.server_timing {
        passthrough::add_server_timing(&mut resp, "proxy", entered);
    }
    resp
}
