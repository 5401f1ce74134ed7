//! One registry request: endpoint choice (mirror `ns=`, HTTP for loopback), authentication
//! (basic, bearer tokens per scope, renewal on 401), redirects that never carry credentials to
//! another host (nor, under an allowed-origins list, to an unlisted loopback or link-local
//! address: allow/target.rs), and retries with exponential backoff and jitter on 5xx, 429 and broken connections.

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode, Url};
use tracing::Instrument;

use super::auth::{parse_challenge, Challenge, Token, TokenResponse};
use super::{Reference, RegistryClient};
use crate::OriginError;

/// Where requests for a reference go.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// Host (with port) that receives the requests and whose credentials apply.
    pub host: String,
    /// `http(s)://host`.
    pub base: Url,
    /// Upstream registry when `host` is a mirror (`?ns=`).
    pub ns: Option<String>,
}

/// A request body that can be sent again on a retry.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    Empty,
    Bytes(Bytes),
    File { path: PathBuf, len: u64 },
}

/// What one request needs: method, URL, headers, body, and the scope it needs.
#[derive(Debug, Clone)]
pub(crate) struct Req {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Body,
    /// `repository:<name>:pull` or `...:pull,push`.
    pub scope: String,
    /// Human description for errors and spans.
    pub what: String,
    /// Small request: apply the whole-request timeout.
    pub bounded: bool,
}

const MAX_REDIRECTS: usize = 10;

