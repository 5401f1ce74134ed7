//! The registry proxy with real clients: curl (ranges, auth), skopeo, and containerd's `ctr`
//! pulling and running an image through the proxies of two nodes, all against docker-registry.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{cluster, sha256, REPO};
use shoal_peer::{Peer, PeerConfig};
use shoal_testkit::{need_binaries, or_skip, Registry, RegistryAuth, RegistryOpts};

/// `cfg` with the proxy on; a default upstream is allowed too.
fn with_proxy(mut cfg: PeerConfig, default_upstream: Option<String>) -> PeerConfig {
    cfg.allowed_origins.extend(default_upstream.clone());
    cfg.proxy.enabled = true;
    cfg.proxy.listen = "127.0.0.1:0".parse().unwrap();
    cfg.proxy.default_upstream = default_upstream;
    cfg
}

/// What curl got: status, headers (lower-case names), body.
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn curl(url: &str, extra: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let (h, b) = (dir.path().join("h"), dir.path().join("b"));
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "60", "-D"])
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&h).unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Got {
        status,
        headers,
        body: std::fs::read(&b).unwrap_or_default(),
    }
}

fn blob_gets(log: &[shoal_testkit::AccessEntry], digest: &str) -> usize {
    log.iter()
        .filter(|e| e.method == "GET" && e.path.contains(&format!("/blobs/{digest}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_ranges_manifests_and_first_fetch_streaming() {
    if need_binaries(&["curl"]).is_err() {
        return;
    }
    let Some(c) = cluster(false).await else {
        return;
    };
    let img = c
        .registry
        .push_random_image(REPO, "v1", 3 << 20, 7)
        .await
        .unwrap();
    let peer = c.start(with_proxy(c.config("p1", false), None)).await;
    let proxy = peer.proxy_addr().unwrap();
    let ns = c.registry.host();
    let url = |path: &str| format!("http://{proxy}/v2/{path}?ns={ns}");

    // Pass-through: /v2/, manifest by tag (not cached), tags list; 400 without an upstream.
    assert_eq!(curl(&url(""), &[]).status, 200);
    let m = curl(
        &url(&format!("{REPO}/manifests/v1")),
        &["-H", "Accept: application/vnd.oci.image.manifest.v1+json"],
    );
    assert_eq!(m.status, 200);
    assert_eq!(m.body, img.manifest);
    assert_eq!(
        m.header("docker-content-digest"),
        Some(img.manifest_digest.as_str())
    );
    assert_eq!(m.header("server-timing"), None, "off unless asked for");
    let mut timed = with_proxy(c.config("p0", false), None);
    timed.proxy.server_timing = true;
    let timed = c.start(timed).await;
    let t = curl(
        &format!(
            "http://{}/v2/{REPO}/manifests/v1?ns={ns}",
            timed.proxy_addr().unwrap()
        ),
        &["-H", "Accept: application/vnd.oci.image.manifest.v1+json"],
    );
    assert_eq!(t.body, img.manifest, "the answer itself is unchanged");
    // One list, however many header fields carry it (RFC 9110 section 5.3).
    let timing = t
        .headers
        .iter()
        .filter(|(n, _)| n == "server-timing")
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let dur = |name: &str| {
        timing.split(',').map(str::trim).find_map(|m| {
            m.strip_prefix(name)?
                .strip_prefix(";dur=")?
                .parse::<f64>()
                .ok()
        })
    };
    assert!(
        matches!((dur("upstream"), dur("proxy")), (Some(up), Some(all)) if up >= 0.0 && all >= up),
        "{timing}"
    );
    let tags = curl(&url(&format!("{REPO}/tags/list")), &[]);
    assert!(String::from_utf8_lossy(&tags.body).contains("v1"));
    assert_eq!(curl(&format!("http://{proxy}/v2/"), &[]).status, 400);
    assert_eq!(curl(&url("nope/manifests/x"), &[]).status, 404);

    // First fetch of a plain blob, asked with a range: streamed from the origin while imported.
    let layer = &img.layer;
    let size = layer.len() as u64;
    let d = &img.layer_digest;
    let blob = url(&format!("{REPO}/blobs/{d}"));
    let g = curl(&blob, &["-r", "1000-1999"]);
    assert_eq!(g.status, 206);
    assert_eq!(g.body, &layer[1000..2000]);
    assert_eq!(
        g.header("content-range"),
        Some(format!("bytes 1000-1999/{size}").as_str())
    );

    // Whole blob, now from the verified cache.
    let g = curl(&blob, &[]);
    assert_eq!(g.status, 200);
    assert_eq!(sha256(&g.body), *d);
    assert_eq!(g.header("content-length"), Some(size.to_string().as_str()));
    assert_eq!(g.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(g.header("etag"), Some(format!("\"{d}\"").as_str()));
    let h = curl(&blob, &["-I"]);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some(size.to_string().as_str()));
    // (curl -I writes the head where the body would go: no body bytes to check.)

    // Ranges: first byte, middle, last byte, open-ended, several (whole), unsatisfiable.
    let mid = size / 2;
    let cases = [
        ("0-0".to_string(), 0, 1),
        (format!("{mid}-{}", mid + 99), mid, mid + 100),
        ("-1".to_string(), size - 1, size),
        (format!("{}-", size - 4096), size - 4096, size),
    ];
    for (r, s, e) in cases {
        let g = curl(&blob, &["-r", &r]);
        assert_eq!(g.status, 206, "range {r}");
        assert_eq!(g.body, &layer[s as usize..e as usize], "range {r}");
        assert_eq!(
            g.header("content-range"),
            Some(format!("bytes {s}-{}/{size}", e - 1).as_str())
        );
        assert_eq!(
            g.header("content-length"),
            Some((e - s).to_string().as_str())
        );
    }
    // h2c (prior knowledge) on the same port.
    let g = curl(&blob, &["--http2-prior-knowledge", "-r", "10-19"]);
    assert_eq!((g.status, g.body.as_slice()), (206, &layer[10..20]));
    let g = curl(&blob, &["-r", "0-1,5-6"]);
    assert_eq!(g.status, 200);
    assert_eq!(g.body.len() as u64, size);
    let g = curl(&blob, &["-r", &format!("{size}-")]);
    assert_eq!(g.status, 416);
    assert_eq!(
        g.header("content-range"),
        Some(format!("bytes */{size}").as_str())
    );
    assert!(g.body.is_empty());

    // The origin sent the layer once (the teed first fetch); every other answer was the cache.
    let log = c.registry.access_log().await;
    assert_eq!(blob_gets(&log, d), 1, "{log:?}");
    peer.shutdown().await;
}

/// A cached blob of many pieces is read ahead from the store in runs (api/cached.rs): whole and
/// ranged answers are exact across run boundaries, and a piece changed on disk behind the
/// store's back is never served: the rest of the answer comes through the swarm task instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_reads_run_ahead_and_never_serve_a_bad_piece() {
    if need_binaries(&["curl"]).is_err() {
        return;
    }
    let Some(c) = cluster(false).await else {
        return;
    };
    // 1 MiB pieces (the test cluster's), 10 of them, the last one short.
    let size = (9 << 20) + 12_345;
    let img = c
        .registry
        .push_random_image(REPO, "v1", size, 11)
        .await
        .unwrap();
    let cfg = with_proxy(c.config("p1", false), None);
    let data_dir = cfg.data_dir.clone();
    let peer = c.start(cfg).await;
    let proxy = peer.proxy_addr().unwrap();
    let d = &img.layer_digest;
    let blob = format!(
        "http://{proxy}/v2/{REPO}/blobs/{d}?ns={}",
        c.registry.host()
    );
    let layer = &img.layer;
    let first = curl(&blob, &[]); // teed from the origin into the store
    assert_eq!(sha256(&first.body), *d);
    for _ in 0..2 {
        let g = curl(&blob, &[]);
        assert_eq!(g.status, 200);
        assert_eq!(sha256(&g.body), *d, "whole blob from the cache");
    }
    for (s, e) in [
        ((4 << 20) - 10, (8 << 20) + 10),
        (1, size - 1),
        (size - 12_346, size),
    ] {
        let g = curl(&blob, &["-r", &format!("{s}-{}", e - 1)]);
        assert_eq!(g.status, 206);
        assert_eq!(g.body, &layer[s..e], "range {s}-{e}");
    }
    let hits = peer.store().stats().hits;
    assert!(
        hits >= 20,
        "answers came from the store ({hits} piece reads)"
    );

    // Flip one byte of piece 6 in the store's data file.
    let hex = d.trim_start_matches("sha256:");
    let file = data_dir
        .join("store")
        .join("blobs")
        .join(&hex[..2])
        .join(format!("{hex}.data"));
    let at = (6 << 20) + 777;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&[layer[at] ^ 0x01], at as u64).unwrap();
    }
    let g = curl(&blob, &[]);
    assert_eq!(g.status, 200);
    assert_eq!(
        sha256(&g.body),
        *d,
        "the bad piece was refetched, never served"
    );
    assert_eq!(peer.store().stats().corruptions, 1);
    let g = curl(&blob, &["-r", &format!("{}-{}", at - 5, at + 5)]);
    assert_eq!(g.body, &layer[at - 5..at + 6]);
    peer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_blobs_need_the_clients_credentials() {
    if need_binaries(&["curl"]).is_err() {
        return;
    }
    common::init_logs();
    let auth = RegistryAuth::Basic {
        user: "alice".into(),
        password: "s3cret".into(),
    };
    let Some(registry) = or_skip(Registry::start(RegistryOpts { auth }).await) else {
        return;
    };
    let Some(c) = cluster(false).await else {
        return;
    };
    let img = registry
        .push_random_image(REPO, "v1", 1 << 20, 9)
        .await
        .unwrap();
    let peer = c
        .start(with_proxy(c.config("p1", false), Some(registry.host())))
        .await;
    let proxy = peer.proxy_addr().unwrap();
    let d = &img.layer_digest;
    let blob = format!("http://{proxy}/v2/{REPO}/blobs/{d}");

    // Without credentials: the registry's challenge, no data (before and after caching).
    let g = curl(&blob, &[]);
    assert_eq!(g.status, 401);
    assert!(g.header("www-authenticate").unwrap().starts_with("Basic"));
    assert!(!g
        .body
        .windows(64)
        .any(|w| img.layer.windows(64).next() == Some(w)));
    let g = curl(&blob, &["-u", "alice:s3cret"]);
    assert_eq!(g.status, 200);
    assert_eq!(sha256(&g.body), *d);
    assert!(peer.store().stats().complete_blobs >= 1);
    for extra in [
        &[][..],
        &["-I"][..],
        &["-u", "alice:wrong"][..],
        &["-r", "0-9"][..],
    ] {
        let g = curl(&blob, extra);
        assert_eq!(g.status, 401, "{extra:?}");
        assert!(
            g.body.len() < 200 && !g.body.starts_with(&img.layer[..16]),
            "{extra:?}"
        );
    }
    // A manifest without credentials: the challenge passes back unchanged.
    let m = curl(&format!("http://{proxy}/v2/{REPO}/manifests/v1"), &[]);
    assert_eq!(m.status, 401);
    assert!(m.header("www-authenticate").is_some());
    // With them, again from the cache.
    let g = curl(&blob, &["-u", "alice:s3cret", "-r", "100-199"]);
    assert_eq!((g.status, g.body.as_slice()), (206, &img.layer[100..200]));
    assert_eq!(blob_gets(&registry.access_log().await, d), 1);
    peer.shutdown().await;
}

/// One kept-alive HTTP/1.1 client connection, used for every request (a pooling client may
/// open a second one while the first is on its way back to its pool).
struct OneConnection {
    stream: std::io::BufReader<std::net::TcpStream>,
}

impl OneConnection {
    fn open(addr: std::net::SocketAddr) -> OneConnection {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        OneConnection {
            stream: std::io::BufReader::new(stream),
        }
    }

    /// Sends a bodiless request and reads its answer by its Content-Length.
    fn send(&mut self, method: &str, path: &str, accept: &str) -> Got {
        use std::io::{BufRead, Read, Write};
        let req = format!("{method} {path} HTTP/1.1\r\nHost: proxy\r\nAccept: {accept}\r\n\r\n");
        self.stream.get_mut().write_all(req.as_bytes()).unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            assert!(
                self.stream.read_until(b'\n', &mut head).unwrap() > 0,
                "closed"
            );
        }
        let mut parsed = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut parsed);
        resp.parse(&head).unwrap();
        let status = resp.code.unwrap();
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let mut answer = Got {
            status,
            headers,
            body: Vec::new(),
        };
        if method != "HEAD" {
            let len: usize = answer.header("content-length").unwrap().parse().unwrap();
            answer.body.resize(len, 0);
            self.stream.read_exact(&mut answer.body).unwrap();
        }
        answer
    }
}

