//! Registry client against the real `docker-registry`: auth modes, token cache and renewal,
//! docker config.json, push/pull round trips, multi-arch indexes, mirrors (`ns=`), retries,
//! resumed streams, redirects that must not carry credentials, and the allowed-origins rule for
//! redirects and token realms (never to an unlisted loopback or link-local address).

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use shoal_origin::{
    collect_stream, parse_digest, AllowedOrigins, ByteRange, Credentials, ListOwner, OriginError,
    PlatformSpec, PushOutcome, Reference, RefusalReason, RegistryClient, RegistryOptions,
    RegistryOrigin, OCI_INDEX, OCI_MANIFEST,
};
use shoal_testkit::{
    or_skip, random_bytes, sha256_digest, Registry, RegistryAuth, RegistryOpts, Relay,
};

fn opts() -> RegistryOptions {
    RegistryOptions {
        use_docker_config: false,
        backoff_base: Duration::from_millis(10),
        ..Default::default()
    }
}

fn with_creds(host: &str, user: &str, pass: &str) -> RegistryOptions {
    let mut o = opts();
    o.credentials = HashMap::from([(host.to_string(), Credentials::new(user, pass))]);
    o
}

async fn fetch_all(
    c: &RegistryClient,
    r: &Reference,
    digest: &str,
) -> Result<Vec<u8>, OriginError> {
    let d = parse_digest(digest)?;
    collect_stream(c.fetch_blob(r, &d).await?, 1 << 30).await
}

async fn start(auth: RegistryAuth) -> Option<Registry> {
    or_skip(Registry::start(RegistryOpts { auth }).await)
}

#[tokio::test]
async fn anonymous_pull_serves_each_byte_once() {
    let Some(reg) = start(RegistryAuth::Anonymous).await else {
        return;
    };
    let img = reg
        .push_random_image("anon/app", "v1", 5 << 20, 7)
        .await
        .unwrap();
    let c = RegistryClient::new(opts()).unwrap();
    let r = Reference::parse(&reg.reference("anon/app", "v1")).unwrap();
    let m = c.pull_manifest(&r).await.unwrap();
    assert_eq!(m.digest.to_string(), img.manifest_digest);
    assert_eq!(m.bytes.as_ref(), img.manifest.as_slice());
    assert_eq!(m.media_type, OCI_MANIFEST);
    let layer = fetch_all(&c, &r, &img.layer_digest).await.unwrap();
    assert!(layer == img.layer);
    assert_eq!(
        reg.blob_bytes_served(&img.layer_digest).await,
        img.layer.len() as u64
    );
    // A missing tag names the reference.
    let e = c
        .pull_manifest(&r.with_tag("nope").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, OriginError::ManifestNotFound { .. }) && e.to_string().contains("nope"),
        "{e}"
    );
}

#[tokio::test]
async fn basic_auth_right_wrong_and_missing_credentials() {
    let auth = RegistryAuth::Basic {
        user: "alice".into(),
        password: "s3cret".into(),
    };
    let Some(reg) = start(auth).await else { return };
    let img = reg
        .push_random_image("basic/app", "v1", 1 << 20, 8)
        .await
        .unwrap();
    let r = Reference::parse(&reg.reference("basic/app", "v1")).unwrap();

    let good = RegistryClient::new(with_creds(&reg.host(), "alice", "s3cret")).unwrap();
    assert_eq!(
        good.pull_manifest(&r).await.unwrap().digest.to_string(),
        img.manifest_digest
    );
    assert!(fetch_all(&good, &r, &img.layer_digest).await.unwrap() == img.layer);

    let wrong = RegistryClient::new(with_creds(&reg.host(), "alice", "wrong")).unwrap();
    let e = wrong.pull_manifest(&r).await.unwrap_err();
    assert!(
        matches!(e, OriginError::AuthFailed { status: 401, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&reg.host()),
        "error names the registry: {e}"
    );

    let none = RegistryClient::new(opts()).unwrap();
    let e = none.pull_manifest(&r).await.unwrap_err();
    assert!(matches!(e, OriginError::AuthRequired { .. }), "{e:?}");
}

#[tokio::test]
async fn docker_config_json_credentials() {
    let auth = RegistryAuth::Basic {
        user: "bob".into(),
        password: "pw:with:colons".into(),
    };
    let Some(reg) = start(auth).await else { return };
    let img = reg
        .push_random_image("cfg/app", "v1", 64 << 10, 9)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    let auth_b64 = base64::engine::general_purpose::STANDARD.encode("bob:pw:with:colons");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth_b64}"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let o = RegistryOptions {
        use_docker_config: true,
        docker_config_path: Some(cfg),
        ..opts()
    };
    let c = RegistryClient::new(o).unwrap();
    let r = Reference::parse(&reg.reference("cfg/app", "v1")).unwrap();
    assert_eq!(
        c.pull_manifest(&r).await.unwrap().digest.to_string(),
        img.manifest_digest
    );
    assert!(fetch_all(&c, &r, &img.layer_digest).await.unwrap() == img.layer);
}

