//! A peer's DHT identity, tied to its cluster certificate (docs/protocol.md, "DHT discovery").
//!
//! The libp2p key is derived from the node's TLS key, so a node keeps its PeerId across
//! restarts. The binding other nodes check is an attestation the node sends as its identify
//! agent version: its host id, its QUIC addresses, a signature by its TLS key over
//! (PeerId, host id, addresses), and its leaf certificate. A receiver accepts the PeerId only
//! when the certificate chains to the cluster CA, names the host id, and the signature holds.
//! The noise handshake already proved the sender owns the PeerId, so a copied attestation is
//! useless to anyone else.

use std::net::SocketAddr;
use std::sync::Arc;

use libp2p::PeerId;
use rustls::server::danger::ClientCertVerifier;
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, UnixTime};
use shoal_proto::HostId;
use shoal_tls::NodeIdentity;

use crate::error::PeerError;

/// First word of a Shoal attestation (the identify agent version).
const AGENT: &str = "shoal-dht/1";
/// Domain separation of the signed message.
const CONTEXT: &str = "shoal-dht-identity/1";
/// Signature schemes a node key may sign attestations with (rcgen issues ECDSA P-256).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// What an attested peer claims, once verified: who it is and where its piece server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Its host id (its certificate's common name).
    pub host_id: HostId,
    /// Its QUIC piece-server addresses.
    pub addresses: Vec<SocketAddr>,
}

/// The libp2p keypair of a node, derived from its TLS key file's bytes.
pub(crate) fn keypair_from_tls_key(key_pem: &[u8]) -> Result<libp2p::identity::Keypair, PeerError> {
    let seed = blake3::derive_key("shoal libp2p identity v1", key_pem);
    libp2p::identity::Keypair::ed25519_from_bytes(seed)
        .map_err(|e| PeerError::Config(format!("deriving the DHT key from the TLS key: {e}")))
}

fn message(peer: &PeerId, claim: &Claim) -> Vec<u8> {
    let addrs: Vec<String> = claim.addresses.iter().map(|a| a.to_string()).collect();
    format!("{CONTEXT}\n{peer}\n{}\n{}", claim.host_id, addrs.join(",")).into_bytes()
}

/// This node's attestation for `peer`, as the identify agent version.
pub(crate) fn attest(
    identity: &NodeIdentity,
    peer: &PeerId,
    claim: &Claim,
) -> Result<String, PeerError> {
    let fail = |why: String| PeerError::Config(format!("DHT attestation: {why}"));
    let ck = identity.certified_key();
    let leaf = ck
        .cert
        .first()
        .ok_or_else(|| fail("the node certificate file holds no certificate".into()))?;
    let signer = ck
        .key
        .choose_scheme(SCHEMES)
        .ok_or_else(|| fail("the node key type cannot sign attestations".into()))?;
    let sig = signer
        .sign(&message(peer, claim))
        .map_err(|e| fail(e.to_string()))?;
    let addrs: Vec<String> = claim.addresses.iter().map(|a| a.to_string()).collect();
    Ok(format!(
        "{AGENT} {} {} {:04x} {} {}",
        claim.host_id,
        addrs.join(","),
        u16::from(signer.scheme()),
        hex::encode(sig),
        hex::encode(leaf.as_ref()),
    ))
}

/// Checks attestations against the cluster CA.
pub(crate) struct Verifier {
    chain: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier trusting the CA of `identity`.
    pub fn new(identity: &NodeIdentity) -> Result<Self, PeerError> {
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(
            identity.roots(),
            shoal_tls::provider(),
        )
        .build()
        .map_err(|e| PeerError::Config(format!("DHT attestation verifier: {e}")))?;
        Ok(Verifier { chain })
    }

