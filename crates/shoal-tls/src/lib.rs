//! Cluster identity for Shoal: the CA, node certificates, and rustls configs for QUIC and HTTPS.
//!
//! Every peer <-> peer and peer <-> scheduler connection is QUIC with mutual TLS: both ends
//! present a certificate issued by the cluster CA and verify the other's. This crate makes the
//! CA and node certificates ([`ClusterCa`]), loads them from files the way a Kubernetes Secret
//! mounts them ([`NodeIdentity`], reloaded live when they change), and builds the rustls and
//! quinn configurations. One crypto provider, *ring*, is used everywhere; call
//! [`install_crypto_provider`] once at start.

mod ca;
mod config;
mod error;
mod files;
mod reload;

use std::sync::Arc;

pub use ca::{
    ClusterCa, IssuedCert, NodeCertRequest, DEFAULT_CA_DAYS, DEFAULT_NODE_DAYS, MAX_DAYS,
};
pub use config::{
    https_server_config, identity_of, mtls_client_config, mtls_server_config, peer_identity,
    quic_client_config, quic_server_config, PeerIdentity,
};
pub use error::TlsError;
pub use files::{load_certs, load_key, IdentityPaths, CA_CRT, CA_KEY, TLS_CRT, TLS_KEY};
pub use reload::{NodeIdentity, DEFAULT_RELOAD_INTERVAL};

/// The crypto provider every Shoal TLS config uses: rustls' *ring* provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs *ring* as the process-wide rustls provider (for libraries that use the default,
/// such as reqwest). Call once at start; calling again is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed: by an earlier call, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
