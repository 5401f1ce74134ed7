//! Where stored chunk bytes come from when the cache misses: byte ranges of a data blob, from the
//! local peer's API (the swarm) or straight from the origin (registry, local directory).
//!
//! Sources return raw stored bytes; nothing here trusts them. read.rs decompresses and checks every
//! chunk against its BLAKE3 name before anyone sees it.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, BodyStream, Empty};
use hyper_util::rt::TokioIo;
use shoal_origin::{ByteRange, Digest, Origin};

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
        let stream = self
            .origin
            .read_range(blob, ByteRange::new(start, end))
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

/// The local peer daemon's API (HTTP/1 over its unix socket, peer/src/api): `GET
/// /blobs/<digest>?source=<origin>` with a `Range` header, answered 206 from the swarm.
pub struct PeerSource {
    socket: PathBuf,
    /// The origin reference the peer fetches from when no peer has the blob (`docker://HOST/REPO`).
    origin_ref: Option<String>,
    /// The image's bootstrap (`sha256:<hex>`, verified by the mount): the peer reads the data
    /// blobs' piece tables from it, so it fetches only the pieces a read covers.
    bootstrap: Option<String>,
}

impl PeerSource {
    /// A client of the peer listening on `socket`; `origin_ref` tells it where the blobs live,
    /// `bootstrap` where their piece tables are.
    pub fn new(
        socket: impl Into<PathBuf>,
        origin_ref: Option<String>,
        bootstrap: Option<String>,
    ) -> Self {
        PeerSource {
            socket: socket.into(),
            origin_ref,
            bootstrap,
        }
    }

    /// A new HTTP/1 connection to the peer's API.
    async fn connect<B>(
        &self,
        err: &impl Fn(String) -> FetchError,
    ) -> Result<hyper::client::conn::http1::SendRequest<B>, FetchError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| err(format!("connect: {e} (is `shoal peer` running?)")))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "peer API connection ended");
            }
        });
        Ok(sender)
    }

    fn uri(&self, blob: &Digest) -> String {
        let mut q = Vec::new();
        if let Some(r) = &self.origin_ref {
            q.push(format!("source={}", percent_encode(r)));
        }
        if let Some(b) = &self.bootstrap {
            q.push(format!("bootstrap={}", percent_encode(b)));
        }
        if q.is_empty() {
            format!("/blobs/{blob}")
        } else {
            format!("/blobs/{blob}?{}", q.join("&"))
        }
    }
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[async_trait::async_trait]
impl ChunkSource for PeerSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Peer
    }
    fn describe(&self) -> String {
        format!("peer {}", self.socket.display())
    }
    async fn offer_pieces(
        &self,
        blob: &Digest,
        piece_size: u32,
        pieces: &[[u8; 32]],
    ) -> Result<(), FetchError> {
        let err = |r: String| fetch_err(self, blob, 0, 0, r);
        let mut sender = self.connect(&err).await?;
        let uri = self.uri(blob).replacen(
            &format!("/blobs/{blob}"),
            &format!("/blobs/{blob}/pieces"),
            1,
        );
        let req = Request::builder()
            .method(Method::PUT)
            .uri(uri)
            .header(header::HOST, "shoal-peer")
            .header("shoal-piece-size", piece_size.to_string())
            .body(http_body_util::Full::new(Bytes::from(pieces.concat())))
            .map_err(|e| err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| err(format!("request: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = http_body_util::Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        let mut e = err(format!("answered {status}: {body}"));
        e.refused = status == StatusCode::FORBIDDEN;
        Err(e)
    }

    async fn read_range(&self, blob: &Digest, start: u64, end: u64) -> Result<Bytes, FetchError> {
        let err = |r: String| fetch_err(self, blob, start, end, r);
        if end <= start {
            return Err(err("empty range".into()));
        }
        let want = usize::try_from(end - start).map_err(|_| err("range too large".into()))?;
        let mut sender = self.connect(&err).await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(self.uri(blob))
            .header(header::HOST, "shoal-peer")
            .header(header::RANGE, format!("bytes={start}-{}", end - 1))
            .body(Empty::<Bytes>::new())
            .map_err(|e| err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| err(format!("request: {e}")))?;
        let status = resp.status();
        if status != StatusCode::PARTIAL_CONTENT && !(status == StatusCode::OK && start == 0) {
            let body = http_body_util::Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
                .unwrap_or_default();
            let mut e = err(format!("answered {status}: {body}"));
            e.refused = status == StatusCode::FORBIDDEN;
            return Err(e);
        }
        let mut out = Vec::with_capacity(want);
        let mut body = BodyStream::new(resp.into_body());
        while let Some(frame) = body.next().await {
            let frame = frame.map_err(|e| err(format!("body broke: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > want {
                    // A 200 with the whole blob: keep only what was asked for.
                    let take = want - out.len();
                    out.extend_from_slice(data.get(..take).unwrap_or_default());
                    break;
                }
                out.extend_from_slice(&data);
            }
        }
        if out.len() != want {
            return Err(err(format!("got {} of {want} bytes", out.len())));
        }
        Ok(Bytes::from(out))
    }
}
