//! Private blobs stay private: before a blob is served from the swarm (or this node's cache),
//! the upstream is asked, with the client's own credentials, whether the client may read it
//! (a HEAD of the blob). A yes is remembered briefly per credential, registry, repository and
//! blob; a no (401, 403, 404...) goes back to the client as the upstream gave it, and no byte.

use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use shoal_proto::Digest;

use super::mirror::Upstream;
use super::server::State;
use super::{full, registry_error, Body};

/// Permission checks remembered at most.
const CACHE_ENTRIES: u64 = 100_000;

/// Headers of a refusal worth passing on (the challenge above all).
const REFUSAL_HEADERS: [header::HeaderName; 2] = [header::WWW_AUTHENTICATE, header::CONTENT_TYPE];

/// The upstream's answer on whether a client may read a blob.
pub(crate) enum Verdict {
    /// Readable; the size when the upstream said it.
    Allowed(Option<u64>),
    /// Not readable: the answer for the client.
    Denied(Response<Body>),
}

/// Recent successful checks.
pub(crate) struct Authz {
    allowed: moka::sync::Cache<[u8; 32], Option<u64>>,
}

impl Authz {
    /// A cache keeping a yes for `ttl` (zero: ask every time).
    pub fn new(ttl: Duration) -> Self {
        Authz {
            allowed: moka::sync::Cache::builder()
                .max_capacity(if ttl.is_zero() { 0 } else { CACHE_ENTRIES })
                .time_to_live(ttl.max(Duration::from_millis(1)))
                .build(),
        }
    }

    /// Asks the upstream (or the cache) whether the holder of `authorization` may read `blob`
    /// in repository `name`.
    pub async fn check(
        &self,
        state: &State,
        up: &Upstream,
        name: &str,
        blob: &Digest,
        authorization: Option<&HeaderValue>,
        method: &Method,
    ) -> Verdict {
        let key = cache_key(authorization, up, name, blob);
        if let Some(size) = self.allowed.get(&key) {
            return Verdict::Allowed(size);
        }
        let url = up.url(&format!("/v2/{name}/blobs/{blob}"), None);
        let mut rb = state.http.head(&url);
        if let Some(a) = authorization {
            rb = rb.header(header::AUTHORIZATION, a.clone());
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => {
                // Cannot confirm: refuse rather than serve a possibly private blob.
                tracing::info!(upstream = %up.host, %blob, error = %e, "permission check failed");
                return Verdict::Denied(registry_error(
                    StatusCode::BAD_GATEWAY,
                    "UNAVAILABLE",
                    &format!(
                        "upstream registry {} did not answer the permission check for {blob}: {e}",
                        up.host
                    ),
                ));
            }
        };
        let status = resp.status();
        if status.is_success() || status.is_redirection() {
            let size = status
                .is_success()
                .then(|| {
                    resp.headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .flatten();
            self.allowed.insert(key, size);
            return Verdict::Allowed(size);
        }
        tracing::debug!(upstream = %up.host, %blob, %status, "client may not read the blob");
        Verdict::Denied(refusal(status, resp.headers(), method, blob))
    }
}

/// The upstream's refusal as the client gets it: its status and challenge; a registry error
/// body on GET (a HEAD answer has none).
fn refusal(
    status: StatusCode,
    upstream: &HeaderMap,
    method: &Method,
    blob: &Digest,
) -> Response<Body> {
    let (code, message) = match status {
        StatusCode::UNAUTHORIZED => ("UNAUTHORIZED", "authentication required"),
        StatusCode::FORBIDDEN => ("DENIED", "requested access to the resource is denied"),
        StatusCode::NOT_FOUND => ("BLOB_UNKNOWN", "blob unknown to registry"),
        _ => ("UNKNOWN", "the upstream registry refused the request"),
    };
    let mut r = if method == Method::HEAD {
        full(status, "")
    } else {
        registry_error(status, code, &format!("{message}: {blob}"))
    };
    *r.status_mut() = status;
    for name in REFUSAL_HEADERS {
        if name == header::CONTENT_TYPE && method != Method::HEAD {
            continue;
        }
        for v in upstream.get_all(&name) {
            r.headers_mut().append(name.clone(), v.clone());
        }
    }
    r
}

/// BLAKE3 of credential, registry, repository and blob: the cache holds no credential itself.
fn cache_key(
    authorization: Option<&HeaderValue>,
    up: &Upstream,
    name: &str,
    blob: &Digest,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for part in [
        authorization.map_or(&b""[..], HeaderValue::as_bytes),
        up.host.as_bytes(),
        name.as_bytes(),
        blob.to_string().as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_credentials_and_repositories() {
        let up = Upstream {
            host: "r".into(),
            base: "http://r".into(),
        };
        let d = Digest::parse(
            "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        )
        .unwrap();
        let a = HeaderValue::from_static("Basic YTpi");
        let k = cache_key(Some(&a), &up, "x", &d);
        assert_eq!(k, cache_key(Some(&a), &up, "x", &d));
        assert_ne!(k, cache_key(None, &up, "x", &d));
        assert_ne!(k, cache_key(Some(&a), &up, "y", &d));
    }
}
