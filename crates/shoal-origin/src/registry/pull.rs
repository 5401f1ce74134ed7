//! Reading from a registry: manifests (with multi-arch index resolution), blob HEAD, and blob
//! byte ranges as streams that resume after a broken connection.

use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};

use super::transport::{read_limited, Body, Endpoint, Req};
use super::{Reference, RegistryClient};
use crate::{ByteRange, ByteStream, Digest, OriginError};

/// Largest manifest or index we accept (the distribution default limit is 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A manifest as the registry holds it: its digest, bytes and media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledManifest {
    /// sha256 of `bytes` (checked against the reference's digest when it had one).
    pub digest: Digest,
    /// The exact bytes (push them unchanged to keep the digest).
    pub bytes: Bytes,
    /// The media type the registry sent (or the manifest's own `mediaType`).
    pub media_type: String,
}

impl PulledManifest {
    /// Whether this is a multi-arch index (OCI index or docker manifest list).
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX || self.media_type == DOCKER_LIST
    }
}

/// The platform to pick from a multi-arch index: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v8`, `v7`, ...; `None` accepts any.
    pub variant: Option<String>,
}

impl PlatformSpec {
    /// This machine's platform in OCI (Go) names.
    pub fn current() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        PlatformSpec {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self, OriginError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(PlatformSpec {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
                Ok(PlatformSpec {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: Some(v.to_string()),
                })
            }
            _ => Err(OriginError::Config(format!(
                "platform {s:?} is not os/arch[/variant]"
            ))),
        }
    }

    fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        p.os().to_string() == self.os
            && p.architecture().to_string() == self.architecture
            && match &self.variant {
                None => true,
                Some(v) => p.variant().as_deref() == Some(v.as_str()),
            }
    }
}

impl std::fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn pull_scope(r: &Reference) -> String {
    format!("repository:{}:pull", r.repository())
}

impl RegistryClient {
    /// The manifest for `reference`; a multi-arch index is resolved to the manifest for the
    /// configured platform ([`super::RegistryOptions::platform`]).
    pub async fn pull_manifest(
        &self,
        reference: &Reference,
    ) -> Result<PulledManifest, OriginError> {
        let platform = self.opts.platform.clone();
        self.pull_manifest_for(reference, &platform).await
    }