#[tokio::test]
async fn bearer_tokens_are_cached_per_scope_and_renewed_on_401() {
    let Some(reg) = start(RegistryAuth::Token { credentials: None }).await else {
        return;
    };
    let img = reg
        .push_random_image("tok/app", "v1", 2 << 20, 10)
        .await
        .unwrap();
    assert_eq!(
        reg.token_requests(),
        0,
        "the fixture's own pushes mint tokens without the issuer"
    );
    let r = Reference::parse(&reg.reference("tok/app", "v1")).unwrap();
    let c = RegistryClient::new(opts()).unwrap();
    let origin = RegistryOrigin::new(c.clone(), r.clone());
    let d = parse_digest(&img.layer_digest).unwrap();

    // Many requests, some concurrent, one scope: one token.
    c.pull_manifest(&r).await.unwrap();
    let reads =
        (0..8u64).map(|i| common::read(&origin, &d, ByteRange::new(i * 1000, i * 1000 + 500)));
    for (i, got) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        let i = i as u64;
        assert!(got.unwrap() == img.layer[(i * 1000) as usize..(i * 1000 + 500) as usize]);
    }
    assert!(fetch_all(&c, &r, &img.layer_digest).await.unwrap() == img.layer);
    assert_eq!(
        reg.token_requests(),
        1,
        "one token for repository:tok/app:pull"
    );

    // Another scope (push) needs its own token.
    let blob = Bytes::from(random_bytes(1000, 11));
    let bd = parse_digest(&sha256_digest(&blob)).unwrap();
    assert_eq!(
        c.push_blob(&r, &bd, blob).await.unwrap(),
        PushOutcome::Uploaded
    );
    assert_eq!(reg.token_requests(), 2, "pull,push is a second scope");

    // A token the registry refuses is dropped and fetched again once.
    let c2 = RegistryClient::new(opts()).unwrap();
    reg.issue_stale_tokens(1);
    let before = reg.token_requests();
    assert!(fetch_all(&c2, &r, &img.layer_digest).await.unwrap() == img.layer);
    assert_eq!(
        reg.token_requests() - before,
        2,
        "stale token, then a renewed one"
    );
}

#[tokio::test]
async fn bearer_token_issuer_checks_credentials() {
    let auth = RegistryAuth::Token {
        credentials: Some(("carol".into(), "tokpw".into())),
    };
    let Some(reg) = start(auth).await else { return };
    let img = reg
        .push_random_image("tokc/app", "v1", 10_000, 12)
        .await
        .unwrap();
    let r = Reference::parse(&reg.reference("tokc/app", "v1")).unwrap();
    let good = RegistryClient::new(with_creds(&reg.host(), "carol", "tokpw")).unwrap();
    assert_eq!(
        good.pull_manifest(&r).await.unwrap().digest.to_string(),
        img.manifest_digest
    );
    let bad = RegistryClient::new(with_creds(&reg.host(), "carol", "nope")).unwrap();
    let e = bad.pull_manifest(&r).await.unwrap_err();
    assert!(matches!(e, OriginError::AuthFailed { .. }), "{e:?}");
    let anon = RegistryClient::new(opts()).unwrap();
    let e = anon.pull_manifest(&r).await.unwrap_err();
    assert!(matches!(e, OriginError::AuthRequired { .. }), "{e:?}");
}

