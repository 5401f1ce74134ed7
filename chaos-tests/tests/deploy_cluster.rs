//! Runs the Kubernetes base manifests (deploy/kubernetes/base) without a cluster: the scheduler,
//! one seed and two node peers start as real `shoal` processes, each in its own network namespace,
//! with the exact `command`/`args` and `env` their containers declare, after their init containers'
//! commands ran the same way. `shoal get` through both node peers then pulls a blob from a real
//! docker-registry, which serves it once.
//!
//! What the test does in place of Kubernetes, and the only changes it makes:
//! - Downward API: `metadata.name` is the pod name (`<statefulset>-0`, `<daemonset>-<node>`),
//!   `spec.nodeName` the host's name (`node-a`, ...), `status.podIP` and `status.hostIP` the
//!   namespace's address (the peer uses the host network, so both are the node's address).
//!   `$(VAR)` in env values and args expands as Kubernetes does (`$$` escapes, unknown names stay).
//! - Volumes: every volume of a pod is a directory `<pod dir>/vol/<volume name>`. In args and in
//!   the ConfigMap's TOML files, only strings starting with a container's `mountPath` (e.g.
//!   `/etc/shoal/config`, `/etc/shoal/tls`, `/etc/shoal/ca`, `/var/lib/shoal`, `/run/shoal`) are
//!   rewritten to that directory; nothing else in a command line changes. The ConfigMap holds the
//!   files of the kustomization's configMapGenerator; the Secrets hold a CA from `shoal ca init`
//!   (`shoal-ca`) and the scheduler's certificate from `shoal ca issue --name shoal-scheduler`
//!   (`shoal-scheduler-tls`), as kustomization.yaml documents.
//! - Service names: each namespace gets `/etc/netns/<namespace>/hosts` (which `ip netns exec`
//!   bind-mounts over `/etc/hosts`) naming the headless Services' pods, so `scheduler_dns` and
//!   `dht_bootstrap_dns` resolve as cluster DNS would. Removed on drop.
//! - The origin: the registry is reached through a pass-through `FaultRelay` in an origin host,
//!   over plain HTTP; the config changes are `plain_http_registries = ["<origin>"]` in the seed's
//!   and peer's TOML (a real registry speaks HTTPS and needs no such line), and `<origin>`
//!   appended to the `allowed_origins` every shipped TOML must set (as an operator edits it).
//! - Not emulated: the image's user (`runAsUser`), read-only root filesystems, resource limits,
//!   mount propagation and /dev/fuse (no FUSE mount happens in this test).
//!
//! Needs root (network namespaces) and the `shoal` binary next to the test executable
//! (`cargo build -p shoal-cli`); without either it prints `SKIP:` and passes, except the missing
//! binary under CI=true, which fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_yaml::Value;
use sha2::{Digest as _, Sha256};
use shoal_chaos::{http_get, or_skip, Cmd, FaultRelay, Host, Proc, TestNet};
use shoal_testkit::{Registry, RegistryOpts};

const MIB: usize = 1 << 20;
/// Where `ip netns exec NAME` finds files to bind-mount over `/etc` (iproute2).
const NETNS_ETC: &str = "/etc/netns";
const T: Duration = Duration::from_secs(5);

fn base_dir() -> PathBuf {
    manifest_dir().join("../deploy/kubernetes/base")
}

/// The `shoal` binary next to the test executable (target/<profile>/shoal), or why it is absent.
fn shoal_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/deps/<test> -> target/<profile>/shoal
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("shoal"))
        .ok_or_else(|| format!("no directory above {}", exe.display()))?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "no shoal binary at {} (cargo build -p shoal-cli)",
            bin.display()
        ))
    }
}

/// ConfigMap name -> (file name, contents).
type ConfigMaps = BTreeMap<String, Vec<(String, String)>>;

