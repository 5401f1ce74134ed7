//! OCI 1.1 referrers: manifests whose `subject` is another manifest (signatures, SBOMs, Shoal
//! indexes). Listed by the registry's referrers API when it has one; otherwise through the
//! referrers tag scheme — an image index tagged `sha256-<hex>` (the subject's digest) that the
//! pushing client keeps up to date.

use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use super::pull::{sha256_digest, MAX_MANIFEST_BYTES, OCI_INDEX};
use super::transport::{read_limited, Body, Req};
use super::{Reference, RegistryClient};
use crate::{Digest, OriginError};

/// The tag of the referrers tag scheme for `subject` (`sha256-<hex>`).
pub fn referrers_tag(subject: &Digest) -> String {
    subject.to_string().replacen(':', "-", 1)
}

/// How a referrer was made findable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferrerListing {
    /// The registry answered the manifest push with `OCI-Subject`: its referrers API lists it.
    Api,
    /// The registry has no referrers API: the referrer was added to the `sha256-<hex>` tag.
    TagScheme,
}

impl RegistryClient {
    /// Pushes a manifest with a `subject` by its digest and makes it findable: by the registry's
    /// referrers API when the push is answered with `OCI-Subject`, else by adding `referrer` (its
    /// descriptor, with `artifactType` and annotations) to the index under the subject's
    /// referrers tag.
    pub async fn push_referrer(
        &self,
        reference: &Reference,
        bytes: Bytes,
        referrer: &Descriptor,
        subject: &Digest,
    ) -> Result<ReferrerListing, OriginError> {
        let digest = sha256_digest(&bytes);
        // By digest only: the reference's tag names the image and must not move.
        let by_digest = Reference::parse(&format!(
            "{}/{}@{digest}",
            reference.registry(),
            reference.repository()
        ))?;
        let answered_subject = self
            .push_manifest_headers(&by_digest, bytes, referrer.media_type().as_ref())
            .await?;
        if answered_subject.is_some() {
            return Ok(ReferrerListing::Api);
        }
        let tagged = reference.with_tag(&referrers_tag(subject))?;
        let mut manifests: Vec<Descriptor> = match self.pull_manifest_raw(&tagged).await {
            Ok(m) => ImageIndex::from_reader(m.bytes.as_ref())
                .map_err(|e| OriginError::Protocol {
                    origin: reference.registry().to_string(),
                    what: format!("referrers tag {tagged}"),
                    reason: format!("not an image index: {e}"),
                })?
                .manifests()
                .clone(),
            Err(OriginError::ManifestNotFound { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        manifests.retain(|d| d.digest() != referrer.digest());
        manifests.push(referrer.clone());
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(manifests)
            .build()
            .map_err(|e| OriginError::Config(format!("building the referrers index: {e}")))?;
        let json = serde_json::to_vec(&index)
            .map_err(|e| OriginError::Config(format!("encoding the referrers index: {e}")))?;
        self.push_manifest(&tagged, Bytes::from(json), OCI_INDEX)
            .await?;
        Ok(ReferrerListing::TagScheme)
    }

    /// The referrers of `subject` in `reference`'s repository: from the referrers API, else from
    /// the referrers tag (empty when neither lists any).
    pub async fn referrers(
        &self,
        reference: &Reference,
        subject: &Digest,
    ) -> Result<Vec<Descriptor>, OriginError> {
        if let Some(index) = self.referrers_api(reference, subject).await? {
            return Ok(index.manifests().clone());
        }
        let tagged = reference.with_tag(&referrers_tag(subject))?;
        match self.pull_manifest_raw(&tagged).await {
            Ok(m) => Ok(ImageIndex::from_reader(m.bytes.as_ref())
                .map_err(|e| OriginError::Protocol {
                    origin: reference.registry().to_string(),
                    what: format!("referrers tag {tagged}"),
                    reason: format!("not an image index: {e}"),
                })?
                .manifests()
                .clone()),
            Err(OriginError::ManifestNotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `GET /v2/<name>/referrers/<digest>`; `None` when the registry has no such API.
    async fn referrers_api(
        &self,
        reference: &Reference,
        subject: &Digest,
    ) -> Result<Option<ImageIndex>, OriginError> {
        let ep = self.endpoint(reference)?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let req = Req {
            method: Method::GET,
            url: self.api_url(
                &ep,
                &format!("{}/referrers/{subject}", reference.repository()),
            )?,
            headers,
            body: Body::Empty,
            scope: format!("repository:{}:pull", reference.repository()),
            what: format!("referrers of {subject} in {}", reference.repository()),
            bounded: true,
        };
        let resp = self.send(&ep, &req).await?;
        if resp.status() != StatusCode::OK {
            // 404 (no API, or an old registry), 400/405: the tag scheme is the fallback.
            return Ok(None);
        }
        let is_index = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with(OCI_INDEX));
        let bytes = read_limited(resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| self.protocol(&ep, &req, &e))?;
        if !is_index {
            return Ok(None);
        }
        ImageIndex::from_reader(&bytes[..])
            .map(Some)
            .map_err(|e| self.protocol(&ep, &req, &format!("not an image index: {e}")))
    }
}
