//! The local API: HTTP/1 over a unix socket (default `/run/shoal/peer.sock`), for `shoal get`,
//! the FUSE filesystem and operators.
//!
//! - `GET|HEAD /blobs/sha256:<hex>?source=docker://HOST/REPO` — the blob, or with a `Range`
//!   header one byte range of it (206), streamed as pieces arrive (read ahead from the store when
//!   it holds them all, cached.rs); 416 for a range outside it; 403 when the source is outside
//!   `allowed_origins` (here, or the scheduler's or a seed's), the body saying which entry to add.
//!   With `&bootstrap=sha256:…` (a Shoal data blob's image bootstrap), the blob's piece table is
//!   read from that bootstrap, so ranges are fetched piece by piece instead of the blob whole.
//! - `POST /blobs/sha256:<hex>/fetch?source=...` — fetch the whole blob; answers with its status
//!   once it is complete and verified.
//! - `PUT /blobs/sha256:<hex>/pieces?source=...` — the blob's piece table, from a local client
//!   that has it from trusted metadata (a Shoal bootstrap, the index of an unconverted layer):
//!   header `Shoal-Piece-Size`, body the pieces' BLAKE3 hashes back to back. Ranges of the blob
//!   are then fetched piece by piece, each piece verified, instead of the whole blob being
//!   imported before the first byte is served. 204 when taken (or already known), 409 when it
//!   disagrees with what this peer knows of the blob, or a download without it already runs.
//! - `GET /tasks`, `GET /tasks/sha256:<hex>` — download status (JSON).
//! - `GET /cache` — store figures (JSON).
//! - `GET /status` — host id, seed mode, scheduler connection, store figures, tasks (JSON).

mod bootstrap_table;
pub(crate) mod cached;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use shoal_api::{CacheStatus, NodeStatus, RangeAnswer};
use shoal_proto::{Digest, OriginRef};
use shoal_store::AsyncStore;
use tokio::net::UnixListener;

use crate::download::Downloader;
use crate::error::PeerError;

/// Largest request head accepted.
const MAX_HEADERS: usize = 64;
/// The piece-size header of a piece table a client offers (the API crate's contract).
pub use shoal_api::PIECE_SIZE_HEADER;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What the API answers from.
pub(crate) struct ApiState {
    pub downloader: Arc<Downloader>,
    pub store: AsyncStore,
    /// Connections accepted (clients keep theirs open between requests).
    pub connections: Arc<std::sync::atomic::AtomicU64>,
}

/// Binds the socket (replacing a stale one; the parent directory is created 0755) and serves
/// until the returned task is aborted, which also ends every open connection (clients keep
/// theirs open between requests: a stopped peer must not go on answering on them).
pub(crate) fn serve(
    path: &Path,
    state: Arc<ApiState>,
) -> Result<tokio::task::JoinHandle<()>, PeerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| PeerError::io("create directory", dir.display(), e))?;
    }
    if path.exists() {
        // A socket left by a previous run: nobody can be listening if we got this far.
        std::fs::remove_file(path)
            .map_err(|e| PeerError::io("remove stale socket", path.display(), e))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| PeerError::io("bind local API socket", path.display(), e))?;
    let path: PathBuf = path.to_path_buf();
    Ok(tokio::spawn(async move {
        // Dropped (aborting every connection) when this task is aborted.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                Some(_) = connections.join_next() => continue,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(socket = %path.display(), error = %e, "local API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            state
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let state = Arc::clone(&state);
            connections.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(handle(&state, req).await) }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.max_headers(MAX_HEADERS);
                if let Err(e) = http.serve_connection(TokioIo::new(stream), svc).await {
                    tracing::debug!(error = %e, "local API connection ended with an error");
                }
            });
        }
    }))
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

fn json<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(v) => {
            let mut r = full(StatusCode::OK, v);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => full(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error(e: &PeerError) -> Response<Body> {
    let status = match e {
        PeerError::BadRequest(_) | PeerError::Proto(_) | PeerError::Id(_) => {
            StatusCode::BAD_REQUEST
        }
        PeerError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        // The body names the origin and the allowed_origins entry to add.
        PeerError::NotAllowed(_) => StatusCode::FORBIDDEN,
        PeerError::Origin(o) if o.to_string().contains("not found") => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_GATEWAY,
    };
    full(status, format!("{e}\n"))
}

/// The value of query parameter `name`, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, PeerError> {
    let Some(q) = query else { return Ok(None) };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

pub(crate) fn percent_decode(s: &str) -> Result<String, PeerError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        PeerError::BadRequest("bad percent-encoding in the query".into())
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| PeerError::BadRequest("query is not UTF-8".into()))
}