/// Pass-through on one kept-alive client connection, which the proxy serves on an upstream
/// connection pinned to it: small answers, a HEAD, an answer too large to read whole (streamed,
/// after which the next request pins a new connection), and an upstream gone (a clean 502, no
/// hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pass_through_on_a_kept_alive_connection() {
    common::init_logs();
    let Some(registry) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    let Some(c) = cluster(false).await else {
        return;
    };
    let img = registry
        .push_random_image(REPO, "v1", 4096, 3)
        .await
        .unwrap();
    // An OCI manifest over the proxy's read-whole bound (256 KiB), by a large annotation.
    let v1: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    let mut big = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": v1["config"],
        "layers": v1["layers"],
        "annotations": { "filler": "x".repeat(400 << 10) },
    });
    big["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    big["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar".into();
    let big = serde_json::to_vec(&big).unwrap();
    let big_digest = registry
        .push_manifest(
            REPO,
            "big",
            "application/vnd.oci.image.manifest.v1+json",
            &big,
        )
        .await
        .unwrap();
    let peer = c
        .start(with_proxy(c.config("p1", false), Some(registry.host())))
        .await;
    let proxy = peer.proxy_addr().unwrap();
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let mut conn = OneConnection::open(proxy);
    let manifest = |conn: &mut OneConnection, method: &str, name: &str| {
        conn.send(method, &format!("/v2/{REPO}/manifests/{name}"), accept)
    };

    for round in 0..2 {
        let r = manifest(&mut conn, "GET", "v1");
        assert_eq!(r.status, 200, "round {round}");
        assert_eq!(
            r.header("docker-content-digest"),
            Some(img.manifest_digest.as_str())
        );
        assert_eq!(r.body, img.manifest);

        let r = manifest(&mut conn, "HEAD", "v1");
        assert_eq!(r.status, 200);
        let len = img.manifest.len().to_string();
        assert_eq!(r.header("content-length"), Some(len.as_str()));

        let r = manifest(&mut conn, "GET", "big");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("docker-content-digest"), Some(big_digest.as_str()));
        assert_eq!(r.body, big, "the streamed answer, whole");

        let r = conn.send("GET", &format!("/v2/{REPO}/tags/list"), "*/*");
        assert_eq!(r.status, 200);
        let tags: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let mut tags: Vec<&str> = tags["tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t.as_str())
            .collect();
        tags.sort_unstable();
        assert_eq!(tags, ["big", "v1"]);

        let r = manifest(&mut conn, "GET", "nope");
        assert_eq!(r.status, 404, "the upstream's answer, unchanged");
        assert!(String::from_utf8_lossy(&r.body).contains("MANIFEST_UNKNOWN"));
    }

    // One pinned connection at the start and one after each streamed answer, not one per
    // request.
    let opened = peer.proxy_stats().unwrap().pinned_connections.get();
    assert_eq!(opened, 3, "upstream connections pinned for 10 requests");

    drop(registry);
    let started = std::time::Instant::now();
    // The first finds its pinned connection closed and tries the pool; the second cannot
    // connect at all.
    for _ in 0..2 {
        let r = manifest(&mut conn, "GET", "v1");
        assert_eq!(r.status, 502, "upstream gone");
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    peer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_copies_through_the_proxy() {
    if need_binaries(&["skopeo"]).is_err() {
        return;
    }
    let Some(c) = cluster(false).await else {
        return;
    };
    let img = c
        .registry
        .push_random_image(REPO, "v1", 2 << 20, 11)
        .await
        .unwrap();
    let peer = c
        .start(with_proxy(c.config("p1", false), Some(c.registry.host())))
        .await;
    let proxy = peer.proxy_addr().unwrap();
    let out_dir = c.dir.path().join("skopeo-out");
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            "--override-os",
            "linux",
            "--override-arch",
            "amd64",
        ])
        .arg(format!("docker://{proxy}/{REPO}:v1"))
        .arg(format!("dir:{}", out_dir.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layer_file = out_dir.join(img.layer_digest.trim_start_matches("sha256:"));
    assert_eq!(common::file_sha256(&layer_file), img.layer_digest);
    let status = peer
        .downloader()
        .status(&shoal_proto::Digest::parse(&img.layer_digest).unwrap())
        .expect("the layer went through the proxy's swarm task");
    assert!(status.complete);
    peer.shutdown().await;
}

/// A containerd with its own root, state and socket, stopped on drop.
struct Containerd {
    child: std::process::Child,
    dir: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        let cfg = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n[metrics]\n  address = \"\"\n"
        );
        std::fs::write(dir.join("config.toml"), cfg).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            child,
            dir: dir.to_path_buf(),
        };
        let start = std::time::Instant::now();
        while c.ctr(&["version"]).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "containerd did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("c.sock"))
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "ctr {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A hosts directory sending `registry` to the proxy at `proxy`.
    fn hosts_dir(&self, registry: &str, proxy: std::net::SocketAddr) -> PathBuf {
        let hosts = self.dir.join("certs.d");
        std::fs::create_dir_all(hosts.join(registry)).unwrap();
        std::fs::write(
            hosts.join(registry).join("hosts.toml"),
            format!(
                "server = \"http://{registry}\"\n\n[host.\"http://{proxy}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        hosts
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", "shoal-run"]);
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshots may leave mounts; unmount anything left under our root.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("root"))
            .status();
    }
}

/// An uncompressed tar layer holding a static busybox as /bin/busybox and /bin/sh.
fn busybox_layer(busybox: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let data = std::fs::read(busybox).unwrap();
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "bin/", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, "bin/busybox", data.as_slice())
        .unwrap();
    let mut l = tar::Header::new_gnu();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_size(0);
    l.set_mode(0o777);
    b.append_link(&mut l, "bin/sh", "busybox").unwrap();
    b.into_inner().unwrap()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_pulls_and_runs_through_two_nodes() {
    let needs =
        shoal_testkit::Needs::root(&["containerd", "ctr", "runc"]).and_paths(&["/bin/busybox"]);
    if shoal_testkit::require(needs).is_err() {
        return;
    }
    let busybox = Path::new("/bin/busybox");
    let Some(c) = cluster(true).await else { return };
    let img = c
        .registry
        .push_image_for(
            "shoal/busybox",
            "1",
            busybox_layer(busybox),
            "linux",
            "amd64",
        )
        .await
        .unwrap();
    let reg = c.registry.host();
    let image = format!("{reg}/shoal/busybox:1");
    let nodes: Vec<(Peer, Containerd)> = {
        let mut v = Vec::new();
        for name in ["n1", "n2"] {
            let peer = c.start(with_proxy(c.config(name, false), None)).await;
            let dir = c.dir.path().join("ctrd").join(name);
            let ctrd = blocking(move || Containerd::start(&dir)).await;
            v.push((peer, ctrd));
        }
        v
    };

    let pull = |i: usize| {
        let (peer, ctrd) = &nodes[i];
        let hosts = ctrd.hosts_dir(&reg, peer.proxy_addr().unwrap());
        let hosts = hosts.display().to_string();
        ctrd.ctr(&[
            "image",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            &hosts,
            &image,
        ])
    };
    pull(0).unwrap();
    let out = nodes[0]
        .1
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "native",
            &image,
            "shoal-run",
            "/bin/busybox",
            "echo",
            "hello-from-shoal",
        ])
        .unwrap();
    assert!(out.contains("hello-from-shoal"), "{out}");
    let layer = shoal_proto::Digest::parse(&img.layer_digest).unwrap();
    let s1 = nodes[0]
        .0
        .downloader()
        .status(&layer)
        .expect("layer came through n1's proxy");
    assert!(s1.complete);

    pull(1).unwrap();
    let s2 = nodes[1]
        .0
        .downloader()
        .status(&layer)
        .expect("layer came through n2's proxy");
    assert!(s2.complete);
    assert!(
        s2.bytes_from_peers > 0 && s2.bytes_from_origin == 0,
        "{s2:?}"
    );
    let log = c.registry.access_log().await;
    for d in [&img.layer_digest, &img.config_digest] {
        assert_eq!(
            blob_gets(&log, d),
            1,
            "one GET of {d} at the registry: {log:?}"
        );
    }
    let out = nodes[1]
        .1
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "native",
            &image,
            "shoal-run",
            "/bin/sh",
            "-c",
            "echo second-node",
        ])
        .unwrap();
    assert!(out.contains("second-node"), "{out}");
    assert_eq!(sha256(&img.layer), img.layer_digest);
    drop(nodes);
}

