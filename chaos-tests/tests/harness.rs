//! Proves the chaos harness on its own: namespaces reach each other through the bridge, tbf caps
//! hold, iptables loss and partitions act, the relays inject what they claim in front of a real
//! registry, process and disk helpers work, and nothing is left behind.
//!
//! Root-only tests skip with a printed reason when not root (CI runs them as root).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shoal_chaos::{
    corrupt_byte, http_get, leftover_namespaces, netem_available, or_skip, Cmd, DelayRelay, Fault,
    FaultRelay, FaultScope, Proc, TestNet, Tmpfs,
};
use shoal_testkit::{Registry, RegistryOpts};

const T: Duration = Duration::from_secs(10);

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Sends `n` bytes from `from` to a listener on `to` and returns the receiver's payload rate in
/// bit/s (first byte to end of stream).
fn transfer_rate(net: &TestNet, from: usize, to: usize, n: usize) -> f64 {
    let l = net.host(to).tcp_listener(0).expect("listener");
    let port = l.local_addr().expect("addr").port();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(T)).expect("timeout");
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0usize;
        let mut start = None;
        while got < n {
            let r = s.read(&mut buf).expect("read within the timeout");
            if r == 0 {
                break;
            }
            start.get_or_insert_with(Instant::now);
            got += r;
        }
        let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        (got, secs)
    });
    let mut s = net
        .host(from)
        .tcp_connect(net.host(to).sock(port), T)
        .expect("connect");
    s.set_write_timeout(Some(T)).expect("timeout");
    let block = vec![7u8; 64 << 10];
    let mut sent = 0;
    while sent < n {
        let k = block.len().min(n - sent);
        s.write_all(&block[..k]).expect("write within the timeout");
        sent += k;
    }
    drop(s);
    let (got, secs) = rx.join().expect("receiver");
    assert_eq!(got, n, "every byte arrives");
    got as f64 * 8.0 / secs
}

/// Sends `n` UDP datagrams from `from` to `to` (paced) and returns how many arrived.
fn udp_burst(net: &TestNet, from: usize, to: usize, n: usize) -> usize {
    let rx = net.host(to).udp_socket(0).expect("udp rx");
    let port = rx.local_addr().expect("addr").port();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    // A large receive buffer: a busy CI machine must not drop datagrams the rule let through.
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt on an open socket with a pointer to a live c_int of the given length.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&rx),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut got = 0;
        while rx.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    let tx = net.host(from).udp_socket(0).expect("udp tx");
    let dst = net.host(to).sock(port);
    for i in 0..n {
        tx.send_to(&(i as u64).to_le_bytes(), dst).expect("send");
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    counter.join().expect("counter")
}

fn can_connect(net: &TestNet, from: usize, to: usize, port: u16) -> bool {
    net.host(from)
        .tcp_connect(net.host(to).sock(port), Duration::from_millis(700))
        .is_ok()
}

#[test]
fn three_hosts_reach_each_other_through_the_bridge() {
    let Some(net) = or_skip(TestNet::create("reach", 3)) else {
        return;
    };
    // Each host answers on its own address; a command inside a host sees only its interface.
    for h in net.hosts() {
        let out = h.run("ip", &["-4", "-o", "addr", "show"]).expect("ip addr");
        assert!(out.contains(&h.addr().to_string()), "{out}");
        assert!(!out.contains("10.77.0.") || out.matches("10.77.0.").count() == 1);
    }
    let mut listeners = Vec::new();
    for h in net.hosts() {
        let l = h.tcp_listener(7000).expect("listen");
        listeners.push(std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut s, peer) = l.accept().expect("accept");
                s.write_all(peer.ip().to_string().as_bytes()).expect("echo");
            }
        }));
    }
    for a in 0..3 {
        for b in 0..3 {
            if a == b {
                continue;
            }
            let mut s = net
                .host(a)
                .tcp_connect(net.host(b).sock(7000), T)
                .expect("connect across the bridge");
            let mut seen = String::new();
            s.read_to_string(&mut seen).expect("read");
            assert_eq!(seen, net.host(a).addr().to_string(), "source address kept");
        }
    }
    for l in listeners {
        l.join().expect("listener thread");
    }
    // A child process in a host reaches another host too (curl to a listener).
    let l = net.host(2).tcp_listener(8080).expect("listen");
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
            .expect("answer");
    });
    if shoal_testkit::need_binaries(&["curl"]).is_ok() {
        let url = format!("http://{}/", net.host(2).sock(8080));
        let out = net
            .host(0)
            .run("curl", &["-sS", "--max-time", "5", &url])
            .expect("curl from host 0");
        assert_eq!(out, "hello");
        server.join().expect("server");
    }
    // The machine's own namespace has no route to the test subnet: nothing leaked into it.
    let root = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip");
    assert!(!String::from_utf8_lossy(&root.stdout).contains("10.77.0."));
}

