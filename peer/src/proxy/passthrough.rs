//! Pass-through: manifests, tags, referrers, catalog, token endpoints and anything else that is
//! not a blob by digest go to the upstream as they came (Authorization included) and the answer
//! comes back unchanged and streamed, 401 challenges too, so the client runs its own token flow.
//! Tags are never cached. Also the swarm's fallback: a blob range straight from the upstream.

use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::{header, HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};

use super::mirror::{Upstream, UPSTREAM_HEADER};
use super::server::State;
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
        Err(e) => {
            tracing::info!(upstream = %up.host, path = parts.uri.path(), error = %e, "upstream unreachable");
            registry_error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("upstream registry {} did not answer: {e}", up.host),
            )
        }
    }
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
    let status = resp.status();
    let mut headers = HeaderMap::with_capacity(resp.headers().len());
    for (name, value) in resp.headers() {
        if !hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
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
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
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