/// Every document of every resource kustomization.yaml lists, and the configMapGenerator files.
fn load_base() -> (Vec<Value>, ConfigMaps) {
    let dir = base_dir();
    let read = |p: &Path| {
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    };
    let kust: Value =
        serde_yaml::from_str(&read(&dir.join("kustomization.yaml"))).expect("kustomization.yaml");
    let mut docs = Vec::new();
    for r in seq(&kust["resources"]) {
        let text = read(&dir.join(str_of(&r)));
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(d).expect("manifest YAML");
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    let mut config_maps = BTreeMap::new();
    for g in seq(&kust["configMapGenerator"]) {
        let files = seq(&g["files"])
            .iter()
            .map(|f| {
                let f = str_of(f);
                let name = f.rsplit('/').next().unwrap_or(f).to_string();
                (name, read(&dir.join(f)))
            })
            .collect();
        config_maps.insert(str_of(&g["name"]).to_string(), files);
    }
    (docs, config_maps)
}

fn seq(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

fn str_of(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string in the manifests, found {v:?}"))
}

/// `$(VAR)` expansion as Kubernetes does it: `$$` is a literal `$`, unknown names stay as written.
fn expand(s: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match vars.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// One pod of a workload, placed on one test host.
struct Pod {
    workload: String,
    name: String,
    node: String,
    host: Host,
    dir: PathBuf,
    spec: Value,
}

impl Pod {
    fn ip(&self) -> String {
        self.host.addr().to_string()
    }

    /// The container's env, downward-API fields filled in, in declaration order.
    fn env(&self, c: &Value) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = Vec::new();
        for e in seq(&c["env"]) {
            let name = str_of(&e["name"]).to_string();
            let value = if let Some(v) = e["value"].as_str() {
                expand(v, &vars)
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.name") => self.name.clone(),
                    Some("spec.nodeName") => self.node.clone(),
                    Some("status.podIP" | "status.hostIP") => self.ip(),
                    other => panic!("{}: env {name}: unsupported source {other:?}", self.name),
                }
            };
            vars.push((name, value));
        }
        vars
    }

    /// (mountPath, host directory) of the container's mounts, longest path first.
    fn mounts(&self, c: &Value) -> Vec<(String, PathBuf)> {
        let mut m: Vec<(String, PathBuf)> = seq(&c["volumeMounts"])
            .iter()
            .map(|vm| {
                let vol = str_of(&vm["name"]);
                (
                    str_of(&vm["mountPath"]).to_string(),
                    self.dir.join("vol").join(vol),
                )
            })
            .collect();
        m.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        m
    }

    /// The pod's first (main) container.
    fn main(&self) -> Value {
        seq(&self.spec["containers"])
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{}: no containers", self.workload))
    }

    fn container(&self, name: &str) -> Value {
        seq(&self.spec["initContainers"])
            .into_iter()
            .chain(seq(&self.spec["containers"]))
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{}: no container {name}", self.workload))
    }

    /// The container's full command line (image entrypoint `shoal` unless `command` is set),
    /// variables expanded and mount paths rewritten, and its env.
    fn command_line(&self, c: &Value, shoal: &Path) -> (Vec<String>, Vec<(String, String)>) {
        let env = self.env(c);
        let mounts = self.mounts(c);
        let mut argv: Vec<String> = seq(&c["command"])
            .iter()
            .chain(seq(&c["args"]).iter())
            .map(|a| rewrite_arg(&expand(str_of(a), &env), &mounts))
            .collect();
        if c["command"].is_null() {
            argv.insert(0, shoal.display().to_string());
        } else if argv
            .first()
            .is_some_and(|p| p.rsplit('/').next() == Some("shoal"))
        {
            argv[0] = shoal.display().to_string();
        }
        (argv, env)
    }
}

/// `path` with a mount path prefix replaced by its host directory; other strings unchanged.
fn rewrite_path(path: &str, mounts: &[(String, PathBuf)]) -> Option<String> {
    mounts.iter().find_map(|(mp, dir)| {
        let rest = path.strip_prefix(mp.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then(|| format!("{}{rest}", dir.display()))
    })
}

/// An argument `/path`, `--flag=/path` with a mounted path rewritten.
fn rewrite_arg(arg: &str, mounts: &[(String, PathBuf)]) -> String {
    if let Some(p) = rewrite_path(arg, mounts) {
        return p;
    }
    if let Some((flag, value)) = arg.split_once('=') {
        if let Some(p) = rewrite_path(value, mounts) {
            return format!("{flag}={p}");
        }
    }
    arg.to_string()
}

/// Rewrites every string value of a TOML document that starts with a mount path.
fn rewrite_toml(v: &mut toml::Value, mounts: &[(String, PathBuf)]) {
    match v {
        toml::Value::String(s) => {
            if let Some(p) = rewrite_path(s, mounts) {
                *s = p;
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(|x| rewrite_toml(x, mounts)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, x)| rewrite_toml(x, mounts)),
        _ => {}
    }
}

/// `/etc/netns/<ns>/` directories with a `hosts` file; removed on drop, and `/etc/netns` too
/// when this test created it and it is empty again.
struct HostsFiles {
    dirs: Vec<PathBuf>,
    made_parent: bool,
}

impl Drop for HostsFiles {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        if self.made_parent {
            // Fails (and is left) while another test still has a namespace directory there.
            let _ = std::fs::remove_dir(NETNS_ETC);
        }
    }
}

fn run_ok(mut c: std::process::Command, what: &str) -> String {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn workload<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in the base manifests"))
}

/// The readiness probe's port of the pod's main container.
fn probe_port(c: &Value) -> u16 {
    c["readinessProbe"]["httpGet"]["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("{:?}: readinessProbe.httpGet.port", c["name"]))
}

async fn wait_ready(pod: &Pod, proc: &mut Proc, port: u16) {
    let start = Instant::now();
    loop {
        let r = http_get(Some(pod.host.netns()), pod.host.sock(port), "/readyz", T).await;
        if r.is_ok_and(|r| r.status == 200) {
            return;
        }
        assert!(
            proc.is_running(),
            "{} exited:\n{}",
            pod.name,
            proc.log_tail(40)
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}: /readyz not 200 within 20 s:\n{}",
            pod.name,
            proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of metric line `name` (labels included, exactly as printed), if present.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
}

fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_base_manifests_command_lines_run_a_swarm_that_pulls_through_both_node_peers() {
    // Host 0: origin (relay), 1: scheduler, 2: seed, 3 and 4: nodes with the peer DaemonSet.
    let Some(net) = or_skip(TestNet::create("deploy", 5)) else {
        return;
    };
    let shoal = match shoal_binary() {
        Ok(b) => b,
        Err(reason) => {
            shoal_testkit::cannot_run(reason);
            return;
        }
    };
    let started = Instant::now();
    let Some(registry) = shoal_testkit::or_skip(Registry::start(RegistryOpts::default()).await)
    else {
        return;
    };
    let relay = FaultRelay::start_on(
        net.host(0).tcp_listener(5000).expect("relay listener"),
        &registry.url(),
    )
    .expect("relay");
    let origin = net.host(0).sock(5000).to_string();

    let (docs, config_maps) = load_base();
    let root = net.dir().join("pods");
    let pod = |kind: &str, workload_name: &str, name: String, node: &str, h: usize| {
        let spec = workload(&docs, kind, workload_name)["spec"]["template"]["spec"].clone();
        Pod {
            workload: workload_name.to_string(),
            dir: root.join(&name),
            name,
            node: node.to_string(),
            host: net.host(h).clone(),
            spec,
        }
    };
    let pods = [
        pod(
            "StatefulSet",
            "shoal-scheduler",
            "shoal-scheduler-0".into(),
            "node-s",
            1,
        ),
        pod(
            "StatefulSet",
            "shoal-seed",
            "shoal-seed-0".into(),
            "node-z",
            2,
        ),
        pod(
            "DaemonSet",
            "shoal-peer",
            "shoal-peer-node-a".into(),
            "node-a",
            3,
        ),
        pod(
            "DaemonSet",
            "shoal-peer",
            "shoal-peer-node-b".into(),
            "node-b",
            4,
        ),
    ];

    // Name resolution: each headless Service names the pods its selector matches.
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for svc in docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Service"))
    {
        let name = str_of(&svc["metadata"]["name"]);
        let selector = svc["spec"]["selector"]
            .as_mapping()
            .cloned()
            .unwrap_or_default();
        for p in &pods {
            let tpl = docs
                .iter()
                .find(|d| {
                    d["metadata"]["name"].as_str() == Some(p.workload.as_str())
                        && d["kind"].as_str() != Some("Service")
                })
                .map(|d| d["spec"]["template"]["metadata"]["labels"].clone())
                .unwrap_or_default();
            if selector.iter().all(|(k, v)| tpl.get(k) == Some(v)) {
                hosts.push_str(&format!("{} {name} {}.{name}\n", p.ip(), p.name));
            }
        }
    }
    let mut hosts_files = HostsFiles {
        dirs: Vec::new(),
        made_parent: !Path::new(NETNS_ETC).exists(),
    };
    for h in net.hosts() {
        let d = Path::new(NETNS_ETC).join(h.netns().name());
        std::fs::create_dir_all(&d).expect("/etc/netns/<ns>");
        hosts_files.dirs.push(d.clone());
        std::fs::write(d.join("hosts"), &hosts).expect("hosts file");
    }

    // The Secrets: the cluster CA and the scheduler's certificate, as kustomization.yaml says.
    let secrets = net.dir().join("secrets");
    let ca = secrets.join("shoal-ca");
    let sched_tls = secrets.join("shoal-scheduler-tls");
    let mut c = std::process::Command::new(&shoal);
    c.args(["ca", "init", "--dir"]).arg(&ca);
    run_ok(c, "shoal ca init");
    let mut c = std::process::Command::new(&shoal);
    c.args(["ca", "issue", "--name", "shoal-scheduler", "--dir"])
        .arg(&ca)
        .arg("--out")
        .arg(&sched_tls);
    run_ok(c, "shoal ca issue (scheduler)");

    let mut procs = Vec::new();
    for p in &pods {
        let main = p.main();
        let mounts = p.mounts(&main);
        // Volumes (a volumeClaimTemplate's volume is not in `volumes`: an empty directory).
        let vol = p.dir.join("vol");
        let all_mounts = seq(&p.spec["initContainers"])
            .iter()
            .chain(std::iter::once(&main))
            .flat_map(|c| seq(&c["volumeMounts"]))
            .collect::<Vec<_>>();
        for vm in &all_mounts {
            std::fs::create_dir_all(vol.join(str_of(&vm["name"]))).expect("volume dir");
        }
        for v in seq(&p.spec["volumes"]) {
            let dir = vol.join(str_of(&v["name"]));
            std::fs::create_dir_all(&dir).expect("volume dir");
            if let Some(cm) = v["configMap"]["name"].as_str() {
                let files = config_maps
                    .get(cm)
                    .unwrap_or_else(|| panic!("{}: no ConfigMap {cm}", p.name));
                for (file, text) in files {
                    let mut t: toml::Value = toml::from_str(text).expect("config TOML");
                    rewrite_toml(&mut t, &mounts);
                    // The snapshotter fetches only through its node's peer: no origin list.
                    if file == "snapshotter.toml" {
                        std::fs::write(dir.join(file), toml::to_string(&t).expect("TOML"))
                            .expect("config file");
                        continue;
                    }
                    // The shipped list, plus this test's origin (as an operator edits it).
                    let list = t
                        .get_mut("allowed_origins")
                        .and_then(|v| v.as_array_mut())
                        .unwrap_or_else(|| panic!("{cm}/{file} sets no allowed_origins"));
                    list.push(origin.clone().into());
                    if let Some(tab) = t.as_table_mut().filter(|_| file != "scheduler.toml") {
                        tab.insert(
                            "plain_http_registries".into(),
                            toml::Value::Array(vec![origin.clone().into()]),
                        );
                    }
                    std::fs::write(dir.join(file), toml::to_string(&t).expect("TOML"))
                        .expect("config file");
                }
            } else if let Some(secret) = v["secret"]["secretName"].as_str() {
                let src = match secret {
                    "shoal-ca" => &ca,
                    "shoal-scheduler-tls" => &sched_tls,
                    other => panic!("{}: unknown Secret {other}", p.name),
                };
                let mode = v["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                for e in std::fs::read_dir(src).expect("secret dir") {
                    let e = e.expect("secret file");
                    let to = dir.join(e.file_name());
                    std::fs::copy(e.path(), &to).expect("copy secret");
                    use std::os::unix::fs::PermissionsExt as _;
                    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                        .expect("secret mode");
                }
            }
        }
        // Init containers, in order, to completion.
        for ic in seq(&p.spec["initContainers"]) {
            let (argv, env) = p.command_line(&ic, &shoal);
            let mut c = p.host.command(&argv[0]);
            c.args(&argv[1..]).envs(env.iter().map(|(k, v)| (k, v)));
            let what = format!("{} init container {:?}: {argv:?}", p.name, ic["name"]);
            tokio::task::block_in_place(|| run_ok(c, &what));
        }
        let (argv, env) = p.command_line(&main, &shoal);
        let mut cmd = Cmd::new(&argv[0]).args(&argv[1..]);
        for (k, v) in &env {
            cmd = cmd.env(k, v);
        }
        println!("{}: {}", p.name, cmd.display());
        let mut proc = p
            .host
            .spawn(&p.name, cmd)
            .expect("start the pod's container");
        wait_ready(p, &mut proc, probe_port(&main)).await;
        procs.push(proc);
    }

    // A blob in the registry; `shoal get` through each node peer's API socket, in its namespace.
    let data = shoal_testkit::random_bytes(16 * MIB, 9);
    let digest = registry.push_blob("deploy/app", &data).await.expect("push");
    let blob = format!("docker://{origin}/deploy/app@{digest}");
    for p in &pods[2..] {
        let main = p.container("peer");
        let sock = rewrite_path("/run/shoal/peer.sock", &p.mounts(&main)).expect("socket path");
        let out = p.dir.join("pulled");
        let mut c = p.host.command(&shoal);
        c.args(["get", &blob, "-o"])
            .arg(&out)
            .args(["--api", &sock]);
        let printed =
            tokio::task::block_in_place(|| run_ok(c, &format!("shoal get via {}", p.name)));
        assert!(printed.contains(&digest), "{printed}");
        assert_eq!(
            sha256_file(&out),
            digest,
            "{} delivered other bytes",
            p.name
        );
    }
    assert_eq!(
        registry.blob_bytes_served(&digest).await,
        data.len() as u64,
        "the registry served the blob once"
    );
    assert_eq!(relay.blob_bytes_served(&digest), data.len() as u64);

    for (p, proc) in pods.iter().zip(procs.iter_mut()) {
        let main = p.main();
        let port = probe_port(&main);
        for path in ["/healthz", "/readyz"] {
            let r = http_get(Some(p.host.netns()), p.host.sock(port), path, T)
                .await
                .unwrap_or_else(|e| panic!("{} {path}: {e}", p.name));
            assert_eq!(r.status, 200, "{} {path}:\n{}", p.name, proc.log_tail(20));
        }
        assert!(proc.is_running(), "{}:\n{}", p.name, proc.log_tail(40));
    }
    // Every peer reached the scheduler through the Service name (`scheduler_dns`), and the
    // scheduler knows the seed and both nodes.
    for p in &pods[1..] {
        let r = http_get(
            Some(p.host.netns()),
            p.host.sock(probe_port(&p.main())),
            "/metrics",
            T,
        )
        .await
        .expect("peer metrics");
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(
            metric(&text, "shoal_peer_scheduler_connected"),
            Some(1.0),
            "{}: {text}",
            p.name
        );
    }
    let r = http_get(
        Some(pods[0].host.netns()),
        pods[0].host.sock(probe_port(&pods[0].main())),
        "/metrics",
        T,
    )
    .await
    .expect("scheduler metrics");
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(metric(&text, "shoal_scheduler_hosts"), Some(3.0), "{text}");
    // The containerd-config init container wrote its hosts.toml into the node's certs.d.
    for p in &pods[2..] {
        let certs = p.dir.join("vol/containerd-certs/_default/hosts.toml");
        let text =
            std::fs::read_to_string(&certs).unwrap_or_else(|e| panic!("{}: {e}", certs.display()));
        assert!(text.contains("127.0.0.1:4480"), "{text}");
    }
    println!(
        "deploy cluster: 4 pods from the base manifests, 16 MiB through 2 node peers in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(procs);
    drop(hosts_files);
}

/// The package's directory, as cargo gives it when it runs the test: a build dir shared between
/// checkouts at different paths may hold a binary compiled in another one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
