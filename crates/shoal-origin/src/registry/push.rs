//! Writing to a registry: blob existence, monolithic blob upload (skipped when the registry
//! already has the blob), and manifest push.

use std::path::Path;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};

use super::pull::sha256_digest;
use super::transport::{Body, Req};
use super::{Reference, RegistryClient};
use crate::{Digest, OriginError};

/// What a blob push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The blob was uploaded.
    Uploaded,
    /// The registry already had it; nothing was sent.
    AlreadyExists,
}

fn push_scope(r: &Reference) -> String {
    format!("repository:{}:pull,push", r.repository())
}

impl RegistryClient {
    /// Whether the repository of `reference` holds blob `digest`.
    pub async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<bool, OriginError> {
        Ok(self.head_blob(reference, digest).await?.is_some())
    }

    /// Uploads a blob held in memory, unless the registry already has it.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        data: Bytes,
    ) -> Result<PushOutcome, OriginError> {
        self.push_body(reference, digest, Body::Bytes(data)).await
    }

    /// Uploads a blob from a file (streamed, re-read on retry), unless the registry already has it.
    pub async fn push_blob_file(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
    ) -> Result<PushOutcome, OriginError> {
        let len = tokio::fs::metadata(path)
            .await
            .map_err(|source| OriginError::Io {
                what: format!("reading blob {digest} to push from"),
                path: path.display().to_string(),
                source,
            })?
            .len();
        self.push_body(
            reference,
            digest,
            Body::File {
                path: path.to_path_buf(),
                len,
            },
        )
        .await
    }

    async fn push_body(
        &self,
        reference: &Reference,
        digest: &Digest,
        body: Body,
    ) -> Result<PushOutcome, OriginError> {
        if self.blob_exists(reference, digest).await? {
            tracing::debug!(%digest, repository = reference.repository(), "blob already in registry, skipped");
            return Ok(PushOutcome::AlreadyExists);
        }
        let ep = self.endpoint(reference)?;
        let start = Req {
            method: Method::POST,
            url: self.api_url(&ep, &format!("{}/blobs/uploads/", reference.repository()))?,
            headers: HeaderMap::new(),
            body: Body::Empty,
            scope: push_scope(reference),
            what: format!(
                "upload start for blob {digest} in {}",
                reference.repository()
            ),
            bounded: true,
        };
        let resp = self.send(&ep, &start).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.status_error(&ep, &start, resp).await);
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.protocol(&ep, &start, "202 without Location"))?;
        let mut url: Url = start
            .url
            .join(location)
            .map_err(|e| self.protocol(&ep, &start, &format!("bad Location: {e}")))?;
        url.query_pairs_mut().append_pair("digest", digest.as_ref());
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let put = Req {
            method: Method::PUT,
            url,
            headers,
            body,
            scope: push_scope(reference),
            what: format!("upload of blob {digest} to {}", reference.repository()),
            bounded: false,
        };
        let resp = self.send(&ep, &put).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.status_error(&ep, &put, resp).await);
        }
        tracing::debug!(%digest, repository = reference.repository(), "blob uploaded");
        Ok(PushOutcome::Uploaded)
    }

    /// Pushes a manifest (or index) under `reference`'s tag (or its digest); returns its digest.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<Digest, OriginError> {
        let digest = sha256_digest(&bytes);
        self.push_manifest_headers(reference, bytes, media_type)
            .await?;
        Ok(digest)
    }

    /// [`RegistryClient::push_manifest`]; returns the `OCI-Subject` header of the answer (a
    /// registry with a referrers API sends it for a manifest with a `subject`).
    pub(crate) async fn push_manifest_headers(
        &self,
        reference: &Reference,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<Option<String>, OriginError> {
        if bytes.len() > super::pull::MAX_MANIFEST_BYTES {
            return Err(OriginError::TooLarge {
                what: format!("manifest for {reference}"),
                limit: super::pull::MAX_MANIFEST_BYTES as u64,
            });
        }
        let digest = sha256_digest(&bytes);
        let ep = self.endpoint(reference)?;
        let target = match reference.tag() {
            Some(t) => t.to_string(),
            None => digest.to_string(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(media_type)
                .map_err(|_| OriginError::Config(format!("media type {media_type:?}")))?,
        );
        let req = Req {
            method: Method::PUT,
            url: self.api_url(
                &ep,
                &format!("{}/manifests/{target}", reference.repository()),
            )?,
            headers,
            body: Body::Bytes(bytes),
            scope: push_scope(reference),
            what: format!("manifest push {reference}"),
            bounded: true,
        };
        let resp = self.send(&ep, &req).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.status_error(&ep, &req, resp).await);
        }
        Ok(resp
            .headers()
            .get("OCI-Subject")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string))
    }
}
