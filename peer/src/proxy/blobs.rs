//! `GET`/`HEAD /v2/<name>/blobs/<digest>`: through the swarm, keyed by digest (the same blob in
//! two repositories or registries is one task, shared by every client), streamed as pieces
//! arrive; one range answers 206 from the pieces that cover it, an unsatisfiable one 416. When
//! the swarm fails, the request (or the rest of it) comes from the upstream.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use shoal_proto::{Digest, OriginRef};

use super::authz::Verdict;
use super::mirror::Upstream;
use super::passthrough;
use super::server::State;
use super::{full, Body};
use crate::api::cached;
use crate::api::range::{parse_range, RangeAsk};
use crate::download::RangeStream;

/// Serves one blob request.
pub(crate) async fn serve(
    state: &Arc<State>,
    req: Request<Incoming>,
    up: &Upstream,
    name: &str,
    blob: Digest,
) -> Response<Body> {
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let upstream_size = match state
        .authz
        .check(state, up, name, &blob, auth.as_ref(), req.method())
        .await
    {
        Verdict::Denied(resp) => return resp,
        Verdict::Allowed(size) => size,
    };
    let authorization = auth
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= shoal_proto::MAX_AUTHORIZATION_LEN)
        .map(str::to_string);
    let origin = OriginRef {
        reference: format!("docker://{}/{name}", up.host),
        authorization: authorization.clone(),
    };
    let task = match state.downloader.open(blob, Some(origin)).await {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(%blob, error = %e, "swarm could not open the blob; passing through to upstream");
            return passthrough::forward(state, req, up).await;
        }
    };
    let size = match (task.size(), upstream_size) {
        (Some(ours), Some(theirs)) if ours != theirs => {
            // Cannot be for one digest; trust neither the task nor our cache: pass through.
            tracing::warn!(%blob, ours, theirs, "blob size differs from the upstream's");
            return passthrough::forward(state, req, up).await;
        }
        (Some(size), _) => size,
        (None, _) => return passthrough::forward(state, req, up).await,
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (status, start, end) = match parse_range(range, size) {
        RangeAsk::Whole => (StatusCode::OK, 0, size),
        RangeAsk::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e),
        RangeAsk::Unsatisfiable => {
            let mut r = full(StatusCode::RANGE_NOT_SATISFIABLE, "");
            set(
                r.headers_mut(),
                header::CONTENT_RANGE,
                format!("bytes */{size}"),
            );
            return r;
        }
    };
    let body: Body = if req.method() == Method::HEAD {
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync()
    } else {
        let stream = match cached::read(&task, &state.store, blob, start, end, true).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%blob, error = %e, "swarm read failed; passing through to upstream");
                return passthrough::forward(state, req, up).await;
            }
        };
        let fallback = Fallback {
            state: Arc::clone(state),
            url: up.url(&format!("/v2/{name}/blobs/{blob}"), None),
            authorization,
            blob,
        };
        let frames = with_fallback(stream, fallback, start, end).map(|r| r.map(Frame::data));
        BodyExt::boxed_unsync(StreamBody::new(frames))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    set(h, header::CONTENT_LENGTH, (end - start).to_string());
    set(h, header::CONTENT_TYPE, "application/octet-stream".into());
    set(h, header::ACCEPT_RANGES, "bytes".into());
    set(h, header::ETAG, format!("\"{blob}\""));
    set(
        h,
        header::HeaderName::from_static("docker-content-digest"),
        blob.to_string(),
    );
    set(
        h,
        header::HeaderName::from_static("docker-distribution-api-version"),
        "registry/2.0".into(),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            h,
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
        );
    }
    resp
}

fn set(h: &mut http::HeaderMap, name: header::HeaderName, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(name, v);
    }
}

/// Where the rest of a response comes from if the swarm fails part-way.
struct Fallback {
    state: Arc<State>,
    url: String,
    authorization: Option<String>,
    blob: Digest,
}

enum Source {
    Swarm(RangeStream),
    Upstream(BoxStream<'static, Result<Bytes, std::io::Error>>),
    Done,
}

/// The swarm's stream of `start..end`; on a swarm error, the remaining bytes from the upstream
/// (origin bytes passed through, as a plain mirror would). Bytes already sent are kept.
fn with_fallback(
    swarm: RangeStream,
    fallback: Fallback,
    start: u64,
    end: u64,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold(
        (Source::Swarm(swarm), fallback, start),
        move |(mut src, fb, mut pos)| async move {
            loop {
                let next = match &mut src {
                    Source::Swarm(s) => match s.next().await {
                        Some(Ok(b)) => Ok(b),
                        None => return None,
                        Some(Err(e)) => {
                            tracing::warn!(blob = %fb.blob, at = pos, error = %e, "swarm failed mid-response; rest from upstream");
                            match passthrough::upstream_range(
                                &fb.state,
                                &fb.url,
                                fb.authorization.as_deref(),
                                pos,
                                end,
                            )
                            .await
                            {
                                Ok(u) => {
                                    src = Source::Upstream(u);
                                    continue;
                                }
                                Err(why) => Err(std::io::Error::other(format!(
                                    "{e}; upstream fallback for {} failed too: {why}",
                                    fb.blob
                                ))),
                            }
                        }
                    },
                    Source::Upstream(u) => match u.next().await {
                        Some(r) => r,
                        None if pos < end => Err(std::io::Error::other(format!(
                            "upstream ended {} bytes early for {}",
                            end - pos,
                            fb.blob
                        ))),
                        None => return None,
                    },
                    Source::Done => return None,
                };
                return match next {
                    Ok(b) => {
                        pos += b.len() as u64;
                        Some((Ok(b), (src, fb, pos)))
                    }
                    Err(e) => Some((Err(e), (Source::Done, fb, pos))),
                };
            }
        },
    )
}
