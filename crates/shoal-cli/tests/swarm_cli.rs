//! The swarm from the one `shoal` binary, as an operator runs it: real processes on loopback
//! (`shoal scheduler`, `shoal peer --seed`, two `shoal peer`), certificates from `shoal ca`, a
//! real docker-registry as origin. `shoal get` through peer 1 then peer 2 moves the blob out of
//! the registry once; `/metrics` shows peer 2 fed by peers; `shoal preheat` puts an image on the
//! seed before anyone asks; `shoal status` reports the node.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use shoal_testkit::{or_skip, Registry, RegistryOpts};

const MIB: usize = 1 << 20;
const SCHEDULER: &str = "shoal-scheduler";

/// A `shoal` process; killed (and reaped) on drop. Its stderr goes to a file shown on failure.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, self.log_tail());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node's addresses and files.
struct Node {
    name: String,
    quic: SocketAddr,
    metrics: SocketAddr,
    socket: PathBuf,
    data: PathBuf,
    tls: PathBuf,
}

struct Swarm {
    dir: tempfile::TempDir,
    registry: Registry,
    /// What every peer and seed allows: the registry (on loopback, so listed like any other).
    allowed: String,
    scheduler: SocketAddr,
    sched_metrics: SocketAddr,
    procs: Vec<Proc>,
}

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .expect("the shoal binary runs")
}

fn shoal_ok(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|u| u.local_addr())
        .expect("a free UDP port")
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
}

/// A plain HTTP/1.1 GET; returns (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of metric line `name` (with labels, exactly as printed), if present.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
}

fn sha256_file(path: &Path) -> String {
    let mut h = Sha256::new();
    h.update(std::fs::read(path).expect("reading the fetched file"));
    format!("sha256:{}", hex::encode(h.finalize()))
}

impl Swarm {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Issues a certificate for `name` (loopback IP) with `shoal ca issue`.
    fn issue(&self, name: &str) -> PathBuf {
        let out = self.path(&format!("tls/{name}"));
        shoal_ok(&[
            "ca",
            "issue",
            "--name",
            name,
            "--dir",
            s(&self.path("ca")),
            "--out",
            s(&out),
            "--ip",
            "127.0.0.1",
        ]);
        out
    }

    fn spawn(&mut self, name: &str, args: &[&str]) {
        let log = self.path(&format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["--log", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("starting shoal");
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log,
        });
    }

    /// Waits until `GET addr/readyz` answers 200 (and the process still runs).
    fn wait_ready(&mut self, addr: SocketAddr) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(addr, "/readyz") {
                return;
            }
            for p in &mut self.procs {
                p.assert_running();
            }
            let last = self.procs.last().map(|p| p.log_tail()).unwrap_or_default();
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{addr}/readyz not 200 within 30 s:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn node(&self, name: &str) -> Node {
        Node {
            name: name.to_string(),
            quic: free_udp(),
            metrics: free_tcp(),
            socket: self.path(&format!("{name}/peer.sock")),
            data: self.path(&format!("{name}/data")),
            tls: self.issue(name),
        }
    }

    fn start_peer(&mut self, n: &Node, seed: bool) {
        let quic = n.quic.to_string();
        let metrics = n.metrics.to_string();
        let sched = self.scheduler.to_string();
        let mut args = vec![
            "peer",
            "--data-dir",
            s(&n.data),
            "--tls-dir",
            s(&n.tls),
            "--listen",
            &quic,
            "--scheduler",
            &sched,
            "--scheduler-name",
            SCHEDULER,
            "--api-socket",
            s(&n.socket),
            "--metrics-listen",
            &metrics,
            "--cache-bytes",
            "1073741824",
            "--dht=false",
            "--allowed-origins",
            &self.allowed,
        ];
        if seed {
            args.push("--seed");
        }
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&n.name, &refs);
        self.wait_ready(n.metrics);
    }

    fn blob_ref(&self, repo: &str, digest: &str) -> String {
        format!("docker://{}/{repo}@{digest}", self.registry.host())
    }
}

