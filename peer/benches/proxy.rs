//! Registry proxy benchmark (docs/benchmarks.md, "Registry proxy (issue 6)"):
//! 1. a cached blob served through the proxy beside docker-registry serving it from its disk,
//!    same run, same client, in rounds that alternate which goes first: the best throughput of
//!    each, their ratio, and the median of the rounds' own ratios;
//! 2. the latency a pass-through manifest request adds, p50/p99, with 1 and 64 concurrent
//!    clients: proxy minus direct at the same percentile, beside a minimal HTTP relay minus
//!    direct as the least any proxy adds (direct, proxied and relayed requests taken in turn
//!    so all see the same load), and per proxied request its time minus the
//!    upstream's share the proxy reports (`Server-Timing`), which leaves out the registry's
//!    own queueing that dominates both p99s with 64 clients; that share split into the
//!    proxy's handler and the hop around it. The clients are lean (a thread and a keep-alive
//!    connection each, plain HTTP/1.1), so their own scheduling stays out of the figures as
//!    far as two cores allow; and each client asks the kernel when an answer reached its
//!    socket (`SO_TIMESTAMPING`, software receive stamps), so the time until then is also
//!    given without the client's own wake-up, which direct requests pay the same. Before
//!    the latency runs, a probe of how much the machine takes from busy cores (on a VM, the
//!    host).
//!
//! Run: `cargo bench -p shoal-peer --bench proxy` (SHOAL_BENCH_BLOB_MIB sets the blob size,
//! default 1024; SHOAL_BENCH_ROUNDS the downloads of it from each, default 10;
//! SHOAL_BENCH_REQUESTS the manifest requests per client count, default 4000).

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use shoal_peer::{Peer, PeerConfig};
use shoal_testkit::{Registry, RegistryOpts};
use shoal_tls::{ClusterCa, NodeCertRequest};

const REPO: &str = "bench/app";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Downloads `url` whole; returns bytes and seconds.
async fn download(http: &reqwest::Client, url: &str) -> (u64, f64) {
    let start = Instant::now();
    let resp = http.get(url).send().await.expect("GET");
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let mut n = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(c) = body.next().await {
        n += c.expect("body").len() as u64;
    }
    (n, start.elapsed().as_secs_f64())
}

/// One keep-alive HTTP/1.1 connection that GETs one path again and again, as lean as a load
/// generator: the request written whole, the answer read by its Content-Length, on a thread
/// of its own, so an answer wakes the thread waiting for it and no queue of other clients'
/// tasks sits inside the measured time.
struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

/// One answer: latency (µs), the time (µs) until its last bytes reached the client's socket,
/// and the `Server-Timing` durations (µs) the proxy reported.
struct Timed {
    us: u64,
    at_socket_us: u64,
    upstream: Option<u64>,
    handler: Option<u64>,
}

/// `SO_TIMESTAMPING` (and `SCM_TIMESTAMPING`) of asm-generic and x86: libc leaves it out for
/// these targets.
const SO_TIMESTAMPING: libc::c_int = 37;

/// Asks the kernel to stamp every received packet of `stream` (software stamps, wall clock).
fn stamp_receives(stream: &TcpStream) {
    let flags = libc::SOF_TIMESTAMPING_RX_SOFTWARE | libc::SOF_TIMESTAMPING_SOFTWARE;
    // SAFETY: a valid socket and a c_uint option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_TIMESTAMPING,
            (&flags as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_TIMESTAMPING: {}",
        std::io::Error::last_os_error()
    );
}