    /// The claim of `peer` if `agent` is a valid attestation for it; else why not.
    pub fn verify(&self, peer: &PeerId, agent: &str) -> Result<Claim, String> {
        let mut parts = agent.split(' ');
        if parts.next() != Some(AGENT) {
            return Err("no Shoal attestation (not a cluster node)".into());
        }
        let (Some(host), Some(addrs), Some(scheme), Some(sig), Some(cert), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err("malformed attestation".into());
        };
        let host_id = HostId::new(host).map_err(|e| e.to_string())?;
        let addresses = addrs
            .split(',')
            .filter(|a| !a.is_empty())
            .take(shoal_proto::MAX_ADDRESSES)
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| format!("address {a}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let scheme = SignatureScheme::from(
            u16::from_str_radix(scheme, 16).map_err(|e| format!("scheme: {e}"))?,
        );
        let sig = hex::decode(sig).map_err(|e| format!("signature: {e}"))?;
        let cert =
            CertificateDer::from(hex::decode(cert).map_err(|e| format!("certificate: {e}"))?);
        self.chain
            .verify_client_cert(&cert, &[], UnixTime::now())
            .map_err(|e| format!("certificate not issued by the cluster CA: {e}"))?;
        let named = shoal_tls::identity_of(&cert).map_err(|e| e.to_string())?;
        if named.common_name != host_id.as_str() {
            return Err(format!(
                "claims host id {host_id} but its certificate names {}",
                named.common_name
            ));
        }
        let claim = Claim { host_id, addresses };
        let alg = shoal_tls::provider()
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .and_then(|(_, algs)| algs.first().copied())
            .ok_or_else(|| format!("unsupported signature scheme {scheme:?}"))?;
        webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| format!("certificate: {e}"))?
            .verify_signature(alg, &message(peer, &claim), &sig)
            .map_err(|e| format!("signature does not bind PeerId {peer}: {e}"))?;
        Ok(claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attestations_bind_peer_ids_to_cluster_certificates() {
        shoal_tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = shoal_tls::ClusterCa::init(&dir.path().join("ca"), "test CA", 1).unwrap();
        let other_ca = shoal_tls::ClusterCa::init(&dir.path().join("ca2"), "other CA", 1).unwrap();
        let load = |ca: &shoal_tls::ClusterCa, name: &str| {
            let d = dir.path().join(name);
            ca.issue(&shoal_tls::NodeCertRequest::new(name, 1))
                .unwrap()
                .write_to(&d)
                .unwrap();
            NodeIdentity::load(shoal_tls::IdentityPaths::in_dir(&d)).unwrap()
        };
        let a = load(&ca, "node-a");
        let outsider = load(&other_ca, "node-x");
        let key = keypair_from_tls_key(&std::fs::read(&a.paths().key).unwrap()).unwrap();
        let again = keypair_from_tls_key(&std::fs::read(&a.paths().key).unwrap()).unwrap();
        let peer = key.public().to_peer_id();
        assert_eq!(peer, again.public().to_peer_id(), "stable PeerId");
        let claim = Claim {
            host_id: HostId::new("node-a").unwrap(),
            addresses: vec!["127.0.0.1:4470".parse().unwrap()],
        };
        let v = Verifier::new(&a).unwrap();
        let agent = attest(&a, &peer, &claim).unwrap();
        assert_eq!(v.verify(&peer, &agent).unwrap(), claim);
        // Another PeerId cannot reuse the attestation.
        let thief = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        assert!(v.verify(&thief, &agent).is_err());
        // A changed address breaks the signature.
        let forged = agent.replace("127.0.0.1:4470", "10.9.9.9:4470");
        assert!(v.verify(&peer, &forged).is_err());
        // A certificate from another CA is refused.
        let x_claim = Claim {
            host_id: HostId::new("node-x").unwrap(),
            addresses: vec![],
        };
        let x_agent = attest(&outsider, &peer, &x_claim).unwrap();
        let err = v.verify(&peer, &x_agent).unwrap_err();
        assert!(err.contains("cluster CA"), "{err}");
        assert!(v.verify(&peer, "rust-libp2p/0.57").is_err());
        assert!(v.verify(&peer, "shoal-dht/1 a b").is_err());
    }
}