#[tokio::test]
async fn push_then_pull_round_trips_and_skips_existing_blobs() {
    let Some(reg) = start(RegistryAuth::Basic {
        user: "u".into(),
        password: "p".into(),
    })
    .await
    else {
        return;
    };
    let c = RegistryClient::new(with_creds(&reg.host(), "u", "p")).unwrap();
    let r = Reference::parse(&reg.reference("push/app", "v2")).unwrap();
    let layer = random_bytes(3 << 20, 13);
    let layer_d = parse_digest(&sha256_digest(&layer)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layer_file = dir.path().join("layer");
    std::fs::write(&layer_file, &layer).unwrap();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let config_d = parse_digest(&sha256_digest(&config)).unwrap();

    assert!(!c.blob_exists(&r, &layer_d).await.unwrap());
    assert_eq!(
        c.push_blob_file(&r, &layer_d, &layer_file).await.unwrap(),
        PushOutcome::Uploaded
    );
    assert_eq!(
        c.push_blob(&r, &config_d, Bytes::from(config.clone()))
            .await
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert!(c.blob_exists(&r, &layer_d).await.unwrap());
    // Second push of the same blobs sends nothing.
    assert_eq!(
        c.push_blob_file(&r, &layer_d, &layer_file).await.unwrap(),
        PushOutcome::AlreadyExists
    );
    assert_eq!(
        c.push_blob(&r, &config_d, Bytes::from(config.clone()))
            .await
            .unwrap(),
        PushOutcome::AlreadyExists
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_d.to_string(), "size": layer.len()}]
    })
    .to_string();
    let md = c
        .push_manifest(&r, Bytes::from(manifest.clone()), OCI_MANIFEST)
        .await
        .unwrap();

    let pulled = c.pull_manifest(&r).await.unwrap();
    assert_eq!(pulled.digest, md);
    assert_eq!(pulled.bytes.as_ref(), manifest.as_bytes());
    assert!(fetch_all(&c, &r, layer_d.as_ref()).await.unwrap() == layer);
    assert!(fetch_all(&c, &r, config_d.as_ref()).await.unwrap() == config);
    let log = reg.access_log().await;
    let uploads = log
        .iter()
        .filter(|e| e.method == "PUT" && e.path.contains("/blobs/uploads/"))
        .count();
    assert_eq!(uploads, 2, "each blob uploaded exactly once");
    // The manifest is also reachable by digest.
    let by_digest = c
        .pull_manifest_raw(&r.with_digest(md.clone()))
        .await
        .unwrap();
    assert_eq!(by_digest.digest, md);
}

