//! S3-compatible object store origin (SigV4, custom endpoint, path or virtual-host style) via `object_store`.
//!
//! Blobs are objects `<prefix>/<algorithm>/<encoded>`, the layout of [`crate::LocalDirOrigin`].

use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};

use crate::{BlobStat, ByteRange, ByteStream, Digest, Origin, OriginError};

/// Where and how to reach an S3-compatible bucket.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/` needed).
    pub prefix: String,
    /// Region for SigV4 (`us-east-1` when empty).
    pub region: String,
    /// Custom endpoint (`https://s3.example.internal:9000`); empty for AWS.
    pub endpoint: String,
    /// Access key id; empty means the environment / instance credentials.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Address the bucket as `bucket.endpoint` instead of `endpoint/bucket`.
    pub virtual_hosted_style: bool,
    /// Allow `http://` endpoints (loopback tests, private networks).
    pub allow_http: bool,
}

/// Blobs read from an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct S3Origin {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
}

impl S3Origin {
    /// Builds the client; no request is sent until the first read.
    pub fn new(opts: &S3Options) -> Result<Self, OriginError> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&opts.bucket)
            .with_region(if opts.region.is_empty() {
                "us-east-1"
            } else {
                &opts.region
            })
            .with_virtual_hosted_style_request(opts.virtual_hosted_style)
            .with_allow_http(opts.allow_http);
        if !opts.endpoint.is_empty() {
            b = b.with_endpoint(&opts.endpoint);
        }
        if !opts.access_key_id.is_empty() {
            b = b
                .with_access_key_id(&opts.access_key_id)
                .with_secret_access_key(&opts.secret_access_key);
        }
        let store = b
            .build()
            .map_err(|e| OriginError::Config(format!("S3 bucket {:?}: {e}", opts.bucket)))?;
        Ok(S3Origin {
            store: Arc::new(store),
            bucket: opts.bucket.clone(),
            prefix: opts.prefix.trim_matches('/').to_string(),
        })
    }

    /// The object key that holds `digest`.
    pub fn object_key(&self, digest: &Digest) -> Result<ObjectPath, OriginError> {
        let parts = [digest.algorithm().as_ref(), digest.digest()];
        // object_store's Path refuses `..`, `.` and separators inside a part; check anyway so
        // the error names the blob.
        if parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('/'))
        {
            return Err(OriginError::UnsafeKey {
                key: digest.to_string(),
                origin: self.describe(),
            });
        }
        let key = if self.prefix.is_empty() {
            format!("{}/{}", parts[0], parts[1])
        } else {
            format!("{}/{}/{}", self.prefix, parts[0], parts[1])
        };
        ObjectPath::parse(&key).map_err(|_| OriginError::UnsafeKey {
            key: digest.to_string(),
            origin: self.describe(),
        })
    }

    fn map_err(&self, digest: &Digest, what: &str, e: object_store::Error) -> OriginError {
        match e {
            object_store::Error::NotFound { .. } => OriginError::BlobNotFound {
                digest: digest.to_string(),
                origin: self.describe(),
            },
            source => OriginError::ObjectStore {
                origin: self.describe(),
                what: format!("{what} {digest}"),
                source,
            },
        }
    }
}

#[async_trait::async_trait]
impl Origin for S3Origin {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn stat(&self, digest: &Digest) -> Result<BlobStat, OriginError> {
        let key = self.object_key(digest)?;
        let meta = self
            .store
            .head(&key)
            .await
            .map_err(|e| self.map_err(digest, "stat", e))?;
        Ok(BlobStat { size: meta.size })
    }

    async fn read_range(
        &self,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<ByteStream, OriginError> {
        let key = self.object_key(digest)?;
        tracing::debug!(%digest, %range, bucket = %self.bucket, "s3 read");
        // A ranged GET past the end is clamped by S3, so check the range against the size first
        // (one HEAD); a full read needs no HEAD.
        let get_range = if range.is_full() {
            None
        } else {
            let size = self.stat(digest).await?.size;
            let end = range.resolve(digest, size)?;
            if end == range.start {
                return Ok(Box::pin(futures::stream::empty()));
            }
            Some(GetRange::Bounded(range.start..end))
        };
        let opts = GetOptions {
            range: get_range,
            ..Default::default()
        };
        let result = self
            .store
            .get_opts(&key, opts)
            .await
            .map_err(|e| self.map_err(digest, "read", e))?;
        let origin = self.describe();
        let d = digest.to_string();
        let stream = result.into_stream().map(move |r| {
            r.map_err(|source| OriginError::ObjectStore {
                origin: origin.clone(),
                what: format!("read {d}"),
                source,
            })
        });
        Ok(Box::pin(stream))
    }
}
