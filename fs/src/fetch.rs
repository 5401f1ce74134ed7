//! Where stored chunk bytes come from when the cache misses: byte ranges of a data blob, from the
//! local peer's API (the swarm) or straight from the origin (registry, local directory).
//!
//! Sources return raw stored bytes; nothing here trusts them. read.rs decompresses and checks every
//! chunk against its BLAKE3 name before anyone sees it.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use shoal_origin::{ByteRange, Origin};
use shoal_types::Digest;

/// Which kind of source served bytes (the metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// The local peer daemon (the swarm).
    Peer,
    /// The origin itself.
    Origin,
}

impl SourceKind {
    /// `peer` or `origin`.
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Peer => "peer",
            SourceKind::Origin => "origin",
        }
    }
}

/// Why a source could not deliver a range.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: reading {blob} bytes {start}..{end}: {reason}")]
pub struct FetchError {
    /// The source (`peer /run/shoal/peer.sock`, `registry host/repo`).
    pub source_name: String,
    /// The blob.
    pub blob: String,
    /// First byte asked for.
    pub start: u64,
    /// One past the last byte asked for.
    pub end: u64,
    /// What failed.
    pub reason: String,
    /// The source refused the origin by policy (the peer's `allowed_origins`): reading it from
    /// anywhere else would go around the operator's decision.
    pub refused: bool,
}

/// A place that serves byte ranges of an image's data blobs.
#[async_trait::async_trait]
pub trait ChunkSource: Send + Sync {
    /// Peer or origin.
    fn kind(&self) -> SourceKind;
    /// A short name for logs.
    fn describe(&self) -> String;
    /// Bytes `start..end` of `blob`; exactly `end - start` bytes or an error.
    async fn read_range(&self, blob: &Digest, start: u64, end: u64) -> Result<Bytes, FetchError>;
    /// Hands the source a blob's piece table (`piece_size`, the pieces' BLAKE3) from the
    /// verified bootstrap, so that a peer fetches the pieces a range needs one by one instead
    /// of importing the whole blob first. Sources that need none ignore it.
    async fn offer_pieces(
        &self,
        _blob: &Digest,
        _piece_size: u32,
        _pieces: &[[u8; 32]],
    ) -> Result<(), FetchError> {
        Ok(())
    }
    /// Told when bytes this source served failed verification (the peer report hook).
    fn report_bad(&self, blob: &Digest, start: u64, end: u64) {
        tracing::warn!(source = %self.describe(), %blob, start, end, "source served bytes that failed verification");
    }
}

fn fetch_err(
    src: &dyn ChunkSource,
    blob: &Digest,
    start: u64,
    end: u64,
    reason: impl ToString,
) -> FetchError {
    FetchError {
        source_name: src.describe(),
        blob: blob.to_string(),
        start,
        end,
        reason: reason.to_string(),
        refused: false,
    }
}

/// An origin ([`shoal_origin::Origin`]: registry repository or local blob directory) as a source.
pub struct OriginSource {
    origin: Arc<dyn Origin>,
}

impl OriginSource {
    /// Reads through `origin`.
    pub fn new(origin: Arc<dyn Origin>) -> Self {
        OriginSource { origin }
    }
}

#[async_trait::async_trait]
impl ChunkSource for OriginSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Origin
    }
    fn describe(&self) -> String {
        self.origin.describe()
    }
    async fn read_range(&self, blob: &Digest, start: u64, end: u64) -> Result<Bytes, FetchError> {
        let err = |r: String| fetch_err(self, blob, start, end, r);
        let want = usize::try_from(end.saturating_sub(start))
            .map_err(|_| err("range too large".into()))?;
        // The edge to oci-spec: the origins name blobs their way.
        let digest =
            shoal_origin::parse_digest(&blob.to_string()).map_err(|e| err(e.to_string()))?;
        let stream = self
            .origin
            .read_range(&digest, ByteRange::new(start, end))
            .await
            .map_err(|e| err(e.to_string()))?;
        let data = shoal_origin::collect_stream(stream, want)
            .await
            .map_err(|e| err(e.to_string()))?;
        if data.len() != want {
            return Err(err(format!("got {} of {want} bytes", data.len())));
        }
        Ok(Bytes::from(data))
    }
}

/// The local peer daemon's API (HTTP/1 over its unix socket; crates/shoal-api): `GET
/// /blobs/<digest>?source=<origin>&bootstrap=<digest>` with a `Range` header, answered 206 from
/// the swarm, on connections the client keeps open between reads.
pub struct PeerSource {
    client: shoal_api::Client,
    /// The origin reference the peer fetches from when no peer has the blob (`docker://HOST/REPO`).
    origin_ref: Option<String>,
    /// The image's bootstrap (verified by the mount): the peer reads the data blobs' piece
    /// tables from it, so it fetches only the pieces a read covers.
    bootstrap: Option<Digest>,
}

impl PeerSource {
    /// A client of the peer listening on `socket`; `origin_ref` tells it where the blobs live,
    /// `bootstrap` where their piece tables are.
    pub fn new(
        socket: impl Into<PathBuf>,
        origin_ref: Option<String>,
        bootstrap: Option<Digest>,
    ) -> Self {
        PeerSource {
            client: shoal_api::Client::new(socket),
            origin_ref,
            bootstrap,
        }
    }
}

#[async_trait::async_trait]
impl ChunkSource for PeerSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Peer
    }
    fn describe(&self) -> String {
        format!("peer {}", self.client.socket().display())
    }
    async fn offer_pieces(
        &self,
        blob: &Digest,
        piece_size: u32,
        pieces: &[[u8; 32]],
    ) -> Result<(), FetchError> {
        let mut req = self.client.blob(blob);
        if let Some(r) = &self.origin_ref {
            req = req.source(r.clone());
        }
        req.offer_pieces(piece_size, pieces).await.map_err(|e| {
            let refused = e.is_refused();
            let mut err = fetch_err(self, blob, 0, 0, e);
            err.refused = refused;
            err
        })
    }

    async fn read_range(&self, blob: &Digest, start: u64, end: u64) -> Result<Bytes, FetchError> {
        let mut req = self.client.blob(blob).range(start..end);
        if let Some(r) = &self.origin_ref {
            req = req.source(r.clone());
        }
        if let Some(b) = &self.bootstrap {
            req = req.bootstrap(b);
        }
        req.read().await.map_err(|e| {
            let refused = e.is_refused();
            let mut err = fetch_err(self, blob, start, end, e);
            err.refused = refused;
            err
        })
    }
}
