//! Shoal's lazy image filesystem: mounts a converted image read-only over FUSE as soon as its
//! small bootstrap is verified, and fetches file data chunk by chunk as it is read — from the
//! local cache, the local peer (the swarm) or the origin — checking every chunk's BLAKE3 against
//! the Merkle metadata before any reader sees it.
//!
//! Data path by module (README.md draws it): [`mount`] opens the source ([`image`]; a plain image
//! through its Shoal index, [`index`]) and starts a FUSE session per bootstrap (`session`; the
//! layers of an indexed image stacked by overlayfs, `layers`) -> [`inode`] answers metadata from
//! the bootstrap and hands reads to a thread pool -> [`read`] maps offsets to chunks and serves
//! cached ones (`cache`: memory, then the store) -> `load` fetches the rest through [`fetch`]
//! (peer, else origin) in the requests `plan` merges (span runs of indexed layers whole),
//! decompresses and verifies ([`verify`]) -> the caches keep them.
//! [`ahead`] picks what a sequential read will want next (loaded in the background),
//! [`prefetch`] warms the cache in the background, [`access_log`] records first reads,
//! [`metrics`] counts. Configuration: [`config`]. [`snapshotter`] is containerd's remote
//! snapshotter that mounts images this way for containers.

pub mod access_log;
pub mod ahead;
mod cache;
pub mod config;
mod error;
pub mod fetch;
mod flight;
pub mod image;
pub mod index;
pub mod inode;
mod layers;
mod load;
pub mod metrics;
pub mod mount;
mod plan;
pub mod prefetch;
pub mod read;
mod session;
pub mod snapshotter;
pub mod verify;

pub use config::FsConfig;
pub use error::{FsError, Result};
pub use metrics::{Metrics, MetricsSnapshot};
pub use mount::{mount, run, umount, MountHandle};
