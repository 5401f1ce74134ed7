//! Swarm resilience on loopback with real parts (issue 5): several schedulers with rendezvous
//! failover, every scheduler killed mid-pull with the peers carrying on through the libp2p DHT,
//! and an outsider without a cluster certificate kept out of the DHT.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use shoal_peer::scheduler_ring::rendezvous_order;
use shoal_peer::{Peer, PeerConfig};
use shoal_scheduler::service::SchedulerService;

const MIB: usize = 1 << 20;

/// One scheduler service and its metrics.
struct Sched {
    svc: SchedulerService,
    metrics: prometheus_client::registry::Registry,
    addr: SocketAddr,
}

impl Sched {
    /// The `shoal_scheduler_tasks` gauge: tasks this scheduler knows.
    fn tasks(&self) -> i64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics).unwrap();
        text.lines()
            .find(|l| l.starts_with("shoal_scheduler_tasks "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn start_sched(c: &Cluster, listen: SocketAddr) -> Sched {
    start_sched_allowing(c, listen, &[])
}

/// A scheduler that also allows `extra` origins.
fn start_sched_allowing(c: &Cluster, listen: SocketAddr, extra: &[String]) -> Sched {
    let cfg = c.scheduler_config(listen, extra);
    let mut metrics = prometheus_client::registry::Registry::default();
    let svc = SchedulerService::start(cfg, &mut metrics).unwrap();
    let addr = svc.local_addr().unwrap();
    Sched { svc, metrics, addr }
}

fn config(c: &Cluster, name: &str, seed: bool, schedulers: &[SocketAddr]) -> PeerConfig {
    PeerConfig {
        scheduler: None,
        schedulers: schedulers.to_vec(),
        ..c.config(name, seed)
    }
}

/// Starts a peer and waits until it is registered with `n` schedulers.
async fn start_with(cfg: PeerConfig, n: usize) -> Peer {
    let p = Peer::start(cfg).await.unwrap();
    wait_until(Duration::from_secs(15), || p.schedulers_connected() >= n).await;
    p
}

/// Waits until every peer has verified at least `n` others in the DHT.
async fn dht_joined(peers: &[&Peer], n: usize) {
    let start = std::time::Instant::now();
    loop {
        let mut ok = true;
        for p in peers {
            let s = p.discovery().unwrap().status().await;
            ok &= s.verified_peers >= n;
        }
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "peers did not join the DHT"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pull started while no scheduler runs and the only copy is still coming in from the origin
/// follows that import through the DHT (the hashes its holders know so far, protocol version 4)
/// instead of importing the blob a second time. The relay holds the origin's body after 8 MiB
/// until the late pull has pieces from peers, so the import is in progress throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pull_started_with_every_scheduler_down_follows_an_import_in_progress() {
    let Some(c) = cluster(false).await else {
        return;
    };
    let size = 24 * MIB;
    let (blob, data) = c.push_blob(size, 53).await;
    let relay = shoal_testkit::Relay::start(&c.registry.url())
        .await
        .unwrap();
    relay
        .faults()
        .hold_after
        .store(8 * MIB as u64, Ordering::SeqCst);
    relay
        .faults()
        .hold_blob_bodies
        .store(true, Ordering::SeqCst);
    let origin = shoal_proto::OriginRef {
        reference: format!("docker://{}/{REPO}", relay.host()),
        authorization: None,
    };
    let via_relay = [relay.host()];
    let sched = start_sched_allowing(&c, "127.0.0.1:0".parse().unwrap(), &via_relay);
    let addrs = [sched.addr];
    let node = |name: &str, seed: bool| {
        let mut cfg = config(&c, name, seed, &addrs);
        cfg.allowed_origins.extend_from_slice(&via_relay);
        cfg
    };
    let mut seed_cfg = node("seed-1", true);
    seed_cfg.origin_idle_timeout_ms = 60_000;
    let seed = start_with(seed_cfg, 1).await;
    let early = start_with(node("peer-0", false), 1).await;
    let late = start_with(node("peer-1", false), 1).await;
    dht_joined(&[&seed, &early, &late], 2).await;
    let from_peers = |p: &Peer| {
        p.downloader()
            .stats()
            .bytes_from_peers
            .load(Ordering::Relaxed)
    };

    let first = fetch(&early, blob, origin.clone());
    let second = async {
        wait_until(Duration::from_secs(30), || {
            from_peers(&early) >= 4 * MIB as u64
        })
        .await;
        sched.svc.shutdown();
        wait_until(Duration::from_secs(20), || {
            [&seed, &early, &late]
                .iter()
                .all(|p| !p.scheduler_connected())
        })
        .await;
        let pull = fetch(&late, blob, origin.clone());
        let release = async {
            // Pieces from peers while the import is held: the late pull follows it.
            wait_until(Duration::from_secs(30), || from_peers(&late) > 0).await;
            relay
                .faults()
                .hold_blob_bodies
                .store(false, Ordering::SeqCst);
        };
        futures::future::join(pull, release).await.0
    };
    let (a, b) = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join(first, second),
    )
    .await
    .expect("both pulls finish");
    assert_eq!(sha256(&a), sha256(&data));
    assert_eq!(sha256(&b), sha256(&data));
    assert_eq!(
        from_peers(&late),
        size as u64,
        "the late pull came from peers"
    );
    assert_eq!(
        c.registry.blob_bytes_served(&blob.to_string()).await,
        size as u64,
        "the origin sent the blob once (the seed's import)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scheduler_killed_mid_pull_peers_finish_through_the_dht() {
    let Some(c) = cluster(false).await else {
        return;
    };
    let size = 48 * MIB;
    let (blob, data) = c.push_blob(size, 51).await;
    let want = sha256(&data);
    let scheds = [
        start_sched(&c, "127.0.0.1:0".parse().unwrap()),
        start_sched(&c, "127.0.0.1:0".parse().unwrap()),
    ];
    let addrs: Vec<SocketAddr> = scheds.iter().map(|s| s.addr).collect();
    // A capped seed uplink makes the peers trade among themselves, and keeps the pull going
    // long enough to kill the schedulers in the middle of it.
    let mut seed_cfg = config(&c, "seed-1", true, &addrs);
    seed_cfg.upload_bytes_per_sec = 32 * MIB as u64;
    let seed = start_with(seed_cfg, 2).await;
    let mut peers = Vec::new();
    for i in 0..6 {
        peers.push(start_with(config(&c, &format!("peer-{i}"), false, &addrs), 2).await);
    }
    let all: Vec<&Peer> = std::iter::once(&seed).chain(peers.iter()).collect();
    dht_joined(&all, 3).await;

    let pulls = futures::future::join_all(peers.iter().map(|p| fetch(p, blob, c.origin())));
    let kill = async {
        wait_until(Duration::from_secs(60), || {
            seed.upload_stats().pieces.load(Ordering::Relaxed) > 8
        })
        .await;
        for s in &scheds {
            s.svc.shutdown();
        }
        eprintln!("every scheduler killed");
        wait_until(Duration::from_secs(20), || {
            peers.iter().all(|p| !p.scheduler_connected())
        })
        .await;
        // New pulls while no scheduler runs: two new peers that know two addresses to join
        // the DHT through, and nothing else.
        let mut late = Vec::new();
        for i in 6..8 {
            let mut cfg = config(&c, &format!("peer-{i}"), false, &addrs);
            cfg.dht_bootstrap = vec![seed.quic_addr(), peers[0].quic_addr()];
            late.push(Peer::start(cfg).await.unwrap());
        }
        let late_refs: Vec<&Peer> = late.iter().collect();
        dht_joined(&late_refs, 2).await;
        let got = futures::future::join_all(late.iter().map(|p| fetch(p, blob, c.origin()))).await;
        (late, got)
    };
    let (got, (late, late_got)) =
        tokio::time::timeout(Duration::from_secs(180), futures::future::join(pulls, kill))
            .await
            .expect("every pull finishes without schedulers");
    for (i, g) in got.iter().chain(late_got.iter()).enumerate() {
        assert_eq!(sha256(g), want, "peer-{i} got other bytes");
    }
    let served = c.registry.blob_bytes_served(&blob.to_string()).await;
    let from_peers: u64 = peers
        .iter()
        .chain(late.iter())
        .map(|p| {
            p.downloader()
                .stats()
                .bytes_from_peers
                .load(Ordering::Relaxed)
        })
        .sum();
    eprintln!(
        "registry served {} MiB for 8 pulls of {} MiB; peers got {} MiB from peers",
        served >> 20,
        size >> 20,
        from_peers >> 20
    );
    assert!(
        served <= 3 * size as u64,
        "mostly from peers: the registry served {served} bytes, well under 6 x {size}"
    );
    for p in &late {
        assert!(
            p.downloader()
                .stats()
                .bytes_from_peers
                .load(Ordering::Relaxed)
                > 0,
            "a pull started with every scheduler down got pieces from peers"
        );
    }

    // A blob nobody holds, with no scheduler: the DHT names nobody and the peer goes to the origin.
    let (fresh, fresh_data) = c.push_blob(4 * MIB, 52).await;
    let got = tokio::time::timeout(Duration::from_secs(60), fetch(&late[0], fresh, c.origin()))
        .await
        .expect("a blob nobody holds comes from the origin");
    assert_eq!(sha256(&got), sha256(&fresh_data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_schedulers_one_killed_its_blobs_move_and_come_back() {
    let Some(c) = cluster(false).await else {
        return;
    };
    let mut scheds: Vec<Sched> = (0..3)
        .map(|_| start_sched(&c, "127.0.0.1:0".parse().unwrap()))
        .collect();
    let addrs: Vec<SocketAddr> = scheds.iter().map(|s| s.addr).collect();
    let seed = start_with(config(&c, "seed-1", true, &addrs), 3).await;
    let a = start_with(config(&c, "peer-a", false, &addrs), 3).await;
    let b = start_with(config(&c, "peer-b", false, &addrs), 3).await;
    let mut blobs = Vec::new();
    for i in 0..9 {
        blobs.push(c.push_blob(2 * MIB, 60 + i).await);
    }
    let owner = |d: &shoal_proto::Digest, live: &[SocketAddr]| rendezvous_order(live, d)[0];
    // Pull every blob on peer-a: each task lands on its rendezvous owner.
    for (d, data) in &blobs {
        assert_eq!(sha256(&fetch(&a, *d, c.origin()).await), sha256(data));
    }
    let owned = |s: &SocketAddr, live: &[SocketAddr]| {
        blobs.iter().filter(|(d, _)| owner(d, live) == *s).count() as i64
    };
    for s in &scheds {
        wait_until(Duration::from_secs(10), || {
            s.tasks() == owned(&s.addr, &addrs)
        })
        .await;
    }
    // Kill the scheduler owning the most blobs.
    let victim = (0..3).max_by_key(|i| owned(&addrs[*i], &addrs)).unwrap();
    let victim_addr = addrs[victim];
    assert!(owned(&victim_addr, &addrs) > 0);
    scheds[victim].svc.shutdown();
    let live: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| *a != victim_addr)
        .collect();
    wait_until(Duration::from_secs(20), || {
        [&seed, &a, &b]
            .iter()
            .all(|p| p.schedulers_connected() == 2)
    })
    .await;
    // Its blobs move to the others: the peers announce their tasks to the new owners.
    for s in scheds.iter().filter(|s| s.addr != victim_addr) {
        let want = owned(&s.addr, &live);
        let start = std::time::Instant::now();
        while s.tasks() < want {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "scheduler {} knows {} tasks, expected {want} after the failover",
                s.addr,
                s.tasks()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // No pull fails while one scheduler is down, and peer-b is served by peer-a and the seed.
    for (d, data) in &blobs {
        assert_eq!(sha256(&fetch(&b, *d, c.origin()).await), sha256(data));
    }
    let from_peers = b
        .downloader()
        .stats()
        .bytes_from_peers
        .load(Ordering::Relaxed);
    assert_eq!(
        from_peers,
        9 * 2 * MIB as u64,
        "peer-b got every blob from peers"
    );

    // The scheduler comes back on its address and takes its blobs back from the announcements.
    drop(scheds.remove(victim));
    let back = {
        let start = std::time::Instant::now();
        loop {
            // The old endpoint's socket closes once its driver notices: retry the bind briefly.
            let cfg = c.scheduler_config(victim_addr, &[]);
            let mut metrics = prometheus_client::registry::Registry::default();
            match SchedulerService::start(cfg, &mut metrics) {
                Ok(svc) => {
                    break Sched {
                        svc,
                        metrics,
                        addr: victim_addr,
                    }
                }
                Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "rebind: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_until(Duration::from_secs(30), || {
        [&seed, &a, &b]
            .iter()
            .all(|p| p.schedulers_connected() == 3)
    })
    .await;
    let want = owned(&victim_addr, &addrs);
    wait_until(Duration::from_secs(20), || back.tasks() == want).await;
    // And the blobs that never belonged to it stay where they are.
    for s in &scheds {
        assert!(s.tasks() >= owned(&s.addr, &addrs));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outsider_without_a_cluster_certificate_is_kept_out_of_the_dht() {
    let Some(c) = cluster(false).await else {
        return;
    };
    let (blob, data) = c.push_blob(2 * MIB, 70).await;
    let a = Peer::start(c.config("peer-a", false)).await.unwrap();
    let mut cfg = c.config("peer-b", false);
    cfg.dht_bootstrap = vec![a.quic_addr()];
    let b = Peer::start(cfg).await.unwrap();
    dht_joined(&[&a, &b], 1).await;

    // The outsider: a plain libp2p node with Kademlia and identify, its own key, no
    // certificate. It connects to peer-a and announces itself as a provider of the blob.
    let key = libp2p::identity::Keypair::generate_ed25519();
    #[derive(libp2p::swarm::NetworkBehaviour)]
    struct Outsider {
        kad: libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore>,
        identify: libp2p::identify::Behaviour,
    }
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|k| {
            let id = k.public().to_peer_id();
            let mut kad = libp2p::kad::Behaviour::with_config(
                id,
                libp2p::kad::store::MemoryStore::new(id),
                libp2p::kad::Config::new(libp2p::StreamProtocol::new("/shoal/kad/1.0.0")),
            );
            kad.set_mode(Some(libp2p::kad::Mode::Server));
            Outsider {
                kad,
                identify: libp2p::identify::Behaviour::new(libp2p::identify::Config::new(
                    "/shoal/id/1.0.0".into(),
                    k.public(),
                )),
            }
        })
        .unwrap()
        .build();
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let a_peer = a.discovery().unwrap().peer_id();
    let a_addr: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", a.quic_addr().port())
        .parse()
        .unwrap();
    swarm.behaviour_mut().kad.add_address(&a_peer, a_addr);
    let key = libp2p::kad::RecordKey::new(&blob.to_string());
    swarm.behaviour_mut().kad.start_providing(key).unwrap();
    let drive = async {
        loop {
            let _ = swarm.select_next_some().await;
        }
    };
    let refused = async {
        let start = std::time::Instant::now();
        loop {
            if a.discovery().unwrap().status().await.refused_peers > 0 {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "peer-a never refused the outsider"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = drive => unreachable!(),
        _ = refused => {}
    }
    // Keep the outsider trying for a moment; it stays out.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let _ = swarm.select_next_some().await;
        }
    })
    .await;
    let status = a.discovery().unwrap().status().await;
    assert_eq!(
        status.verified_peers, 1,
        "only peer-b is verified: {status:?}"
    );
    assert!(
        !swarm.is_connected(&a_peer),
        "peer-a closed the outsider's connection"
    );
    // Neither peer names the outsider as a holder: peer-b finds nobody, and fetches from the
    // origin; peer-a, once it holds the blob, is found by peer-b.
    assert!(b.discovery().unwrap().find_holders(blob).await.is_empty());
    assert_eq!(sha256(&fetch(&a, blob, c.origin()).await), sha256(&data));
    let start = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(2100)).await; // past the lookup cache
        let holders = b.discovery().unwrap().find_holders(blob).await;
        if !holders.is_empty() {
            assert_eq!(holders.len(), 1, "{holders:?}");
            assert_eq!(holders[0].host_id.as_str(), "peer-a");
            assert_eq!(holders[0].addresses, vec![a.quic_addr()]);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "peer-a never found"
        );
    }
}
