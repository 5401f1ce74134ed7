//! Where bytes come from when no peer has them: OCI registries, S3-compatible stores and local directories.
//!
//! Which origins a daemon may use at all is the operator's list, [`AllowedOrigins`] (`allow`):
//! a [`RegistryClient`] built with one refuses other registries, and never follows a registry
//! to a loopback or link-local address the list does not name.
//!
//! Every origin implements [`Origin`]: the size of a blob ([`Origin::stat`]) and a byte range of it
//! as a stream of [`Bytes`] ([`Origin::read_range`]). Origins do not verify content: the caller
//! (store, peer) checks every piece against its digest. Registries also resolve references to
//! manifests and take pushes, through [`RegistryClient`].
//!
//! What comes from crates and what is written here:
//! - S3-compatible stores use `object_store` (SigV4, custom endpoint, path or virtual-host style).
//! - OCI types (digests, manifests, indexes, platforms, media types) come from `oci-spec`.
//! - The registry client is written here on `reqwest`. `oci-client` was evaluated and left out: its
//!   token cache is keyed by registry and pull/push only (not by repository scope), it has no
//!   retries or resumption of broken blob streams, no re-authentication on a 401 with a cached
//!   token, no `ns=` mirror selection, and it follows redirects with reqwest's policy, which we want
//!   to control ourselves so a credential never reaches another host. Written by hand therefore:
//!   `docker://` reference parsing, the `WWW-Authenticate` challenge parser, the per-scope token
//!   cache, docker `config.json` credentials, redirect handling, retries with backoff and jitter,
//!   and the push upload protocol.

pub mod allow;
mod error;
mod local;
mod registry;
mod s3;

use std::pin::Pin;

pub use allow::{AllowedOrigin, AllowedOrigins, ListOwner, Refusal, RefusalReason};
pub use bytes::Bytes;
pub use error::OriginError;
pub use local::LocalDirOrigin;
pub use oci_spec::image::{Digest, Platform};
pub use registry::{
    docker_config_location, is_loopback_host, load_docker_config, referrers_tag, Credentials,
    PlatformSpec, PulledManifest, PushOutcome, Reference, ReferrerListing, RegistryClient,
    RegistryOptions, RegistryOrigin, DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST_BYTES, OCI_INDEX,
    OCI_MANIFEST,
};
pub use s3::{S3Options, S3Origin};

/// A stream of blob bytes, in order; an error ends it.
pub type ByteStream = Pin<Box<dyn futures::Stream<Item = Result<Bytes, OriginError>> + Send>>;

/// What an origin knows about a blob without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobStat {
    /// Size of the whole blob in bytes.
    pub size: u64,
}

/// A byte range of a blob: `start..end` (end exclusive), or `start..` to the end of the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte to return.
    pub start: u64,
    /// One past the last byte to return; `None` reads to the end of the blob.
    pub end: Option<u64>,
}

impl ByteRange {
    /// The whole blob.
    pub const fn full() -> Self {
        ByteRange {
            start: 0,
            end: None,
        }
    }

    /// Bytes `start..end` (end exclusive).
    pub const fn new(start: u64, end: u64) -> Self {
        ByteRange {
            start,
            end: Some(end),
        }
    }

    /// Bytes from `start` to the end of the blob.
    pub const fn from_offset(start: u64) -> Self {
        ByteRange { start, end: None }
    }

    /// Whether this range asks for the whole blob.
    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end.is_none()
    }

    /// Checks the range against a blob of `size` bytes; returns the end (exclusive).
    /// An empty range (`start == end`) is valid and reads nothing.
    pub fn resolve(&self, digest: &Digest, size: u64) -> Result<u64, OriginError> {
        let end = self.end.unwrap_or(size);
        if self.start > end || end > size {
            return Err(OriginError::RangeNotSatisfiable {
                digest: digest.to_string(),
                range: *self,
                size,
            });
        }
        Ok(end)
    }

    /// The HTTP `Range` header value for this range.
    pub fn to_header(&self) -> String {
        match self.end {
            Some(end) => format!("bytes={}-{}", self.start, end.saturating_sub(1)),
            None => format!("bytes={}-", self.start),
        }
    }
}

impl std::fmt::Display for ByteRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.end {
            Some(end) => write!(f, "{}..{}", self.start, end),
            None => write!(f, "{}..", self.start),
        }
    }
}

/// One place blobs can be read from when no peer has them.
///
/// Implementations: [`RegistryOrigin`] (one repository of an OCI registry), [`S3Origin`],
/// [`LocalDirOrigin`]. All of them run the same conformance tests (tests/conformance.rs).
#[async_trait::async_trait]
pub trait Origin: Send + Sync {
    /// A short name for logs and errors (`registry 127.0.0.1:5000/app`, `s3://bucket/prefix`).
    fn describe(&self) -> String;

    /// Size of a blob; [`OriginError::BlobNotFound`] when the origin does not have it.
    async fn stat(&self, digest: &Digest) -> Result<BlobStat, OriginError>;

    /// A byte range of a blob as a stream. A range past the end of the blob is
    /// [`OriginError::RangeNotSatisfiable`]; the stream yields exactly the bytes asked for.
    async fn read_range(
        &self,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<ByteStream, OriginError>;

    /// The whole blob as a stream.
    async fn read(&self, digest: &Digest) -> Result<ByteStream, OriginError> {
        self.read_range(digest, ByteRange::full()).await
    }
}

/// Parses a blob digest (`sha256:<64 hex>`), with an error that names the bad input.
pub fn parse_digest(s: &str) -> Result<Digest, OriginError> {
    s.parse::<Digest>().map_err(|e| OriginError::InvalidDigest {
        digest: s.to_string(),
        reason: e.to_string(),
    })
}

/// Collects a stream into memory, refusing to hold more than `limit` bytes.
pub async fn collect_stream(mut stream: ByteStream, limit: usize) -> Result<Vec<u8>, OriginError> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if out.len() + chunk.len() > limit {
            return Err(OriginError::TooLarge {
                what: "stream".into(),
                limit: limit as u64,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
