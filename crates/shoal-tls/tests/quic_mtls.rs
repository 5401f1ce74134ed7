//! Real quinn endpoints on loopback with certificates from a real cluster CA: who may connect,
//! who may not, and live certificate reload.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{Codec, Digest, PieceReply, PieceRequest, PieceSet, ALPN_PEER};
use shoal_tls::*;
use time::OffsetDateTime;

const CA_NAME: &str = "Shoal test CA";

fn init_ca(dir: &Path) -> ClusterCa {
    ClusterCa::init(dir, CA_NAME, 30).unwrap()
}

/// Issues a certificate for `name` into `dir` and loads it as a node identity.
fn node(ca: &ClusterCa, dir: &Path, req: NodeCertRequest) -> Arc<NodeIdentity> {
    ca.issue(&req).unwrap().write_to(dir).unwrap();
    NodeIdentity::load(IdentityPaths::in_dir(dir)).unwrap()
}

fn request(name: &str) -> NodeCertRequest {
    let mut r = NodeCertRequest::new(name, 30);
    r.ips.push("127.0.0.1".parse().unwrap());
    r
}

/// A piece server that answers one HeldPieces request per connection; returns its address and
/// a channel reporting each connection's outcome (the client's common name, or the error).
fn serve(
    identity: &Arc<NodeIdentity>,
) -> (
    quinn::Endpoint,
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
) {
    let cfg = quic_server_config(identity, &[ALPN_PEER]).unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let outcome = async {
                    let conn = incoming.await.map_err(|e| e.to_string())?;
                    let who = peer_identity(&conn).map_err(|e| e.to_string())?;
                    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
                    let codec = Codec::default();
                    let req: PieceRequest =
                        codec.read(&mut recv).await.map_err(|e| e.to_string())?;
                    let PieceRequest::HeldPieces { .. } = req else {
                        return Err("unexpected request".to_string());
                    };
                    let reply = PieceReply::Held(PieceSet::full(3));
                    codec
                        .write(&mut send, &reply)
                        .await
                        .map_err(|e| e.to_string())?;
                    send.finish().map_err(|e| e.to_string())?;
                    // Keep the connection until the client has read the reply and closed.
                    let _ = conn.closed().await;
                    Ok(who.common_name)
                }
                .await;
                let _ = tx.send(outcome);
            });
        }
    });
    (endpoint, addr, rx)
}

/// Connects with `cfg`, asks for held pieces, and returns the reply and the server's leaf cert.
async fn ask(
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<(PieceReply, Vec<u8>), String> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(cfg);
    let result = async {
        let conn = endpoint
            .connect(addr, server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let leaf = conn
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| chain.first().map(|c| c.to_vec()))
            .ok_or("no server certificate")?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let codec = Codec::default();
        codec
            .write(
                &mut send,
                &PieceRequest::HeldPieces {
                    blob: Digest::from_bytes([1; 32]),
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let reply: PieceReply = codec.read(&mut recv).await.map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"done");
        Ok((reply, leaf))
    };
    let out = tokio::time::timeout(Duration::from_secs(10), result)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    endpoint.wait_idle().await;
    out
}

async fn server_outcome(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
) -> Result<String, String> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the server reports every connection")
        .expect("server task alive")
}

#[tokio::test]
async fn valid_certificates_connect_both_ways_and_exchange_a_frame() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let server_id = node(&ca, &tmp.path().join("a"), request("node-a"));
    let client_id = node(&ca, &tmp.path().join("b"), request("node-b"));
    let (_ep, addr, mut outcomes) = serve(&server_id);

    let (reply, _) = ask(
        quic_client_config(&client_id, &[ALPN_PEER]).unwrap(),
        addr,
        "node-a",
    )
    .await
    .unwrap();
    assert_eq!(reply, PieceReply::Held(PieceSet::full(3)));
    assert_eq!(server_outcome(&mut outcomes).await.unwrap(), "node-b");

    // The server's certificate must match the name dialled.
    let err = ask(
        quic_client_config(&client_id, &[ALPN_PEER]).unwrap(),
        addr,
        "node-c",
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // A wrong ALPN (scheduler protocol at a piece server) is refused too.
    let err = ask(
        quic_client_config(&client_id, &[shoal_proto::ALPN_SCHEDULER]).unwrap(),
        addr,
        "node-a",
    )
    .await
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("protocol") || err.contains("120"),
        "{err}"
    );
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let other_ca = ClusterCa::init(&tmp.path().join("other-ca"), "Intruder CA", 30).unwrap();
    let server_id = node(&ca, &tmp.path().join("a"), request("node-a"));
    // The intruder trusts our CA (it knows the public CA cert) but its own cert is foreign.
    let intruder_dir = tmp.path().join("x");
    other_ca
        .issue(&request("node-x"))
        .unwrap()
        .write_to(&intruder_dir)
        .unwrap();
    std::fs::write(intruder_dir.join(CA_CRT), ca.cert_pem()).unwrap();
    let intruder = NodeIdentity::load(IdentityPaths::in_dir(&intruder_dir)).unwrap();
    let (_ep, addr, mut outcomes) = serve(&server_id);

    let result = ask(
        quic_client_config(&intruder, &[ALPN_PEER]).unwrap(),
        addr,
        "node-a",
    )
    .await;
    assert!(result.is_err(), "the intruder got a reply: {result:?}");
    let server_err = server_outcome(&mut outcomes).await.unwrap_err();
    assert!(
        server_err.contains("UnknownIssuer") || server_err.to_lowercase().contains("certificate"),
        "{server_err}"
    );
}

