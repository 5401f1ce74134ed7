//! Fetching a Shoal image's bootstrap for a lazy mount: through the local peer's API (the swarm)
//! when a peer runs, else straight from the registry; streamed to a file while its sha256 is
//! computed, and kept only when it equals the digest the image's manifest named.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use shoal_origin::{Reference, RegistryClient, RegistryOptions};

use super::error::{Result, SnapshotterError};

/// Largest bootstrap accepted (the FUSE mount holds it in memory).
pub const MAX_BOOTSTRAP: u64 = 1 << 30;

/// Where a bootstrap is fetched from.
#[derive(Debug, Clone)]
pub struct BootstrapSource {
    /// The local peer's API (the one client fs has, keeping its connections), tried first.
    pub peer: Option<shoal_api::Client>,
    /// Registry hosts spoken to over plain HTTP.
    pub plain_http: Vec<String>,
    /// A docker config.json with credentials for the direct registry fetch.
    pub docker_config: Option<PathBuf>,
}

/// Fetches `digest` of `reference`'s repository into `dest` (replaced atomically), verified.
pub async fn fetch(
    src: &BootstrapSource,
    reference: &Reference,
    digest: &str,
    dest: &Path,
) -> Result<()> {
    let image = format!(
        "{}/{}@{digest}",
        reference.registry(),
        reference.repository()
    );
    let fail = |reason: String| SnapshotterError::Image {
        image: image.clone(),
        reason,
    };
    let tmp = dest.with_extension("part");
    let mut peer_error = None;
    if let Some(peer) = &src.peer {
        match from_peer(peer, reference, digest, &tmp).await {
            Ok(()) => return persist(&tmp, dest),
            // The operator's allow-list said no: going around the peer would defeat it.
            Err(PeerFailure::Refused(why)) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(fail(format!("the local peer refused its origin: {why}")));
            }
            Err(PeerFailure::Failed(e)) => {
                tracing::warn!(%image, error = %e, "bootstrap not fetched through the local peer; fetching it from the registry");
                peer_error = Some(e);
            }
        }
    }
    match from_registry(src, reference, digest, &tmp).await {
        Ok(()) => persist(&tmp, dest),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(fail(match peer_error {
                Some(p) => format!("through the local peer: {p}; from the registry: {e}"),
                None => format!("from the registry: {e}"),
            }))
        }
    }
}

fn persist(tmp: &Path, dest: &Path) -> Result<()> {
    std::fs::rename(tmp, dest).map_err(|e| SnapshotterError::io("storing bootstrap", dest, e))
}

/// Writes the stream of chunks to `tmp`, checking the size bound and the sha256.
struct Sink {
    file: std::fs::File,
    hash: Sha256,
    len: u64,
}

impl Sink {
    fn create(tmp: &Path) -> std::result::Result<Sink, String> {
        let file =
            std::fs::File::create(tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        Ok(Sink {
            file,
            hash: Sha256::new(),
            len: 0,
        })
    }

    fn put(&mut self, data: &[u8]) -> std::result::Result<(), String> {
        self.len += data.len() as u64;
        if self.len > MAX_BOOTSTRAP {
            return Err(format!("bootstrap is larger than {MAX_BOOTSTRAP} bytes"));
        }
        self.hash.update(data);
        self.file
            .write_all(data)
            .map_err(|e| format!("writing: {e}"))
    }

    fn finish(self, digest: &str) -> std::result::Result<(), String> {
        let got = format!("sha256:{}", hex::encode(self.hash.finalize()));
        if got != digest {
            return Err(format!(
                "the bootstrap's sha256 is {got}, the image names {digest}: refusing it"
            ));
        }
        self.file
            .sync_all()
            .map_err(|e| format!("syncing the bootstrap: {e}"))
    }
}

/// Why the peer did not deliver.
enum PeerFailure {
    /// It refused the origin (403: not in its `allowed_origins`).
    Refused(String),
    /// Anything else (not running, the swarm and the origin failed): the registry is tried.
    Failed(String),
}

impl From<String> for PeerFailure {
    fn from(s: String) -> Self {
        PeerFailure::Failed(s)
    }
}

async fn from_peer(
    peer: &shoal_api::Client,
    reference: &Reference,
    digest: &str,
    tmp: &Path,
) -> std::result::Result<(), PeerFailure> {
    let blob = shoal_types::Digest::parse(digest)
        .map_err(|e| format!("{digest} is not a digest the peer can name: {e}"))?;
    let source = format!(
        "docker://{}/{}",
        reference.registry(),
        reference.repository()
    );
    let resp = peer.blob(&blob).source(source).send().await.map_err(|e| {
        if e.is_refused() {
            PeerFailure::Refused(e.to_string())
        } else {
            PeerFailure::Failed(e.to_string())
        }
    })?;
    let mut sink = Sink::create(tmp)?;
    let mut body = resp.body;
    while let Some(chunk) = body.next().await {
        sink.put(&chunk.map_err(|e| e.to_string())?)?;
    }
    Ok(sink.finish(digest)?)
}

async fn from_registry(
    src: &BootstrapSource,
    reference: &Reference,
    digest: &str,
    tmp: &Path,
) -> std::result::Result<(), String> {
    let opts = RegistryOptions {
        plain_http: src.plain_http.iter().cloned().collect(),
        docker_config_path: src.docker_config.clone(),
        max_attempts: 3,
        ..RegistryOptions::default()
    };
    let client = RegistryClient::new(opts).map_err(|e| e.to_string())?;
    let d: shoal_origin::Digest = digest.parse().map_err(|e| format!("{e}"))?;
    let mut stream = client
        .fetch_blob(reference, &d)
        .await
        .map_err(|e| e.to_string())?;
    let mut sink = Sink::create(tmp)?;
    while let Some(chunk) = stream.next().await {
        sink.put(&chunk.map_err(|e| e.to_string())?)?;
    }
    sink.finish(digest)
}