#[tokio::test]
async fn multi_arch_index_resolves_to_the_platform() {
    let Some(reg) = start(RegistryAuth::Anonymous).await else {
        return;
    };
    let amd = reg
        .push_image_for(
            "multi/app",
            "amd64",
            random_bytes(1000, 14),
            "linux",
            "amd64",
        )
        .await
        .unwrap();
    let arm = reg
        .push_image_for(
            "multi/app",
            "arm64",
            random_bytes(1000, 15),
            "linux",
            "arm64",
        )
        .await
        .unwrap();
    let desc = |img: &shoal_testkit::TestImage, arch: &str, variant: Option<&str>| {
        let mut p = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            p["variant"] = v.into();
        }
        serde_json::json!({"mediaType": OCI_MANIFEST, "digest": img.manifest_digest, "size": img.manifest.len(), "platform": p})
    };
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [desc(&amd, "amd64", None), desc(&arm, "arm64", Some("v8"))]})
    .to_string();
    let index_d = reg
        .push_manifest("multi/app", "latest", OCI_INDEX, index.as_bytes())
        .await
        .unwrap();
    let r = Reference::parse(&format!("docker://{}/multi/app", reg.host())).unwrap();
    let c = RegistryClient::new(opts()).unwrap();

    let raw = c.pull_manifest_raw(&r).await.unwrap();
    assert!(raw.is_index());
    assert_eq!(raw.digest.to_string(), index_d);
    let got = c
        .pull_manifest_for(&r, &PlatformSpec::parse("linux/arm64/v8").unwrap())
        .await
        .unwrap();
    assert_eq!(got.digest.to_string(), arm.manifest_digest);
    let got = c
        .pull_manifest_for(&r, &PlatformSpec::parse("linux/amd64").unwrap())
        .await
        .unwrap();
    assert_eq!(got.digest.to_string(), amd.manifest_digest);
    let c_arm = RegistryClient::new(RegistryOptions {
        platform: PlatformSpec::parse("linux/arm64").unwrap(),
        ..opts()
    })
    .unwrap();
    assert_eq!(
        c_arm.pull_manifest(&r).await.unwrap().digest.to_string(),
        arm.manifest_digest
    );
    let e = c
        .pull_manifest_for(&r, &PlatformSpec::parse("linux/s390x").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, OriginError::NoMatchingPlatform { .. })
            && e.to_string().contains("linux/arm64/v8"),
        "{e}"
    );
}

#[tokio::test]
async fn mirror_selects_upstream_with_ns() {
    let Some(reg) = start(RegistryAuth::Anonymous).await else {
        return;
    };
    let img = reg
        .push_random_image("library/app", "v1", 100_000, 16)
        .await
        .unwrap();
    let mut o = opts();
    o.mirrors.insert("upstream.invalid:5000".into(), reg.host());
    let c = RegistryClient::new(o).unwrap();
    let r = Reference::parse("docker://upstream.invalid:5000/library/app:v1").unwrap();
    assert_eq!(
        c.pull_manifest(&r).await.unwrap().digest.to_string(),
        img.manifest_digest
    );
    assert!(fetch_all(&c, &r, &img.layer_digest).await.unwrap() == img.layer);
    let log = reg.access_log().await;
    let mirrored: Vec<_> = log
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains("/library/app/"))
        .collect();
    assert!(!mirrored.is_empty());
    assert!(
        mirrored
            .iter()
            .all(|e| e.path.contains("ns=upstream.invalid%3A5000")),
        "{mirrored:?}"
    );
}

#[tokio::test]
async fn retries_5xx_then_gives_up_with_the_status() {
    let Some(reg) = start(RegistryAuth::Anonymous).await else {
        return;
    };
    let img = reg
        .push_random_image("retry/app", "v1", 1 << 20, 17)
        .await
        .unwrap();
    let relay = Relay::start(&reg.url()).await.unwrap();
    let r = Reference::parse(&format!("docker://{}/retry/app:v1", relay.host())).unwrap();
    let c = RegistryClient::new(RegistryOptions {
        max_attempts: 4,
        ..opts()
    })
    .unwrap();

    relay
        .faults()
        .fail_next_blob_gets
        .store(3, Ordering::SeqCst);
    assert!(fetch_all(&c, &r, &img.layer_digest).await.unwrap() == img.layer);
    assert_eq!(relay.stats().injected_failures, 3);

    relay
        .faults()
        .fail_next_requests
        .store(10, Ordering::SeqCst);
    let e = c.pull_manifest(&r).await.unwrap_err();
    assert!(
        matches!(e, OriginError::RegistryStatus { status: 503, .. }),
        "{e:?}"
    );
    assert_eq!(
        relay.stats().injected_failures,
        7,
        "exactly max_attempts tries"
    );
    relay.faults().fail_next_requests.store(0, Ordering::SeqCst);
}

