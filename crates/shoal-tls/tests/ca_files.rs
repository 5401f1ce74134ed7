//! The CA and node files on disk: modes, refusal to overwrite, reloading from the files, and
//! clear errors for bad input.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use shoal_tls::*;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_restrictive_files_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let ca = ClusterCa::init(&dir, "Test CA", 10).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
    assert_eq!(mode(&dir.join(CA_CRT)), 0o644);
    let before = std::fs::read(dir.join(CA_KEY)).unwrap();
    assert!(matches!(
        ClusterCa::init(&dir, "Test CA", 10),
        Err(TlsError::CaExists(_))
    ));
    assert_eq!(std::fs::read(dir.join(CA_KEY)).unwrap(), before);
    // Loading gives the same CA certificate back.
    assert_eq!(ClusterCa::load(&dir).unwrap().cert_pem(), ca.cert_pem());
}

#[test]
fn issued_certificate_names_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&tmp.path().join("ca"), "Test CA", 10).unwrap();
    let loaded = ClusterCa::load(&tmp.path().join("ca")).unwrap();
    let mut req = NodeCertRequest::new("node-1.cluster.local", 5);
    req.dns = vec!["svc.example".into()];
    req.ips = vec!["10.1.2.3".parse().unwrap()];
    let out = tmp.path().join("node");
    // Issued by the reloaded CA: its signature must verify against the original CA cert.
    loaded.issue(&req).unwrap().write_to(&out).unwrap();
    assert_eq!(mode(&out.join(TLS_KEY)), 0o600);
    assert_eq!(
        std::fs::read_to_string(out.join(CA_CRT)).unwrap(),
        ca.cert_pem()
    );
    let id = NodeIdentity::load(IdentityPaths::in_dir(&out)).unwrap();
    let names = identity_of(&id.certified_key().cert[0]).unwrap();
    assert_eq!(names.common_name, "node-1.cluster.local");
    assert_eq!(names.dns_names, vec!["node-1.cluster.local", "svc.example"]);
    assert_eq!(id.roots().len(), 1);
}

#[test]
fn bad_requests_and_files_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&tmp.path().join("ca"), "Test CA", 10).unwrap();
    assert!(matches!(
        ClusterCa::init(&tmp.path().join("ca2"), "Test CA", 0),
        Err(TlsError::Invalid {
            field: "validity",
            ..
        })
    ));
    assert!(matches!(
        ca.issue(&NodeCertRequest::new("bad name", 1)),
        Err(TlsError::Invalid {
            field: "DNS name",
            ..
        })
    ));
    assert!(matches!(
        ca.issue(&NodeCertRequest::new("10.0.0.1", 1)),
        Err(TlsError::Invalid {
            field: "DNS name",
            ..
        })
    ));
    let mut backwards = NodeCertRequest::new("node", 1);
    backwards.not_after = backwards.not_before;
    assert!(matches!(
        ca.issue(&backwards),
        Err(TlsError::Invalid {
            field: "validity",
            ..
        })
    ));

    // Missing files name the path.
    let err = NodeIdentity::load(IdentityPaths::in_dir(&tmp.path().join("none"))).unwrap_err();
    assert!(err.to_string().contains("tls.crt"), "{err}");

    // Garbage instead of PEM.
    let out = tmp.path().join("node");
    ca.issue(&NodeCertRequest::new("node", 1))
        .unwrap()
        .write_to(&out)
        .unwrap();
    std::fs::write(out.join(TLS_KEY), "not a key").unwrap();
    let err = NodeIdentity::load(IdentityPaths::in_dir(&out)).unwrap_err();
    assert!(matches!(err, TlsError::BadPem { .. }), "{err}");

    // A CA key that does not belong to the CA certificate.
    let other = ClusterCa::init(&tmp.path().join("other"), "Other", 10).unwrap();
    drop(other);
    std::fs::copy(
        tmp.path().join("other").join(CA_KEY),
        tmp.path().join("ca").join(CA_KEY),
    )
    .unwrap();
    let err = ClusterCa::load(&tmp.path().join("ca")).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");

    // A node certificate is not a CA.
    let fake = tmp.path().join("fake");
    std::fs::create_dir(&fake).unwrap();
    ca.issue(&NodeCertRequest::new("n2", 1))
        .unwrap()
        .write_to(&tmp.path().join("n2"))
        .unwrap();
    std::fs::copy(tmp.path().join("n2").join(TLS_CRT), fake.join(CA_CRT)).unwrap();
    std::fs::copy(tmp.path().join("n2").join(TLS_KEY), fake.join(CA_KEY)).unwrap();
    let err = ClusterCa::load(&fake).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
}