/// An uncompressed tar layer with one small file holding `data`.
fn small_layer(data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, "etc/shoal-test.txt", data).unwrap();
    b.into_inner().unwrap()
}

/// Two registries, only one in the node's allowed_origins: containerd pulls from the allowed
/// one through the proxy; any request naming the other (`ns=`, the Shoal-Upstream header,
/// through containerd) is answered 403, naming that registry and the setting, before anything
/// is contacted: the other registry's log shows no request at all. With the registry itself as
/// its fallback, containerd then pulls it without Shoal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_allowed_registry_is_reached_through_the_proxy() {
    if need_binaries(&["containerd", "ctr", "curl"]).is_err() {
        return;
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI runs as root"
        );
        eprintln!("SKIP: containerd needs root");
        return;
    }
    let Some(c) = cluster(true).await else { return };
    let Some(other) = or_skip(Registry::start(RegistryOpts::default()).await) else {
        return;
    };
    let (reg, other_host) = (c.registry.host(), other.host());
    let allowed = c
        .registry
        .push_image_for(
            "shoal/allowed",
            "1",
            small_layer(b"allowed\n"),
            "linux",
            "amd64",
        )
        .await
        .unwrap();
    let foreign = other
        .push_image_for(
            "shoal/foreign",
            "1",
            small_layer(b"foreign\n"),
            "linux",
            "amd64",
        )
        .await
        .unwrap();
    let seen_before = other.access_log().await.len();
    let peer = c.start(with_proxy(c.config("n1", false), None)).await;
    let proxy = peer.proxy_addr().unwrap();
    let dir = c.dir.path().join("ctrd").join("n1");
    let ctrd = blocking(move || Containerd::start(&dir)).await;
    let pull = |image: String, hosts: PathBuf| {
        let hosts = hosts.display().to_string();
        ctrd.ctr(&[
            "image",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            &hosts,
            &image,
        ])
    };

    // The allowed registry: through the proxy and the swarm.
    let hosts = ctrd.hosts_dir(&reg, proxy);
    pull(format!("{reg}/shoal/allowed:1"), hosts.clone()).unwrap();
    let layer = shoal_proto::Digest::parse(&allowed.layer_digest).unwrap();
    assert!(peer.downloader().status(&layer).unwrap().complete);

    // The other registry, with the proxy as containerd's only host: refused.
    std::fs::create_dir_all(hosts.join(&other_host)).unwrap();
    std::fs::write(
        hosts.join(&other_host).join("hosts.toml"),
        format!(
            "server = \"http://{proxy}\"\n\n[host.\"http://{proxy}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    let err = pull(format!("{other_host}/shoal/foreign:1"), hosts.clone()).unwrap_err();
    assert!(err.contains("403"), "{err}");
    let paths = [
        format!("/v2/shoal/foreign/manifests/1?ns={other_host}"),
        format!(
            "/v2/shoal/foreign/blobs/{}?ns={other_host}",
            foreign.layer_digest
        ),
    ];
    for path in &paths {
        let g = curl(&format!("http://{proxy}{path}"), &[]);
        assert_eq!(g.status, 403, "{path}");
        let body = String::from_utf8_lossy(&g.body);
        for part in [
            "DENIED",
            &format!("registry {other_host} is not an allowed origin of this peer"),
            &format!("add \\\"{other_host}\\\" to allowed_origins"),
            "--allowed-origins",
        ] {
            assert!(body.contains(part), "{part:?} missing in {body}");
        }
    }
    let g = curl(
        &format!(
            "http://{proxy}/v2/shoal/foreign/blobs/{}",
            foreign.layer_digest
        ),
        &["-H", &format!("Shoal-Upstream: {other_host}")],
    );
    assert_eq!(g.status, 403);
    assert_eq!(
        other.access_log().await.len(),
        seen_before,
        "the refused registry saw a request: {}",
        other.log_tail(10)
    );
    let foreign_layer = shoal_proto::Digest::parse(&foreign.layer_digest).unwrap();
    assert!(peer.downloader().status(&foreign_layer).is_none());
    let refused = peer.allowed_origins().refusals()[0].1;
    assert!(refused >= 4, "{refused} refusals counted");
    let stats = peer.proxy_stats().unwrap();
    let refused_answers = stats
        .requests
        .get_or_create(&shoal_peer::proxy::RequestLabels {
            route: "refused",
            status: "4xx",
        })
        .get();
    assert!(refused_answers >= 4, "{refused_answers}");

    // With the registry itself as the fallback, containerd pulls it on its own.
    std::fs::write(
        hosts.join(&other_host).join("hosts.toml"),
        format!(
            "server = \"http://{other_host}\"\n\n[host.\"http://{proxy}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    pull(format!("{other_host}/shoal/foreign:1"), hosts).unwrap();
    assert!(other.access_log().await.len() > seen_before);
    assert!(peer.downloader().status(&foreign_layer).is_none());
    drop(ctrd);
}

/// A registry whose blob GETs redirect to a loopback address (here the relay's own storage
/// listener, which would serve them) or to 169.254.169.254: the swarm's origin fetch and the
/// proxy's fallback to the upstream both refuse to follow, so the redirect target sees nothing;
/// listed by host and port, the same redirect is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_redirects_to_loopback_or_link_local_are_not_followed() {
    let Some(c) = cluster(false).await else {
        return;
    };
    let (blob, data) = c.push_blob(3 << 20, 71).await;
    let relay = shoal_testkit::Relay::start(&c.registry.url())
        .await
        .unwrap();
    relay
        .faults()
        .redirect_blobs
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let storage = format!("127.0.0.1:{}", relay.storage_port());
    let fetch = |peer: &Peer| {
        let url = format!(
            "http://{}/v2/{REPO}/blobs/{blob}?ns={}",
            peer.proxy_addr().unwrap(),
            relay.host()
        );
        async move {
            let resp = reqwest::get(&url).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status()));
            }
            resp.bytes()
                .await
                .map(|b| b.to_vec())
                .map_err(|e| format!("body: {e}"))
        }
    };
    for (name, base) in [
        ("n1", format!("http://{storage}")),
        ("n2", "http://169.254.169.254".to_string()),
    ] {
        *relay.faults().redirect_base.lock().unwrap() = Some(base);
        let mut cfg = with_proxy(c.config(name, false), None);
        cfg.dht = false;
        cfg.allowed_origins.push(relay.host());
        let peer = c.start(cfg).await;
        let got = fetch(&peer).await;
        assert!(
            got.is_err(),
            "{name}: the blob came through a refused redirect"
        );
        let r = peer.allowed_origins().refusals();
        assert!(
            r[1].1 + r[2].1 >= 2,
            "{name}: the swarm and the fallback refused: {r:?}"
        );
        let failure = || peer.downloader().status(&blob).and_then(|s| s.error);
        common::wait_until(Duration::from_secs(10), || failure().is_some()).await;
        let why = failure().unwrap_or_default();
        let kind = if name == "n1" {
            "a loopback address"
        } else {
            "a link-local address"
        };
        assert!(
            why.contains(kind) && why.contains("allowed_origins"),
            "{name}: {why}"
        );
        peer.shutdown().await;
    }
    assert_eq!(relay.stats().storage_requests, 0, "a redirect was followed");

    // Listed, the redirect to the storage listener is followed.
    *relay.faults().redirect_base.lock().unwrap() = Some(format!("http://{storage}"));
    let mut cfg = with_proxy(c.config("n3", false), None);
    cfg.dht = false;
    cfg.allowed_origins.extend([relay.host(), storage]);
    let peer = c.start(cfg).await;
    assert!(fetch(&peer).await.unwrap() == data);
    assert!(relay.stats().storage_requests >= 1);
}