#[tokio::test]
async fn broken_blob_streams_resume_where_they_stopped() {
    let Some(reg) = start(RegistryAuth::Anonymous).await else {
        return;
    };
    let img = reg
        .push_random_image("cut/app", "v1", 8 << 20, 18)
        .await
        .unwrap();
    let relay = Relay::start(&reg.url()).await.unwrap();
    let r = Reference::parse(&format!("docker://{}/cut/app:v1", relay.host())).unwrap();
    let c = RegistryClient::new(opts()).unwrap();
    relay.faults().cut_after.store(1 << 20, Ordering::SeqCst);
    relay
        .faults()
        .cut_next_blob_bodies
        .store(2, Ordering::SeqCst);
    assert!(fetch_all(&c, &r, &img.layer_digest).await.unwrap() == img.layer);
    assert_eq!(relay.stats().cut_bodies, 2);
    // Ranged reads resume too, and return exactly the range.
    relay
        .faults()
        .cut_next_blob_bodies
        .store(1, Ordering::SeqCst);
    let d = parse_digest(&img.layer_digest).unwrap();
    let got = collect_stream(
        c.fetch_blob_range(&r, &d, ByteRange::new(100, 3 << 20))
            .await
            .unwrap(),
        1 << 30,
    )
    .await
    .unwrap();
    assert!(got == img.layer[100..3 << 20]);
    assert_eq!(relay.stats().cut_bodies, 3);
}

#[tokio::test]
async fn redirects_to_storage_never_carry_credentials() {
    let Some(reg) = start(RegistryAuth::Basic {
        user: "dave".into(),
        password: "pw".into(),
    })
    .await
    else {
        return;
    };
    let img = reg
        .push_random_image("redir/app", "v1", 2 << 20, 19)
        .await
        .unwrap();
    let relay = Relay::start(&reg.url()).await.unwrap();
    relay.faults().redirect_blobs.store(true, Ordering::SeqCst);
    let r = Reference::parse(&format!("docker://{}/redir/app:v1", relay.host())).unwrap();
    let c = RegistryClient::new(with_creds(&relay.host(), "dave", "pw")).unwrap();
    assert_eq!(
        c.pull_manifest(&r).await.unwrap().digest.to_string(),
        img.manifest_digest
    );
    assert!(fetch_all(&c, &r, &img.layer_digest).await.unwrap() == img.layer);
    let d = parse_digest(&img.layer_digest).unwrap();
    let origin = RegistryOrigin::new(c.clone(), r.clone());
    assert!(
        common::read(&origin, &d, ByteRange::new(10, 20))
            .await
            .unwrap()
            == img.layer[10..20]
    );
    let st = relay.stats();
    assert!(st.redirects >= 2 && st.storage_requests >= 2, "{st:?}");
    assert_eq!(
        st.storage_requests_with_auth, 0,
        "Authorization must not follow a redirect to another host"
    );
}

fn guarded(list: &[String]) -> RegistryClient {
    let allowed = AllowedOrigins::parse(list, ListOwner::Peer).unwrap();
    RegistryClient::new(RegistryOptions {
        allowed: Some(Arc::new(allowed)),
        ..opts()
    })
    .unwrap()
}

