//! A client of the local API that keeps its connections: requests go out on idle HTTP/1
//! connections of a pool (hyper-util's), so a reader that asks for many small ranges (the FUSE
//! filesystem, the snapshotter) pays the socket connect and the handshake once, not per range.

use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, BodyStream, Full};
use hyper_util::client::legacy::Client as Pool;
use hyper_util::rt::{TokioExecutor, TokioIo};
use shoal_types::Digest;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::{blob_path, ApiError, CacheStatus, NodeStatus, TaskStatus};

/// Largest JSON answer read (status lists).
const MAX_JSON: usize = 16 << 20;
/// Largest error body read.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Idle connections kept, and for how long.
const MAX_IDLE: usize = 32;
const IDLE_FOR: Duration = Duration::from_secs(60);

/// The bytes of a blob answer, as they arrive.
pub type ByteStream = Pin<Box<dyn futures::Stream<Item = Result<Bytes, ApiError>> + Send>>;

/// An answer to a blob GET.
pub struct BlobResponse {
    /// 200 (whole blob) or 206 (a range).
    pub status: u16,
    /// Bytes in the body.
    pub content_length: Option<u64>,
    /// The body.
    pub body: ByteStream,
}

impl std::fmt::Debug for BlobResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobResponse")
            .field("status", &self.status)
            .field("content_length", &self.content_length)
            .finish_non_exhaustive()
    }
}

/// Opens connections to the socket (hyper-util's pool asks it for each new connection).
#[derive(Clone)]
struct UnixConnector {
    socket: Arc<PathBuf>,
}

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let socket = Arc::clone(&self.socket);
        Box::pin(async move { UnixStream::connect(&*socket).await.map(TokioIo::new) })
    }
}

/// A client of a peer's local API socket. Cheap to clone; clones share the connections.
/// Requests need a tokio runtime (the connections' tasks run on it).
#[derive(Clone)]
pub struct Client {
    socket: Arc<PathBuf>,
    // Full: every request but a piece table offer has an empty one.
    pool: Pool<UnixConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// One blob request being built: [`Client::blob`], then the origin, a range or credentials,
/// then how the bytes are wanted ([`send`](BlobRequest::send), [`read`](BlobRequest::read),
/// [`to_file`](BlobRequest::to_file), [`fetch`](BlobRequest::fetch), [`size`](BlobRequest::size)).
#[derive(Debug, Clone)]
#[must_use = "a request does nothing until it is sent"]
pub struct BlobRequest<'a> {
    client: &'a Client,
    blob: Digest,
    source: Option<String>,
    bootstrap: Option<Digest>,
    range: Option<Range<u64>>,
    authorization: Option<String>,
}

