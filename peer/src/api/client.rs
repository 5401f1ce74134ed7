//! A small client of the local API (used by `shoal get` and by the FUSE filesystem): one HTTP/1
//! connection over the unix socket per request.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, BodyStream, Empty};
use hyper_util::rt::TokioIo;
use shoal_proto::Digest;
use tokio::io::AsyncWriteExt;

use super::CacheStatus;
use crate::download::TaskStatus;
use crate::error::PeerError;

/// Largest JSON answer read (status lists).
const MAX_JSON: usize = 16 << 20;

/// The body of a blob answer: the bytes as they arrive.
pub type ByteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, PeerError>> + Send>>;

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

/// A client of a peer's local API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
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

impl ApiClient {
    /// A client of the peer listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        req: Request<Empty<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, PeerError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| PeerError::io("connect to local API", self.socket.display(), e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PeerError::Api {
                status: 0,
                message: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "local API client connection ended");
            }
        });
        sender.send_request(req).await.map_err(|e| PeerError::Api {
            status: 0,
            message: e.to_string(),
        })
    }

    fn request(method: Method, uri: &str) -> Result<http::request::Builder, PeerError> {
        Ok(Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "shoal-peer"))
    }

    fn blob_uri(blob: &Digest, source: Option<&str>, suffix: &str) -> String {
        match source {
            Some(s) => format!("/blobs/{blob}{suffix}?source={}", encode(s)),
            None => format!("/blobs/{blob}{suffix}"),
        }
    }

    /// GETs the blob, or `range` (`start..end`, end exclusive) of it; `source` is the origin
    /// reference (`docker://HOST/REPO`) for a blob not cached anywhere yet.
    pub async fn get_blob(
        &self,
        blob: &Digest,
        source: Option<&str>,
        range: Option<(u64, u64)>,
    ) -> Result<BlobResponse, PeerError> {
        let mut b = Self::request(Method::GET, &Self::blob_uri(blob, source, ""))?;
        if let Some((start, end)) = range {
            if end <= start {
                return Err(PeerError::BadRequest(format!("empty range {start}..{end}")));
            }
            b = b.header(header::RANGE, format!("bytes={start}-{}", end - 1));
        }
        let req = b
            .body(Empty::new())
            .map_err(|e| PeerError::BadRequest(e.to_string()))?;
        let resp = match self.send(req).await {
            Ok(r) => r,
            // The peer dropped the request because its download failed: say why.
            Err(e) => {
                return Err(match self.task_error(blob).await {
                    Some(why) => PeerError::Api {
                        status: 0,
                        message: format!("the peer's download failed: {why}"),
                    },
                    None => e,
                })
            }
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
        let (client, blob) = (self.clone(), *blob);
        let body = BodyStream::new(resp.into_body()).filter_map(move |frame| {
            let client = client.clone();
            async move {
                match frame {
                    Ok(f) => f.into_data().ok().map(Ok),
                    // The peer cut the body because its download failed: say why (the origin
                    // and what it answered), which the task status records.
                    Err(e) => Some(Err(PeerError::Api {
                        status: 0,
                        message: match client.task_error(&blob).await {
                            Some(why) => format!("the peer's download failed: {why}"),
                            None => format!("body broke: {e}"),
                        },
                    })),
                }
            }
        });
        Ok(BlobResponse {
            status: status.as_u16(),
            content_length,
            body: Box::pin(body),
        })
    }

    /// Reads `range` of a blob into memory (for small reads, e.g. FUSE chunks).
    pub async fn read_range(
        &self,
        blob: &Digest,
        source: Option<&str>,
        start: u64,
        end: u64,
    ) -> Result<Bytes, PeerError> {
        let resp = self.get_blob(blob, source, Some((start, end))).await?;
        let want = usize::try_from(end - start)
            .map_err(|_| PeerError::BadRequest("range too large".into()))?;
        let mut out = Vec::with_capacity(want.min(64 << 20));
        let mut body = resp.body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > want {
                return Err(PeerError::Api {
                    status: 206,
                    message: "more bytes than asked for".into(),
                });
            }
            out.extend_from_slice(&chunk);
        }
        if out.len() != want {
            return Err(PeerError::Api {
                status: 206,
                message: format!("got {} of {want} bytes", out.len()),
            });
        }
        Ok(Bytes::from(out))
    }

    /// Fetches the whole blob through the peer into `path` (written to `path.partial`, then
    /// renamed), returning its size. The peer has checked its sha256.
    pub async fn fetch_to_file(
        &self,
        blob: &Digest,
        source: Option<&str>,
        path: &Path,
    ) -> Result<u64, PeerError> {
        let resp = self.get_blob(blob, source, None).await?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| PeerError::io("create", tmp.display(), e))?;
        let mut body = resp.body;
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            file.write_all(&chunk)
                .await
                .map_err(|e| PeerError::io("write", tmp.display(), e))?;
            n += chunk.len() as u64;
        }
        file.sync_all()
            .await
            .map_err(|e| PeerError::io("sync", tmp.display(), e))?;
        if resp.content_length.is_some_and(|l| l != n) {
            return Err(PeerError::Api {
                status: 200,
                message: format!("body ended after {n} bytes"),
            });
        }
        tokio::fs::rename(&tmp, path)
            .await
            .map_err(|e| PeerError::io("rename into", path.display(), e))?;
        Ok(n)
    }

    /// Asks the peer to fetch the whole blob (e.g. preheat); returns its status once complete.
    pub async fn fetch(
        &self,
        blob: &Digest,
        source: Option<&str>,
    ) -> Result<TaskStatus, PeerError> {
        let req = Self::request(Method::POST, &Self::blob_uri(blob, source, "/fetch"))?
            .body(Empty::new())
            .map_err(|e| PeerError::BadRequest(e.to_string()))?;
        self.json(req).await
    }

    /// The last failure of the download of `blob`, if the peer records one.
    async fn task_error(&self, blob: &Digest) -> Option<String> {
        let tasks = self.tasks().await.ok()?;
        let name = blob.to_string();
        tasks.into_iter().find(|t| t.blob == name)?.error
    }

    /// Status of every download.
    pub async fn tasks(&self) -> Result<Vec<TaskStatus>, PeerError> {
        let req = Self::request(Method::GET, "/tasks")?
            .body(Empty::new())
            .map_err(|e| PeerError::BadRequest(e.to_string()))?;
        self.json(req).await
    }

    /// The node's state: scheduler connection, store figures, tasks.
    pub async fn status(&self) -> Result<super::NodeStatus, PeerError> {
        let req = Self::request(Method::GET, "/status")?
            .body(Empty::new())
            .map_err(|e| PeerError::BadRequest(e.to_string()))?;
        self.json(req).await
    }

    /// Store figures.
    pub async fn cache(&self) -> Result<CacheStatus, PeerError> {
        let req = Self::request(Method::GET, "/cache")?
            .body(Empty::new())
            .map_err(|e| PeerError::BadRequest(e.to_string()))?;
        self.json(req).await
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: Request<Empty<Bytes>>,
    ) -> Result<T, PeerError> {
        let resp = self.send(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(error_of(resp).await);
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JSON)
            .collect()
            .await
            .map_err(|e| PeerError::Api {
                status: 200,
                message: e.to_string(),
            })?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| PeerError::Api {
            status: 200,
            message: format!("bad JSON: {e}"),
        })
    }
}

async fn error_of(resp: hyper::Response<hyper::body::Incoming>) -> PeerError {
    let status = resp.status().as_u16();
    let message = match http_body_util::Limited::new(resp.into_body(), 64 << 10)
        .collect()
        .await
    {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
        Err(e) => e.to_string(),
    };
    PeerError::Api { status, message }
}
