//! Checks deploy/ without a cluster: every Kubernetes manifest (each base and component file, and
//! the `kubectl kustomize` output of every overlay) against the Kubernetes schemas with
//! `kubernetes-validate` (PyPI; it ships the schemas), every TOML config the manifests and the
//! systemd examples ship against the real config structs (unknown fields are errors), and the
//! Dockerfile's stages and users.
//!
//! `kubernetes-validate` is installed by deploy/local/deps.sh; without it the schema checks skip
//! with a printed reason, except under CI=true where they fail. Rendering overlays needs
//! `kubectl` (its built-in kustomize); without it only the overlay rendering is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Oldest Kubernetes minor the manifests support; the validator's newest is checked too.
const OLDEST_KUBERNETES: &str = "1.29.0";

fn deploy_dir() -> PathBuf {
    manifest_dir().join("../deploy")
}

/// The validator's command line, or why there is none.
fn validator() -> Result<Vec<String>, String> {
    let cli = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    if cli.is_ok_and(|o| o.status.success()) {
        return Ok(vec!["kubernetes-validate".into()]);
    }
    let module = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output();
    match module {
        Ok(o) if o.status.success() => Ok(vec![
            "python3".into(),
            "-m".into(),
            "kubernetes_validate".into(),
        ]),
        _ => Err("kubernetes-validate is not installed (pip install kubernetes-validate)".into()),
    }
}

/// Runs the validator in strict mode on `files` for one Kubernetes version; the error text when
/// any resource fails.
fn validate(cmd: &[String], version: Option<&str>, files: &[PathBuf]) -> Result<String, String> {
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]).arg("--strict").arg("--no-warn");
    if let Some(v) = version {
        c.args(["-k", v]);
    }
    c.args(files);
    let out = c.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.contains("ERROR") {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Every manifest file (not kustomization.yaml, not patches) under `dir`.
fn manifests(dir: &Path) -> Vec<PathBuf> {
    // Patches are partial objects: they are checked in the rendered output instead.
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap_or_default();
    let patches: Vec<&str> = kustomization
        .lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("path:"))
        .map(str::trim)
        .collect();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.extension().is_some_and(|e| e == "yaml")
            && name != "kustomization.yaml"
            && !patches.contains(&name)
        {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn kubectl_available() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `kubectl kustomize dir` into a file in `out_dir`.
fn render(dir: &Path, out_dir: &Path, name: &str) -> PathBuf {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let file = out_dir.join(format!("{name}.yaml"));
    std::fs::write(&file, &out.stdout).expect("writing the rendered overlay");
    file
}

#[test]
fn manifests_match_the_kubernetes_schemas() {
    let cmd = match validator() {
        Ok(cmd) => cmd,
        Err(why) => {
            shoal_testkit::cannot_run(format!("{why} (deploy/local/deps.sh installs it)"));
            return;
        }
    };
    let k8s = deploy_dir().join("kubernetes");
    let tmp = tempfile::tempdir().expect("temp dir");

    // The validator must catch a wrong field, or a pass below would mean nothing.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  clusterIP: None\n  portz: []\n",
    )
    .expect("writing the bad manifest");
    let err = validate(&cmd, Some(OLDEST_KUBERNETES), &[bad]).expect_err("portz is not a field");
    assert!(err.contains("portz"), "{err}");

    let mut files = manifests(&k8s.join("base"));
    for component in ["network-policy", "service-monitor", "cert-manager"] {
        files.extend(manifests(&k8s.join("components").join(component)));
    }
    if kubectl_available() {
        for overlay in ["dev", "production"] {
            files.push(render(
                &k8s.join("overlays").join(overlay),
                tmp.path(),
                overlay,
            ));
        }
        // Every component at once (cert-manager is not in any overlay). kustomize takes only
        // relative paths, so the temp overlay reaches the repository through `..`s.
        let all = tmp.path().join("all");
        std::fs::create_dir(&all).expect("temp overlay dir");
        let all_abs = all.canonicalize().expect("temp overlay path");
        let k8s_abs = k8s.canonicalize().expect("deploy/kubernetes");
        let up = "../".repeat(all_abs.components().count() - 1);
        let rel = |sub: &str| {
            let target = k8s_abs.join(sub);
            format!(
                "{up}{}",
                target.strip_prefix("/").unwrap_or(&target).display()
            )
        };
        let components = ["network-policy", "service-monitor", "cert-manager"]
            .map(|c| format!("  - {}\n", rel(&format!("components/{c}"))))
            .concat();
        std::fs::write(
            all.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n{components}",
                rel("base")
            ),
        )
        .expect("writing the temp overlay");
        files.push(render(&all, tmp.path(), "all-components"));
    } else {
        eprintln!("overlay rendering skipped: kubectl (with kustomize) is not installed");
    }
    for version in [Some(OLDEST_KUBERNETES), None] {
        if let Err(text) = validate(&cmd, version, &files) {
            panic!("manifests fail the schemas of Kubernetes {version:?}:\n{text}");
        }
    }
    eprintln!("{} manifest files valid", files.len());
}