impl RegistryClient {
    /// The endpoint for a reference's registry.
    pub(crate) fn endpoint(&self, reference: &Reference) -> Result<Endpoint, OriginError> {
        let upstream = reference.registry();
        if let Some(allowed) = &self.opts.allowed {
            allowed.check_registry(upstream)?;
        }
        let (host, ns) = match self.opts.mirrors.get(upstream) {
            Some(mirror) => (mirror.clone(), Some(upstream.to_string())),
            None => (upstream.to_string(), None),
        };
        let plain = super::is_loopback_host(&host) || self.opts.plain_http.contains(&host);
        let scheme = if plain { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{host}")).map_err(|e| {
            OriginError::InvalidReference {
                reference: reference.to_string(),
                reason: format!("registry host is not a valid URL authority: {e}"),
            }
        })?;
        Ok(Endpoint { host, base, ns })
    }

    /// `base/v2/<path>` with `ns=` for mirrors.
    pub(crate) fn api_url(&self, ep: &Endpoint, path: &str) -> Result<Url, OriginError> {
        let mut url = ep
            .base
            .join(&format!("/v2/{path}"))
            .map_err(|e| OriginError::Config(format!("URL for {path}: {e}")))?;
        if let Some(ns) = &ep.ns {
            url.query_pairs_mut().append_pair("ns", ns);
        }
        Ok(url)
    }

    /// Sends a request with authentication, redirects and retries; returns the final response
    /// whatever its status (except 401, which becomes an auth error).
    pub(crate) async fn send(&self, ep: &Endpoint, req: &Req) -> Result<Response, OriginError> {
        let span = tracing::debug_span!("registry_request", registry = %ep.host, method = %req.method, what = %req.what);
        self.send_inner(ep, req).instrument(span).await
    }

    async fn send_inner(&self, ep: &Endpoint, req: &Req) -> Result<Response, OriginError> {
        let mut attempt: u32 = 0;
        let mut url = req.url.clone();
        let mut redirects = 0usize;
        let mut renewed = false;
        let mut learned = false;
        // The last URL off the registry's own origin that the allowed-origins rule passed.
        let mut checked: Option<Url> = None;
        loop {
            attempt += 1;
            let same_origin = url.origin() == ep.base.origin();
            if !same_origin && checked.as_ref() != Some(&url) {
                let from = format!(
                    "registry {} sent the request for {} on to",
                    ep.host, req.what
                );
                self.check_target(&url, &from).await?;
                checked = Some(url.clone());
            }
            let auth = if same_origin && self.authorization.is_some() {
                self.authorization.as_deref().map(str::to_string)
            } else if same_origin {
                self.auth_header(ep, &req.scope, &req.what).await?
            } else {
                // Redirected to blob storage: its URL carries its own authorization.
                None
            };
            let result = self.execute_once(req, &url, auth.as_deref()).await;
            let resp = match result {
                Ok(r) => r,
                Err(e) if attempt < self.opts.max_attempts => {
                    tracing::debug!(attempt, error = %e, "request failed, retrying");
                    tokio::time::sleep(self.backoff(attempt)).await;
                    continue;
                }
                Err(source) => {
                    return Err(OriginError::Transport {
                        origin: ep.host.clone(),
                        what: req.what.clone(),
                        attempts: attempt,
                        source,
                    })
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && same_origin && self.authorization.is_some() {
                return Err(self.auth_error(ep, req, true, status));
            }
            if status == StatusCode::UNAUTHORIZED && same_origin {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                let Some(challenge) = challenge else {
                    return Err(self.auth_error(ep, req, auth.is_some(), status));
                };
                let known = self.learn_challenge(ep, challenge);
                if let Some(sent) = &auth {
                    // A bearer token was refused (expired, revoked): drop it and fetch a new one,
                    // once. Refused basic credentials are final.
                    if renewed || !sent.starts_with("Bearer ") {
                        return Err(self.auth_error(ep, req, true, status));
                    }
                    self.drop_token(ep, &req.scope, sent);
                    renewed = true;
                } else if !known || learned {
                    // Basic auth asked for and nothing to send, or the challenge did not help.
                    return Err(self.auth_error(ep, req, false, status));
                } else {
                    learned = true;
                }
                attempt -= 1; // an auth round trip is not a failed attempt
                continue;
            }
            if status.is_redirection() {
                if let Some(loc) = resp.headers().get(LOCATION) {
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        return Err(self.protocol(ep, req, "more than 10 redirects"));
                    }
                    let loc = loc
                        .to_str()
                        .map_err(|_| self.protocol(ep, req, "Location header is not text"))?;
                    url = url.join(loc).map_err(|e| {
                        self.protocol(ep, req, &format!("bad Location {loc:?}: {e}"))
                    })?;
                    tracing::debug!(to = %url.origin().ascii_serialization(), "following redirect");
                    attempt -= 1;
                    continue;
                }
            }
            let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
            if retryable && attempt < self.opts.max_attempts {
                tracing::debug!(attempt, %status, "server error, retrying");
                tokio::time::sleep(self.backoff(attempt)).await;
                continue;
            }
            return Ok(resp);
        }
    }

    /// With an allowed-origins list: whether a request may go on to `url`, off the
    /// registry's own origin (redirects, upload locations, token realms).
    async fn check_target(&self, url: &Url, from: &str) -> Result<(), OriginError> {
        match &self.opts.allowed {
            Some(allowed) => Ok(allowed
                .check_target(url, from, self.opts.connect_timeout)
                .await?),
            None => Ok(()),
        }
    }

    async fn execute_once(
        &self,
        req: &Req,
        url: &Url,
        auth: Option<&str>,
    ) -> Result<Response, reqwest::Error> {
        let mut rb = self
            .http
            .request(req.method.clone(), url.clone())
            .headers(req.headers.clone());
        if let Some(a) = auth {
            rb = rb.header(AUTHORIZATION, a);
        }
        if req.bounded {
            rb = rb.timeout(self.opts.request_timeout);
        }
        rb = match &req.body {
            Body::Empty => rb,
            Body::Bytes(b) => rb.body(b.clone()),
            Body::File { path, len } => match tokio::fs::File::open(path).await {
                Ok(f) => rb.header(CONTENT_LENGTH, HeaderValue::from(*len)).body(
                    reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f)),
                ),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot reopen blob file for upload");
                    // Sending an empty body makes the registry refuse the digest, which names the blob.
                    rb.header(CONTENT_LENGTH, HeaderValue::from(0u64))
                }
            },
        };
        rb.send().await
    }

    /// Exponential backoff with jitter: a random delay in [d/2, d], d = base * 2^(attempt-1).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .opts
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let d = exp.min(self.opts.backoff_max);
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let half = d / 2;
        half + Duration::from_nanos(r % (half.as_nanos().max(1) as u64))
    }

    /// The Authorization value to send, fetching a bearer token when the host wants one.
    async fn auth_header(
        &self,
        ep: &Endpoint,
        scope: &str,
        what: &str,
    ) -> Result<Option<String>, OriginError> {
        let challenge = self
            .challenges
            .lock()
            .ok()
            .and_then(|m| m.get(&ep.host).cloned());
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials.get(&ep.host).map(|c| c.basic_header())),
            Some(Challenge::Bearer { realm, service, .. }) => {
                if let Some(t) = self.cached_token(ep, scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let _one = self.token_fetch.lock().await;
                if let Some(t) = self.cached_token(ep, scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let token = self
                    .fetch_token(ep, &realm, service.as_deref(), scope, what)
                    .await?;
                let value = token.value.clone();
                if let Ok(mut m) = self.tokens.lock() {
                    m.insert((ep.host.clone(), scope.to_string()), token);
                }
                Ok(Some(format!("Bearer {value}")))
            }
        }
    }

    fn cached_token(&self, ep: &Endpoint, scope: &str) -> Option<String> {
        let m = self.tokens.lock().ok()?;
        let t = m.get(&(ep.host.clone(), scope.to_string()))?;
        t.is_fresh().then(|| t.value.clone())
    }

    fn drop_token(&self, ep: &Endpoint, scope: &str, sent: &str) {
        if let Ok(mut m) = self.tokens.lock() {
            let key = (ep.host.clone(), scope.to_string());
            // Only drop the token we sent; a concurrent request may already have renewed it.
            if m.get(&key)
                .is_some_and(|t| sent == format!("Bearer {}", t.value))
            {
                m.remove(&key);
            }
        }
    }

    /// Records the host's challenge; returns whether we can answer it (bearer, or basic with credentials).
    fn learn_challenge(&self, ep: &Endpoint, c: Challenge) -> bool {
        let answerable = match &c {
            Challenge::Basic => self.credentials.contains_key(&ep.host),
            Challenge::Bearer { .. } => true,
        };
        if let Ok(mut m) = self.challenges.lock() {
            m.insert(ep.host.clone(), c);
        }
        answerable
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        what: &str,
    ) -> Result<Token, OriginError> {
        let bad = |reason: String| OriginError::BadAuthChallenge {
            registry: ep.host.clone(),
            reason,
        };
        let mut url = Url::parse(realm).map_err(|e| bad(format!("realm {realm:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!("realm {realm:?} is not http(s)")));
        }
        if url.origin() != ep.base.origin() {
            let from = format!("registry {} sent the token request for {what} to", ep.host);
            self.check_target(&url, &from).await?;
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let creds = self.credentials.get(&ep.host);
        let span = tracing::debug_span!("registry_token", registry = %ep.host, scope);
        async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut rb = self
                    .http
                    .get(url.clone())
                    .timeout(self.opts.request_timeout);
                if let Some(c) = creds {
                    rb = rb.header(AUTHORIZATION, c.basic_header());
                }
                let resp = match rb.send().await {
                    Ok(r) => r,
                    Err(e) if attempt < self.opts.max_attempts => {
                        tracing::debug!(error = %e, "token request failed, retrying");
                        tokio::time::sleep(self.backoff(attempt)).await;
                        continue;
                    }
                    Err(source) => {
                        return Err(OriginError::Transport {
                            origin: url.origin().ascii_serialization(),
                            what: format!("token for {scope}"),
                            attempts: attempt,
                            source,
                        })
                    }
                };
                let status = resp.status();
                if status.is_server_error() && attempt < self.opts.max_attempts {
                    tokio::time::sleep(self.backoff(attempt)).await;
                    continue;
                }
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    return Err(if creds.is_some() {
                        OriginError::AuthFailed {
                            registry: ep.host.clone(),
                            what: what.to_string(),
                            status: status.as_u16(),
                        }
                    } else {
                        OriginError::AuthRequired {
                            registry: ep.host.clone(),
                            what: what.to_string(),
                        }
                    });
                }
                if !status.is_success() {
                    return Err(bad(format!("token service answered {status}")));
                }
                let body = read_limited(resp, 1 << 20)
                    .await
                    .map_err(|e| bad(format!("token answer: {e}")))?;
                let parsed: TokenResponse = serde_json::from_slice(&body)
                    .map_err(|e| bad(format!("token answer is not JSON: {e}")))?;
                let value = parsed
                    .token
                    .or(parsed.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad("token answer has no token".into()))?;
                return Ok(Token::new(value, parsed.expires_in));
            }
        }
        .instrument(span)
        .await
    }

    fn auth_error(&self, ep: &Endpoint, req: &Req, sent: bool, status: StatusCode) -> OriginError {
        if sent || self.credentials.contains_key(&ep.host) {
            OriginError::AuthFailed {
                registry: ep.host.clone(),
                what: req.what.clone(),
                status: status.as_u16(),
            }
        } else {
            OriginError::AuthRequired {
                registry: ep.host.clone(),
                what: req.what.clone(),
            }
        }
    }

    pub(crate) fn protocol(&self, ep: &Endpoint, req: &Req, reason: &str) -> OriginError {
        OriginError::Protocol {
            origin: ep.host.clone(),
            what: req.what.clone(),
            reason: reason.to_string(),
        }
    }

    /// An error for an unexpected status, with the start of the registry's error body.
    pub(crate) async fn status_error(
        &self,
        ep: &Endpoint,
        req: &Req,
        resp: Response,
    ) -> OriginError {
        let status = resp.status().as_u16();
        let body = read_limited(resp, 4096).await.unwrap_or_default();
        OriginError::RegistryStatus {
            registry: ep.host.clone(),
            what: req.what.clone(),
            status,
            body: String::from_utf8_lossy(&body)
                .trim()
                .chars()
                .take(512)
                .collect(),
        }
    }
}

