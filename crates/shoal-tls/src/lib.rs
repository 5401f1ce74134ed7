//! Cluster identity for Shoal: the CA, node certificates, and rustls configs for QUIC and HTTPS.