#[tokio::test]
async fn no_client_certificate_is_rejected() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let server_id = node(&ca, &tmp.path().join("a"), request("node-a"));
    let (_ep, addr, mut outcomes) = serve(&server_id);

    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(server_id.roots())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_PEER.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let result = ask(cfg, addr, "node-a").await;
    assert!(
        result.is_err(),
        "a client without a certificate got a reply: {result:?}"
    );
    let server_err = server_outcome(&mut outcomes).await.unwrap_err();
    assert!(
        server_err.to_lowercase().contains("certificate"),
        "{server_err}"
    );
}

#[tokio::test]
async fn expired_certificates_are_rejected() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let mut expired = request("node-old");
    expired.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
    expired.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired_id = node(&ca, &tmp.path().join("old"), expired.clone());
    let good_id = node(&ca, &tmp.path().join("a"), request("node-a"));

    // Expired client certificate: the server refuses it.
    let (_ep, addr, mut outcomes) = serve(&good_id);
    let result = ask(
        quic_client_config(&expired_id, &[ALPN_PEER]).unwrap(),
        addr,
        "node-a",
    )
    .await;
    assert!(result.is_err(), "an expired client got a reply: {result:?}");
    let server_err = server_outcome(&mut outcomes).await.unwrap_err();
    assert!(
        server_err.contains("Expired") || server_err.to_lowercase().contains("expired"),
        "{server_err}"
    );

    // Expired server certificate: the client refuses it.
    let (_ep2, addr2, _outcomes2) = serve(&expired_id);
    let err = ask(
        quic_client_config(&good_id, &[ALPN_PEER]).unwrap(),
        addr2,
        "node-old",
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn replaced_files_are_served_after_reload() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let server_dir = tmp.path().join("a");
    let server_id = node(&ca, &server_dir, request("node-a"));
    let client_id = node(&ca, &tmp.path().join("b"), request("node-b"));
    let watcher = server_id.spawn_watcher(Duration::from_millis(50));
    let (_ep, addr, _outcomes) = serve(&server_id);
    // A fresh client config per connection: a resumed TLS session would show the old
    // certificate without a new handshake.
    let client_cfg = || quic_client_config(&client_id, &[ALPN_PEER]).unwrap();

    let first_leaf = load_certs(&server_dir.join(TLS_CRT)).unwrap().remove(0);
    let (_, seen) = ask(client_cfg(), addr, "node-a").await.unwrap();
    assert_eq!(seen, first_leaf.to_vec());

    // A rotation that is half done (new certificate, old key) is not taken.
    let rotated = ca.issue(&request("node-a")).unwrap();
    std::fs::write(server_dir.join(TLS_CRT), &rotated.cert_pem).unwrap();
    assert!(server_id.reload_if_changed().is_err());
    let (_, seen) = ask(client_cfg(), addr, "node-a").await.unwrap();
    assert_eq!(
        seen,
        first_leaf.to_vec(),
        "a mismatched key must not replace the working one"
    );

    // The finished rotation is picked up by the watcher without a restart.
    rotated.write_to(&server_dir).unwrap();
    let new_leaf = load_certs(&server_dir.join(TLS_CRT)).unwrap().remove(0);
    assert_ne!(new_leaf, first_leaf);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, seen) = ask(client_cfg(), addr, "node-a").await.unwrap();
        if seen == new_leaf.to_vec() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
}
