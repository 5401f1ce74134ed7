//! Every origin (registry, S3 via moto, local directory) runs the same conformance suite.

mod common;

use shoal_origin::{
    parse_digest, LocalDirOrigin, Reference, RegistryClient, RegistryOptions, RegistryOrigin,
    S3Options, S3Origin,
};
use shoal_testkit::{or_skip, random_bytes, sha256_digest, MotoS3, Registry, RegistryOpts};

const SIZE: usize = 3 * 1024 * 1024 + 17;

#[tokio::test]
async fn registry_origin_conforms() {
    let Some(reg) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    let data = random_bytes(SIZE, 1);
    let digest = parse_digest(&reg.push_blob("conf/app", &data).await.unwrap()).unwrap();
    let client = RegistryClient::new(RegistryOptions {
        use_docker_config: false,
        ..Default::default()
    })
    .unwrap();
    let origin = RegistryOrigin::new(
        client,
        Reference::parse(&reg.reference("conf/app", "x")).unwrap(),
    );
    common::conformance(&origin, &digest, &data).await;
}

#[tokio::test]
async fn s3_origin_conforms() {
    let Some(moto) = or_skip(MotoS3::start().await) else {
        return;
    };
    moto.create_bucket("shoal-blobs").await.unwrap();
    let data = random_bytes(SIZE, 2);
    let digest = sha256_digest(&data);
    let hex = digest.trim_start_matches("sha256:");
    moto.put_object("shoal-blobs", &format!("cache/sha256/{hex}"), data.clone())
        .await
        .unwrap();
    let origin = S3Origin::new(&S3Options {
        bucket: "shoal-blobs".into(),
        prefix: "/cache/".into(),
        region: "us-east-1".into(),
        endpoint: moto.endpoint(),
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        virtual_hosted_style: false,
        allow_http: true,
    })
    .unwrap();
    common::conformance(&origin, &parse_digest(&digest).unwrap(), &data).await;
}

#[tokio::test]
async fn local_dir_origin_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(SIZE, 3);
    let digest = sha256_digest(&data);
    std::fs::create_dir_all(dir.path().join("sha256")).unwrap();
    std::fs::write(
        dir.path()
            .join("sha256")
            .join(digest.trim_start_matches("sha256:")),
        &data,
    )
    .unwrap();
    let origin = LocalDirOrigin::new(dir.path());
    common::conformance(&origin, &parse_digest(&digest).unwrap(), &data).await;
}

#[test]
fn local_dir_refuses_keys_that_leave_the_directory() {
    for bad in [
        "sha256:../../etc/passwd",
        "../x:abc",
        "sha256/../x:abc",
        "sha256:abc/def",
        ":abc",
        "sha256:",
    ] {
        assert!(
            parse_digest(bad).is_err(),
            "{bad} must not parse as a digest"
        );
    }
    // A non-sha256 algorithm with a legal encoded part stays two plain components under the root.
    let dir = tempfile::tempdir().unwrap();
    let o = LocalDirOrigin::new(dir.path());
    let d =
        parse_digest("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8").unwrap();
    let p = o.blob_path(&d).unwrap();
    assert!(p.starts_with(dir.path()));
    assert_eq!(p.strip_prefix(dir.path()).unwrap().components().count(), 2);
}
