//! The swarm on loopback with real parts: docker-registry as origin, the scheduler's QUIC
//! service, seeds and peers speaking mutual-TLS QUIC with certificates from a real cluster CA.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use shoal_api::Client as ApiClient;
use shoal_peer::PeerConfig;

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_seed_six_peers_share_a_64_mib_blob_fetched_from_origin_once() {
    let Some(c) = cluster(true).await else { return };
    let (blob, data) = c.push_blob(64 * MIB, 1).await;
    let want = sha256(&data);
    // The seed's uplink is capped (as a real one is), so the peers must share among themselves.
    let mut seed = c.config("seed-1", true);
    seed.upload_bytes_per_sec = 96 * MIB as u64;
    let seed = c.start(seed).await;
    let mut peers = Vec::new();
    for i in 0..6 {
        peers.push(c.start(c.config(&format!("peer-{i}"), false)).await);
    }
    // Every peer asks at once; half of them through the local API, half in-process.
    let mut jobs = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let origin = c.origin();
        let out = c.dir.path().join(format!("out-{i}"));
        let sock = c
            .dir
            .path()
            .join("nodes")
            .join(format!("peer-{i}"))
            .join("peer.sock");
        jobs.push(async move {
            if i % 2 == 0 {
                let client = ApiClient::new(sock);
                let n = client
                    .blob(&blob)
                    .source(origin.reference.clone())
                    .to_file(&out)
                    .await
                    .unwrap();
                assert_eq!(n, 64 * MIB as u64);
                file_sha256(&out)
            } else {
                sha256(&fetch(p, blob, origin).await)
            }
        });
    }
    let got = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(jobs))
        .await
        .expect("all six downloads finish");
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, &want, "peer-{i} got other bytes");
    }
    let served = c.registry.blob_bytes_served(&blob.to_string()).await;
    assert_eq!(
        served,
        64 * MIB as u64,
        "the registry served the blob exactly once"
    );
    let from_peers: u64 = peers
        .iter()
        .map(|p| {
            p.downloader()
                .stats()
                .bytes_from_peers
                .load(Ordering::Relaxed)
        })
        .sum();
    let from_origin: u64 = peers
        .iter()
        .map(|p| {
            p.downloader()
                .stats()
                .bytes_from_origin
                .load(Ordering::Relaxed)
        })
        .sum();
    assert_eq!(from_origin, 0, "peers never went to the origin");
    assert_eq!(from_peers, 6 * 64 * MIB as u64);
    let peer_uploads: u64 = peers
        .iter()
        .map(|p| p.upload_stats().bytes.load(Ordering::Relaxed))
        .sum();
    let seed_uploads = seed.upload_stats().bytes.load(Ordering::Relaxed);
    eprintln!(
        "seed uploaded {} MiB, peers uploaded {} MiB to each other",
        seed_uploads >> 20,
        peer_uploads >> 20
    );
    // Every piece moved once per peer, plus at most the endgame's duplicates: the last few
    // pieces of each download are also asked of a second parent, and the loser may have sent
    // its copy before it was cancelled.
    let once = 6 * 64 * MIB as u64;
    let endgame = 6 * 4 * MIB as u64;
    let uploaded = seed_uploads + peer_uploads;
    assert!(
        (once..=once + endgame).contains(&uploaded),
        "every piece moved once per peer (plus endgame duplicates): {uploaded} bytes"
    );
    assert!(peer_uploads > 0, "peers served each other");
    let status = ApiClient::new(c.dir.path().join("nodes/peer-0/peer.sock"))
        .cache()
        .await
        .unwrap();
    assert_eq!(status.complete_blobs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parent_killed_mid_transfer_does_not_stop_the_download() {
    let Some(c) = cluster(true).await else { return };
    let (blob, data) = c.push_blob(32 * MIB, 2).await;
    // Slow parents, so the transfer is still running when one of them dies.
    let mut slow = c.config("seed-1", true);
    slow.upload_bytes_per_sec = 12 * MIB as u64;
    let seed = c.start(slow).await;
    let mut slow = c.config("peer-a", false);
    slow.upload_bytes_per_sec = 12 * MIB as u64;
    let a = c.start(slow).await;
    assert_eq!(sha256(&fetch(&a, blob, c.origin()).await), sha256(&data));

    let b = c.start(c.config("peer-b", false)).await;
    let download = {
        let origin = c.origin();
        let b = &b;
        async move { fetch(b, blob, origin).await }
    };
    let kill = async {
        wait_until(Duration::from_secs(20), || {
            a.upload_stats().pieces.load(Ordering::Relaxed) > 2
        })
        .await;
        a.kill();
    };
    let (got, ()) = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(download, kill),
    )
    .await
    .expect("the download finishes");
    assert_eq!(sha256(&got), sha256(&data));
    assert_eq!(
        c.registry.blob_bytes_served(&blob.to_string()).await,
        32 * MIB as u64,
        "only the seed's first fetch"
    );
    assert!(seed.upload_stats().pieces.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parent_serving_flipped_bytes_is_detected_and_blocked() {
    let Some(c) = cluster(true).await else { return };
    let (blob, data) = c.push_blob(16 * MIB, 3).await;
    let _seed = c.start(c.config("seed-1", true)).await;
    let bad = c.start(c.config("peer-bad", false)).await;
    bad.corrupt_uploads(true);
    assert_eq!(
        sha256(&fetch(&bad, blob, c.origin()).await),
        sha256(&data),
        "its own copy is good"
    );

    let victim = c.start(c.config("peer-b", false)).await;
    assert_eq!(
        sha256(&fetch(&victim, blob, c.origin()).await),
        sha256(&data)
    );
    let stats = victim.downloader().stats();
    let served_bad = bad.upload_stats().pieces.load(Ordering::Relaxed);
    // The scheduler ranks non-seeds first and the driver prefers them on ties: the bad peer is asked.
    assert!(served_bad > 0, "the bad parent was asked for pieces");
    assert!(
        stats.corrupt_pieces.load(Ordering::Relaxed) >= 1,
        "flipped bytes were detected"
    );
    assert_eq!(
        stats.parents_dropped.load(Ordering::Relaxed),
        1,
        "the bad parent was dropped once"
    );
    let per_parent = c.config("x", false).per_parent_concurrency as u64;
    assert!(
        served_bad <= per_parent,
        "dropped after its first bad piece ({served_bad} were in flight)"
    );

    // Reported as corrupt, it is blocked for the whole task: the next peer never gets its bytes.
    let before = bad.upload_stats().pieces.load(Ordering::Relaxed);
    let next = c.start(c.config("peer-c", false)).await;
    assert_eq!(sha256(&fetch(&next, blob, c.origin()).await), sha256(&data));
    assert_eq!(
        bad.upload_stats().pieces.load(Ordering::Relaxed),
        before,
        "blocked parent got no requests"
    );
    assert_eq!(
        next.downloader()
            .stats()
            .corrupt_pieces
            .load(Ordering::Relaxed),
        0
    );
    assert_eq!(
        c.registry.blob_bytes_served(&blob.to_string()).await,
        16 * MIB as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_scheduler_killed_peers_fall_back_to_the_origin() {
    let Some(mut c) = cluster(true).await else {
        return;
    };
    let (blob, data) = c.push_blob(8 * MIB, 4).await;
    // This story is about the origin fallback alone: without the DHT one peer cannot find the
    // other's copy, so both must go to the origin.
    let no_dht = |name| PeerConfig {
        dht: false,
        ..c.config(name, false)
    };
    let a = c.start(no_dht("peer-a")).await;
    let b = c.start(no_dht("peer-b")).await;
    if let Some(s) = c.scheduler.take() {
        s.shutdown();
    }
    wait_until(Duration::from_secs(15), || {
        !a.scheduler_connected() && !b.scheduler_connected()
    })
    .await;
    let (ga, gb) = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(fetch(&a, blob, c.origin()), fetch(&b, blob, c.origin())),
    )
    .await
    .expect("both finish without a scheduler");
    assert_eq!(sha256(&ga), sha256(&data));
    assert_eq!(sha256(&gb), sha256(&data));
    assert!(
        a.downloader()
            .stats()
            .bytes_from_origin
            .load(Ordering::Relaxed)
            >= 8 * MIB as u64
    );

    // A scheduler that comes back is found again (reconnect with backoff).
    c.start_scheduler();
    let addr = c.scheduler_addr().unwrap();
    let mut cfg = c.config("peer-late", false);
    cfg.scheduler = Some(addr);
    let late = c.start(cfg).await;
    assert!(late.scheduler_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_through_the_local_api_fetch_only_their_pieces() {
    let Some(c) = cluster(true).await else { return };
    let (blob, data) = c.push_blob(8 * MIB + 123, 5).await;
    let seed = c.start(c.config("seed-1", true)).await;
    assert_eq!(sha256(&fetch(&seed, blob, c.origin()).await), sha256(&data));
    let peer = c.start(c.config("peer-a", false)).await;
    let client = ApiClient::new(c.dir.path().join("nodes/peer-a/peer.sock"));
    let src = c.origin().reference;
    let size = data.len() as u64;
    let m = MIB as u64;
    for (start, end) in [
        (0, 1),
        (size / 2, size / 2 + 100),
        (size - 1, size),
        (m - 10, m + 10),
    ] {
        let got = client
            .blob(&blob)
            .source(src.clone())
            .range(start..end)
            .read()
            .await
            .unwrap();
        assert_eq!(
            &got[..],
            &data[start as usize..end as usize],
            "range {start}..{end}"
        );
    }
    let err = client
        .blob(&blob)
        .source(src.clone())
        .range(size..size + 5)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(416), "{err}");
    let tasks = client.tasks().await.unwrap();
    let t = tasks.iter().find(|t| t.blob == blob).unwrap();
    assert!(!t.complete, "only the covering pieces were fetched: {t:?}");
    // Pieces 0, 1, 4 and 8 (1 MiB pieces) cover the four ranges.
    assert_eq!(t.held, 4, "{t:?}");
    assert_eq!(seed.upload_stats().pieces.load(Ordering::Relaxed), 4);
    assert_eq!(
        c.registry.blob_bytes_served(&blob.to_string()).await,
        size,
        "only the seed's fetch"
    );
    // The whole blob through the API: 200, every byte, sha256 checked by the peer.
    let out = c.dir.path().join("whole");
    let n = client
        .blob(&blob)
        .source(src.clone())
        .to_file(&out)
        .await
        .unwrap();
    assert_eq!(n, size);
    assert_eq!(file_sha256(&out), sha256(&data));
    assert_eq!(client.blob(&blob).size().await.unwrap(), size);
    let status = client.blob(&blob).fetch().await.unwrap();
    assert!(status.complete, "{status:?}");
    // The client keeps its connections: 20 more small reads, and still a connection or two
    // (one opens when a request goes out before the last answer's connection is idle again).
    for i in 0..20u64 {
        let at = i * (size / 20);
        let got = client.blob(&blob).range(at..at + 64).read().await.unwrap();
        assert_eq!(&got[..], &data[at as usize..at as usize + 64]);
    }
    let connections = peer.api_connections();
    assert!(
        connections <= 3,
        "{connections} connections for 28 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_cluster_certificates_get_pieces() {
    let Some(c) = cluster(false).await else {
        return;
    };
    let (blob, data) = c.push_blob(2 * MIB, 6).await;
    let a = c.start(c.config("peer-a", false)).await;
    assert_eq!(sha256(&fetch(&a, blob, c.origin()).await), sha256(&data));
    let addr = a.quic_addr();

    // A node of the cluster gets the piece.
    let friend =
        shoal_tls::NodeIdentity::load(shoal_tls::IdentityPaths::in_dir(&c.identity("friend")))
            .unwrap();
    let cfg = shoal_tls::quic_client_config(&friend, &[shoal_proto::ALPN_PEER]).unwrap();
    let piece = ask_piece(cfg, addr, "peer-a", "friend", blob)
        .await
        .unwrap();
    assert_eq!(&piece[..], &data[..MIB]);
    let served = a.upload_stats().pieces.load(Ordering::Relaxed);
    assert_eq!(served, 1);

    // A certificate from another CA: nothing.
    let other = tempfile::tempdir().unwrap();
    let other_ca = shoal_tls::ClusterCa::init(&other.path().join("ca"), "Other CA", 30).unwrap();
    let mut req = shoal_tls::NodeCertRequest::new("intruder", 30);
    req.ips.push("127.0.0.1".parse().unwrap());
    other_ca
        .issue(&req)
        .unwrap()
        .write_to(&other.path().join("n"))
        .unwrap();
    // It trusts our CA (so only the server's check of its certificate can stop it).
    std::fs::copy(
        c.dir.path().join("ca/ca.crt"),
        other.path().join("n/ca.crt"),
    )
    .unwrap();
    let intruder =
        shoal_tls::NodeIdentity::load(shoal_tls::IdentityPaths::in_dir(&other.path().join("n")))
            .unwrap();
    let cfg = shoal_tls::quic_client_config(&intruder, &[shoal_proto::ALPN_PEER]).unwrap();
    assert!(ask_piece(cfg, addr, "peer-a", "intruder", blob)
        .await
        .is_err());

    // No client certificate at all: nothing.
    let tls = rustls::ClientConfig::builder_with_provider(shoal_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(friend.roots())
        .with_no_client_auth();
    let mut tls = tls;
    tls.alpn_protocols = vec![shoal_proto::ALPN_PEER.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(quic));
    assert!(ask_piece(cfg, addr, "peer-a", "friend", blob)
        .await
        .is_err());

    assert_eq!(
        a.upload_stats().pieces.load(Ordering::Relaxed),
        served,
        "no piece left for the refused clients"
    );
    // The server counts a refused handshake in its own task, which can finish after the
    // client has already seen the failure.
    wait_until(Duration::from_secs(5), || {
        a.upload_stats().refused.load(Ordering::Relaxed) >= 2
    })
    .await;
}

/// Connects with `cfg`, says Hello as `me`, and asks for piece 0 of `blob`.
async fn ask_piece(
    cfg: quinn::ClientConfig,
    addr: std::net::SocketAddr,
    server: &str,
    me: &str,
    blob: shoal_proto::Digest,
) -> Result<Vec<u8>, String> {
    let mut ep =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    ep.set_default_client_config(cfg);
    let attempt = async {
        let conn = ep
            .connect(addr, server)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = shoal_proto::Hello::new(
            shoal_proto::Role::Peer,
            shoal_proto::HostId::new(me).unwrap(),
        );
        let n = shoal_proto::client_handshake(&mut recv, &mut send, &hello)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        n.codec
            .write(
                &mut send,
                &shoal_proto::PieceRequest::GetPiece { blob, index: 0 },
            )
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        match shoal_proto::read_piece(&n.codec, &mut recv, &blob, 0, MIB as u32)
            .await
            .map_err(|e| e.to_string())?
        {
            shoal_proto::PieceResponse::Piece { bytes, .. } => Ok(bytes),
            other => Err(format!("{other:?}")),
        }
    };
    let r = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    ep.close(0u32.into(), b"");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_survives_the_scheduler_dying_mid_transfer() {
    let Some(mut c) = cluster(true).await else {
        return;
    };
    let (blob, data) = c.push_blob(24 * MIB, 7).await;
    let mut slow = c.config("seed-1", true);
    slow.upload_bytes_per_sec = 8 * MIB as u64;
    let seed = c.start(slow).await;
    assert_eq!(sha256(&fetch(&seed, blob, c.origin()).await), sha256(&data));
    let a = c.start(c.config("peer-a", false)).await;
    let download = fetch(&a, blob, c.origin());
    let kill = async {
        wait_until(Duration::from_secs(20), || {
            seed.upload_stats().pieces.load(Ordering::Relaxed) > 2
        })
        .await;
        if let Some(s) = c.scheduler.take() {
            s.shutdown();
        }
    };
    let (got, ()) = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(download, kill),
    )
    .await
    .expect("the download finishes without the scheduler");
    assert_eq!(sha256(&got), sha256(&data));
    let stats = a.downloader().stats();
    let total = stats.bytes_from_peers.load(Ordering::Relaxed)
        + stats.bytes_from_origin.load(Ordering::Relaxed);
    assert_eq!(
        total,
        24 * MIB as u64,
        "every byte came from the seed or the origin, once"
    );
}

/// Through the local API (what `shoal get`, fs and the snapshotter use): a source outside the
/// peer's own allowed_origins is answered 403 before anything is contacted; one the peer allows
/// but the scheduler does not is refused by the scheduler, also 403, naming the scheduler's
/// setting, and nobody is ordered to fetch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origins_outside_the_lists_are_refused_through_the_local_api() {
    let Some(mut c) = cluster(false).await else {
        return;
    };
    let mut sched = c.scheduler_config("127.0.0.1:0".parse().unwrap(), &[]);
    sched.allowed_origins.clear();
    let mut metrics = prometheus_client::registry::Registry::default();
    c.scheduler =
        Some(shoal_scheduler::service::SchedulerService::start(sched, &mut metrics).unwrap());
    let (blob, _) = c.push_blob(1 << 20, 61).await;
    let mut seed = c.config("seed-1", true);
    seed.dht = false;
    let seed = c.start(seed).await;
    let mut cfg = c.config("peer-a", false);
    cfg.dht = false;
    let client = ApiClient::new(&cfg.api_socket);
    let peer = c.start(cfg).await;
    let api_error = |r: Result<shoal_api::BlobResponse, shoal_api::ApiError>| match r {
        Err(shoal_api::ApiError::Status { status, message }) => (status, message),
        Err(e) => panic!("expected an API error, got {e}"),
        Ok(_) => panic!("expected a refusal, got the blob"),
    };

    let elsewhere = "docker://127.0.0.1:1/swarm/app";
    let (status, message) = api_error(client.blob(&blob).source(elsewhere).send().await);
    assert_eq!(status, 403, "{message}");
    for part in [
        "registry 127.0.0.1:1 is not an allowed origin of this peer",
        "add \"127.0.0.1:1\" to allowed_origins in the `shoal peer` config",
        "--allowed-origins",
    ] {
        assert!(message.contains(part), "{part:?} missing in {message}");
    }
    assert!(
        peer.downloader().status(&blob).is_none(),
        "no task was made"
    );

    let served = c.registry.access_log().await.len();
    let origin = c.origin().reference;
    let (status, message) = api_error(client.blob(&blob).source(origin.clone()).send().await);
    assert_eq!(status, 403, "{message}");
    let host = c.registry.host();
    for part in [
        format!("the scheduler refused {blob}"),
        format!("registry {host} is not an allowed origin of the scheduler"),
        "allowed_origins in the `shoal scheduler` config".to_string(),
    ] {
        assert!(message.contains(&part), "{part:?} missing in {message}");
    }
    // The peer's own size check (a HEAD) is all the registry saw; no seed was ordered.
    let log = c.registry.access_log().await;
    assert!(
        log[served..].iter().all(|e| e.method == "HEAD"),
        "{:?}",
        &log[served..]
    );
    assert!(seed.downloader().status(&blob).is_none());
    assert_eq!(seed.allowed_origins().refusals()[0].1, 0);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
    assert!(
        text.contains("shoal_scheduler_origin_refusals_total{reason=\"not_allowed\"} 1"),
        "{text}"
    );
}
