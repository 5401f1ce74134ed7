//! The transparent registry proxy: a registry mirror for containerd (default `127.0.0.1:4480`)
//! whose blobs come through the swarm and everything else straight from the upstream registry.
//!
//! Data path of one request (server.rs accepts HTTP/1.1 or h2c, optionally TLS):
//!
//! ```text
//!  GET /v2/<name>/blobs/sha256:<hex>?ns=<registry>      anything else under /v2/ (and tokens)
//!        | mirror.rs: upstream = ns= | header | default         |
//!        | server.rs: not in allowed_origins? 403, nothing contacted
//!        |                                                      |
//!        v                                                      v
//!  authz.rs: HEAD upstream with the client's Authorization   passthrough.rs: the same request to
//!   (cached briefly per credential, repository and blob);     the upstream, Authorization
//!   401/403/404 go back to the client, never a byte           forwarded, answer streamed back
//!        |                                                     unchanged (401 challenges too);
//!        |                                                     GET/HEAD to a plain-HTTP upstream
//!        |                                                     on the client connection's own
//!        |                                                     upstream connection (pinned.rs)
//!        v
//!  blobs.rs: Downloader::open(digest) (one task per digest, shared by every client and every
//!   repository) -> Range: 206 from the covering pieces, 416, or 200 -> api/cached.rs: held
//!   pieces read and verified ahead on the blocking pool, else streamed as pieces arrive
//!   (first fetch of a plain OCI blob: origin bytes teed into the store, download/tee.rs)
//!   -> if the swarm fails, the rest of the request comes from the upstream
//! ```

mod authz;
mod blobs;
mod mirror;
mod passthrough;
mod pinned;
mod server;
mod stats;

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use serde::{Deserialize, Serialize};

pub(crate) use server::start;
pub use server::ProxyServer;
pub use stats::{ProxyStats, RequestLabels};

/// Response body of the proxy: streamed, boxed.
type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The registry proxy's settings (the `[proxy]` section of the peer config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Serve the registry proxy.
    pub enabled: bool,
    /// TCP address the proxy listens on.
    pub listen: SocketAddr,
    /// Registry for requests that name none (no `ns=` query parameter, no `Shoal-Upstream`
    /// header), e.g. `registry-1.docker.io`; `None`: such requests are refused with 400.
    pub default_upstream: Option<String>,
    /// Serve HTTPS with this node's certificate (the peer's `tls_dir`) instead of plain HTTP.
    pub tls: bool,
    /// How long a successful permission check (HEAD of a blob upstream with the client's
    /// credentials) is reused for the same credential, repository and blob, in seconds.
    pub authz_cache_secs: u64,
    /// Connecting to the upstream registry gives up after this long.
    pub upstream_connect_timeout_ms: u64,
    /// An upstream response silent for this long fails (headers or body).
    pub upstream_read_timeout_ms: u64,
    /// A client must send a request's headers within this long (also the keep-alive idle limit).
    pub header_timeout_ms: u64,
    /// Largest request body accepted (the proxy serves pulls; bodies are small).
    pub max_request_body: usize,
    /// On shutdown, requests in flight get this long to finish.
    pub shutdown_grace_ms: u64,
    /// Add `Server-Timing: upstream;dur=MS, proxy;dur=MS` to answers: how long the upstream
    /// took (pass-through: head and a small body) and the proxy's handler in all, so a client
    /// can tell the proxy's share of a slow request.
    pub server_timing: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 4480)),
            default_upstream: None,
            tls: false,
            authz_cache_secs: 60,
            upstream_connect_timeout_ms: 10_000,
            upstream_read_timeout_ms: 60_000,
            header_timeout_ms: 30_000,
            max_request_body: 4 << 20,
            shutdown_grace_ms: 10_000,
            server_timing: false,
        }
    }
}

/// A response with a small fixed body.
pub(crate) fn full(status: http::StatusCode, body: impl Into<Bytes>) -> http::Response<Body> {
    let mut r = http::Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

/// An OCI distribution error answer (`{"errors":[{"code":..,"message":..}]}`).
pub(crate) fn registry_error(
    status: http::StatusCode,
    code: &str,
    message: &str,
) -> http::Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    let mut r = full(status, body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
