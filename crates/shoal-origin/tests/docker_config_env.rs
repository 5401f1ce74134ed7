//! `$DOCKER_CONFIG` is honoured (its own test binary: it sets a process environment variable).

use base64::Engine;
use shoal_origin::{Reference, RegistryClient, RegistryOptions};
use shoal_testkit::{or_skip, Registry, RegistryAuth, RegistryOpts};

#[tokio::test]
async fn docker_config_env_supplies_credentials() {
    let auth = RegistryAuth::Basic {
        user: "erin".into(),
        password: "envpw".into(),
    };
    let Some(reg) = or_skip(Registry::start(RegistryOpts { auth }).await) else {
        return;
    };
    let img = reg
        .push_random_image("env/app", "v1", 1000, 20)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let auth_b64 = base64::engine::general_purpose::STANDARD.encode("erin:envpw");
    std::fs::write(
        dir.path().join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth_b64}"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    // The only test in this binary, so no other thread reads the environment meanwhile.
    std::env::set_var("DOCKER_CONFIG", dir.path());
    let c = RegistryClient::new(RegistryOptions::default()).unwrap();
    let r = Reference::parse(&reg.reference("env/app", "v1")).unwrap();
    assert_eq!(
        c.pull_manifest(&r).await.unwrap().digest.to_string(),
        img.manifest_digest
    );
}
