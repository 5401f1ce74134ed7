//! Every scheduling rule, as a scenario.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use shoal_scheduler::{Decision, FailureKind, Held, HostLoad, SchedulerConfig, SchedulerError};

fn one_parent() -> SchedulerConfig {
    SchedulerConfig {
        max_parents: 1,
        ..SchedulerConfig::default()
    }
}

#[test]
fn a_peer_is_never_given_a_parent_that_downloads_from_it() {
    let mut c = cluster();
    let b1 = blob(1);
    let (a, b, x) = (c.peer("a"), c.peer("b"), c.peer("x"));
    c.announce(&a, &b1, holding(0..8));
    c.announce(&b, &b1, holding(8..16));
    // x is not far behind b (a peer well behind is never named: the next test).
    c.announce(&x, &b1, holding([0, 1, 2, 3, 4, 8]));
    // a downloads from b ...
    assert!(parents(&c.decide(&a, &b1)).contains(&"b".to_string()));
    // ... so b may not download from a, even though a holds what b lacks; x is fine.
    assert_eq!(parents(&c.decide(&b, &b1)), vec!["x"]);
}

#[test]
fn a_peer_well_behind_the_asker_is_not_named() {
    let mut c = cluster();
    let b1 = blob(1);
    let (a, b, x) = (c.peer("a"), c.peer("b"), c.peer("x"));
    c.announce(&a, &b1, holding(0..10));
    // b lacks most of what a holds and holds one piece a lacks; x is further along than a.
    c.announce(&b, &b1, holding([15]));
    c.announce(&x, &b1, holding(4..15));
    assert_eq!(parents(&c.decide(&a, &b1)), vec!["x"]);
    // Once b has caught up it is named again.
    c.s.report_pieces(&b, &b1, &[0, 1, 2, 3, 4, 5, 6])
        .unwrap_or_else(|e| panic!("{e}"));
    let named = parents(&c.decide(&a, &b1));
    assert!(named.contains(&"b".to_string()), "{named:?}");
}

#[test]
fn a_peer_is_never_given_a_descendant_further_down() {
    let mut c = cluster();
    let b1 = blob(1);
    // z holds everything but serves nobody (no slots): every piece exists, so nobody is sent
    // to the origin, and the chain below is the only way pieces move.
    let z = c.host("z", "", "", 0, false);
    c.announce(&z, &b1, Held::All);
    let (a, b, x) = (c.peer("a"), c.peer("b"), c.peer("x"));
    c.announce(&b, &b1, holding([0]));
    c.announce(&a, &b1, Held::Nothing);
    c.announce(&x, &b1, Held::Nothing);
    assert_eq!(parents(&c.decide(&a, &b1)), vec!["b"]);
    c.s.report_pieces(&a, &b1, &[1])
        .unwrap_or_else(|e| panic!("{e}"));
    c.s.report_failure(&x, &b1, &b, FailureKind::Refused)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parents(&c.decide(&x, &b1)), vec!["a"]);
    c.s.report_pieces(&x, &b1, &[2])
        .unwrap_or_else(|e| panic!("{e}"));
    // x -> a -> b: b lacks pieces a and x hold, but both descend from b; y does not.
    let y = c.peer("y");
    c.announce(&y, &b1, holding([3]));
    assert_eq!(parents(&c.decide(&b, &b1)), vec!["y"]);
}

#[test]
fn parent_graphs_stay_acyclic_under_random_traffic() {
    let mut c = cluster_with(SchedulerConfig {
        max_parents: 3,
        ..SchedulerConfig::default()
    });
    let task = blob(9);
    let mut rng = fastrand::Rng::with_seed(42);
    let peers: Vec<_> = (0..40).map(|i| c.peer(&format!("p{i}"))).collect();
    for p in &peers {
        let held: Vec<u32> = (0..PIECES).filter(|_| rng.u8(..) < 40).collect();
        c.announce(p, &task, holding(held));
    }
    let mut graph: HashMap<String, Vec<String>> = HashMap::new();
    for step in 0..2_000 {
        let p = &peers[rng.usize(..peers.len())];
        if rng.bool() {
            let piece = rng.u32(..PIECES);
            c.s.report_pieces(p, &task, &[piece])
                .unwrap_or_else(|e| panic!("{e}"));
            if c.s.held_set(p, &task).is_some_and(|s| s.is_complete()) {
                graph.remove(p.as_str()); // complete: its edges are released
            }
            continue;
        }
        let d = c.decide(p, &task);
        graph.insert(p.to_string(), parents(&d));
        assert_acyclic(&graph, step);
    }
}

