//! The one error type of this crate: every message names the blob, origin or registry and what to do.

use crate::ByteRange;

/// What went wrong while talking to an origin.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The origin answered, and it does not have this blob.
    #[error("blob {digest} not found at {origin}: check the digest and that the origin holds it")]
    BlobNotFound {
        /// The blob asked for.
        digest: String,
        /// Which origin was asked.
        origin: String,
    },
    /// The registry has no manifest for this reference.
    #[error("manifest {reference} not found: check the repository and tag or digest")]
    ManifestNotFound {
        /// The reference asked for.
        reference: String,
    },
    /// A byte range outside the blob.
    #[error("range {range} of blob {digest} is outside its {size} bytes")]
    RangeNotSatisfiable {
        /// The blob.
        digest: String,
        /// The range asked for.
        range: ByteRange,
        /// The blob's size.
        size: u64,
    },
    /// A digest that is not `algorithm:encoded` in the OCI grammar.
    #[error("invalid digest {digest:?}: {reason} (expected sha256:<64 lowercase hex>)")]
    InvalidDigest {
        /// The input.
        digest: String,
        /// Why it was refused.
        reason: String,
    },
    /// A reference that does not parse.
    #[error("invalid image reference {reference:?}: {reason} (expected docker://HOST[:PORT]/REPO[:TAG|@sha256:...])")]
    InvalidReference {
        /// The input.
        reference: String,
        /// Why it was refused.
        reason: String,
    },
    /// The registry wants credentials we do not have.
    #[error("registry {registry} requires authentication for {what}: log in (docker login writes config.json) or pass credentials")]
    AuthRequired {
        /// Registry host.
        registry: String,
        /// The request that was refused.
        what: String,
    },
    /// The registry (or its token service) refused the credentials we sent.
    #[error("registry {registry} refused the credentials for {what} (HTTP {status}): check user name and password or token, and access to the repository")]
    AuthFailed {
        /// Registry host.
        registry: String,
        /// The request that was refused.
        what: String,
        /// HTTP status.
        status: u16,
    },
    /// A challenge we could not understand or a token answer we could not use.
    #[error("registry {registry} sent an unusable authentication challenge or token: {reason}")]
    BadAuthChallenge {
        /// Registry host.
        registry: String,
        /// What was wrong.
        reason: String,
    },
    /// The registry answered with an HTTP status we do not accept.
    #[error("registry {registry} answered {status} to {what}: {body}")]
    RegistryStatus {
        /// Registry host.
        registry: String,
        /// Request description.
        what: String,
        /// HTTP status.
        status: u16,
        /// Start of the body (the registry's error JSON).
        body: String,
    },
    /// A network error that persisted through every retry.
    #[error("request to {origin} for {what} failed after {attempts} attempts: {source}")]
    Transport {
        /// Origin or registry host.
        origin: String,
        /// Request description.
        what: String,
        /// How many times it was tried.
        attempts: u32,
        /// The last error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered something that breaks the protocol (bad header, wrong length).
    #[error("{origin} sent an invalid answer for {what}: {reason}")]
    Protocol {
        /// Origin or registry host.
        origin: String,
        /// Request description.
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// An index has no manifest for the wanted platform.
    #[error(
        "image index {reference} has no manifest for platform {platform}; available: {available}"
    )]
    NoMatchingPlatform {
        /// The reference.
        reference: String,
        /// The platform asked for.
        platform: String,
        /// The platforms the index lists.
        available: String,
    },
    /// Something bigger than we are willing to hold in memory.
    #[error("{what} is larger than the {limit}-byte limit")]
    TooLarge {
        /// What it was.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// Reading docker's config.json failed.
    #[error("cannot use docker config {path}: {reason}")]
    DockerConfig {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A local file could not be read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A blob key that could leave the origin's directory or prefix.
    #[error(
        "blob key {key:?} is not allowed in {origin}: it could name a path outside the origin"
    )]
    UnsafeKey {
        /// The key.
        key: String,
        /// The origin.
        origin: String,
    },
    /// The S3-compatible store failed.
    #[error("object store {origin} failed for {what}: {source}")]
    ObjectStore {
        /// Bucket and prefix.
        origin: String,
        /// Request description.
        what: String,
        /// The object_store error.
        #[source]
        source: object_store::Error,
    },
    /// An origin, or a host an origin sent a request on to, outside the operator's
    /// `allowed_origins` (the message names the entry to add).
    #[error(transparent)]
    NotAllowed(#[from] crate::allow::Refusal),
    /// Bad client configuration (TLS roots, options).
    #[error("invalid origin configuration: {0}")]
    Config(String),
}
