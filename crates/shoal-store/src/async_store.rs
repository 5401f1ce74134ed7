//! The tokio face of the store: each blocking call runs on `spawn_blocking`, and `get_or_fetch`
//! coalesces concurrent fetches of one item across tasks.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::blob::BlobStatus;
use crate::config::PutOutcome;
use crate::config::{StoreConfig, StoreStats};
use crate::error::{Error, Result};
use crate::flight::FetchError;
use crate::index::PinGuard;
use crate::key::{Blake3Hash, Digest, Item, PieceLayout};
use crate::store::Store;

/// An async handle on a [`Store`]. Cheap to clone; clones share the store and the flights.
#[derive(Clone, Debug)]
pub struct AsyncStore {
    store: Store,
    flights: moka::future::Cache<Item, Bytes>,
}

impl AsyncStore {
    /// Wraps an opened store.
    pub fn new(store: Store) -> Self {
        AsyncStore {
            store,
            flights: moka::future::Cache::builder().build(),
        }
    }

    /// Opens the store (recovery runs on a blocking thread).
    pub async fn open(config: StoreConfig) -> Result<Self> {
        let store = tokio::task::spawn_blocking(move || Store::open(config))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        Ok(AsyncStore::new(store))
    }

    /// The synchronous store underneath (for threads, e.g. FUSE workers).
    pub fn store(&self) -> &Store {
        &self.store
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    /// See [`Store::ensure_blob`].
    pub async fn ensure_blob(&self, digest: Digest, layout: Arc<PieceLayout>) -> Result<()> {
        self.blocking(move |s| s.ensure_blob(&digest, &layout))
            .await
    }

    /// See [`Store::adopt_blob`].
    pub async fn adopt_blob(
        &self,
        digest: Digest,
        layout: Arc<PieceLayout>,
        staged: Arc<crate::StagedFile>,
        pieces: Vec<(u32, Blake3Hash)>,
    ) -> Result<bool> {
        self.blocking(move |s| s.adopt_blob(&digest, (*layout).clone(), &staged, &pieces))
            .await
    }

    /// See [`Store::put_piece`].
    pub async fn put_piece(&self, digest: Digest, index: u32, data: Bytes) -> Result<PutOutcome> {
        self.blocking(move |s| s.put_piece(&digest, index, &data))
            .await
    }

    /// See [`Store::read_piece`].
    pub async fn read_piece(&self, digest: Digest, index: u32) -> Result<Bytes> {
        self.blocking(move |s| s.read_piece(&digest, index)).await
    }

    /// See [`Store::read_range`].
    pub async fn read_range(&self, digest: Digest, offset: u64, len: u64) -> Result<Bytes> {
        self.blocking(move |s| s.read_range(&digest, offset, len))
            .await
    }

    /// See [`Store::complete_blob`].
    pub async fn complete_blob(&self, digest: Digest) -> Result<()> {
        self.blocking(move |s| s.complete_blob(&digest)).await
    }

    /// See [`Store::digest_ahead`].
    pub async fn digest_ahead(&self, digest: Digest) -> Result<()> {
        self.blocking(move |s| s.digest_ahead(&digest)).await
    }

    /// See [`Store::import_blob`]; `reader` is read on a blocking thread.
    pub async fn import_blob<R>(
        &self,
        digest: Digest,
        piece_size: u32,
        mut reader: R,
    ) -> Result<PieceLayout>
    where
        R: Read + Send + 'static,
    {
        self.blocking(move |s| s.import_blob(&digest, piece_size, &mut reader))
            .await
    }

    /// See [`Store::remove_blob`].
    pub async fn remove_blob(&self, digest: Digest) -> Result<()> {
        self.blocking(move |s| s.remove_blob(&digest)).await
    }

    /// See [`Store::put_chunk`].
    pub async fn put_chunk(&self, hash: Blake3Hash, data: Bytes) -> Result<PutOutcome> {
        self.blocking(move |s| s.put_chunk(&hash, &data)).await
    }

    /// See [`Store::get_chunk`].
    pub async fn get_chunk(&self, hash: Blake3Hash) -> Result<Bytes> {
        self.blocking(move |s| s.get_chunk(&hash)).await
    }

    /// See [`Store::blob_status`] (memory only, no I/O).
    pub fn blob_status(&self, digest: &Digest) -> Option<BlobStatus> {
        self.store.blob_status(digest)
    }

    /// See [`Store::pin_blob`] (memory only, no I/O).
    pub fn pin_blob(&self, digest: &Digest) -> Result<PinGuard> {
        self.store.pin_blob(digest)
    }

    /// See [`Store::pin_chunk`] (memory only, no I/O).
    pub fn pin_chunk(&self, hash: &Blake3Hash) -> Result<PinGuard> {
        self.store.pin_chunk(hash)
    }

    /// See [`Store::stats`].
    pub fn stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// See [`Store::sweep`].
    pub async fn sweep(&self) -> Result<u64> {
        self.blocking(|s| Ok(s.sweep())).await
    }

    /// Runs [`Store::sweep`] every `every` until the returned task is aborted.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = this.sweep().await {
                    tracing::warn!(error = %e, "store sweep failed");
                }
            }
        })
    }

    /// Returns the item from the store, or runs `fetch` once for all concurrent callers of the
    /// same item, verifies, stores and returns the bytes. Bytes that do not verify are
    /// [`Error::HashMismatch`] and never stored; when the store is full the verified bytes are
    /// still returned, uncached. For a piece, register the blob with `ensure_blob` first.
    pub async fn get_or_fetch<F, E>(&self, item: Item, fetch: F) -> Result<Bytes>
    where
        F: std::future::Future<Output = Result<Bytes, E>> + Send,
        E: Into<FetchError>,
    {
        match self.blocking(move |s| s.read_item(&item)).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) if e.is_corrupt() || matches!(e, Error::NotPresent { .. }) => {}
            Err(e) => return Err(e),
        }
        let ran = AtomicBool::new(false);
        let result = self
            .flights
            .try_get_with(item, async {
                ran.store(true, Ordering::Relaxed);
                if let Ok(bytes) = self.blocking(move |s| s.read_item(&item)).await {
                    return Ok(bytes); // a flight that just ended stored it
                }
                self.store.count_fetch();
                let bytes = fetch.await.map_err(|e| Error::Fetch {
                    item: item.to_string(),
                    source: e.into(),
                })?;
                let data = bytes.clone();
                self.blocking(move |s| {
                    s.verify_item(&item, &data)?;
                    s.keep_fetched(&item, &data);
                    Ok(())
                })
                .await?;
                Ok::<_, Error>(bytes)
            })
            .await;
        if ran.load(Ordering::Relaxed) {
            self.flights.invalidate(&item).await;
        }
        result.map_err(Error::from_shared)
    }
}
