//! OCI registry origin: a client for the distribution API (pull, Range reads, push) and an
//! [`Origin`](crate::Origin) over one repository.
//!
//! Data path: [`RegistryClient`] resolves a [`Reference`] to an endpoint (mirror with `ns=` or the
//! registry itself, HTTP for loopback), `transport` sends each request with auth, redirects and
//! retries, `pull` reads manifests and blobs, `push` uploads them, `referrers` lists and publishes
//! OCI 1.1 referrers (API or tag scheme).

mod auth;
mod pull;
mod push;
mod reference;
mod referrers;
mod transport;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex as AsyncMutex;

use auth::Challenge;
pub use auth::{docker_config_location, load_docker_config, Credentials};
pub use pull::{
    PlatformSpec, PulledManifest, DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST_BYTES, OCI_INDEX,
    OCI_MANIFEST,
};
pub use push::PushOutcome;
pub use reference::{is_loopback_host, Reference};
pub use referrers::{referrers_tag, ReferrerListing};

use crate::{AllowedOrigins, BlobStat, ByteRange, ByteStream, Digest, Origin, OriginError};

/// How to reach registries: credentials, plain-HTTP hosts, mirrors, timeouts and retries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Explicit credentials by registry host (`host[:port]`); they win over docker's config.json.
    pub credentials: HashMap<String, Credentials>,
    /// Read docker's config.json (`$DOCKER_CONFIG`, else `~/.docker`) for more credentials.
    pub use_docker_config: bool,
    /// A config.json to read instead of the default location.
    pub docker_config_path: Option<PathBuf>,
    /// Hosts spoken to over plain HTTP. Loopback hosts and localhost always are.
    pub plain_http: HashSet<String>,
    /// Mirrors: upstream registry host -> mirror host. Requests go to the mirror with `?ns=<upstream>`.
    pub mirrors: HashMap<String, String>,
    /// Extra PEM root certificates trusted for HTTPS registries (a private CA).
    pub extra_root_pem: Vec<Vec<u8>>,
    /// Platform picked from multi-arch indexes; default: this machine's.
    pub platform: PlatformSpec,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest silence while reading a response before the attempt fails.
    pub read_timeout: Duration,
    /// Whole-request limit for small requests (manifests, HEAD, tokens), not blob bodies.
    pub request_timeout: Duration,
    /// Attempts per request on 5xx, 429 and broken connections (1 = no retry).
    pub max_attempts: u32,
    /// First backoff delay; doubled per attempt, with jitter.
    pub backoff_base: Duration,
    /// Longest backoff delay.
    pub backoff_max: Duration,
    /// The operator's allowed origins: with a list, registries outside it are refused before
    /// any request, and requests never follow a registry (redirect, upload location, token
    /// realm) to a loopback or link-local address the list does not name. `None`: no limit
    /// (tools run by hand on a reference the user typed).
    pub allowed: Option<Arc<AllowedOrigins>>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            credentials: HashMap::new(),
            use_docker_config: true,
            docker_config_path: None,
            plain_http: HashSet::new(),
            mirrors: HashMap::new(),
            extra_root_pem: Vec::new(),
            platform: PlatformSpec::current(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            allowed: None,
        }
    }
}

/// A client for OCI registries (distribution API v2), shared by every task of a process.
///
/// Holds the HTTP connection pool, credentials and the bearer-token cache; clones share them.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    opts: Arc<RegistryOptions>,
    credentials: Arc<HashMap<String, Credentials>>,
    /// What each registry host asked for last (learned from its 401).
    challenges: Arc<std::sync::Mutex<HashMap<String, Challenge>>>,
    /// Bearer tokens by (registry host, scope).
    tokens: Arc<std::sync::Mutex<HashMap<(String, String), auth::Token>>>,
    /// One token fetch at a time, so concurrent first requests share one token.
    token_fetch: Arc<AsyncMutex<()>>,
    /// A caller's own Authorization value sent as is instead of this client's credentials
    /// (see [`RegistryClient::with_authorization`]).
    authorization: Option<Arc<str>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field(
                "credential_hosts",
                &self.credentials.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// Builds a client. Reads docker's config.json now when asked to (a missing file is fine).
    pub fn new(opts: RegistryOptions) -> Result<Self, OriginError> {
        // reqwest is built without a default crypto provider; Shoal uses ring everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")));
        if let Some(allowed) = &opts.allowed {
            builder = builder.dns_resolver(allowed.resolver());
        }
        for pem in &opts.extra_root_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| OriginError::Config(format!("extra root certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| OriginError::Config(format!("HTTP client: {e}")))?;

        let mut credentials = HashMap::new();
        if opts.use_docker_config {
            let path = opts.docker_config_path.clone().or_else(|| {
                docker_config_location(
                    std::env::var("DOCKER_CONFIG").ok().as_deref(),
                    std::env::var("HOME").ok().as_deref(),
                )
            });
            if let Some(path) = path {
                if path.exists() {
                    credentials.extend(load_docker_config(&path)?);
                }
            }
        }
        credentials.extend(opts.credentials.clone());
        Ok(RegistryClient {
            http,
            opts: Arc::new(opts),
            credentials: Arc::new(credentials),
            challenges: Arc::default(),
            tokens: Arc::default(),
            token_fetch: Arc::default(),
            authorization: None,
        })
    }

    /// A clone (same connection pool) that sends `authorization` (a client's `Authorization`
    /// header value, e.g. forwarded by the registry proxy) verbatim to the registry host instead
    /// of this client's credentials and tokens. A 401 is then final: the token flow belongs to
    /// whoever issued the value. Redirects to another host still carry no credential.
    pub fn with_authorization(&self, authorization: Option<String>) -> RegistryClient {
        RegistryClient {
            authorization: authorization.map(Arc::from),
            ..self.clone()
        }
    }

    /// The options this client was built with.
    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    /// The size of a blob (HEAD), or [`OriginError::BlobNotFound`].
    pub async fn stat_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<BlobStat, OriginError> {
        self.head_blob(reference, digest)
            .await?
            .ok_or_else(|| OriginError::BlobNotFound {
                digest: digest.to_string(),
                origin: format!(
                    "registry {}/{}",
                    reference.registry(),
                    reference.repository()
                ),
            })
    }

    /// The whole blob as a stream; broken connections resume with a Range request.
    pub async fn fetch_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<ByteStream, OriginError> {
        self.fetch_blob_range(reference, digest, ByteRange::full())
            .await
    }
}

/// One repository of a registry, as an [`Origin`] for blobs by digest.
#[derive(Debug, Clone)]
pub struct RegistryOrigin {
    client: RegistryClient,
    reference: Reference,
}

impl RegistryOrigin {
    /// Blobs of `reference`'s repository, fetched with `client`.
    pub fn new(client: RegistryClient, reference: Reference) -> Self {
        RegistryOrigin { client, reference }
    }

    /// The client, for manifests and pushes.
    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    /// The repository this origin reads.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }
}

#[async_trait::async_trait]
impl Origin for RegistryOrigin {
    fn describe(&self) -> String {
        format!(
            "registry {}/{}",
            self.reference.registry(),
            self.reference.repository()
        )
    }

    async fn stat(&self, digest: &Digest) -> Result<BlobStat, OriginError> {
        self.client.stat_blob(&self.reference, digest).await
    }

    async fn read_range(
        &self,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<ByteStream, OriginError> {
        self.client
            .fetch_blob_range(&self.reference, digest, range)
            .await
    }
}