async fn handle(state: &ApiState, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let (&Method::PUT, ["blobs", digest, "pieces"]) = (req.method(), segments.as_slice()) {
        return offer_pieces(state, req, digest, query.as_deref())
            .await
            .unwrap_or_else(|e| error(&e));
    }
    let result = match (req.method(), segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["blobs", digest]) => {
            get_blob(state, &req, digest, query.as_deref()).await
        }
        (&Method::POST, ["blobs", digest, "fetch"]) => {
            fetch_blob(state, &req, digest, query.as_deref()).await
        }
        (&Method::GET, ["tasks"]) => Ok(json(&state.downloader.statuses())),
        (&Method::GET, ["tasks", digest]) => match parse_digest(digest) {
            Ok(d) => match state.downloader.status(&d) {
                Some(s) => Ok(json(&s)),
                None => Ok(full(StatusCode::NOT_FOUND, format!("no task for {d}\n"))),
            },
            Err(e) => Err(e),
        },
        (&Method::GET, ["cache"]) => Ok(json(&cache_status(state))),
        (&Method::GET, ["status"]) => {
            let (host_id, seed, schedulers, schedulers_connected) = state.downloader.node();
            Ok(json(&NodeStatus {
                host_id,
                seed,
                schedulers,
                schedulers_connected,
                cache: cache_status(state),
                tasks: state.downloader.statuses(),
            }))
        }
        _ => Ok(full(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {} {path}\n", req.method()),
        )),
    };
    result.unwrap_or_else(|e| error(&e))
}

fn cache_status(state: &ApiState) -> CacheStatus {
    let s = state.store.stats();
    let d = state.downloader.stats();
    use std::sync::atomic::Ordering::Relaxed;
    CacheStatus {
        used_bytes: s.used_bytes,
        high_watermark: s.high_watermark,
        blobs: s.blobs,
        complete_blobs: s.complete_blobs,
        pieces: s.pieces,
        corruptions: s.corruptions,
        bytes_from_peers: d.bytes_from_peers.load(Relaxed),
        bytes_from_origin: d.bytes_from_origin.load(Relaxed),
    }
}

fn parse_digest(text: &str) -> Result<Digest, PeerError> {
    Digest::parse(text).map_err(|e| PeerError::BadRequest(e.to_string()))
}

fn origin_of(req: &Request<Incoming>, query: Option<&str>) -> Result<Option<OriginRef>, PeerError> {
    let Some(reference) = query_param(query, "source")? else {
        return Ok(None);
    };
    if reference.len() > shoal_proto::MAX_ORIGIN_REF_LEN {
        return Err(PeerError::BadRequest("source reference too long".into()));
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= shoal_proto::MAX_AUTHORIZATION_LEN)
        .map(str::to_string);
    Ok(Some(OriginRef {
        reference,
        authorization,
    }))
}

async fn get_blob(
    state: &ApiState,
    req: &Request<Incoming>,
    digest: &str,
    query: Option<&str>,
) -> Result<Response<Body>, PeerError> {
    let blob = parse_digest(digest)?;
    let origin = origin_of(req, query)?;
    if let Some(boot) = query_param(query, "bootstrap")? {
        bootstrap_table::ensure(state, blob, parse_digest(&boot)?, origin.clone()).await?;
    }
    let task = state.downloader.open(blob, origin).await?;
    let size = task
        .size()
        .ok_or_else(|| PeerError::download(blob, "size unknown"))?;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let answer = RangeAnswer::new(range, size);
    let body: Body = match answer.bytes() {
        Some((start, end)) if req.method() != Method::HEAD => {
            let stream = cached::read(&task, &state.store, blob, start, end, false).await?;
            let frames = stream.map(|r| {
                r.map(Frame::data)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            });
            BodyExt::boxed_unsync(StreamBody::new(frames))
        }
        _ => Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = answer.status();
    *resp.headers_mut() = answer.headers(&blob);
    Ok(resp)
}

async fn fetch_blob(
    state: &ApiState,
    req: &Request<Incoming>,
    digest: &str,
    query: Option<&str>,
) -> Result<Response<Body>, PeerError> {
    let blob = parse_digest(digest)?;
    let origin = origin_of(req, query)?;
    let task = state.downloader.open(blob, origin).await?;
    task.fetch_all().await?;
    Ok(json(&task.status()))
}

async fn offer_pieces(
    state: &ApiState,
    req: Request<Incoming>,
    digest: &str,
    query: Option<&str>,
) -> Result<Response<Body>, PeerError> {
    let blob = parse_digest(digest)?;
    let origin = origin_of(&req, query)?;
    let piece_size: u32 = req
        .headers()
        .get(PIECE_SIZE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| PeerError::BadRequest(format!("{PIECE_SIZE_HEADER} header missing")))?;
    let max = shoal_proto::MAX_PIECES as usize * 32;
    let body = http_body_util::Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| PeerError::BadRequest(format!("piece table: {e}")))?
        .to_bytes();
    if body.is_empty() || body.len() % 32 != 0 {
        return Err(PeerError::BadRequest(format!(
            "a piece table is whole 32-byte hashes; got {} bytes",
            body.len()
        )));
    }
    let table: Vec<[u8; 32]> = body
        .chunks_exact(32)
        .map(|h| {
            let mut a = [0u8; 32];
            a.copy_from_slice(h);
            a
        })
        .collect();
    let task = state.downloader.open(blob, origin).await?;
    match task.offer_table(piece_size, table).await? {
        Ok(()) => Ok(full(StatusCode::NO_CONTENT, "")),
        Err(why) => Ok(full(StatusCode::CONFLICT, format!("{why}\n"))),
    }
}
