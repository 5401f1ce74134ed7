//! Pass-through: manifests, tags, referrers, catalog, token endpoints and anything else that is
//! not a blob by digest go to the upstream as they came (Authorization included) and the answer
//! comes back unchanged and streamed, 401 challenges too, so the client runs its own token flow.
//! Tags are never cached. Bodiless GETs and HEADs to a plain-HTTP upstream go out on the client
//! connection's pinned upstream connection (pinned.rs), everything else through a shared pool.
//! Also the swarm's fallback: a blob range straight from the upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::{header, HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};

use super::mirror::{Upstream, UPSTREAM_HEADER};
use super::pinned::{self, Answer, PinError, PinSlot};
use super::server::{State, USER_AGENT};
use super::{registry_error, Body};

/// Upstream answers up to this size are read whole before the client gets them: one write of
/// head and body instead of a write per part (and a wakeup per chunk) on the latency path.
const WHOLE_UP_TO: u64 = 256 << 10;

/// Hop-by-hop headers (RFC 9110 section 7.6.1): never forwarded either way.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || name == header::UPGRADE
}

/// The client's headers as the upstream gets them: without hop-by-hop ones, Host and ours.
fn request_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name.as_str() == UPSTREAM_HEADER
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Sends `req` to the upstream and streams its answer back unchanged.
pub(crate) async fn forward(
    state: &State,
    req: Request<Incoming>,
    up: &Upstream,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, state.cfg.max_request_body)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return registry_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "SIZE_INVALID",
                &format!(
                    "request body refused (the proxy takes at most {} bytes): {e}",
                    state.cfg.max_request_body
                ),
            )
        }
    };
    if let Some(out) = try_pinned(state, &parts, &body, up).await {
        return out;
    }
    let url = up.url(parts.uri.path(), parts.uri.query());
    let mut rb = state
        .http
        .request(parts.method.clone(), &url)
        .headers(request_headers(&parts.headers));
    if !body.is_empty() {
        rb = rb.body(body);
    }
    let asked = Instant::now();
    match rb.send().await {
        Ok(resp) => {
            let mut out = relay(resp).await;
            if state.cfg.server_timing {
                add_server_timing(&mut out, "upstream", asked);
            }
            out
        }
        Err(e) => upstream_unreachable(up, &e),
    }
}

/// The answer when the upstream could not be reached.
fn upstream_unreachable(up: &Upstream, e: &dyn std::fmt::Display) -> Response<Body> {
    tracing::info!(upstream = %up.host, error = %e, "upstream unreachable");
    registry_error(
        StatusCode::BAD_GATEWAY,
        "UNAVAILABLE",
        &format!("upstream registry {} did not answer: {e}", up.host),
    )
}

/// Adds `Server-Timing: metric;dur=MS` (W3C Server Timing), the time since `since`, as a field
/// of its own: fields already there, the upstream's included, stay as they were.
pub(crate) fn add_server_timing(out: &mut Response<Body>, metric: &str, since: Instant) {
    let ms = since.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = http::HeaderValue::from_str(&format!("{metric};dur={ms:.3}")) {
        out.headers_mut().append(SERVER_TIMING, v);
    }
}

/// The Server-Timing response header.
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// An upstream answer as the client gets it: status, headers (minus hop-by-hop), and the body:
/// a small one (manifests, tokens, errors) read whole and sent with the head in one write, a
/// larger one streamed.
pub(crate) async fn relay(resp: reqwest::Response) -> Response<Body> {
    let (status, headers) = (resp.status(), answer_headers(resp.headers()));
    let body = if resp.content_length().is_some_and(|n| n <= WHOLE_UP_TO) {
        match resp.bytes().await {
            Ok(b) => Full::new(b).map_err(|never| match never {}).boxed_unsync(),
            Err(e) => {
                return registry_error(
                    StatusCode::BAD_GATEWAY,
                    "UNAVAILABLE",
                    &format!("the upstream registry's answer broke off: {e}"),
                )
            }
        }
    } else {
        let frames = resp
            .bytes_stream()
            .map_ok(Frame::data)
            .map_err(std::io::Error::other);
        BodyExt::boxed_unsync(StreamBody::new(frames))
    };
    answer(status, headers, body)
}