    /// Like [`RegistryClient::pull_manifest`] for a given platform.
    pub async fn pull_manifest_for(
        &self,
        reference: &Reference,
        platform: &PlatformSpec,
    ) -> Result<PulledManifest, OriginError> {
        let top = self.pull_manifest_raw(reference).await?;
        if !top.is_index() {
            return Ok(top);
        }
        let index = oci_spec::image::ImageIndex::from_reader(top.bytes.as_ref()).map_err(|e| {
            OriginError::Protocol {
                origin: reference.registry().to_string(),
                what: format!("index {reference}"),
                reason: format!("not a valid image index: {e}"),
            }
        })?;
        let chosen = index
            .manifests()
            .iter()
            .find(|d| d.platform().as_ref().is_some_and(|p| platform.matches(p)));
        let Some(chosen) = chosen else {
            let available: Vec<String> = index
                .manifests()
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| match p.variant() {
                    Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
                    None => format!("{}/{}", p.os(), p.architecture()),
                })
                .collect();
            return Err(OriginError::NoMatchingPlatform {
                reference: reference.to_string(),
                platform: platform.to_string(),
                available: available.join(", "),
            });
        };
        tracing::debug!(%reference, digest = %chosen.digest(), %platform, "index resolved");
        self.pull_manifest_raw(&reference.with_digest(chosen.digest().clone()))
            .await
    }

    /// The manifest or index for `reference` exactly as stored (no platform resolution).
    pub async fn pull_manifest_raw(
        &self,
        reference: &Reference,
    ) -> Result<PulledManifest, OriginError> {
        let ep = self.endpoint(reference)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static(
                "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json",
            ),
        );
        let req = Req {
            method: Method::GET,
            url: self.api_url(
                &ep,
                &format!(
                    "{}/manifests/{}",
                    reference.repository(),
                    reference.manifest_ref()
                ),
            )?,
            headers,
            body: Body::Empty,
            scope: pull_scope(reference),
            what: format!("manifest {reference}"),
            bounded: true,
        };
        let resp = self.send(&ep, &req).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(OriginError::ManifestNotFound {
                    reference: reference.to_string(),
                })
            }
            _ => return Err(self.status_error(&ep, &req, resp).await),
        }
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let bytes = read_limited(resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| self.protocol(&ep, &req, &e))?;
        let digest = sha256_digest(&bytes);
        if let Some(want) = reference.digest() {
            if *want != digest {
                return Err(self.protocol(
                    &ep,
                    &req,
                    &format!("manifest bytes hash to {digest}, not the requested digest"),
                ));
            }
        }
        // The manifest's own mediaType wins over a generic Content-Type.
        let own_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            });
        let media_type = own_type
            .or(header_type)
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        Ok(PulledManifest {
            digest,
            bytes: Bytes::from(bytes),
            media_type,
        })
    }

    /// HEAD of a blob: `Some(size)` or `None` when the registry does not have it.
    pub(crate) async fn head_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Option<crate::BlobStat>, OriginError> {
        let ep = self.endpoint(reference)?;
        let req = Req {
            method: Method::HEAD,
            url: self.api_url(&ep, &format!("{}/blobs/{digest}", reference.repository()))?,
            headers: HeaderMap::new(),
            body: Body::Empty,
            scope: pull_scope(reference),
            what: format!("blob {digest} in {}", reference.repository()),
            bounded: true,
        };
        let resp = self.send(&ep, &req).await?;
        match resp.status() {
            StatusCode::OK => {
                let size = resp
                    .headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| self.protocol(&ep, &req, "HEAD without Content-Length"))?;
                Ok(Some(crate::BlobStat { size }))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.status_error(&ep, &req, resp).await),
        }
    }

    /// A byte range of a blob as a stream. Broken connections resume from the last byte
    /// received with a Range request, up to `max_attempts` times.
    pub async fn fetch_blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<ByteStream, OriginError> {
        let ep = self.endpoint(reference)?;
        if range.end == Some(range.start) {
            // Nothing to read; still check that the range lies inside the blob.
            let size = self
                .head_blob(reference, digest)
                .await?
                .ok_or_else(|| not_found(reference, digest))?
                .size;
            range.resolve(digest, size)?;
            return Ok(Box::pin(futures::stream::empty()));
        }
        let (resp, req, want) = match self.open_range(&ep, reference, digest, range).await {
            Ok(opened) => opened,
            // An open range starting exactly at the end is empty, not an error.
            Err(OriginError::RangeNotSatisfiable { size, .. })
                if range.end.is_none() && range.start == size =>
            {
                return Ok(Box::pin(futures::stream::empty()));
            }
            Err(e) => return Err(e),
        };
        let state = ResumeState {
            client: self.clone(),
            done: false,
            ep,
            req,
            reference: reference.clone(),
            digest: digest.clone(),
            range,
            want,
            got: 0,
            body: Some(Box::pin(resp.bytes_stream())),
            failures: 0,
        };
        Ok(Box::pin(futures::stream::unfold(state, next_chunk)))
    }

    /// Sends one ranged GET and checks the answer; returns how many bytes it will carry.
    async fn open_range(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<(Response, Req, Option<u64>), OriginError> {
        let mut headers = HeaderMap::new();
        if !range.is_full() {
            let v = HeaderValue::from_str(&range.to_header())
                .map_err(|e| OriginError::Config(format!("range header: {e}")))?;
            headers.insert(RANGE, v);
        }
        let req = Req {
            method: Method::GET,
            url: self.api_url(ep, &format!("{}/blobs/{digest}", reference.repository()))?,
            headers,
            body: Body::Empty,
            scope: pull_scope(reference),
            what: format!("blob {digest} range {range} in {}", reference.repository()),
            bounded: false,
        };
        let resp = self.send(ep, &req).await?;
        match resp.status() {
            StatusCode::OK => {
                if range.start != 0 {
                    // A server that ignores Range: refuse rather than download everything.
                    return Err(self.protocol(ep, &req, "server ignored the Range header"));
                }
                let len = resp.content_length();
                if let (Some(end), Some(len)) = (range.end, len) {
                    if end > len {
                        return Err(OriginError::RangeNotSatisfiable {
                            digest: digest.to_string(),
                            range,
                            size: len,
                        });
                    }
                }
                let want = range.end.or(len);
                Ok((resp, req, want))
            }
            StatusCode::PARTIAL_CONTENT => {
                let (start, end_incl, total) = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or_else(|| self.protocol(ep, &req, "206 without a valid Content-Range"))?;
                if start != range.start {
                    return Err(self.protocol(
                        ep,
                        &req,
                        "Content-Range does not start where asked",
                    ));
                }
                if let (Some(end), Some(total)) = (range.end, total) {
                    if end > total {
                        return Err(OriginError::RangeNotSatisfiable {
                            digest: digest.to_string(),
                            range,
                            size: total,
                        });
                    }
                }
                Ok((resp, req, Some(end_incl + 1 - start)))
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let size = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes */"))
                    .and_then(|v| v.trim().parse().ok());
                match size {
                    Some(size) => Err(OriginError::RangeNotSatisfiable {
                        digest: digest.to_string(),
                        range,
                        size,
                    }),
                    None => {
                        let size = self
                            .head_blob(reference, digest)
                            .await?
                            .map(|s| s.size)
                            .unwrap_or(0);
                        Err(OriginError::RangeNotSatisfiable {
                            digest: digest.to_string(),
                            range,
                            size,
                        })
                    }
                }
            }
            StatusCode::NOT_FOUND => Err(not_found(reference, digest)),
            _ => Err(self.status_error(ep, &req, resp).await),
        }
    }
}

