//! The store contract every backend implements, so one conformance suite can run against each.

use std::io::Read;

use bytes::Bytes;

use crate::blob::BlobStatus;
use crate::config::PutOutcome;
use crate::config::StoreStats;
use crate::error::Result;
use crate::flight::FetchError;
use crate::key::{Blake3Hash, Digest, Item, PieceLayout};
use crate::store::Store;

/// What a content store does; [`Store`] (on disk) is the implementation today.
/// Semantics are those documented on [`Store`]'s methods of the same names.
pub trait ContentStore: Send + Sync {
    /// Keeps an entry from eviction while alive.
    type Pin: Send;
    /// Registers a blob's trusted piece layout.
    fn ensure_blob(&self, digest: &Digest, layout: &PieceLayout) -> Result<()>;
    /// Verifies and stores one piece.
    fn put_piece(&self, digest: &Digest, index: u32, data: &[u8]) -> Result<PutOutcome>;
    /// Reads one verified piece.
    fn read_piece(&self, digest: &Digest, index: u32) -> Result<Bytes>;
    /// Reads a byte range covered by held pieces.
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes>;
    /// What is held of a blob.
    fn blob_status(&self, digest: &Digest) -> Option<BlobStatus>;
    /// Verifies the whole blob's sha256 and marks it complete.
    fn complete_blob(&self, digest: &Digest) -> Result<()>;
    /// Streams a whole blob in, computing its piece table.
    fn import_blob(
        &self,
        digest: &Digest,
        piece_size: u32,
        reader: &mut dyn Read,
    ) -> Result<PieceLayout>;
    /// Removes a blob unless pinned.
    fn remove_blob(&self, digest: &Digest) -> Result<()>;
    /// Pins a blob.
    fn pin_blob(&self, digest: &Digest) -> Result<Self::Pin>;
    /// Verifies and stores one chunk.
    fn put_chunk(&self, hash: &Blake3Hash, data: &[u8]) -> Result<PutOutcome>;
    /// Reads one verified chunk.
    fn get_chunk(&self, hash: &Blake3Hash) -> Result<Bytes>;
    /// True when the chunk is indexed.
    fn has_chunk(&self, hash: &Blake3Hash) -> bool;
    /// Removes a chunk unless pinned.
    fn remove_chunk(&self, hash: &Blake3Hash) -> Result<()>;
    /// Pins a chunk.
    fn pin_chunk(&self, hash: &Blake3Hash) -> Result<Self::Pin>;
    /// Reads the item, or fetches it once for all concurrent callers (threads).
    fn get_or_fetch_blocking(
        &self,
        item: Item,
        fetch: &mut dyn FnMut() -> Result<Bytes, FetchError>,
    ) -> Result<Bytes>;
    /// TTL eviction plus watermark enforcement.
    fn sweep(&self) -> u64;
    /// Sizes and counters.
    fn stats(&self) -> StoreStats;
}

impl ContentStore for Store {
    type Pin = crate::index::PinGuard;
    fn ensure_blob(&self, digest: &Digest, layout: &PieceLayout) -> Result<()> {
        Store::ensure_blob(self, digest, layout)
    }
    fn put_piece(&self, digest: &Digest, index: u32, data: &[u8]) -> Result<PutOutcome> {
        Store::put_piece(self, digest, index, data)
    }
    fn read_piece(&self, digest: &Digest, index: u32) -> Result<Bytes> {
        Store::read_piece(self, digest, index)
    }
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        Store::read_range(self, digest, offset, len)
    }
    fn blob_status(&self, digest: &Digest) -> Option<BlobStatus> {
        Store::blob_status(self, digest)
    }
    fn complete_blob(&self, digest: &Digest) -> Result<()> {
        Store::complete_blob(self, digest)
    }
    fn import_blob(
        &self,
        digest: &Digest,
        piece_size: u32,
        reader: &mut dyn Read,
    ) -> Result<PieceLayout> {
        Store::import_blob(self, digest, piece_size, reader)
    }
    fn remove_blob(&self, digest: &Digest) -> Result<()> {
        Store::remove_blob(self, digest)
    }
    fn pin_blob(&self, digest: &Digest) -> Result<Self::Pin> {
        Store::pin_blob(self, digest)
    }
    fn put_chunk(&self, hash: &Blake3Hash, data: &[u8]) -> Result<PutOutcome> {
        Store::put_chunk(self, hash, data)
    }
    fn get_chunk(&self, hash: &Blake3Hash) -> Result<Bytes> {
        Store::get_chunk(self, hash)
    }
    fn has_chunk(&self, hash: &Blake3Hash) -> bool {
        Store::has_chunk(self, hash)
    }
    fn remove_chunk(&self, hash: &Blake3Hash) -> Result<()> {
        Store::remove_chunk(self, hash)
    }
    fn pin_chunk(&self, hash: &Blake3Hash) -> Result<Self::Pin> {
        Store::pin_chunk(self, hash)
    }
    fn get_or_fetch_blocking(
        &self,
        item: Item,
        fetch: &mut dyn FnMut() -> Result<Bytes, FetchError>,
    ) -> Result<Bytes> {
        Store::get_or_fetch_blocking(self, item, fetch)
    }
    fn sweep(&self) -> u64 {
        Store::sweep(self)
    }
    fn stats(&self) -> StoreStats {
        Store::stats(self)
    }
}