/// An upstream answer's headers as the client gets them: without hop-by-hop ones.
fn answer_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if !hop_by_hop(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// A response of `status`, `headers` and `body`.
fn answer(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// A bodiless GET or HEAD to a plain-HTTP upstream on the client connection's pinned upstream
/// connection (pinned.rs), when it has one free; `None` sends the request through the pool
/// (also after a pinned exchange failed: GET and HEAD may be sent again).
async fn try_pinned(
    state: &State,
    parts: &http::request::Parts,
    body: &Bytes,
    up: &Upstream,
) -> Option<Response<Body>> {
    if !body.is_empty()
        || !matches!(parts.method, http::Method::GET | http::Method::HEAD)
        || !up.base.starts_with("http://")
    {
        return None;
    }
    let mut slot = parts.extensions.get::<Arc<PinSlot>>()?.try_lock().ok()?;
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(Upstream::target(parts.uri.path(), parts.uri.query()))
        .body(Empty::new())
        .ok()?;
    let headers = req.headers_mut();
    *headers = request_headers(&parts.headers);
    headers.insert(header::HOST, http::HeaderValue::from_str(&up.host).ok()?);
    // What the pool's client adds to a request without them.
    headers
        .entry(header::USER_AGENT)
        .or_insert(http::HeaderValue::from_static(USER_AGENT));
    headers
        .entry(header::ACCEPT)
        .or_insert(http::HeaderValue::from_static("*/*"));
    let asked = Instant::now();
    let answered = pinned::exchange(
        &mut slot,
        &state.stats.pinned_connections,
        &up.host,
        req,
        WHOLE_UP_TO,
        Duration::from_millis(state.cfg.upstream_connect_timeout_ms),
        Duration::from_millis(state.cfg.upstream_read_timeout_ms),
    )
    .await;
    let (head, body) = match answered {
        Ok(Answer::Whole(resp)) => {
            let (head, bytes) = resp.into_parts();
            let body = Full::new(bytes).map_err(|never| match never {});
            (head, body.boxed_unsync())
        }
        Ok(Answer::Streamed(resp)) => {
            let (head, body) = resp.into_parts();
            (head, body.map_err(std::io::Error::other).boxed_unsync())
        }
        // Unreachable or silent: the pool would only wait as long again.
        Err(e @ (PinError::Connect(_) | PinError::TimedOut)) => {
            return Some(upstream_unreachable(up, &e))
        }
        Err(e) => {
            tracing::debug!(upstream = %up.host, error = %e, "pinned upstream connection failed; through the pool");
            return None;
        }
    };
    let mut out = answer(head.status, answer_headers(&head.headers), body);
    if state.cfg.server_timing {
        add_server_timing(&mut out, "upstream", asked);
    }
    Some(out)
}

/// Bytes `start..end` of a blob straight from the upstream with the client's Authorization:
/// the fallback when the swarm fails part-way through a response.
pub(crate) async fn upstream_range(
    state: &State,
    url: &str,
    authorization: Option<&str>,
    start: u64,
    end: u64,
) -> Result<futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>, String> {
    let mut rb = state.http_follow.get(url).header(
        header::RANGE,
        format!("bytes={start}-{}", end.saturating_sub(1)),
    );
    if let Some(a) = authorization {
        rb = rb.header(header::AUTHORIZATION, a);
    }
    let resp = rb.send().await.map_err(|e| e.to_string())?;
    let skip = match resp.status() {
        StatusCode::PARTIAL_CONTENT => {
            let first = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if first != Some(start) {
                return Err(format!("upstream answered another range ({first:?})"));
            }
            0
        }
        // A registry that ignores Range sends the whole blob: skip to `start`.
        StatusCode::OK => start,
        s => return Err(format!("upstream answered {s}")),
    };
    let want = end - start;
    let stream = resp
        .bytes_stream()
        .map_err(std::io::Error::other)
        .scan((skip, want), |(skip, want), chunk| {
            let out = chunk.map(|mut c| {
                let drop = (*skip).min(c.len() as u64) as usize;
                *skip -= drop as u64;
                let _ = c.split_to(drop);
                let keep = (*want).min(c.len() as u64) as usize;
                c.truncate(keep);
                *want -= keep as u64;
                c
            });
            futures::future::ready(Some(out))
        })
        .try_filter(|c| futures::future::ready(!c.is_empty()));
    Ok(stream.boxed())
}