/// Reads a response body, refusing more than `limit` bytes.
pub(crate) async fn read_limited(mut resp: Response, limit: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(format!("body larger than {limit} bytes"));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > limit {
            return Err(format!("body larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::RegistryOptions;
    use super::*;

    fn client(f: impl FnOnce(&mut RegistryOptions)) -> RegistryClient {
        let mut o = RegistryOptions {
            use_docker_config: false,
            ..Default::default()
        };
        f(&mut o);
        RegistryClient::new(o).unwrap()
    }

    #[test]
    fn loopback_is_plain_http_and_others_need_opt_in() {
        let c = client(|_| {});
        let ep = |s: &str| c.endpoint(&Reference::parse(s).unwrap()).unwrap();
        assert_eq!(ep("127.0.0.1:5000/a").base.scheme(), "http");
        assert_eq!(ep("localhost/a").base.scheme(), "http");
        assert_eq!(ep("[::1]:5000/a").base.scheme(), "http");
        assert_eq!(ep("reg.example:5000/a").base.scheme(), "https");
        let c = client(|o| {
            o.plain_http.insert("reg.example:5000".into());
        });
        let e = c
            .endpoint(&Reference::parse("reg.example:5000/a").unwrap())
            .unwrap();
        assert_eq!(e.base.scheme(), "http");
    }

    #[test]
    fn mirrors_get_ns_and_the_mirror_host() {
        let c = client(|o| {
            o.mirrors
                .insert("up.example".into(), "127.0.0.1:4480".into());
        });
        let ep = c
            .endpoint(&Reference::parse("up.example/lib/app:1").unwrap())
            .unwrap();
        assert_eq!(ep.host, "127.0.0.1:4480");
        let url = c.api_url(&ep, "lib/app/manifests/1").unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:4480/v2/lib/app/manifests/1?ns=up.example"
        );
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let c = client(|o| {
            o.backoff_base = Duration::from_millis(100);
            o.backoff_max = Duration::from_secs(1);
        });
        for attempt in 1..30 {
            let d = c.backoff(attempt);
            let cap = Duration::from_millis(100 * (1u64 << (attempt - 1).min(20)))
                .min(Duration::from_secs(1));
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs cap {cap:?}"
            );
        }
    }
}
