//! rustls configurations built from a [`NodeIdentity`]: mutual-TLS QUIC for the swarm (both
//! ends verify the other's chain to the cluster CA) and server-only HTTPS for the proxy.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::server::WebPkiClientVerifier;
use rustls::version::TLS13;
use rustls_pki_types::CertificateDer;

use crate::{provider, NodeIdentity, TlsError};

/// Server config for a QUIC endpoint (piece server or scheduler) that accepts only clients
/// with a certificate chained to the cluster CA, offering the given ALPN names.
pub fn quic_server_config(
    identity: &Arc<NodeIdentity>,
    alpn: &[&[u8]],
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = mtls_server_config(identity, alpn)?;
    let quic = QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// Client config for QUIC connections to other nodes: presents this node's certificate and
/// accepts only servers chained to the cluster CA whose name matches the one dialled.
pub fn quic_client_config(
    identity: &Arc<NodeIdentity>,
    alpn: &[&[u8]],
) -> Result<quinn::ClientConfig, TlsError> {
    let tls = mtls_client_config(identity, alpn)?;
    let quic = QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The rustls (TLS 1.3 only) server config behind [`quic_server_config`].
pub fn mtls_server_config(
    identity: &Arc<NodeIdentity>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(identity.roots(), provider()).build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::clone(identity) as Arc<dyn rustls::server::ResolvesServerCert>);
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// The rustls (TLS 1.3 only) client config behind [`quic_client_config`].
pub fn mtls_client_config(
    identity: &Arc<NodeIdentity>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_root_certificates(identity.roots())
        .with_client_cert_resolver(
            Arc::clone(identity) as Arc<dyn rustls::client::ResolvesClientCert>
        );
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// Server config for the registry proxy over HTTPS: this node's certificate, no client
/// certificate (container runtimes have none), ALPN `h2` and `http/1.1`.
pub fn https_server_config(identity: &Arc<NodeIdentity>) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(identity) as Arc<dyn rustls::server::ResolvesServerCert>);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Who is on the other end of a verified connection, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's common name: the node name it was issued for.
    pub common_name: String,
    /// Its DNS subject alternative names.
    pub dns_names: Vec<String>,
}

/// Reads the node name from the other side's leaf certificate (already verified by the
/// handshake), e.g. to check it against the host id in its Hello.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, TlsError> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| TlsError::PeerCertificate("the other side sent no certificate".into()))?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::PeerCertificate("not a rustls certificate chain".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| TlsError::PeerCertificate("empty certificate chain".into()))?;
    identity_of(leaf)
}

/// Reads the node name and DNS names of one DER certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<PeerIdentity, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::PeerCertificate(format!("unparsable certificate: {e}")))?;
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| TlsError::PeerCertificate("certificate has no common name".into()))?
        .to_string();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                dns_names.push((*d).to_string());
            }
        }
    }
    Ok(PeerIdentity {
        common_name,
        dns_names,
    })
}
