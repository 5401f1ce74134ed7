//! Registry proxy benchmark (docs/benchmarks.md, "Registry proxy (issue 6)"):
//! 1. a cached blob served through the proxy beside docker-registry serving it from its disk,
//!    same run, same client: throughput of each and their ratio;
//! 2. the latency a pass-through manifest request adds, p50/p99, with 1 and 64 concurrent
//!    clients: proxy minus direct at the same percentile (direct and proxied requests
//!    interleaved so both see the same load), and per proxied request its time minus the
//!    upstream's share the proxy reports (`Server-Timing`), which leaves out the registry's
//!    own queueing that dominates both p99s with 64 clients.
//!
//! Run: `cargo bench -p shoal-peer --bench proxy` (SHOAL_BENCH_BLOB_MIB sets the blob size,
//! default 1024; SHOAL_BENCH_REQUESTS the manifest requests per client count, default 4000).

use std::time::{Duration, Instant};

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

/// The upstream's share (µs) a `Server-Timing: upstream;dur=MS` header reports.
fn upstream_us(r: &reqwest::Response) -> Option<u64> {
    let v = r.headers().get("server-timing")?.to_str().ok()?;
    let ms: f64 = v
        .split("dur=")
        .nth(1)?
        .split([';', ','])
        .next()?
        .parse()
        .ok()?;
    Some((ms * 1000.0) as u64)
}

/// Latencies (µs), sorted, of `total` GETs of `direct` and as many of `via`, spread over
/// `clients` concurrent clients, and per proxied GET its latency minus the upstream's share.
/// Each client alternates the two (which goes first alternates too), so both see the same load
/// on a shared host.
async fn latencies(
    http: &reqwest::Client,
    direct: &str,
    via: &str,
    clients: usize,
    total: usize,
) -> [Vec<u64>; 3] {
    let per = total / clients;
    let jobs = (0..clients).map(|c| {
        let http = http.clone();
        let urls = [direct.to_string(), via.to_string()];
        tokio::spawn(async move {
            let mut out = [Vec::with_capacity(per), Vec::with_capacity(per), Vec::new()];
            for i in 0..per {
                for k in [(i + c) % 2, (i + c + 1) % 2] {
                    let t = Instant::now();
                    let r = http
                        .get(&urls[k])
                        .header("accept", "application/vnd.oci.image.manifest.v1+json")
                        .send()
                        .await
                        .expect("GET manifest");
                    assert!(r.status().is_success());
                    let upstream = upstream_us(&r);
                    let _ = r.bytes().await.expect("manifest body");
                    let us = t.elapsed().as_micros() as u64;
                    out[k].push(us);
                    if k == 1 {
                        let upstream = upstream.expect("the proxy reports Server-Timing");
                        out[2].push(us.saturating_sub(upstream));
                    }
                }
            }
            out
        })
    });
    let mut all: [Vec<u64>; 3] = Default::default();
    for j in futures::future::join_all(jobs).await {
        for (a, v) in all.iter_mut().zip(j.expect("client task")) {
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

    let mut best = (0f64, 0f64);
    for _ in 0..3 {
        let (_, d) = download(&http, &direct).await;
        let (_, p) = download(&http, &via).await;
        best.0 = best.0.max(mib as f64 / d);
        best.1 = best.1.max(mib as f64 / p);
    }
    println!(
        "blob {mib} MiB  docker-registry from disk: {:.0} MiB/s",
        best.0
    );
    println!(
        "blob {mib} MiB  proxy from cache:          {:.0} MiB/s",
        best.1
    );
    println!("throughput ratio proxy/registry: {:.2}", best.1 / best.0);

    let m_direct = format!("{}/v2/{REPO}/manifests/v1", registry.url());
    let m_via = format!("http://{proxy}/v2/{REPO}/manifests/v1");
    let _ = img;
    for clients in [1usize, 64] {
        let _ = latencies(&http, &m_direct, &m_via, clients, clients * 4).await; // warm connections
        let [d, p, own] = latencies(&http, &m_direct, &m_via, clients, requests).await;
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "manifest, {clients:>2} clients: direct p50 {:.3} ms p99 {:.3} ms | proxy p50 {:.3} ms p99 {:.3} ms | added p50 {:.3} ms p99 {:.3} ms | per request, proxy minus upstream: p50 {:.3} ms p99 {:.3} ms",
            ms(pct(&d, 0.5)),
            ms(pct(&d, 0.99)),
            ms(pct(&p, 0.5)),
            ms(pct(&p, 0.99)),
            ms(pct(&p, 0.5).saturating_sub(pct(&d, 0.5))),
            ms(pct(&p, 0.99).saturating_sub(pct(&d, 0.99))),
            ms(pct(&own, 0.5)),
            ms(pct(&own, 0.99)),
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    peer_rt
        .spawn(async move { peer.shutdown().await })
        .await
        .expect("peer shutdown");
    peer_rt.shutdown_background();
}
