//! Back to source: the origin (an OCI registry today) read with Range GETs. A blob without a
//! piece table is imported whole (the store hashes it into a table and checks its sha256); a
//! blob with one is read piece by piece, each piece verified before it is stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use shoal_origin::{ByteRange, Origin, Reference, RegistryClient, RegistryOptions, RegistryOrigin};
use shoal_proto::{Digest, OriginRef};
use tokio::sync::mpsc;

use crate::convert::origin_digest;
use crate::error::PeerError;

/// Chunks of origin bytes queued between the network and the blocking import.
pub(super) const IMPORT_QUEUE: usize = 16;

/// Origins by reference, sharing one registry client (connection pool, tokens).
#[derive(Debug)]
pub(crate) struct Origins {
    client: RegistryClient,
    cache: Mutex<HashMap<String, Arc<RegistryOrigin>>>,
}

impl Origins {
    /// A pool with a registry client; `plain_http` hosts are spoken to without TLS.
    pub fn new(plain_http: &[String]) -> Result<Self, PeerError> {
        let opts = RegistryOptions {
            plain_http: plain_http.iter().cloned().collect(),
            ..RegistryOptions::default()
        };
        Ok(Origins {
            client: RegistryClient::new(opts)?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The origin named by `origin` (`docker://HOST/REPO`); requests carry the client's
    /// forwarded Authorization when `origin` has one, else this peer's own credentials.
    pub fn get(&self, origin: &OriginRef) -> Result<Arc<RegistryOrigin>, PeerError> {
        // Keyed by reference and credential: one client's Authorization never serves another.
        let key = match &origin.authorization {
            Some(a) => format!(
                "{}\n{}",
                origin.reference,
                blake3::hash(a.as_bytes()).to_hex()
            ),
            None => origin.reference.clone(),
        };
        if let Some(o) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(o);
        }
        if !origin.reference.starts_with("docker://") {
            return Err(PeerError::BadRequest(format!(
                "origin {:?} is not supported: use docker://HOST/REPO",
                origin.reference
            )));
        }
        let reference = Reference::parse(&origin.reference)?;
        let client = self.client.with_authorization(origin.authorization.clone());
        let o = Arc::new(RegistryOrigin::new(client, reference));
        if let Ok(mut c) = self.cache.lock() {
            if c.len() > 1024 {
                c.clear(); // bounded: references are cheap to rebuild
            }
            c.insert(key, Arc::clone(&o));
        }
        Ok(o)
    }
}

/// The size of `blob` at its origin (a HEAD).
pub(crate) async fn stat(origin: &dyn Origin, blob: &Digest) -> Result<u64, PeerError> {
    Ok(origin.stat(&origin_digest(blob)?).await?.size)
}

/// Streams the whole blob from the origin into the store, which computes its piece table with
/// `piece_size` and installs it only if its sha256 matches. Returns the layout.
pub(crate) async fn import(
    store: &shoal_store::AsyncStore,
    origin: &dyn Origin,
    blob: &Digest,
    piece_size: u32,
) -> Result<shoal_store::PieceLayout, PeerError> {
    let mut stream = origin.read(&origin_digest(blob)?).await?;
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(IMPORT_QUEUE);
    let import = store.import_blob(
        crate::convert::store_digest(blob),
        piece_size,
        ChannelReader::new(rx),
    );
    let pump = async move {
        while let Some(chunk) = stream.next().await {
            let item = chunk.map_err(|e| std::io::Error::other(e.to_string()));
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    };
    let (layout, ()) = tokio::join!(import, pump);
    Ok(layout?)
}

/// Reads pieces `first..first+lens.len()` (contiguous) from the origin with one Range GET and
/// hands each whole piece to `each` as soon as its last byte arrives.
pub(crate) async fn read_pieces<F, Fut>(
    origin: &dyn Origin,
    blob: &Digest,
    start: u64,
    first: u32,
    lens: &[u64],
    mut each: F,
) -> Result<(), PeerError>
where
    F: FnMut(u32, Bytes) -> Fut,
    Fut: std::future::Future<Output = Result<(), PeerError>>,
{
    let total: u64 = lens.iter().sum();
    let mut stream = origin
        .read_range(&origin_digest(blob)?, ByteRange::new(start, start + total))
        .await?;
    let mut buf = BytesMut::new();
    let mut next = 0usize;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(&len) = lens.get(next) {
            if (buf.len() as u64) < len {
                break;
            }
            let piece = buf.split_to(len as usize).freeze();
            each(first + next as u32, piece).await?;
            next += 1;
        }
    }
    if next < lens.len() {
        return Err(PeerError::download(
            blob,
            format!("origin stream ended after {next} of {} pieces", lens.len()),
        ));
    }
    Ok(())
}

/// A blocking `Read` over chunks sent from async code (the store's import runs on a blocking
/// thread; the origin stream is async).
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    pub(super) fn new(rx: mpsc::Receiver<std::io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