#[test]
fn tbf_caps_bandwidth_both_ways() {
    let Some(net) = or_skip(TestNet::create("tbf", 2)) else {
        return;
    };
    let open = transfer_rate(&net, 0, 1, 8 << 20);
    let cap = 80_000_000u64;
    net.set_bandwidth(0, Some(cap)).expect("tbf");
    let up = transfer_rate(&net, 0, 1, 24 << 20);
    let down = transfer_rate(&net, 1, 0, 24 << 20);
    println!(
        "uncapped {:.0} Mbit/s; cap 80 Mbit/s: host 0 sends {:.1}, receives {:.1} Mbit/s",
        open / 1e6,
        up / 1e6,
        down / 1e6
    );
    for r in [up, down] {
        let ratio = r / cap as f64;
        assert!(
            (0.85..=1.15).contains(&ratio),
            "measured {:.1} Mbit/s against an 80 Mbit/s cap",
            r / 1e6
        );
    }
    assert!(
        open > 2.0 * cap as f64,
        "the cap, not the machine, set the rate"
    );
    net.set_bandwidth(0, None).expect("uncap");
    let again = transfer_rate(&net, 0, 1, 8 << 20);
    assert!(
        again > 1.5 * cap as f64,
        "removing the cap restores the rate"
    );
}

#[test]
fn iptables_statistic_drops_about_the_set_share() {
    let Some(net) = or_skip(TestNet::create("loss", 2)) else {
        return;
    };
    if let Some(h) = net.hosts().first() {
        println!(
            "iptables backend: {}; netem available: {}",
            net.iptables().program(),
            netem_available(h.netns())
        );
    }
    let n = 5000;
    assert_eq!(udp_burst(&net, 0, 1, n), n, "no loss before any rule");
    net.set_loss(0, 0.10).expect("loss");
    for (from, to) in [(0, 1), (1, 0)] {
        let got = udp_burst(&net, from, to, n);
        let drop = 1.0 - got as f64 / n as f64;
        println!(
            "10% loss on host 0, {from}->{to}: dropped {:.2}%",
            drop * 100.0
        );
        assert!((0.07..=0.13).contains(&drop), "dropped {drop} of {n}");
    }
    net.set_loss(0, 0.0).expect("clear loss");
    assert_eq!(udp_burst(&net, 0, 1, n), n, "loss removed");
}

#[test]
fn partition_blocks_and_heal_restores() {
    let Some(net) = or_skip(TestNet::create("part", 3)) else {
        return;
    };
    let mut ls = Vec::new();
    for h in net.hosts() {
        ls.push(h.tcp_listener(9000).expect("listen"));
    }
    assert!(can_connect(&net, 0, 1, 9000) && can_connect(&net, 1, 2, 9000));
    net.partition(&[0], &[1, 2]).expect("partition");
    assert!(!can_connect(&net, 0, 1, 9000), "0 -> 1 cut");
    assert!(!can_connect(&net, 2, 0, 9000), "2 -> 0 cut");
    assert!(can_connect(&net, 1, 2, 9000), "the other half still talks");
    net.heal().expect("heal");
    assert!(can_connect(&net, 0, 1, 9000) && can_connect(&net, 2, 0, 9000));
    drop(ls);
}

