//! Shoal's node store: an on-disk, content-addressed cache of blob pieces, chunks and whole blobs.
//!
//! It promises: nothing it returns is unverified (every piece and chunk read is checked against its
//! BLAKE3 hash, a blob is complete only after its sha256 matched); no torn write is ever visible,
//! even after `kill -9` (piece and chunk bytes are flushed before the journal record that names
//! them; metadata is written to a temporary file and renamed); Shoal's bytes stay under a quota
//! (high/low watermarks, LRU and TTL eviction, pinned entries kept); concurrent misses of one item
//! run one fetch. It does not fetch anything itself, and it does not trust piece tables it is given
//! beyond checking them against the blob's sha256 on completion.
//!
//! [`Store`] is the synchronous core (threads, e.g. FUSE workers); [`AsyncStore`] wraps it for tokio.
//! The on-disk layout and the crash-safety argument are in docs/store.md.

// Layers, lowest first; a module uses only the ones above it in this list.
// Types: no store state.
mod buffers;
mod config;
mod error;
mod key;
// Primitives and on-disk formats: files, blob metadata, chunk packs, chunk group hashes.
mod groups;
mod journal;
mod pack;
mod paths;
// The state and its owner: the in-memory index, then the ledger (index, files, quota, counters).
mod index;
mod ledger;
// Operations on the ledger: blobs, pieces, staged and imported blobs, chunks, recovery.
mod blob;
mod chunk;
mod import;
mod read;
mod recover;
mod staged;
// The handles: single flight, the store's API, its tokio face, the trait (its shared test suite
// is in tests/common).
mod async_store;
mod backend;
mod flight;
mod store;

pub use async_store::AsyncStore;
pub use backend::ContentStore;
pub use blob::{verify_piece, BlobStatus};
pub use buffers::BufferPool;
pub use chunk::verify_chunk;
pub use config::{PutOutcome, StoreConfig, StoreStats};
pub use error::{Error, Result};
pub use flight::FetchError;
pub use index::PinGuard;
pub use key::{
    Blake3Hash, Item, PieceLayout, MAX_CHUNK_SIZE, MAX_PIECES, MAX_PIECE_SIZE, MIN_PIECE_SIZE,
};
pub use read::{BlobReader, MAX_RANGE};
pub use staged::StagedFile;
pub use store::Store;
