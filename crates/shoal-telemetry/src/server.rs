//! The metrics and health server (default `:4490`): `GET /metrics` (Prometheus text format),
//! `GET /healthz` (200 while the process serves), `GET /readyz` (200 when the component's
//! readiness callback says so, 503 otherwise). HTTP/1 on hyper; nothing else is served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::TelemetryError;

/// The design's default address of the metrics and health server.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:4490";

/// Content type of the Prometheus text exposition format prometheus-client writes.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Most request header lines accepted (scrapers send a handful).
const MAX_HEADERS: usize = 32;

/// Slow clients are cut off after this long (a scrape is a few KiB).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Readiness callback: true when the component can do its job (e.g. the peer is registered
/// with its scheduler).
pub type ReadyFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// A running metrics and health server; stops when dropped.
#[derive(Debug)]
pub struct TelemetryServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TelemetryServer {
    /// The bound TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TelemetryServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    registry: Registry,
    ready: ReadyFn,
}

/// Binds `addr` and serves `/metrics` from `registry`, `/healthz`, and `/readyz` from `ready`.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: ReadyFn,
) -> Result<TelemetryServer, TelemetryError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let state = Arc::new(State { registry, ready });
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(addr = %bound, error = %e, "metrics server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(handle(&state, &req)) }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.max_headers(MAX_HEADERS);
                let conn = http.serve_connection(TokioIo::new(stream), svc);
                match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "metrics connection ended with an error")
                    }
                    Err(_) => tracing::debug!("metrics connection timed out"),
                    Ok(Ok(())) => {}
                }
            });
        }
    });
    tracing::info!(addr = %bound, "metrics and health server listening");
    Ok(TelemetryServer { addr: bound, task })
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn handle(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n", PLAIN);
    }
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                Ok(()) => text(StatusCode::OK, out, METRICS_CONTENT_TYPE),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics failed: {e}\n"),
                    PLAIN,
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n", PLAIN),
        "/readyz" => {
            if (state.ready)() {
                text(StatusCode::OK, "ready\n", PLAIN)
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n", PLAIN)
            }
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {other} (try /metrics, /healthz, /readyz)\n"),
            PLAIN,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let status = buf
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let c = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("demo_things", "Things counted", c.clone());
        c.inc_by(7);
        let ready = Arc::new(AtomicBool::new(false));
        let r = Arc::clone(&ready);
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            Arc::new(move || r.load(Ordering::SeqCst)),
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("demo_things_total 7"), "{body}");
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        ready.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        assert_eq!(get(addr, "/nope").await.0, 404);
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let first = serve(
            "127.0.0.1:0".parse().unwrap(),
            Registry::default(),
            Arc::new(|| true),
        )
        .await
        .unwrap();
        let err = serve(first.local_addr(), Registry::default(), Arc::new(|| true))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--metrics-listen"), "{err}");
    }
}