fn assert_acyclic(graph: &HashMap<String, Vec<String>>, step: usize) {
    // Kahn's algorithm on child -> parent edges.
    let mut indegree: HashMap<&str, usize> = HashMap::new();
    for (child, ps) in graph {
        indegree.entry(child).or_default();
        for p in ps {
            *indegree.entry(p).or_default() += 1;
        }
    }
    let mut ready: Vec<&str> = indegree
        .iter()
        .filter(|(_, &d)| d == 0)
        .map(|(&k, _)| k)
        .collect();
    let mut seen = 0;
    while let Some(n) = ready.pop() {
        seen += 1;
        for p in graph.get(n).into_iter().flatten() {
            let d = indegree
                .get_mut(p.as_str())
                .unwrap_or_else(|| panic!("node"));
            *d -= 1;
            if *d == 0 {
                ready.push(p);
            }
        }
    }
    assert_eq!(
        seen,
        indegree.len(),
        "cycle in the parent graph at step {step}: {graph:?}"
    );
}

#[test]
fn seeds_serve_only_while_they_are_the_only_source() {
    let mut c = cluster();
    let b1 = blob(1);
    let (seed, p1, p2) = (c.seed("seed"), c.peer("p1"), c.peer("p2"));
    c.announce(&seed, &b1, Held::All);
    c.announce(&p1, &b1, Held::Nothing);
    c.announce(&p2, &b1, Held::Nothing);
    // Only the seed holds the blob: p1 gets the seed.
    assert_eq!(parents(&c.decide(&p1, &b1)), vec!["seed"]);
    // p1 now holds half: p2 gets p1 first, and the seed only for the half p1 lacks.
    c.s.report_pieces(&p1, &b1, &(0..8).collect::<Vec<_>>())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parents(&c.decide(&p2, &b1)), vec!["p1", "seed"]);
    // Once p1 holds everything, the seed is left alone.
    c.s.report_pieces(&p1, &b1, &(8..16).collect::<Vec<_>>())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parents(&c.decide(&p2, &b1)), vec!["p1"]);
    assert_eq!(c.decide(&p1, &b1), Decision::Done);
}

#[test]
fn a_seed_fetches_from_origin_when_nobody_holds_a_piece() {
    let mut c = cluster();
    let b1 = blob(1);
    let seed = c.seed("seed");
    let peers: Vec<_> = (0..5).map(|i| c.peer(&format!("p{i}"))).collect();
    for p in &peers {
        c.announce(p, &b1, Held::Nothing);
    }
    match c.decide(&peers[0], &b1) {
        Decision::SeedFetch { seed: s, parents } => {
            assert_eq!(s.host, seed);
            assert_eq!(parents.first().map(|p| &p.host), Some(&seed));
        }
        other => panic!("expected a seed fetch, got {other:?}"),
    }
    // The seed is fetching: the others are pointed at it, with no second origin fetch.
    for p in &peers[1..] {
        let d = c.decide(p, &b1);
        assert!(matches!(d, Decision::Parents(_)), "{d:?}");
        assert_eq!(parents(&d), vec!["seed"]);
    }
    assert!(c
        .metrics_text()
        .contains(r#"shoal_scheduler_back_to_source_total{by="seed"} 1"#));
    // A seed whose origin fetch fails is replaced: the next asker orders a fetch again.
    c.s.report_origin_failure(&seed, &b1)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        c.decide(&peers[1], &b1),
        Decision::SeedFetch { .. }
    ));
}