async fn start() -> Option<(Swarm, Node, Node, Node)> {
    start_allowing(&[]).await
}

/// The swarm, its scheduler also allowing `scheduler_also` (the peers and seed do not).
async fn start_allowing(scheduler_also: &[String]) -> Option<(Swarm, Node, Node, Node)> {
    shoal_tls::install_crypto_provider();
    let registry = or_skip(Registry::start(RegistryOpts::default()).await)?;
    let dir = tempfile::tempdir().expect("temp dir");
    let allowed = registry.host();
    let mut sched_allowed = vec![allowed.clone()];
    sched_allowed.extend_from_slice(scheduler_also);
    let sched_allowed = sched_allowed.join(",");
    let mut swarm = Swarm {
        dir,
        registry,
        allowed,
        scheduler: free_udp(),
        sched_metrics: free_tcp(),
        procs: Vec::new(),
    };
    shoal_ok(&["ca", "init", "--dir", s(&swarm.path("ca"))]);
    let sched_tls = swarm.issue(SCHEDULER);
    let sched_metrics = swarm.sched_metrics;
    let (listen, metrics) = (swarm.scheduler.to_string(), sched_metrics.to_string());
    swarm.spawn(
        "scheduler",
        &[
            "scheduler",
            "--host-id",
            SCHEDULER,
            "--listen",
            &listen,
            "--tls-dir",
            s(&sched_tls),
            "--metrics-listen",
            &metrics,
            "--allowed-origins",
            &sched_allowed,
        ],
    );
    swarm.wait_ready(sched_metrics);
    let seed = swarm.node("seed-1");
    swarm.start_peer(&seed, true);
    let p1 = swarm.node("peer-1");
    swarm.start_peer(&p1, false);
    let p2 = swarm.node("peer-2");
    swarm.start_peer(&p2, false);
    Some((swarm, seed, p1, p2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_through_two_peers_moves_the_blob_out_of_the_registry_once_and_preheat_warms_the_seed()
{
    let Some((swarm, seed, p1, p2)) = start().await else {
        return;
    };
    let data = shoal_testkit::random_bytes(32 * MIB, 7);
    let digest = swarm
        .registry
        .push_blob("cli/app", &data)
        .await
        .expect("push");
    let blob = swarm.blob_ref("cli/app", &digest);

    // `shoal get` through peer 1, then peer 2.
    for (node, out) in [(&p1, "out-1"), (&p2, "out-2")] {
        let out = swarm.path(out);
        let printed = tokio::task::block_in_place(|| {
            shoal_ok(&["get", &blob, "-o", s(&out), "--api", s(&node.socket)])
        });
        assert!(printed.contains(&digest), "{printed}");
        assert!(
            printed.contains(&format!("{} bytes", 32 * MIB)),
            "{printed}"
        );
        assert_eq!(
            sha256_file(&out),
            digest,
            "{} delivered other bytes",
            node.name
        );
    }
    let served = swarm.registry.blob_bytes_served(&digest).await;
    assert_eq!(
        served,
        (32 * MIB) as u64,
        "the registry served the blob once"
    );

    // What peer 2 says about itself.
    let (status, text) = http_get(p2.metrics, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let from_peers = metric(&text, "shoal_peer_download_bytes_total{source=\"peer\"}")
        .unwrap_or_else(|| panic!("no peer bytes metric in:\n{text}"));
    assert!(
        from_peers >= (32 * MIB) as f64,
        "peer 2 got {from_peers} bytes from peers"
    );
    assert_eq!(
        metric(&text, "shoal_peer_download_bytes_total{source=\"origin\"}"),
        Some(0.0),
        "peer 2 never went to the origin"
    );
    // The same, per blob.
    let per_task = metric(
        &text,
        &format!("shoal_peer_task_bytes_total{{blob=\"{digest}\",source=\"peer\"}}"),
    );
    assert!(per_task >= Some((32 * MIB) as f64), "{text}");
    assert!(
        text.contains("shoal_peer_piece_fetch_seconds_count"),
        "{text}"
    );
    assert_eq!(metric(&text, "shoal_peer_scheduler_connected"), Some(1.0));
    assert_eq!(http_get(p2.metrics, "/healthz").expect("healthz").0, 200);
    // The scheduler's own metrics: three hosts, and the seed ordered to the origin.
    let (status, text) = http_get(swarm.sched_metrics, "/metrics").expect("scheduler metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "shoal_scheduler_hosts"), Some(3.0), "{text}");
    let by_seed = metric(&text, "shoal_scheduler_back_to_source_total{by=\"seed\"}");
    assert!(by_seed >= Some(1.0), "{text}");
    let status = tokio::task::block_in_place(|| shoal_ok(&["status", "--api", s(&p2.socket)]));
    assert!(status.contains("peer-2 (peer)"), "{status}");
    assert!(status.contains("1 of 1 connected"), "{status}");
    assert!(
        status.contains(&digest) && status.contains("complete"),
        "{status}"
    );

    // Preheat: the seed fetches an image's blobs before any peer asks.
    let image = swarm
        .registry
        .push_random_image("cli/preheated", "v1", 6 * MIB, 11)
        .await
        .expect("push image");
    let admin = swarm.issue("operator");
    let reference = format!("docker://{}/cli/preheated:v1", swarm.registry.host());
    let sched = swarm.scheduler.to_string();
    let said = tokio::task::block_in_place(|| {
        shoal_ok(&[
            "preheat",
            &reference,
            "--scheduler",
            &sched,
            "--scheduler-name",
            SCHEDULER,
            "--tls-dir",
            s(&admin),
        ])
    });
    assert!(said.contains("fetching on seed seed-1"), "{said}");
    let start = Instant::now();
    loop {
        let layer = swarm.registry.blob_bytes_served(&image.layer_digest).await;
        let config = swarm.registry.blob_bytes_served(&image.config_digest).await;
        if layer == (6 * MIB) as u64 && config > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the registry served {layer} bytes of the layer after preheat"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seed_status =
        tokio::task::block_in_place(|| shoal_ok(&["status", "--api", s(&seed.socket), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&seed_status).expect("status JSON");
    let start = Instant::now();
    let mut v = v;
    while v["cache"]["complete_blobs"].as_u64() < Some(3) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "seed status: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let out = tokio::task::block_in_place(|| {
            shoal_ok(&["status", "--api", s(&seed.socket), "--json"])
        });
        v = serde_json::from_str(&out).expect("status JSON");
    }
    let p1_tasks = tokio::task::block_in_place(|| shoal_ok(&["status", "--api", s(&p1.socket)]));
    assert!(
        !p1_tasks.contains(&image.layer_digest),
        "no peer asked for the layer: {p1_tasks}"
    );
    // A peer asking now gets the layer from the swarm: the registry still served it once.
    let out = swarm.path("layer");
    let layer_ref = swarm.blob_ref("cli/preheated", &image.layer_digest);
    tokio::task::block_in_place(|| {
        shoal_ok(&["get", &layer_ref, "-o", s(&out), "--api", s(&p2.socket)])
    });
    assert_eq!(sha256_file(&out), image.layer_digest);
    assert_eq!(
        swarm.registry.blob_bytes_served(&image.layer_digest).await,
        (6 * MIB) as u64
    );
    drop(swarm);
}

/// A host with a valid cluster certificate speaking the scheduler protocol itself, the way any
/// certificate holder can: one connection, one stream per request.
struct Rogue {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    codec: shoal_proto::Codec,
}

impl Rogue {
    async fn connect(scheduler: SocketAddr, tls: &Path, me: &str) -> Rogue {
        let identity = shoal_tls::NodeIdentity::load(shoal_tls::IdentityPaths::in_dir(tls))
            .expect("rogue identity");
        let config = shoal_tls::quic_client_config(&identity, &[shoal_proto::ALPN_SCHEDULER])
            .expect("client config");
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
        let conn = endpoint
            .connect_with(config, scheduler, SCHEDULER)
            .expect("connect")
            .await
            .expect("TLS with the scheduler");
        let (mut send, mut recv) = conn.open_bi().await.expect("hello stream");
        let hello = shoal_proto::Hello::new(
            shoal_proto::Role::Peer,
            shoal_proto::HostId::new(me).unwrap(),
        );
        let negotiated = shoal_proto::client_handshake(&mut recv, &mut send, &hello)
            .await
            .expect("Hello");
        let _ = send.finish();
        let rogue = Rogue {
            _endpoint: endpoint,
            conn,
            codec: negotiated.codec,
        };
        let reply = rogue
            .ask(shoal_proto::SchedulerRequest::RegisterHost(
                shoal_proto::RegisterHost {
                    host_id: shoal_proto::HostId::new(me).unwrap(),
                    addresses: vec!["127.0.0.1:9".parse().unwrap()],
                    locality: shoal_proto::Locality::default(),
                    upload_slots: 4,
                    upload_bytes_per_sec: 0,
                    is_seed: false,
                },
            ))
            .await;
        assert!(
            matches!(reply, shoal_proto::SchedulerReply::Registered(_)),
            "{reply:?}"
        );
        rogue
    }

    async fn ask(&self, req: shoal_proto::SchedulerRequest) -> shoal_proto::SchedulerReply {
        let (mut send, mut recv) = self.conn.open_bi().await.expect("request stream");
        self.codec.write(&mut send, &req).await.expect("request");
        let _ = send.finish();
        self.codec.read(&mut recv).await.expect("reply")
    }

    async fn register_task(
        &self,
        meta: shoal_proto::TaskMeta,
        reference: &str,
    ) -> shoal_proto::SchedulerReply {
        self.ask(shoal_proto::SchedulerRequest::RegisterTask(
            shoal_proto::RegisterTask {
                task: meta,
                piece_table: None,
                held: None,
                origin: Some(shoal_proto::OriginRef {
                    reference: reference.into(),
                    authorization: None,
                }),
            },
        ))
        .await
    }

    async fn request_parents(&self, meta: shoal_proto::TaskMeta) -> shoal_proto::SchedulerReply {
        self.ask(shoal_proto::SchedulerRequest::RequestParents(
            shoal_proto::RequestParents {
                blob: meta.blob,
                wanted: shoal_proto::PieceSet::full(meta.piece_count()),
                exclude: vec![],
            },
        ))
        .await
    }
}

fn refusal(reply: &shoal_proto::SchedulerReply) -> Option<&str> {
    match reply {
        shoal_proto::SchedulerReply::Error(e) if e.code == shoal_proto::ErrorCode::Refused => {
            Some(&e.message)
        }
        _ => None,
    }
}

/// A certificate holder registers a task whose origin the scheduler allows but the seed does
/// not: the seed refuses the order without connecting anywhere (its log shows the refusal and
/// no fetch; the target registry's log shows nothing), the task then fails for its asker with
/// the seed's reason and is not ordered elsewhere, and the swarm goes on serving other blobs.
/// An origin outside even the scheduler's list is refused at once, and `shoal get` naming one
/// outside the peer's list fails with the peer's 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_for_an_origin_the_seed_does_not_allow_fails_without_any_connection() {
    let Some(target) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    let foreign = target
        .push_blob("foreign/app", &shoal_testkit::random_bytes(2 * MIB, 13))
        .await
        .expect("push");
    let Some((swarm, seed, p1, _p2)) = start_allowing(&[target.host()]).await else {
        return;
    };
    let seen_before = target.access_log().await.len();
    let rogue = Rogue::connect(swarm.scheduler, &swarm.issue("rogue"), "rogue").await;
    let meta = shoal_proto::TaskMeta {
        blob: shoal_proto::Digest::parse(&foreign).unwrap(),
        size: (2 * MIB) as u64,
        piece_size: MIB as u32,
    };
    let reference = format!("docker://{}/foreign/app", target.host());
    let reply = rogue.register_task(meta, &reference).await;
    assert!(
        matches!(reply, shoal_proto::SchedulerReply::Task(_)),
        "the scheduler allows it: {reply:?}"
    );
    // The first ask orders the seed; once the seed has refused, every ask is refused.
    let start = Instant::now();
    let why = loop {
        let reply = rogue.request_parents(meta).await;
        if let Some(why) = refusal(&reply) {
            break why.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still not refused: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for part in [
        format!("seed seed-1 refused to fetch it from {reference}"),
        format!(
            "registry {} is not an allowed origin of this seed",
            target.host()
        ),
        format!(
            "add \"{}\" to allowed_origins in the `shoal peer` config",
            target.host()
        ),
    ] {
        assert!(why.contains(&part), "{part:?} missing in {why}");
    }
    let again = rogue.request_parents(meta).await;
    assert!(refusal(&again).is_some(), "{again:?}");
    // An origin outside the scheduler's own list never becomes a task.
    let metadata = "docker://169.254.169.254/latest/app";
    let reply = rogue.register_task(meta, metadata).await;
    let why = refusal(&reply).unwrap_or_else(|| panic!("{reply:?}"));
    assert!(
        why.contains("registry 169.254.169.254 is not an allowed origin of the scheduler"),
        "{why}"
    );

    // `shoal get` of the foreign blob through a peer, whose own list lacks the registry.
    let out = swarm.path("foreign");
    let blob = format!("{reference}@{foreign}");
    let got = tokio::task::block_in_place(|| {
        shoal(&["get", &blob, "-o", s(&out), "--api", s(&p1.socket)])
    });
    assert!(!got.status.success());
    let err = String::from_utf8_lossy(&got.stderr);
    assert!(err.contains("the peer answered 403"), "{err}");
    assert!(
        err.contains(&format!("add \"{}\" to allowed_origins", target.host())),
        "{err}"
    );
    assert!(!out.exists());

    // Nobody connected to the target, and the seed never started a fetch.
    assert_eq!(
        target.access_log().await.len(),
        seen_before,
        "the target saw requests: {}",
        target.log_tail(10)
    );
    let seed_log = std::fs::read_to_string(swarm.path("seed-1.log")).unwrap_or_default();
    assert!(
        seed_log.contains("push from the scheduler refused"),
        "{seed_log}"
    );
    assert!(!seed_log.contains("fetching from origin"), "{seed_log}");
    let (_, text) = http_get(seed.metrics, "/metrics").expect("seed metrics");
    assert_eq!(
        metric(
            &text,
            "shoal_peer_origin_refusals_total{reason=\"not_allowed\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shoal_peer_download_bytes_total{source=\"origin\"}"),
        Some(0.0)
    );
    let (_, text) = http_get(swarm.sched_metrics, "/metrics").expect("scheduler metrics");
    for reason in ["seed_refused", "not_allowed"] {
        let name = format!("shoal_scheduler_origin_refusals_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&text, &name), Some(1.0), "{text}");
    }

    // Other tasks are unaffected: a blob of the allowed registry through the swarm.
    let data = shoal_testkit::random_bytes(3 * MIB, 17);
    let digest = swarm
        .registry
        .push_blob("cli/other", &data)
        .await
        .expect("push");
    let out = swarm.path("other");
    let blob = swarm.blob_ref("cli/other", &digest);
    tokio::task::block_in_place(|| {
        shoal_ok(&["get", &blob, "-o", s(&out), "--api", s(&p1.socket)])
    });
    assert_eq!(sha256_file(&out), digest);
    drop(swarm);
}

#[test]
fn get_without_a_running_peer_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("none.sock");
    let out = shoal(&[
        "get",
        &format!("docker://127.0.0.1:1/a@sha256:{}", "ab".repeat(32)),
        "-o",
        s(&dir.path().join("x")),
        "--api",
        s(&sock),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is `shoal peer` running"), "{err}");
    assert!(!dir.path().join("x").exists());
}