/// The peer config file at `path`, with the host id the manifests pass as a flag filled in.
fn peer_config(path: &Path) -> shoal_peer::PeerConfig {
    let mut cfg = shoal_peer::PeerConfig::from_toml_file(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if cfg.host_id.is_empty() {
        cfg.host_id = "node-a".into();
    }
    cfg.validate()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    cfg
}

#[test]
fn shipped_configs_parse_with_the_real_structs() {
    let k8s = deploy_dir().join("kubernetes");
    let mut seeds = vec![k8s.join("base/config/seed.toml")];
    for overlay in ["dev", "production"] {
        let p = k8s.join("overlays").join(overlay).join("config/seed.toml");
        if p.exists() {
            seeds.push(p);
        }
    }
    for path in &seeds {
        let cfg = peer_config(path);
        assert!(cfg.seed, "{}: a seed config", path.display());
        assert!(
            !cfg.proxy.enabled,
            "{}: seeds serve no proxy",
            path.display()
        );
        assert_eq!(cfg.scheduler_dns.as_deref(), Some("shoal-scheduler:4471"));
    }
    let peer = peer_config(&k8s.join("base/config/peer.toml"));
    assert!(!peer.seed && peer.proxy.enabled);
    // Nothing is allowed by default: every shipped config lists its origins, the same list.
    assert!(!peer.allowed_origins.is_empty());
    for path in &seeds {
        assert_eq!(
            peer_config(path).allowed_origins,
            peer.allowed_origins,
            "{}",
            path.display()
        );
    }
    assert_eq!(peer.proxy.listen.port(), 4480);
    assert_eq!(peer.metrics_listen.port(), 4490, "the probes' port");
    assert_eq!(peer.scheduler_dns.as_deref(), Some("shoal-scheduler:4471"));
    let systemd_peer = peer_config(&deploy_dir().join("systemd/peer.toml.example"));
    assert!(!systemd_peer.advertise.is_empty());
    assert!(!systemd_peer.allowed_origins.is_empty());

    for path in [
        k8s.join("base/config/snapshotter.toml"),
        deploy_dir().join("systemd/snapshotter.toml.example"),
    ] {
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg: shoal_fs::snapshotter::SnapshotterConfig =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cfg.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            cfg.root.to_str(),
            Some(shoal_fs::snapshotter::DEFAULT_ROOT),
            "where the CRI measures image-fs usage"
        );
        assert_eq!(cfg.peer_socket.as_deref(), Some(peer.api_socket.as_path()));
    }
    for path in [
        k8s.join("base/config/scheduler.toml"),
        deploy_dir().join("systemd/scheduler.toml.example"),
    ] {
        let cfg = shoal_scheduler::SchedulerServiceConfig::from_toml_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cfg.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(cfg.host_id, peer.scheduler_name, "peers dial this name");
        assert_eq!(cfg.listen.port(), 4471);
        assert_eq!(cfg.metrics_listen.port(), 4490, "the probes' port");
        assert!(!cfg.allowed_origins.is_empty(), "{}", path.display());
    }
    let sched = shoal_scheduler::SchedulerServiceConfig::from_toml_file(
        &k8s.join("base/config/scheduler.toml"),
    )
    .expect("scheduler.toml");
    assert_eq!(sched.allowed_origins, peer.allowed_origins);
}

#[test]
fn dockerfile_builds_in_one_stage_and_runs_unprivileged() {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    // Instructions, with continuation lines joined.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "builder and runtime stages: {froms:?}");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS builder"));
    assert!(froms[1].contains("-slim") && froms[1].ends_with(" AS runtime"));
    let runtime: Vec<&str> = lines
        .iter()
        .copied()
        .skip_while(|l| !l.ends_with(" AS runtime"))
        .collect();
    let build = lines
        .iter()
        .find(|l| l.contains("cargo build"))
        .expect("a cargo build step");
    assert!(build.contains("--release") && build.contains("--locked") && build.contains("shoal"));
    let installs = runtime
        .iter()
        .find(|l| l.contains("apt-get install"))
        .expect("runtime packages");
    for pkg in ["ca-certificates", "fuse3"] {
        assert!(installs.contains(pkg), "runtime lacks {pkg}");
    }
    assert!(runtime
        .iter()
        .any(|l| l.starts_with("COPY --from=builder ")));
    let user = runtime
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER in the runtime stage");
    let uid = user
        .trim_start_matches("USER ")
        .split(':')
        .next()
        .unwrap_or("");
    assert!(
        uid != "0" && uid != "root",
        "the image runs unprivileged: {user}"
    );
    let entry = runtime
        .iter()
        .find(|l| l.starts_with("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    assert!(entry.contains("/usr/local/bin/shoal"), "{entry}");
}

/// The `rust-version` the workspace declares, from the root Cargo.toml.
fn workspace_rust_version() -> String {
    let root = manifest_dir().join("../Cargo.toml");
    let text = std::fs::read_to_string(&root).expect("root Cargo.toml");
    let manifest: toml::Value = toml::from_str(&text).expect("root Cargo.toml parses");
    manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("workspace.package.rust-version")
        .to_string()
}

/// The triple rustc builds for by default, from `rustc -vV`.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("running rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

fn version_tuple(v: &str) -> (u64, u64) {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn dockerfile_toolchain_builds_the_locked_dependencies() {
    let declared = workspace_rust_version();
    // The oldest compiler every locked dependency accepts. Only the host's dependencies: the
    // image builds for Linux, and a build fetches only those, so --offline finds them.
    let host = host_triple();
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(manifest_dir())
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let needed = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| Some((p["rust_version"].as_str()?, p["name"].as_str()?)))
        .max_by_key(|(v, _)| version_tuple(v))
        .expect("some package declares a rust-version");
    assert!(
        version_tuple(&declared) >= version_tuple(needed.0),
        "workspace rust-version {declared} is older than {} needs ({})",
        needed.1,
        needed.0
    );
    let dockerfile =
        std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    let arg = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION in the Dockerfile");
    assert_eq!(
        arg.trim(),
        declared,
        "the builder image's Rust is the declared rust-version"
    );
}

/// The package's directory, as cargo gives it when it runs the test: a build dir shared between
/// checkouts at different paths may hold a binary compiled in another one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
