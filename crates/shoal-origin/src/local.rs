//! Local directory (NAS) origin: blobs as files `<dir>/<algorithm>/<encoded>`.
//!
//! The layout is that of an OCI image layout's `blobs/` directory, so pointing the origin at
//! `layout/blobs` serves an image laid out by umoci or skopeo. A key can never leave the directory:
//! digests are checked against the OCI grammar and every path component must be a plain name.

use std::io::SeekFrom;
use std::path::{Component, Path, PathBuf};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::{BlobStat, ByteRange, ByteStream, Digest, Origin, OriginError};

/// Blobs read from files in a local (or network-mounted) directory.
#[derive(Debug, Clone)]
pub struct LocalDirOrigin {
    root: PathBuf,
}

impl LocalDirOrigin {
    /// An origin over `root`, which holds `<algorithm>/<encoded>` files.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDirOrigin { root: root.into() }
    }

    /// The file that holds `digest`, refusing anything that is not a plain relative name.
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf, OriginError> {
        let rel = Path::new(digest.algorithm().as_ref()).join(digest.digest());
        let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain || rel.components().count() != 2 {
            return Err(OriginError::UnsafeKey {
                key: digest.to_string(),
                origin: self.describe(),
            });
        }
        Ok(self.root.join(rel))
    }

    fn io_error(&self, digest: &Digest, path: &Path, e: std::io::Error) -> OriginError {
        if e.kind() == std::io::ErrorKind::NotFound {
            OriginError::BlobNotFound {
                digest: digest.to_string(),
                origin: self.describe(),
            }
        } else {
            OriginError::Io {
                what: format!("reading blob {digest} from"),
                path: path.display().to_string(),
                source: e,
            }
        }
    }
}

#[async_trait::async_trait]
impl Origin for LocalDirOrigin {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    async fn stat(&self, digest: &Digest) -> Result<BlobStat, OriginError> {
        let path = self.blob_path(digest)?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| self.io_error(digest, &path, e))?;
        if !meta.is_file() {
            return Err(OriginError::BlobNotFound {
                digest: digest.to_string(),
                origin: self.describe(),
            });
        }
        Ok(BlobStat { size: meta.len() })
    }

    async fn read_range(
        &self,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<ByteStream, OriginError> {
        let path = self.blob_path(digest)?;
        tracing::debug!(%digest, %range, origin = %self.root.display(), "local read");
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| self.io_error(digest, &path, e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| self.io_error(digest, &path, e))?;
        if !meta.is_file() {
            return Err(OriginError::BlobNotFound {
                digest: digest.to_string(),
                origin: self.describe(),
            });
        }
        let end = range.resolve(digest, meta.len())?;
        file.seek(SeekFrom::Start(range.start))
            .await
            .map_err(|e| self.io_error(digest, &path, e))?;
        let what = format!("reading blob {digest} from");
        let shown = path.display().to_string();
        let reader = file.take(end - range.start);
        let stream = ReaderStream::with_capacity(reader, 256 * 1024).map(move |r| {
            r.map_err(|source| OriginError::Io {
                what: what.clone(),
                path: shown.clone(),
                source,
            })
        });
        Ok(Box::pin(stream))
    }
}