async fn registry_with_blob(size: usize) -> Option<(Registry, String, Vec<u8>)> {
    let reg = shoal_testkit::or_skip(Registry::start(RegistryOpts::default()).await)?;
    let blob = shoal_testkit::random_bytes(size, 42);
    let digest = reg.push_blob("chaos/blob", &blob).await.expect("push");
    Some((reg, digest, blob))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_relay_injects_every_mode_in_front_of_a_registry() {
    let Some((reg, digest, blob)) = registry_with_blob(1 << 20).await else {
        return;
    };
    let relay = FaultRelay::start(&reg.url()).await.expect("relay");
    let path = format!("/v2/chaos/blob/blobs/{digest}");
    let get = || http_get(None, relay.addr(), &path, T);

    let r = get().await.expect("pass");
    assert_eq!((r.status, r.body_error.as_ref()), (200, None));
    assert_eq!(sha256(&r.body), digest, "pass-through keeps the bytes");
    assert_eq!(relay.blob_bytes_served(&digest), blob.len() as u64);
    assert_eq!(relay.bytes_served(&path), blob.len() as u64);

    relay.set_fault(Fault::Errors { percent: 100 });
    assert_eq!(get().await.expect("500").status, 500);
    relay.set_fault(Fault::Errors { percent: 50 });
    let mut fails = 0;
    for _ in 0..40 {
        if get().await.expect("get").status == 500 {
            fails += 1;
        }
    }
    assert!((8..=32).contains(&fails), "{fails} of 40 failed at 50%");

    relay.set_fault(Fault::Truncate { after: 1000 });
    let r = get().await.expect("truncated");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1000, "cut after 1000 bytes");
    assert!(r.body_error.is_some(), "the client sees the body break off");

    relay.set_fault(Fault::FlipBytes { every: 4096 });
    let r = get().await.expect("flipped");
    assert_eq!((r.status, r.body.len()), (200, blob.len()));
    assert_ne!(sha256(&r.body), digest, "flipped bytes change the digest");
    let differ = r.body.iter().zip(&blob).filter(|(a, b)| a != b).count();
    assert_eq!(differ, blob.len().div_ceil(4096));

    relay.set_fault(Fault::Slow {
        bytes_per_sec: 2 << 20,
    });
    let t = Instant::now();
    let r = get().await.expect("slow");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(sha256(&r.body), digest, "slow bodies keep the bytes");
    assert!(
        (0.4..3.0).contains(&secs),
        "1 MiB at 2 MiB/s took {secs:.2} s"
    );

    // Manifests and uploads pass untouched unless the scope says otherwise.
    relay.set_fault(Fault::Errors { percent: 100 });
    assert_eq!(
        http_get(None, relay.addr(), "/v2/", T)
            .await
            .expect("v2")
            .status,
        200
    );
    relay.set_scope(FaultScope::All);
    assert_eq!(
        http_get(None, relay.addr(), "/v2/", T)
            .await
            .expect("v2")
            .status,
        500
    );

    let st = relay.stats();
    assert!(st.errors >= 2 && st.truncated == 1 && st.slowed == 1);
    assert_eq!(st.flipped_bytes, blob.len().div_ceil(4096) as u64);
    println!("relay stats: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_reach_the_registry_through_a_relay_in_an_origin_host() {
    let Some(net) = or_skip(TestNet::create("origin", 2)) else {
        return;
    };
    let Some((reg, digest, blob)) = registry_with_blob(4 << 20).await else {
        return;
    };
    // Host 0 is the origin: the relay listens there and reaches the registry on the test's
    // loopback; host 1 pulls through the bridge, with host 0's link capped at 80 Mbit/s.
    let relay = FaultRelay::start_on(net.host(0).tcp_listener(5000).expect("listen"), &reg.url())
        .expect("relay");
    net.set_bandwidth(0, Some(80_000_000)).expect("cap");
    let path = format!("/v2/chaos/blob/blobs/{digest}");
    let origin = net.host(0).sock(5000);
    let t = Instant::now();
    let r = http_get(Some(net.host(1).netns()), origin, &path, T)
        .await
        .expect("pull through the bridge");
    let mbit = blob.len() as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6;
    assert_eq!(sha256(&r.body), digest);
    assert_eq!(relay.blob_bytes_served(&digest), blob.len() as u64);
    println!("4 MiB from the origin host at {mbit:.1} Mbit/s (cap 80)");
    assert!(mbit < 80.0 * 1.15, "the origin link cap holds");
    relay.set_fault(Fault::FlipBytes { every: 1 << 20 });
    let r = http_get(Some(net.host(1).netns()), origin, &path, T)
        .await
        .expect("pull");
    assert_ne!(sha256(&r.body), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_relay_adds_latency_both_ways() {
    // An echo server on loopback; the relay delays each direction by 40 ms.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("echo");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let rtt = |addr: SocketAddr| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            tokio::io::AsyncWriteExt::write_all(&mut s, b"ping")
                .await
                .expect("write");
            let mut b = [0u8; 4];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut b)
                .await
                .expect("read");
            best = best.min(t.elapsed());
        }
        best
    };
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let relay = DelayRelay::start(l, echo_addr, None, Duration::from_millis(40)).expect("relay");
    let direct = rtt(echo_addr).await;
    let delayed = rtt(relay.addr()).await;
    println!("rtt direct {direct:?}, through a 40 ms relay {delayed:?}");
    assert!(delayed >= Duration::from_millis(80), "{delayed:?}");
    assert!(delayed < Duration::from_millis(400), "{delayed:?}");
    relay.set_delay(Duration::ZERO);
    assert!(rtt(relay.addr()).await < Duration::from_millis(40));
    assert!(relay.connections() == 2 && relay.bytes() > 0);
}