/// Reads what is there into `buf`; returns the byte count and when the last of those bytes
/// reached the socket (ns since the epoch), if the kernel said.
fn recv_stamped(stream: &TcpStream, buf: &mut [u8]) -> (usize, Option<u128>) {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 32];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` describes live buffers of the lengths given.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) };
    assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
    let mut stamp = None;
    // SAFETY: the kernel filled `control` with well-formed cmsgs up to msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SO_TIMESTAMPING {
                let ts: [libc::timespec; 3] = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(ts[0].tv_sec as u128 * 1_000_000_000 + ts[0].tv_nsec as u128);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    (n as usize, stamp)
}

/// Wall-clock time in ns since the epoch: the clock of the kernel's receive stamps.
fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Conn {
    fn open(addr: &str, path: &str) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stamp_receives(&stream);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n\r\n"
        );
        Conn {
            stream,
            request: request.into_bytes(),
            buf: Vec::with_capacity(16 << 10),
        }
    }

    fn get(&mut self) -> Timed {
        let (t, sent) = (Instant::now(), now_ns());
        self.stream.write_all(&self.request).expect("send request");
        self.buf.clear();
        let mut chunk = [0u8; 16 << 10];
        let mut arrived = None;
        let (head, body, upstream, handler) = loop {
            let (n, at) = recv_stamped(&self.stream, &mut chunk);
            arrived = at.or(arrived);
            assert!(n > 0, "connection closed mid-answer");
            self.buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = resp.parse(&self.buf).expect("HTTP answer") {
                assert_eq!(resp.code, Some(200), "manifest GET");
                let mut len = None;
                let (mut upstream, mut handler) = (None, None);
                for h in resp.headers.iter() {
                    let v = std::str::from_utf8(h.value).unwrap_or("");
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = v.parse::<usize>().ok();
                    } else if h.name.eq_ignore_ascii_case("server-timing") {
                        upstream = upstream.or(timing_us(v, "upstream"));
                        handler = handler.or(timing_us(v, "proxy"));
                    }
                }
                break (head, len.expect("Content-Length"), upstream, handler);
            }
        };
        while self.buf.len() < head + body {
            let (n, at) = recv_stamped(&self.stream, &mut chunk);
            arrived = at.or(arrived);
            assert!(n > 0, "connection closed mid-body");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let us = t.elapsed().as_micros() as u64;
        let at_socket_us = arrived.map_or(us, |a| (a.saturating_sub(sent) / 1000) as u64);
        Timed {
            us,
            at_socket_us,
            upstream,
            handler,
        }
    }
}

/// The duration (µs) of metric `name` in a `Server-Timing` list (`NAME;dur=MS, ...`).
fn timing_us(list: &str, name: &str) -> Option<u64> {
    list.split(',').map(str::trim).find_map(|m| {
        let ms: f64 = m.strip_prefix(name)?.strip_prefix(";dur=")?.parse().ok()?;
        Some((ms * 1000.0) as u64)
    })
}

/// Latencies (µs), each list sorted, of `total` GETs of `path` at each of `direct`, `via`
/// (the proxy) and `relay`, spread over `clients` concurrent clients: direct, proxied, per
/// proxied GET its latency minus the upstream's share, the proxy's handler minus the
/// upstream's share, and the latency minus the handler (the hop: sockets, the proxy's HTTP
/// layer, waits for a core), the time until the answer reached the client's socket minus the
/// upstream's share; then relayed, and per relayed GET its latency and the time until its
/// socket, each minus the relay's upstream share. Each client takes the three in turn (which
/// goes first rotates too), so all see the same load.
fn latencies(targets: [&str; 3], path: &str, clients: usize, total: usize) -> [Vec<u64>; 9] {
    let per = total / clients;
    let jobs: Vec<_> = (0..clients)
        .map(|c| {
            let (targets, path) = (targets.map(str::to_string), path.to_string());
            std::thread::spawn(move || {
                let mut conns = targets.map(|t| Conn::open(&t, &path));
                let mut out: [Vec<u64>; 9] = Default::default();
                for i in 0..per {
                    for k in (0..3).map(|j| (i + c + j) % 3) {
                        let r = conns[k].get();
                        out[if k == 2 { 6 } else { k }].push(r.us);
                        if k == 2 {
                            let up = r.upstream.expect("the relay reports Server-Timing");
                            out[7].push(r.us.saturating_sub(up));
                            out[8].push(r.at_socket_us.saturating_sub(up));
                        }
                        if k == 1 {
                            let up = r.upstream.expect("the proxy reports Server-Timing");
                            let handler = r.handler.expect("the proxy reports its handler time");
                            out[2].push(r.us.saturating_sub(up));
                            out[3].push(handler.saturating_sub(up));
                            out[4].push(r.us.saturating_sub(handler));
                            out[5].push(r.at_socket_us.saturating_sub(up));
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut all: [Vec<u64>; 9] = Default::default();
    for j in jobs {
        for (a, v) in all.iter_mut().zip(j.join().expect("client thread")) {
            a.extend(v);
        }
    }
    for a in &mut all {
        a.sort_unstable();
    }
    all
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

/// A minimal HTTP relay to `upstream` on a runtime of its own, as the peer has: each request
/// on a connection goes upstream as it came and its answer comes back with
/// `Server-Timing: upstream;dur=MS` added, measured as the proxy measures it. This is the
/// least any HTTP proxy does (one more hop, two more sockets and their wake-ups, no parsing
/// beyond the answer's length), measured beside the proxy in the same run as its baseline.
fn start_relay(rt: &tokio::runtime::Runtime, upstream: String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("relay listener");
    let addr = listener.local_addr().expect("relay address").to_string();
    listener.set_nonblocking(true).expect("relay listener");
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("relay listener");
        while let Ok((down, _)) = listener.accept().await {
            tokio::spawn(relay_conn(down, upstream.clone()));
        }
    });
    addr
}

/// One relayed connection (see [`start_relay`]); the bench's requests are GETs without a body.
async fn relay_conn(mut down: tokio::net::TcpStream, upstream: String) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut up = tokio::net::TcpStream::connect(&upstream).await?;
    down.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let (mut req, mut resp, mut buf) = (Vec::new(), Vec::new(), vec![0u8; 64 << 10]);
    loop {
        req.clear();
        while !req.ends_with(b"\r\n\r\n") {
            let n = down.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            req.extend_from_slice(&buf[..n]);
        }
        let asked = Instant::now();
        up.write_all(&req).await?;
        resp.clear();
        let (head, len) = loop {
            let n = up.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            resp.extend_from_slice(&buf[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(head)) = r.parse(&resp) {
                let len = r
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                    .unwrap_or(0usize);
                break (head, len);
            }
        };
        while resp.len() < head + len {
            let n = up.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            resp.extend_from_slice(&buf[..n]);
        }
        let ms = asked.elapsed().as_secs_f64() * 1000.0;
        let timing = format!("Server-Timing: upstream;dur={ms:.3}\r\n");
        // Before the blank line that ends the head.
        resp.splice(head - 2..head - 2, timing.bytes());
        down.write_all(&resp).await?;
    }
}

/// What the machine itself takes from busy cores, measured before the latency runs while
/// nothing of ours is running: `cores` threads, one pinned to each of the first `cores` cores,
/// read the clock in a loop for `secs`. A gap between two readings is time the thread did not
/// run; on an otherwise idle guest that is the host running something else on the vCPU.
/// Returns the gaps over 1 ms, the longest gap, and the share of the time lost in gaps over
/// 0.2 ms.
fn host_stalls(cores: usize, secs: f64) -> (usize, Duration, f64) {
    let spin = move |cpu: usize| {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the call only reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let (mut over_1ms, mut longest, mut lost) = (0, Duration::ZERO, Duration::ZERO);
        let mut last = Instant::now();
        while last < end {
            let now = Instant::now();
            let gap = now - last;
            if gap > Duration::from_micros(200) {
                lost += gap;
                over_1ms += usize::from(gap > Duration::from_millis(1));
                longest = longest.max(gap);
            }
            last = now;
        }
        (over_1ms, longest, lost)
    };
    let threads: Vec<_> = (0..cores)
        .map(|cpu| std::thread::spawn(move || spin(cpu)))
        .collect();
    let (mut over_1ms, mut longest, mut lost) = (0, Duration::ZERO, Duration::ZERO);
    for t in threads {
        let (o, l, s) = t.join().expect("probe thread");
        over_1ms += o;
        longest = longest.max(l);
        lost += s;
    }
    (
        over_1ms,
        longest,
        lost.as_secs_f64() / (secs * cores as f64),
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    shoal_tls::install_crypto_provider();
    let mib = env_num("SHOAL_BENCH_BLOB_MIB", 1024);
    let requests = env_num("SHOAL_BENCH_REQUESTS", 4000) as usize;
    let registry = match Registry::start(RegistryOpts::default()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIP: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = ClusterCa::init(&dir.path().join("ca"), "bench CA", 1).expect("CA");
    let tls = dir.path().join("tls");
    ca.issue(&NodeCertRequest::new("bench", 1))
        .and_then(|c| c.write_to(&tls))
        .expect("node certificate");
    let mut cfg = PeerConfig {
        host_id: "bench".into(),
        data_dir: dir.path().join("data"),
        tls_dir: tls,
        listen: "127.0.0.1:0".parse().expect("addr"),
        api_socket: dir.path().join("peer.sock"),
        cache_bytes: Some((mib + 256) << 20),
        dht: false,
        allowed_origins: vec![registry.host()],
        ..PeerConfig::default()
    };
    cfg.proxy.enabled = true;
    cfg.proxy.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.proxy.default_upstream = Some(registry.host());
    cfg.proxy.server_timing = true;
    // The peer gets its own runtime (worker threads), as `shoal peer` runs in its own process
    // beside containerd: the proxy and this client must not take turns on the same workers.
    let peer_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("peer")
        .enable_all()
        .build()
        .expect("peer runtime");
    let peer = peer_rt
        .spawn(Peer::start(cfg))
        .await
        .expect("peer task")
        .expect("peer");
    let proxy = peer.proxy_addr().expect("proxy");

    let data = shoal_testkit::random_bytes((mib << 20) as usize, 1);
    let digest = registry.push_blob(REPO, &data).await.expect("push blob");
    drop(data);
    let img = registry
        .push_random_image(REPO, "v1", 4096, 2)
        .await
        .expect("push image");

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()
        .expect("client");
    let direct = format!("{}/v2/{REPO}/blobs/{digest}", registry.url());
    let via = format!("http://{proxy}/v2/{REPO}/blobs/{digest}");
    // Warm: the first fetch through the proxy caches the blob (teed from the registry).
    let (n, secs) = download(&http, &via).await;
    assert_eq!(n, mib << 20);
    println!(
        "first fetch through proxy (teed from origin): {:.0} MiB/s",
        mib as f64 / secs
    );
    let _ = download(&http, &direct).await; // registry's file into the page cache too

    // Rounds alternate which side goes first; each round's ratio compares two downloads made
    // back to back, so their median is the comparison least moved by the host's stalls.
    let (mut best, mut ratios) = ((0f64, 0f64), Vec::new());
    for round in 0..env_num("SHOAL_BENCH_ROUNDS", 10).max(1) {
        let (d, p) = if round % 2 == 0 {
            let d = download(&http, &direct).await.1;
            (d, download(&http, &via).await.1)
        } else {
            let p = download(&http, &via).await.1;
            (download(&http, &direct).await.1, p)
        };
        best.0 = best.0.max(mib as f64 / d);
        best.1 = best.1.max(mib as f64 / p);
        ratios.push(d / p);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "blob {mib} MiB  docker-registry from disk: {:.0} MiB/s",
        best.0
    );
    println!(
        "blob {mib} MiB  proxy from cache:          {:.0} MiB/s",
        best.1
    );
    println!(
        "throughput ratio proxy/registry: best {:.2} | per round: median {:.2}, lowest {:.2}, highest {:.2} ({} rounds)",
        best.1 / best.0,
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        ratios.len()
    );

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ((one, one_max, _), (all, all_max, all_lost)) =
        tokio::task::spawn_blocking(move || (host_stalls(1, 2.0), host_stalls(cores, 2.0)))
            .await
            .expect("host probe");
    println!(
        "host: 1 core busy: {one} stalls over 1 ms in 2 s, longest {:.2} ms | all {cores} cores busy: {all} stalls over 1 ms, longest {:.2} ms, {:.1} % of the time lost",
        one_max.as_secs_f64() * 1000.0,
        all_max.as_secs_f64() * 1000.0,
        all_lost * 100.0
    );

    let path = format!("/v2/{REPO}/manifests/v1");
    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("relay")
        .enable_all()
        .build()
        .expect("relay runtime");
    let relay = start_relay(&relay_rt, registry.host());
    let targets = [registry.host(), proxy.to_string(), relay];
    let _ = img;
    for clients in [1usize, 64] {
        let (t, p) = (targets.clone(), path.clone());
        let [d, p, own, handler, hop, at_socket, relayed, relay_own, relay_at_socket] =
            tokio::task::spawn_blocking(move || {
                let t = [t[0].as_str(), &t[1], &t[2]];
                let _ = latencies(t, &p, clients, clients * 4); // warm connections
                latencies(t, &p, clients, requests)
            })
            .await
            .expect("latency run");
        let ms = |us: u64| us as f64 / 1000.0;
        let p50_p99 = |v: &[u64]| {
            format!(
                "p50 {:.3} ms p99 {:.3} ms",
                ms(pct(v, 0.5)),
                ms(pct(v, 0.99))
            )
        };
        // Signed: below zero, the percentile through the proxy (or relay) was the faster one.
        let added = |v: &[u64]| {
            let diff = |q| (pct(v, q) as f64 - pct(&d, q) as f64) / 1000.0;
            format!("added p50 {:+.3} ms p99 {:+.3} ms", diff(0.5), diff(0.99))
        };
        println!(
            "manifest, {clients:>2} clients: direct {} | proxy {} | {} | per request, proxy minus upstream: {}",
            p50_p99(&d),
            p50_p99(&p),
            added(&p),
            p50_p99(&own),
        );
        println!(
            "    through a minimal HTTP relay instead (the least any proxy adds): {} | {} | per request, relay minus upstream: {} | until the client's socket: {}",
            p50_p99(&relayed),
            added(&relayed),
            p50_p99(&relay_own),
            p50_p99(&relay_at_socket),
        );
        println!(
            "    of which: in the proxy's handler {} | the hop {}",
            p50_p99(&handler),
            p50_p99(&hop),
        );
        println!(
            "    until the answer reached the client's socket (without the client's own wake-up), minus upstream: {}",
            p50_p99(&at_socket),
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    peer_rt
        .spawn(async move { peer.shutdown().await })
        .await
        .expect("peer shutdown");
    peer_rt.shutdown_background();
    relay_rt.shutdown_background();
}