fn refusal(e: OriginError) -> shoal_origin::Refusal {
    match e {
        OriginError::NotAllowed(r) => r,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn redirects_to_loopback_or_link_local_are_refused_unless_listed() {
    let Some(reg) = start(RegistryAuth::Anonymous).await else {
        return;
    };
    let img = reg
        .push_random_image("redir/guard", "v1", 1 << 20, 23)
        .await
        .unwrap();
    let relay = Relay::start(&reg.url()).await.unwrap();
    relay.faults().redirect_blobs.store(true, Ordering::SeqCst);
    let r = Reference::parse(&format!("docker://{}/redir/guard:v1", relay.host())).unwrap();
    let storage = format!("127.0.0.1:{}", relay.storage_port());
    let redirect_to = |base: Option<String>| *relay.faults().redirect_base.lock().unwrap() = base;
    let c = guarded(&[relay.host()]);
    assert_eq!(
        c.pull_manifest(&r).await.unwrap().digest.to_string(),
        img.manifest_digest,
        "the listed registry answers"
    );

    // 127.0.0.1 and 169.254.169.254 as literals, and a name resolving to loopback.
    redirect_to(Some(format!("http://{storage}")));
    let e = refusal(fetch_all(&c, &r, &img.layer_digest).await.unwrap_err());
    assert_eq!(e.reason, RefusalReason::Loopback);
    for part in [
        format!("registry {} sent the request for blob", relay.host()),
        format!("on to {storage}, a loopback address: refused"),
        format!("add \"{storage}\" to allowed_origins"),
    ] {
        assert!(e.message.contains(&part), "{part:?} missing in: {e}");
    }
    redirect_to(Some("http://169.254.169.254".into()));
    let e = refusal(fetch_all(&c, &r, &img.layer_digest).await.unwrap_err());
    assert_eq!(e.reason, RefusalReason::LinkLocal);
    assert!(
        e.message.contains("169.254.169.254, a link-local address"),
        "{e}"
    );
    redirect_to(None); // the relay's own default: http://localhost:<storage port>
    let e = refusal(fetch_all(&c, &r, &img.layer_digest).await.unwrap_err());
    assert_eq!(e.reason, RefusalReason::Loopback);
    assert!(e.message.contains("which resolves to"), "{e}");
    let st = relay.stats();
    assert_eq!(st.redirects, 3);
    assert_eq!(
        st.storage_requests, 0,
        "no request reached the redirect target"
    );

    // Listed by host and port, the same redirects are followed.
    let port = relay.storage_port();
    let c = guarded(&[relay.host(), storage.clone(), format!("localhost:{port}")]);
    assert!(fetch_all(&c, &r, &img.layer_digest).await.unwrap() == img.layer);
    redirect_to(Some(format!("http://{storage}")));
    assert!(fetch_all(&c, &r, &img.layer_digest).await.unwrap() == img.layer);
    assert_eq!(relay.stats().storage_requests, 2);

    // A registry that is not listed gets no request at all.
    let before = relay.stats().requests;
    let e = refusal(guarded(&[reg.host()]).pull_manifest(&r).await.unwrap_err());
    assert_eq!(e.reason, RefusalReason::NotAllowed);
    assert!(
        e.message.contains(&format!("registry {}", relay.host())),
        "{e}"
    );
    assert_eq!(relay.stats().requests, before);
}

#[tokio::test]
async fn a_token_realm_on_loopback_must_be_listed_too() {
    let Some(reg) = start(RegistryAuth::Token { credentials: None }).await else {
        return;
    };
    let img = reg
        .push_random_image("tok/guard", "v1", 64 << 10, 29)
        .await
        .unwrap();
    let r = Reference::parse(&reg.reference("tok/guard", "v1")).unwrap();
    let issuer = reg.issuer_host().unwrap();
    let e = refusal(guarded(&[reg.host()]).pull_manifest(&r).await.unwrap_err());
    assert_eq!(e.reason, RefusalReason::Loopback);
    assert!(e.message.contains("sent the token request"), "{e}");
    assert!(e.message.contains(&issuer), "{e}");
    assert_eq!(reg.token_requests(), 0);
    let c = guarded(&[reg.host(), issuer]);
    assert_eq!(
        c.pull_manifest(&r).await.unwrap().digest.to_string(),
        img.manifest_digest
    );
}

#[test]
fn references_and_errors_say_what_to_do() {
    let e = Reference::parse("docker://app:latest").unwrap_err();
    assert!(e.to_string().contains("docker://HOST"), "{e}");
    let e = parse_digest("sha256:abc").unwrap_err();
    assert!(e.to_string().contains("sha256:<64 lowercase hex>"), "{e}");
}