fn not_found(reference: &Reference, digest: &Digest) -> OriginError {
    OriginError::BlobNotFound {
        digest: digest.to_string(),
        origin: format!(
            "registry {}/{}",
            reference.registry(),
            reference.repository()
        ),
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = b.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, end, total))
}

/// sha256 digest of bytes.
pub(crate) fn sha256_digest(bytes: &[u8]) -> Digest {
    let hex = hex::encode(Sha256::digest(bytes));
    // 64 lowercase hex digits always form a valid sha256 digest.
    Digest::try_from(format!("sha256:{hex}"))
        .unwrap_or_else(|_| unreachable!("sha256 hex is a valid digest"))
}

type BodyStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

struct ResumeState {
    client: RegistryClient,
    /// An error was yielded: end the stream.
    done: bool,
    ep: Endpoint,
    req: Req,
    reference: Reference,
    digest: Digest,
    range: ByteRange,
    /// Bytes the whole range carries, when known.
    want: Option<u64>,
    got: u64,
    body: Option<BodyStream>,
    failures: u32,
}

async fn next_chunk(mut s: ResumeState) -> Option<(Result<Bytes, OriginError>, ResumeState)> {
    loop {
        if s.done || s.want.is_some_and(|w| s.got >= w) {
            return None;
        }
        let body = match s.body.as_mut() {
            Some(b) => b,
            None => {
                // Resume after a failure: ask for what is still missing.
                let range = ByteRange {
                    start: s.range.start + s.got,
                    end: s.want.map(|w| s.range.start + w).or(s.range.end),
                };
                match s
                    .client
                    .open_range(&s.ep, &s.reference, &s.digest, range)
                    .await
                {
                    Ok((resp, _, _)) => {
                        s.body = Some(Box::pin(resp.bytes_stream()));
                        continue;
                    }
                    Err(e) => {
                        s.done = true;
                        return Some((Err(e), s));
                    }
                }
            }
        };
        match body.next().await {
            Some(Ok(mut chunk)) => {
                if let Some(w) = s.want {
                    let left = w - s.got;
                    if chunk.len() as u64 > left {
                        chunk.truncate(left as usize);
                    }
                }
                s.got += chunk.len() as u64;
                if chunk.is_empty() {
                    continue;
                }
                return Some((Ok(chunk), s));
            }
            Some(Err(e)) => {
                s.body = None;
                s.failures += 1;
                if s.failures >= s.client.opts.max_attempts {
                    let err = OriginError::Transport {
                        origin: s.ep.host.clone(),
                        what: s.req.what.clone(),
                        attempts: s.failures,
                        source: e,
                    };
                    s.done = true;
                    return Some((Err(err), s));
                }
                tracing::debug!(digest = %s.digest, got = s.got, error = %e, "blob stream broke, resuming");
                tokio::time::sleep(s.client.backoff(s.failures)).await;
            }
            None => {
                match s.want {
                    // Ended early: the connection closed cleanly mid-body. Resume.
                    Some(w) if s.got < w => {
                        s.body = None;
                        s.failures += 1;
                        if s.failures >= s.client.opts.max_attempts {
                            let err = OriginError::Protocol {
                                origin: s.ep.host.clone(),
                                what: s.req.what.clone(),
                                reason: format!("body ended after {} of {w} bytes", s.got),
                            };
                            s.done = true;
                            return Some((Err(err), s));
                        }
                        tokio::time::sleep(s.client.backoff(s.failures)).await;
                    }
                    _ => return None,
                }
            }
        }
    }
}
