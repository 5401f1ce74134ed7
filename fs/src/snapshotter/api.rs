//! containerd's snapshots API and Mount type, generated from fs/proto by tonic (build.rs). The
//! module tree mirrors the protobuf packages, as the generated code refers to them by relative
//! paths; [`snapshots`] and [`types`] are the short names.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Protobuf package `containerd`.
pub mod containerd {
    /// Package `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// Package `containerd.services`.
    pub mod services {
        /// Package `containerd.services.snapshots`.
        pub mod snapshots {
            /// Package `containerd.services.snapshots.v1` (server and client).
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
