//! Registry blob pull throughput: the origin client beside `curl`, same registry, same blob, same run.
//!
//! `cargo bench -p shoal-origin --bench registry_pull` (blob size: `SHOAL_BENCH_MIB`, default 512;
//! runs per tool: `SHOAL_BENCH_RUNS`, default 3). Prints the figures docs/benchmarks.md quotes.

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_origin::{parse_digest, Reference, RegistryClient, RegistryOptions};
use shoal_testkit::{random_bytes, Registry, RegistryOpts};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mib = env_num("SHOAL_BENCH_MIB", 512);
    let runs = env_num("SHOAL_BENCH_RUNS", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let reg = match Registry::start(RegistryOpts::default()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("registry_pull: {e}");
                return;
            }
        };
        let data = random_bytes(mib << 20, 42);
        let digest = reg.push_blob("bench/blob", &data).await.expect("push blob");
        let size = data.len() as u64;
        drop(data);
        let url = format!("{}/v2/bench/blob/blobs/{digest}", reg.url());

        let mut curl_times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let out = Command::new("curl")
                .args(["-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}", &url])
                .output()
                .expect("run curl");
            let el = t.elapsed();
            let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
            assert_eq!(got, size, "curl downloaded {got} of {size} bytes");
            curl_times.push(el);
        }

        let client = RegistryClient::new(RegistryOptions { use_docker_config: false, ..Default::default() })
            .expect("client");
        let r = Reference::parse(&format!("docker://{}/bench/blob", reg.host())).expect("reference");
        let d = parse_digest(&digest).expect("digest");
        let mut origin_times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let mut s = client.fetch_blob(&r, &d).await.expect("fetch");
            let mut got = 0u64;
            while let Some(chunk) = s.next().await {
                got += chunk.expect("chunk").len() as u64;
            }
            let el = t.elapsed();
            assert_eq!(got, size, "origin client read {got} of {size} bytes");
            origin_times.push(el);
        }

        let rate = |d: Duration| mib as f64 / d.as_secs_f64();
        let (c, o) = (median(curl_times.clone()), median(origin_times.clone()));
        println!("registry blob pull, {mib} MiB blob, {runs} runs each, loopback docker-registry (filesystem storage)");
        println!("{:<16} {:>10} {:>12}   runs (s)", "client", "median s", "MiB/s");
        let fmt = |v: &[Duration]| v.iter().map(|d| format!("{:.3}", d.as_secs_f64())).collect::<Vec<_>>().join(" ");
        println!("{:<16} {:>10.3} {:>12.1}   {}", "curl", c.as_secs_f64(), rate(c), fmt(&curl_times));
        println!("{:<16} {:>10.3} {:>12.1}   {}", "shoal-origin", o.as_secs_f64(), rate(o), fmt(&origin_times));
        println!("ratio shoal-origin/curl throughput: {:.2}", rate(o) / rate(c));
    });
}