#[test]
fn a_seed_out_of_upload_slots_is_waited_for_not_bypassed() {
    let mut c = cluster();
    let (b1, b2) = (blob(1), blob(2));
    let seed = c.host("seed", "", "", 1, true);
    let (p1, p2) = (c.peer("p1"), c.peer("p2"));
    c.announce(&p1, &b1, Held::Nothing);
    c.announce(&p2, &b2, Held::Nothing);
    assert!(matches!(c.decide(&p1, &b1), Decision::SeedFetch { .. }));
    // The seed's only slot serves p1: p2 waits for it instead of fetching b2 from the origin.
    for _ in 0..3 {
        let d = c.decide(&p2, &b2);
        assert!(matches!(d, Decision::Wait { .. }), "{d:?}");
    }
    // p1 is done: the slot is free again and the seed fetches b2 too.
    c.s.report_pieces(&p1, &b1, &(0..PIECES).collect::<Vec<_>>())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.decide(&p1, &b1), Decision::Done);
    match c.decide(&p2, &b2) {
        Decision::SeedFetch { seed: s, .. } => assert_eq!(s.host, seed),
        other => panic!("expected a seed fetch once the seed had a free slot, got {other:?}"),
    }
}

#[test]
fn without_a_seed_only_one_peer_per_blob_goes_back_to_source() {
    let mut c = cluster();
    let b1 = blob(1);
    let peers: Vec<_> = (0..10).map(|i| c.peer(&format!("p{i}"))).collect();
    for p in &peers {
        c.announce(p, &b1, Held::Nothing);
    }
    let decisions: Vec<_> = peers.iter().map(|p| c.decide(p, &b1)).collect();
    let to_origin = decisions
        .iter()
        .filter(|d| **d == Decision::BackToSource)
        .count();
    assert_eq!(to_origin, 1, "{decisions:?}");
    assert_eq!(decisions[0], Decision::BackToSource);
    // The origin fetcher serves as it stores: 8 slots, so 8 peers get it and one waits.
    let from_p0 = decisions
        .iter()
        .filter(|d| parents(d) == vec!["p0"])
        .count();
    assert_eq!(from_p0, 8);
    assert!(
        matches!(decisions[9], Decision::Wait { .. }),
        "{:?}",
        decisions[9]
    );
    assert!(c.metrics_text().contains("shoal_scheduler_queue_depth 1"));

    // The cap is a setting.
    let mut c = cluster_with(SchedulerConfig {
        back_to_source_limit: 3,
        ..SchedulerConfig::default()
    });
    let peers: Vec<_> = (0..10).map(|i| c.peer(&format!("p{i}"))).collect();
    let mut n = 0;
    for (i, p) in peers.iter().enumerate() {
        c.announce(p, &b1, Held::Nothing);
        // Each newcomer refuses every earlier peer, so no origin fetcher can serve it.
        for q in &peers[..i] {
            c.s.report_failure(p, &b1, q, FailureKind::Refused)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        if c.decide(p, &b1) == Decision::BackToSource {
            n += 1;
        }
    }
    assert_eq!(n, 3);
}

#[test]
fn a_failure_blocks_the_parent_for_the_reporter_and_bad_data_for_everyone() {
    let mut c = cluster_with(one_parent());
    let b1 = blob(1);
    let (good, flaky, p1, p2) = (c.peer("good"), c.peer("flaky"), c.peer("p1"), c.peer("p2"));
    c.announce(&good, &b1, Held::All);
    c.announce(&flaky, &b1, Held::All);
    c.announce(&p1, &b1, Held::Nothing);
    c.announce(&p2, &b1, Held::Nothing);
    // Make flaky the favourite (measured fast), then p1 reports it stalled.
    c.s.report_transfer(&p2, &b1, &flaky, 1 << 30, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parents(&c.decide(&p1, &b1)), vec!["flaky"]);
    c.s.report_failure(&p1, &b1, &flaky, FailureKind::Stalled)
        .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..5 {
        assert_eq!(parents(&c.decide(&p1, &b1)), vec!["good"], "blocked for p1");
    }

    // Bad data: blocked for every peer of the task, and its pieces stop counting.
    let mut c = cluster();
    let (bad, p1, p2) = (c.peer("bad"), c.peer("p1"), c.peer("p2"));
    c.announce(&bad, &b1, Held::All);
    c.announce(&p1, &b1, Held::Nothing);
    c.announce(&p2, &b1, Held::Nothing);
    assert_eq!(parents(&c.decide(&p1, &b1)), vec!["bad"]);
    c.s.report_failure(&p1, &b1, &bad, FailureKind::BadData)
        .unwrap_or_else(|e| panic!("{e}"));
    // Nobody else holds the blob and there is no seed: p2 goes to the origin itself.
    assert_eq!(c.decide(&p2, &b1), Decision::BackToSource);
    assert_eq!(parents(&c.decide(&p1, &b1)), vec!["p2"]);
    assert!(c
        .metrics_text()
        .contains(r#"shoal_scheduler_failures_reported_total{kind="bad_data"} 1"#));
}

#[test]
fn silent_hosts_expire_with_their_pieces() {
    let mut c = cluster(); // host timeout 30 s
    let b1 = blob(1);
    let (holder, quiet, p) = (c.peer("holder"), c.peer("quiet"), c.peer("p"));
    c.announce(&quiet, &b1, Held::All);
    c.announce(&holder, &b1, holding(0..8));
    c.announce(&p, &b1, Held::Nothing);
    c.clock.advance(Duration::from_secs(20));
    c.beat(&holder);
    c.beat(&p);
    assert!(c.s.expire_hosts().is_empty());
    c.clock.advance(Duration::from_secs(15));
    assert_eq!(c.s.expire_hosts(), vec![quiet.clone()]);
    assert_eq!(c.s.host_count(), 2);
    assert!(matches!(
        c.s.heartbeat(&quiet, HostLoad::default()),
        Err(SchedulerError::UnknownHost { .. })
    ));
    // Pieces 8..16 were only on the expired host: p is sent to the origin for them.
    assert_eq!(c.decide(&p, &b1), Decision::BackToSource);
    assert_eq!(c.s.task_peer_count(&b1), 2);
    assert!(c
        .metrics_text()
        .contains("shoal_scheduler_hosts_expired_total 1"));

    // Leaving works the same, at once.
    assert!(c.s.leave_host(&holder));
    assert!(c.s.leave_host(&p));
    assert_eq!(c.s.task_count(), 0, "the task goes with its last peer");
    assert_eq!(c.s.peer_task_count(), 0);
}

#[test]
fn nearer_parents_win_all_else_equal() {
    let mut c = cluster_with(one_parent());
    let b1 = blob(1);
    let asker = c.host("asker", "z1", "r1", 8, false);
    let far = c.host("far", "z2", "r1", 8, false);
    let zone = c.host("zone", "z1", "r2", 8, false);
    let rack = c.host("rack", "z1", "r1", 8, false);
    for h in [&far, &zone, &rack] {
        c.announce(h, &b1, Held::All);
    }
    c.announce(&asker, &b1, Held::Nothing);
    for _ in 0..5 {
        assert_eq!(parents(&c.decide(&asker, &b1)), vec!["rack"]);
    }
    assert!(c.s.leave_host(&rack));
    assert_eq!(parents(&c.decide(&asker, &b1)), vec!["zone"]);
    assert!(c.s.leave_host(&zone));
    assert_eq!(parents(&c.decide(&asker, &b1)), vec!["far"]);
}

#[test]
fn more_useful_faster_and_reliable_parents_rank_first() {
    let mut c = cluster_with(one_parent());
    let b1 = blob(1);
    let b2 = blob(2);
    let (few, many, asker) = (c.peer("few"), c.peer("many"), c.peer("asker"));
    c.announce(&few, &b1, holding(0..2));
    c.announce(&many, &b1, Held::All);
    c.announce(&asker, &b1, Held::Nothing);
    assert_eq!(parents(&c.decide(&asker, &b1)), vec!["many"]);

    let (slow, fast, unreliable) = (c.peer("slow"), c.peer("fast"), c.peer("unreliable"));
    for h in [&slow, &fast, &unreliable] {
        c.announce(h, &b2, Held::All);
    }
    c.announce(&asker, &b2, Held::Nothing);
    c.s.report_transfer(&asker, &b2, &slow, 1 << 20, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    c.s.report_transfer(&asker, &b2, &fast, 1 << 30, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parents(&c.decide(&asker, &b2)), vec!["fast"]);
    // Failures elsewhere (another blob) count against a host everywhere, decaying over time.
    c.s.report_transfer(&asker, &b2, &unreliable, 1 << 31, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parents(&c.decide(&asker, &b2)), vec!["unreliable"]);
    c.announce(&unreliable, &b1, Held::All);
    c.s.report_failure(&few, &b1, &unreliable, FailureKind::Unreachable)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parents(&c.decide(&asker, &b2)), vec!["fast"]);
    c.clock.advance(Duration::from_secs(600));
    c.beat(&unreliable);
    assert_eq!(parents(&c.decide(&asker, &b2)), vec!["unreliable"]);
}

#[test]
fn a_parent_whose_uplink_is_full_ranks_below_one_with_room() {
    let mut c = cluster_with(one_parent());
    let b1 = blob(1);
    let (busy, idle, asker) = (c.peer("busy"), c.peer("idle"), c.peer("asker"));
    for h in [&busy, &idle] {
        c.announce(h, &b1, Held::All);
    }
    c.announce(&asker, &b1, Held::Nothing);
    let mib = |n: u64| HostLoad {
        upload_bytes_per_sec: Some(n << 20),
        download_bytes_per_sec: Some(0),
        ..HostLoad::default()
    };
    // Both have uploaded at 100 MiB/s (what their links carry); one still does.
    let beat = |c: &mut Cluster, h: &HostId, load: HostLoad| {
        c.s.heartbeat(h, load).unwrap_or_else(|e| panic!("{e}"))
    };
    for (h, now) in [(&busy, 100), (&idle, 0)] {
        beat(&mut c, h, mib(100));
        beat(&mut c, h, mib(now));
    }
    assert_eq!(parents(&c.decide(&asker, &b1)), vec!["idle"]);
    // The other way round, the other parent.
    beat(&mut c, &busy, mib(10));
    beat(&mut c, &idle, mib(95));
    assert_eq!(parents(&c.decide(&asker, &b1)), vec!["busy"]);
}

#[test]
fn upload_slots_are_held_until_the_child_finishes() {
    let mut c = cluster();
    let b1 = blob(1);
    let parent = c.host("parent", "", "", 1, false);
    let (p1, p2) = (c.peer("p1"), c.peer("p2"));
    c.announce(&parent, &b1, Held::All);
    c.announce(&p1, &b1, Held::Nothing);
    c.announce(&p2, &b1, Held::Nothing);
    assert_eq!(parents(&c.decide(&p1, &b1)), vec!["parent"]);
    assert!(matches!(c.decide(&p2, &b1), Decision::Wait { .. }));
    c.s.report_pieces(&p1, &b1, &(0..PIECES).collect::<Vec<_>>())
        .unwrap_or_else(|e| panic!("{e}"));
    let d = c.decide(&p2, &b1);
    assert!(parents(&d).contains(&"parent".to_string()), "{d:?}");
    // A host's own count of free slots counts too.
    c.s.heartbeat(
        &parent,
        HostLoad {
            free_upload_slots: Some(0),
            ..HostLoad::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parents(&c.decide(&p2, &b1)), vec!["p1"]);
}

#[test]
fn a_restarted_scheduler_rebuilds_from_announcements() {
    let mut before = cluster();
    let b1 = blob(1);
    let b2 = blob(2);
    let names = ["seed", "a", "b", "c", "d"];
    let mut regs = vec![];
    for (i, n) in names.iter().enumerate() {
        let reg = registration(n, "z1", &format!("r{}", i % 2), 8, i == 0);
        before
            .s
            .register_host(reg.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        regs.push(reg);
    }
    let ids: Vec<_> = names.iter().map(|n| id(n)).collect();
    before.announce(&ids[0], &b1, Held::All);
    before.announce(&ids[1], &b1, holding(0..5));
    before.announce(&ids[2], &b1, holding(5..9));
    before.announce(&ids[3], &b2, holding([1, 3]));
    before.announce(&ids[4], &b1, Held::Nothing);
    before.announce(&ids[4], &b2, Held::Nothing);

    // The new scheduler hears each host register and re-announce what it holds.
    let mut after = cluster();
    for reg in &regs {
        after
            .s
            .register_host(reg.clone())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for h in &ids {
        for t in [&b1, &b2] {
            if let Some(set) = before.s.held_set(h, t) {
                after.announce(h, t, Held::Set(set));
            }
        }
    }
    assert_eq!(after.s.host_count(), before.s.host_count());
    assert_eq!(after.s.task_count(), before.s.task_count());
    assert_eq!(after.s.peer_task_count(), before.s.peer_task_count());
    for h in &ids {
        for t in [&b1, &b2] {
            assert_eq!(after.s.held_set(h, t), before.s.held_set(h, t), "{h} {t}");
        }
    }
    // And decides as the old one would: d gets a and b (non-seeds) and the seed for the rest;
    // for b2, whose pieces are mostly held by nobody, the seed is ordered to fetch.
    let d1 = after.decide(&ids[4], &b1);
    assert_eq!(d1, before.decide(&ids[4], &b1));
    let mut got = parents(&d1);
    got.sort();
    assert_eq!(got, vec!["a", "b", "seed"]);
    let d2 = after.decide(&ids[4], &b2);
    assert_eq!(d2, before.decide(&ids[4], &b2));
    assert!(matches!(d2, Decision::SeedFetch { .. }), "{d2:?}");
    assert_eq!(parents(&d2), vec!["seed", "c"]);
}

#[test]
fn memory_bounds_refuse_clearly() {
    let mut c = cluster_with(SchedulerConfig {
        max_tasks_per_host: 2,
        max_peers_per_task: 2,
        max_hosts: 4,
        ..SchedulerConfig::default()
    });
    let (a, b, x) = (c.peer("a"), c.peer("b"), c.peer("x"));
    c.announce(&a, &blob(1), Held::Nothing);
    c.announce(&a, &blob(2), Held::Nothing);
    c.announce(&a, &blob(2), Held::All); // re-announcing is not a new task
    let err = c.s.announce_task(
        &a,
        shoal_scheduler::TaskAnnouncement {
            task: blob(3),
            size: 1,
            piece_size: PIECE_SIZE,
            held: Held::Nothing,
        },
    );
    assert!(
        matches!(
            err,
            Err(SchedulerError::LimitReached {
                what: "tasks per host",
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(
        c.s.task_count(),
        2,
        "a refused announcement creates no task"
    );
    c.announce(&b, &blob(1), Held::Nothing);
    let err = c.s.announce_task(
        &x,
        shoal_scheduler::TaskAnnouncement {
            task: blob(1),
            size: u64::from(PIECES) * u64::from(PIECE_SIZE),
            piece_size: PIECE_SIZE,
            held: Held::Nothing,
        },
    );
    assert!(matches!(
        err,
        Err(SchedulerError::LimitReached {
            what: "peers per task",
            ..
        })
    ));
    c.peer("y");
    let err = c.s.register_host(registration("z", "", "", 1, false));
    assert!(matches!(
        err,
        Err(SchedulerError::LimitReached { what: "hosts", .. })
    ));
    let msg = err.map_err(|e| e.to_string()).err().unwrap_or_default();
    assert!(msg.contains("registering z"), "{msg}");
}

#[test]
fn announcements_must_agree_and_reports_must_be_in_range() {
    let mut c = cluster();
    let b1 = blob(1);
    let (a, b) = (c.peer("a"), c.peer("b"));
    c.announce(&a, &b1, Held::Nothing);
    let wrong_size = c.s.announce_task(
        &b,
        shoal_scheduler::TaskAnnouncement {
            task: b1,
            size: 5,
            piece_size: PIECE_SIZE,
            held: Held::Nothing,
        },
    );
    assert!(matches!(
        wrong_size,
        Err(SchedulerError::TaskMismatch { .. })
    ));
    let short_set = c.s.announce_task(
        &b,
        shoal_scheduler::TaskAnnouncement {
            task: b1,
            size: u64::from(PIECES) * u64::from(PIECE_SIZE),
            piece_size: PIECE_SIZE,
            held: Held::Set(PieceSet::full(PIECES - 8)),
        },
    );
    assert!(matches!(short_set, Err(SchedulerError::InvalidTask { .. })));
    let out_of_range = c.s.report_pieces(&a, &b1, &[3, PIECES]);
    assert!(matches!(
        out_of_range,
        Err(SchedulerError::PieceOutOfRange { piece: 16, .. })
    ));
    assert_eq!(
        c.s.held_set(&a, &b1),
        Some(PieceSet::empty(PIECES)),
        "nothing recorded from a bad report"
    );
    assert!(matches!(
        c.s.decide(&b, &b1),
        Err(SchedulerError::NotInTask { .. })
    ));
    let ghost = id("ghost");
    assert!(matches!(
        c.s.decide(&ghost, &b1),
        Err(SchedulerError::UnknownHost { .. })
    ));
    c.s.publish_piece_table(&a, &b1, vec![[7; 32]; PIECES as usize])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.s.piece_table(&b1).map(|t| t.len()), Some(PIECES as usize));
    let other =
        c.s.publish_piece_table(&a, &b1, vec![[8; 32]; PIECES as usize]);
    assert!(matches!(other, Err(SchedulerError::TaskMismatch { .. })));
}

#[test]
fn metrics_count_decisions_hosts_and_tasks() {
    let mut c = cluster();
    let (a, b) = (c.peer("a"), c.peer("b"));
    c.announce(&a, &blob(1), Held::All);
    c.announce(&b, &blob(1), Held::Nothing);
    c.announce(&b, &blob(2), Held::Nothing);
    c.decide(&b, &blob(1));
    c.decide(&b, &blob(2));
    c.decide(&a, &blob(1));
    let text = c.metrics_text();
    for line in [
        r#"shoal_scheduler_decisions_total{outcome="parents"} 1"#,
        r#"shoal_scheduler_decisions_total{outcome="back_to_source"} 1"#,
        r#"shoal_scheduler_decisions_total{outcome="done"} 1"#,
        r#"shoal_scheduler_back_to_source_total{by="peer"} 1"#,
        "shoal_scheduler_hosts 2",
        "shoal_scheduler_tasks 2",
        "shoal_scheduler_peer_tasks 3",
        "shoal_scheduler_queue_depth 0",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    let seen: HashSet<&str> = text.lines().filter(|l| l.starts_with("shoal_")).collect();
    assert!(!seen.is_empty());
}

#[test]
fn evicted_pieces_stop_counting() {
    let mut c = cluster();
    let b1 = blob(1);
    let (a, b) = (c.peer("a"), c.peer("b"));
    c.announce(&a, &b1, Held::All);
    c.announce(&b, &b1, Held::Nothing);
    assert_eq!(parents(&c.decide(&b, &b1)), vec!["a"]);
    // a evicts half the blob: nobody holds 8..16 now, so b is sent to the origin.
    let gone =
        c.s.report_pieces_removed(&a, &b1, &(8..16).collect::<Vec<_>>());
    assert_eq!(gone, Ok(8));
    assert_eq!(c.decide(&b, &b1), Decision::BackToSource);
    // A full report replaces what was known.
    let upper = PieceSet::from_bitmap(&[0, 0xff], PIECES).unwrap_or_else(|e| panic!("{e}"));
    c.s.report_held(&a, &b1, &upper)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.s.held_set(&a, &b1), Some(upper));
    assert!(matches!(
        c.s.report_pieces_removed(&a, &b1, &[16]),
        Err(SchedulerError::PieceOutOfRange { .. })
    ));
}

#[test]
fn after_a_peer_reports_an_evicted_blob_the_seed_serves_it_not_the_origin() {
    // Chaos scenario 12: a peer evicted a blob the seed also holds; the next asker must get the
    // seed, never be sent to the origin. The scheduler learns of the eviction only from the
    // evicting peer's report (removed pieces, or leaving the task).
    for leave in [false, true] {
        let mut c = cluster();
        let b1 = blob(1);
        let (seed, p0, p1) = (c.seed("seed"), c.peer("p0"), c.peer("p1"));
        c.announce(&seed, &b1, Held::All);
        c.announce(&p0, &b1, Held::All);
        c.announce(&p1, &b1, Held::Nothing);
        // While p0 holds the blob, the seed is spared.
        assert_eq!(parents(&c.decide(&p1, &b1)), vec!["p0"]);
        if leave {
            c.s.leave_task(&p0, &b1).unwrap_or_else(|e| panic!("{e}"));
        } else {
            let gone =
                c.s.report_pieces_removed(&p0, &b1, &(0..16).collect::<Vec<_>>());
            assert_eq!(gone, Ok(16));
        }
        let d = c.decide(&p1, &b1);
        assert_eq!(parents(&d), vec!["seed"], "leave={leave}: {d:?}");
        assert!(
            !c.metrics_text()
                .contains(r#"shoal_scheduler_back_to_source_total{by="peer"} 1"#),
            "leave={leave}"
        );
    }
}