impl Client {
    /// A client of the peer listening on `socket` (nothing is connected before a request).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        let socket = Arc::new(socket.into());
        let pool = Pool::builder(TokioExecutor::new())
            .pool_max_idle_per_host(MAX_IDLE)
            .pool_idle_timeout(IDLE_FOR)
            .build(UnixConnector {
                socket: Arc::clone(&socket),
            });
        Client { socket, pool }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A request for `blob` (or part of it).
    pub fn blob(&self, blob: &Digest) -> BlobRequest<'_> {
        BlobRequest {
            client: self,
            blob: *blob,
            source: None,
            bootstrap: None,
            range: None,
            authorization: None,
        }
    }

    /// Status of every download.
    pub async fn tasks(&self) -> Result<Vec<TaskStatus>, ApiError> {
        self.json(Method::GET, "/tasks").await
    }

    /// Status of the download of `blob`; `None` when the peer has no task for it.
    pub async fn task(&self, blob: &Digest) -> Result<Option<TaskStatus>, ApiError> {
        match self.json(Method::GET, &format!("/tasks/{blob}")).await {
            Ok(t) => Ok(Some(t)),
            Err(ApiError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The node's state: scheduler connection, store figures, tasks.
    pub async fn status(&self) -> Result<NodeStatus, ApiError> {
        self.json(Method::GET, "/status").await
    }

    /// Store figures.
    pub async fn cache(&self) -> Result<CacheStatus, ApiError> {
        self.json(Method::GET, "/cache").await
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        // The pool keys connections by authority; every request names the same one.
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://shoal-peer{path}"));
        for (name, value) in headers {
            b = b.header(name, value);
        }
        b.body(Full::new(body))
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
        self.pool.request(req).await.map_err(|e| {
            let reason = chain(&e);
            if e.is_connect() {
                ApiError::Connect {
                    socket: self.socket.to_path_buf(),
                    source: std::io::Error::other(reason),
                }
            } else {
                ApiError::Http {
                    socket: self.socket.to_path_buf(),
                    reason,
                }
            }
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ApiError> {
        let resp = self
            .send(self.request(method, path, &[], Bytes::new())?)
            .await?;
        json_of(resp).await
    }

    /// Why the peer's download of `blob` failed, if it records a failure.
    async fn task_error(&self, blob: &Digest) -> Option<String> {
        self.task(blob).await.ok().flatten()?.error
    }

    /// `e`, or why the peer's download failed when it says (a request or body cut off
    /// because the download failed is better explained by the download's own error).
    async fn explain(&self, blob: &Digest, e: ApiError) -> ApiError {
        match self.task_error(blob).await {
            Some(reason) => ApiError::Download {
                blob: *blob,
                reason,
            },
            None => e,
        }
    }
}

impl BlobRequest<'_> {
    /// The origin to fetch from if no peer holds the blob (`docker://HOST/REPO`).
    pub fn source(mut self, reference: impl Into<String>) -> Self {
        self.source = Some(reference.into());
        self
    }

    /// The image bootstrap that lists this blob (a Shoal data blob of a lazily mounted image):
    /// the peer reads the blob's piece table from it, so a range fetches only the pieces it
    /// covers instead of the whole blob.
    pub fn bootstrap(mut self, bootstrap: &Digest) -> Self {
        self.bootstrap = Some(*bootstrap);
        self
    }

    /// Only bytes `range` of the blob (end exclusive): a 206.
    pub fn range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Credentials for the origin (an `Authorization` header value), passed on by the peer.
    pub fn authorization(mut self, value: impl Into<String>) -> Self {
        self.authorization = Some(value.into());
        self
    }

    fn build(
        &self,
        method: Method,
        suffix: &str,
        mut headers: Vec<(header::HeaderName, String)>,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        if let Some(r) = &self.range {
            if r.end <= r.start {
                return Err(ApiError::BadRequest(format!(
                    "empty range {}..{} of {}",
                    r.start, r.end, self.blob
                )));
            }
            headers.push((header::RANGE, format!("bytes={}-{}", r.start, r.end - 1)));
        }
        if let Some(a) = &self.authorization {
            headers.push((header::AUTHORIZATION, a.clone()));
        }
        let path = blob_path(
            &self.blob,
            self.source.as_deref(),
            self.bootstrap.as_ref(),
            suffix,
        );
        self.client.request(method, &path, &headers, body)
    }

    /// GETs the blob (or the range) and streams the body as it arrives.
    pub async fn send(self) -> Result<BlobResponse, ApiError> {
        let client = self.client.clone();
        let blob = self.blob;
        let resp = match client
            .send(self.build(Method::GET, "", Vec::new(), Bytes::new())?)
            .await
        {
            Ok(r) => r,
            Err(e) => return Err(client.explain(&blob, e).await),
        };
        let status = resp.status();
        if !(status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT) {
            return Err(error_of(resp).await);
        }
        let content_length = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = BodyStream::new(resp.into_body()).filter_map(move |frame| {
            let client = client.clone();
            async move {
                match frame {
                    Ok(f) => f.into_data().ok().map(Ok),
                    // The peer cuts the body when its download fails: say why.
                    Err(e) => Some(Err(client
                        .explain(&blob, ApiError::Body(format!("body broke: {e}")))
                        .await)),
                }
            }
        });
        Ok(BlobResponse {
            status: status.as_u16(),
            content_length,
            body: Box::pin(body),
        })
    }

    /// The blob's size (a HEAD; the peer learns it from its store, the scheduler or the origin).
    pub async fn size(self) -> Result<u64, ApiError> {
        let client = self.client.clone();
        let resp = client
            .send(self.build(Method::HEAD, "", Vec::new(), Bytes::new())?)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(error_of(resp).await);
        }
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ApiError::Body("no Content-Length in the answer to HEAD".into()))
    }

    /// The bytes in memory: exactly the range asked for (or the whole blob); for reads of a
    /// bounded size, such as a FUSE chunk.
    pub async fn read(self) -> Result<Bytes, ApiError> {
        let range = self.range.clone();
        let resp = self.send().await?;
        let want = match (&range, resp.content_length) {
            (Some(r), _) => Some(r.end - r.start),
            (None, len) => len,
        };
        // A 200 answers a range only if it starts at 0 (the peer sent the whole blob): keep the
        // prefix asked for.
        if resp.status == 200 && range.as_ref().is_some_and(|r| r.start > 0) {
            return Err(ApiError::Body(
                "the peer answered a range with the whole blob".into(),
            ));
        }
        let cap = want.map_or(0, |w| usize::try_from(w).unwrap_or(usize::MAX));
        let mut out = Vec::with_capacity(cap.min(64 << 20));
        let mut body = resp.body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            match want {
                Some(w) if (out.len() + chunk.len()) as u64 > w => {
                    if resp.status != 200 {
                        return Err(ApiError::Body("more bytes than asked for".into()));
                    }
                    let take = (w as usize).saturating_sub(out.len());
                    out.extend_from_slice(chunk.get(..take).unwrap_or_default());
                    break;
                }
                _ => out.extend_from_slice(&chunk),
            }
        }
        if let Some(w) = want.filter(|w| out.len() as u64 != *w) {
            return Err(ApiError::Body(format!("got {} of {w} bytes", out.len())));
        }
        Ok(Bytes::from(out))
    }

    /// Fetches the blob (or the range) into `path`: written to `path.partial`, synced, then
    /// renamed; returns the bytes written. The peer has checked every piece (and, for a whole
    /// blob, the sha256) before sending it.
    pub async fn to_file(self, path: &Path) -> Result<u64, ApiError> {
        let resp = self.send().await?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let file_err = |action, source| ApiError::File {
            action,
            path: tmp.clone(),
            source,
        };
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| file_err("create", e))?;
        let mut body = resp.body;
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            file.write_all(&chunk)
                .await
                .map_err(|e| file_err("write", e))?;
            n += chunk.len() as u64;
        }
        file.sync_all().await.map_err(|e| file_err("sync", e))?;
        if resp.content_length.is_some_and(|l| l != n) {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ApiError::Body(format!("body ended after {n} bytes")));
        }
        tokio::fs::rename(&tmp, path)
            .await
            .map_err(|e| ApiError::File {
                action: "rename into",
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(n)
    }

    /// Asks the peer to fetch the whole blob into its cache (a preheat); returns its status
    /// once the blob is complete and verified.
    pub async fn fetch(self) -> Result<TaskStatus, ApiError> {
        let client = self.client.clone();
        let blob = self.blob;
        let resp = match client
            .send(self.build(Method::POST, "/fetch", Vec::new(), Bytes::new())?)
            .await
        {
            Ok(r) => r,
            Err(e) => return Err(client.explain(&blob, e).await),
        };
        json_of(resp).await
    }

    /// Hands the peer the blob's piece table (`piece_size`, each piece's BLAKE3 in order) that
    /// the caller has from trusted metadata (a verified bootstrap, the index of an unconverted
    /// layer): `PUT /blobs/<digest>/pieces`. Ranges of the blob are then fetched piece by piece,
    /// each piece verified, instead of after importing the whole blob. A 409 (the table
    /// disagrees with what the peer knows of the blob, or a download without it runs) comes
    /// back as [`ApiError::Status`]; the blob can still be read, only not piece by piece.
    pub async fn offer_pieces(self, piece_size: u32, pieces: &[[u8; 32]]) -> Result<(), ApiError> {
        if pieces.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "an empty piece table for {}",
                self.blob
            )));
        }
        let headers = vec![(
            header::HeaderName::from_static(crate::PIECE_SIZE_HEADER),
            piece_size.to_string(),
        )];
        let body = Bytes::from(pieces.concat());
        let req = self.build(Method::PUT, "/pieces", headers, body)?;
        let resp = self.client.send(req).await?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        Ok(())
    }
}

/// An error status and the peer's explanation (its body).
/// The JSON body of a 200 answer, at most `MAX_JSON` bytes; any other answer as an error.
async fn json_of<T: serde::de::DeserializeOwned>(
    resp: http::Response<hyper::body::Incoming>,
) -> Result<T, ApiError> {
    if resp.status() != StatusCode::OK {
        return Err(error_of(resp).await);
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_JSON)
        .collect()
        .await
        .map_err(|e| ApiError::Body(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| ApiError::Body(format!("bad JSON: {e}")))
}

async fn error_of(resp: http::Response<hyper::body::Incoming>) -> ApiError {
    let status = resp.status().as_u16();
    let message = match http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY)
        .collect()
        .await
    {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
        Err(e) => e.to_string(),
    };
    ApiError::Status { status, message }
}

/// An error and its causes, as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