fn log_len(p: &Proc) -> usize {
    std::fs::read_to_string(p.log_path()).map_or(0, |s| s.lines().count())
}

fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.chars().next()
}

fn check_process_helpers(mut p: Proc) {
    std::thread::sleep(Duration::from_millis(400));
    assert!(p.is_running());
    let pid = p.pid().expect("pid");
    p.pause().expect("pause");
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(state_of(pid), Some('T'), "SIGSTOP stops it");
    let frozen = log_len(&p);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(log_len(&p), frozen, "a paused process writes nothing");
    p.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(400));
    assert!(log_len(&p) > frozen, "it runs again after SIGCONT");
    p.kill().expect("kill");
    assert!(
        !p.is_running() && state_of(pid).is_none(),
        "SIGKILL ends it"
    );
    p.restart().expect("restart");
    assert_eq!(p.starts(), 2);
    let pid2 = p.pid().expect("pid");
    assert_ne!(pid, pid2);
    std::thread::sleep(Duration::from_millis(300));
    assert!(p.is_running());
    assert!(
        p.log_tail(1000).contains("=== start 2"),
        "one log across restarts"
    );
    drop(p);
    std::thread::sleep(Duration::from_millis(100));
    assert!(state_of(pid2).is_none(), "drop kills it");
}

fn ticker() -> Cmd {
    Cmd::new("sh").args(["-c", "while true; do echo tick; sleep 0.05; done"])
}

#[test]
fn process_helpers_kill_pause_resume_restart() {
    let dir = tempfile::tempdir().expect("dir");
    check_process_helpers(Proc::spawn("ticker", ticker(), dir.path()).expect("spawn"));
}

#[test]
fn process_helpers_work_inside_a_host() {
    let Some(net) = or_skip(TestNet::create("proc", 1)) else {
        return;
    };
    let p = net.host(0).spawn("ticker", ticker()).expect("spawn");
    assert!(p.log_path().starts_with(net.dir()));
    check_process_helpers(p);
}

#[test]
fn tmpfs_fills_and_corrupt_flips_one_byte() {
    let dir = tempfile::tempdir().expect("dir");
    let f = dir.path().join("piece");
    std::fs::write(&f, [1u8, 2, 3, 4]).expect("write");
    assert_eq!(corrupt_byte(&f, 2).expect("corrupt"), (3, !3u8));
    assert_eq!(std::fs::read(&f).expect("read"), [1, 2, !3u8, 4]);
    assert!(corrupt_byte(&f, 4).is_err(), "past the end is an error");

    let Some(mut fs) = or_skip(Tmpfs::mount(&dir.path().join("data"), 1 << 20)) else {
        return;
    };
    let mnt = fs.path().to_path_buf();
    let written = fs.fill(0).expect("fill");
    assert!(written > 900 << 10, "wrote {written}");
    let e = std::fs::write(mnt.join("more"), vec![0u8; 64 << 10]).expect_err("disk is full");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    fs.unmount().expect("unmount");
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    assert!(!mounts.contains(&*mnt.to_string_lossy()));
}

#[test]
fn drop_removes_namespaces_processes_and_rules_also_on_panic() {
    let Some(net) = or_skip(TestNet::create("drop", 2)) else {
        return;
    };
    let prefix = net.prefix().to_string();
    net.set_loss(1, 0.5).expect("loss");
    net.partition(&[0], &[1]).expect("partition");
    net.set_bandwidth(0, Some(10_000_000)).expect("tbf");
    let p = net
        .host(0)
        .spawn("sleeper", Cmd::new("sleep").arg("600"))
        .expect("spawn");
    let pid = p.pid().expect("pid");
    std::mem::forget(p); // even a leaked Proc dies with its namespace
    assert_eq!(leftover_namespaces(&prefix).expect("list").len(), 3);
    drop(net);
    assert!(leftover_namespaces(&prefix).expect("list").is_empty());
    std::thread::sleep(Duration::from_millis(200));
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        st.is_empty() || st.contains(") Z"),
        "the process in the host was killed"
    );

    // A panicking test still removes its net.
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let net = TestNet::create("panic", 2).expect("net");
        tx.send(net.prefix().to_string()).expect("send");
        panic!("scenario failed");
    });
    assert!(r.is_err());
    let prefix = rx.recv().expect("prefix");
    assert!(leftover_namespaces(&prefix).expect("list").is_empty());
}
