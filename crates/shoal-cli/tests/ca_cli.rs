//! `shoal ca init` and `shoal ca issue` through the real binary; the issued certificates then
//! complete a mutual-TLS QUIC handshake and carry a protocol frame.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use shoal_proto::{Codec, Digest, PieceReply, PieceRequest, PieceSet, ALPN_PEER};
use shoal_tls::{IdentityPaths, NodeIdentity};

fn shoal(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .expect("the shoal binary runs")
}

fn ok(args: &[&str]) {
    let out = shoal(args);
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn init_issue_and_handshake() {
    shoal_tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let a = tmp.path().join("node-a");
    let b = tmp.path().join("node-b");
    let s = |p: &Path| p.to_str().unwrap().to_string();

    ok(&["ca", "init", "--dir", &s(&ca)]);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(mode(&ca), 0o700);
    // A second init must not replace the cluster CA.
    let again = shoal(&["ca", "init", "--dir", &s(&ca)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    ok(&[
        "ca",
        "issue",
        "--name",
        "node-a",
        "--dir",
        &s(&ca),
        "--out",
        &s(&a),
        "--ip",
        "127.0.0.1",
        "--dns",
        "peer.shoal.svc",
        "--days",
        "7",
    ]);
    ok(&[
        "ca",
        "issue",
        "--name",
        "node-b",
        "--dir",
        &s(&ca),
        "--out",
        &s(&b),
    ]);
    assert_eq!(mode(&a.join("tls.key")), 0o600);
    for bad in [
        vec![
            "ca",
            "issue",
            "--name",
            "bad name!",
            "--dir",
            &s(&ca),
            "--out",
            &s(&b),
        ],
        vec![
            "ca",
            "issue",
            "--name",
            "x",
            "--dir",
            &s(&ca),
            "--out",
            &s(&b),
            "--days",
            "0",
        ],
        vec![
            "ca",
            "issue",
            "--name",
            "x",
            "--dir",
            &s(&tmp.path().join("nope")),
            "--out",
            &s(&b),
        ],
    ] {
        let out = shoal(&bad);
        assert!(!out.status.success(), "{bad:?} should fail");
        assert!(!out.stderr.is_empty());
    }

    let server_id = NodeIdentity::load(IdentityPaths::in_dir(&a)).unwrap();
    let client_id = NodeIdentity::load(IdentityPaths::in_dir(&b)).unwrap();
    let names = shoal_tls::identity_of(&server_id.certified_key().cert[0]).unwrap();
    assert_eq!(names.common_name, "node-a");
    assert_eq!(
        names.dns_names,
        vec!["node-a".to_string(), "peer.shoal.svc".to_string()]
    );

    let server = quinn::Endpoint::server(
        shoal_tls::quic_server_config(&server_id, &[ALPN_PEER]).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let serve = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let who = shoal_tls::peer_identity(&conn).unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let codec = Codec::default();
        let _: PieceRequest = codec.read(&mut recv).await.unwrap();
        codec
            .write(&mut send, &PieceReply::Held(PieceSet::full(2)))
            .await
            .unwrap();
        send.finish().unwrap();
        let _ = conn.closed().await;
        who.common_name
    });

    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(
        shoal_tls::quic_client_config(&client_id, &[ALPN_PEER]).unwrap(),
    );
    // Dialled by the extra DNS name given with --dns.
    let conn = client
        .connect(addr, "peer.shoal.svc")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let codec = Codec::default();
    codec
        .write(
            &mut send,
            &PieceRequest::HeldPieces {
                blob: Digest::from_bytes([9; 32]),
            },
        )
        .await
        .unwrap();
    send.finish().unwrap();
    let reply: PieceReply = codec.read(&mut recv).await.unwrap();
    assert_eq!(reply, PieceReply::Held(PieceSet::full(2)));
    conn.close(0u32.into(), b"done");
    assert_eq!(serve.await.unwrap(), "node-b");
    client.wait_idle().await;
}

#[test]
fn help_opens_with_what_shoal_does_for_its_user() {
    let out = |args: &[&str]| {
        let o = shoal(args);
        assert!(o.status.success(), "shoal {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let help = out(&["--help"]);
    let first = help.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("Shoal: container images pulled from your own nodes"),
        "{help}"
    );
    assert!(!help.contains("argument parsing"), "{help}");
    // The short help says the same in a line, and every subcommand is listed.
    let short = out(&["-h"]);
    assert!(short.starts_with("Shoal: "), "{short}");
    for cmd in [
        "peer",
        "scheduler",
        "get",
        "fs",
        "image",
        "containerd-config",
        "snapshotter",
    ] {
        assert!(
            short.contains(&format!("  {cmd} ")),
            "{cmd} missing: {short}"
        );
    }
}
