//! `GET`/`HEAD /v2/<name>/blobs/<digest>`: through the swarm, keyed by digest (the same blob in
//! two repositories or registries is one task, shared by every client), streamed as pieces
//! arrive; one range answers 206 from the pieces that cover it, an unsatisfiable one 416. When
//! the swarm fails, the request (or the rest of it) comes from the upstream.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use http::{header, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use shoal_api::RangeAnswer;
use shoal_proto::{Digest, OriginRef};

use super::authz::Verdict;
use super::mirror::Upstream;
use super::passthrough;
use super::server::State;
use super::Body;
use crate::api::cached;
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
    let answer = RangeAnswer::new(range, size);
    let body: Body = match answer.bytes() {
        Some((start, end)) if req.method() != Method::HEAD => {
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
        }
        _ => Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = answer.status();
    let mut headers = answer.headers(&blob);
    if answer.bytes().is_some() {
        headers.insert(
            header::HeaderName::from_static("docker-distribution-api-version"),
            HeaderValue::from_static("registry/2.0"),
        );
    }
    *resp.headers_mut() = headers;
    resp
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
