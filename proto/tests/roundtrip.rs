//! Every message survives encode -> frame -> decode over a real async stream, and the Hello
//! exchange and piece transfer work end to end over an in-memory duplex pipe.

use std::net::SocketAddr;

use shoal_proto::*;

fn digest(b: u8) -> Digest {
    Digest::from_bytes([b; 32])
}

fn host(name: &str) -> HostId {
    HostId::new(name).unwrap()
}

fn task() -> TaskMeta {
    TaskMeta {
        blob: digest(1),
        size: 3 * (1 << 20) + 17,
        piece_size: 1 << 20,
    }
}

fn set(count: u32, held: &[u32]) -> PieceSet {
    let mut s = PieceSet::empty(count);
    for i in held {
        assert!(s.insert(*i));
    }
    s
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn parent() -> Parent {
    Parent {
        host_id: host("node-b"),
        addresses: vec![addr("10.0.0.2:4470"), addr("[fd00::2]:4470")],
        pieces: set(4, &[0, 2]),
        is_seed: false,
    }
}

fn origin() -> OriginRef {
    OriginRef {
        reference: "docker://registry.local:5000/library/debian".into(),
        authorization: Some("Bearer abc".into()),
    }
}

fn scheduler_requests() -> Vec<SchedulerRequest> {
    vec![
        SchedulerRequest::RegisterHost(RegisterHost {
            host_id: host("node-a"),
            addresses: vec![addr("10.0.0.1:4470")],
            locality: Locality {
                zone: Some("eu-1a".into()),
                rack: None,
            },
            upload_slots: 8,
            upload_bytes_per_sec: 0,
            is_seed: true,
        }),
        SchedulerRequest::Heartbeat(Heartbeat {
            free_upload_slots: 3,
            upload_bytes_per_sec: 1 << 30,
            download_bytes_per_sec: 5,
        }),
        SchedulerRequest::LeaveHost,
        SchedulerRequest::RegisterTask(RegisterTask {
            task: task(),
            piece_table: Some(vec![[9; 32]; 4]),
            held: Some(set(4, &[3])),
            origin: Some(origin()),
        }),
        SchedulerRequest::RegisterTask(RegisterTask {
            task: task(),
            piece_table: None,
            held: None,
            origin: None,
        }),
        SchedulerRequest::PiecesHeld(PiecesHeld {
            blob: digest(1),
            pieces: PieceReport::Full(set(4, &[0, 1, 2, 3])),
        }),
        SchedulerRequest::PiecesHeld(PiecesHeld {
            blob: digest(1),
            pieces: PieceReport::Added(vec![1, 2]),
        }),
        SchedulerRequest::PiecesHeld(PiecesHeld {
            blob: digest(1),
            pieces: PieceReport::Removed(vec![0]),
        }),
        SchedulerRequest::RequestParents(RequestParents {
            blob: digest(1),
            wanted: set(4, &[1, 3]),
            exclude: vec![host("node-z")],
        }),
        SchedulerRequest::ReportPieceFailure(ReportPieceFailure {
            blob: digest(1),
            parent: host("node-b"),
            piece: Some(2),
            reason: FailureReason::Corrupt,
            detail: "blake3 mismatch".into(),
        }),
        SchedulerRequest::DownloadFinished(DownloadFinished {
            blob: digest(1),
            bytes_from_peers: 10,
            bytes_from_origin: 0,
            elapsed_ms: 12,
        }),
        SchedulerRequest::DownloadFailed(DownloadFailed {
            blob: digest(1),
            reason: "origin returned 404".into(),
        }),
        SchedulerRequest::ListHosts { limit: 50 },
        SchedulerRequest::Preheat(Preheat {
            blobs: vec![task()],
            origin: origin(),
        }),
        SchedulerRequest::PieceHashes(PieceHashes {
            blob: digest(1),
            first: 2,
            hashes: vec![[7; 32], [8; 32]],
        }),
        SchedulerRequest::GetPieceHashes {
            blob: digest(1),
            first: 1,
        },
    ]
}

fn scheduler_replies() -> Vec<SchedulerReply> {
    vec![
        SchedulerReply::Ok,
        SchedulerReply::Registered(Registered {
            heartbeat_interval_ms: 5000,
            host_timeout_ms: 30000,
        }),
        SchedulerReply::Task(TaskInfo {
            task: task(),
            piece_table: Some(vec![[1; 32]; 4]),
        }),
        SchedulerReply::Parents(ParentsReply::Parents(vec![parent()])),
        SchedulerReply::Parents(ParentsReply::BackToSource {
            reason: "no seed".into(),
        }),
        SchedulerReply::Parents(ParentsReply::WaitForSeed {
            retry_after_ms: 200,
        }),
        SchedulerReply::Hosts(HostList {
            hosts: vec![HostInfo {
                host_id: host("node-b"),
                addresses: vec![addr("10.0.0.2:4470")],
                locality: Locality::default(),
                is_seed: true,
            }],
        }),
        SchedulerReply::Preheated(PreheatReply {
            outcomes: vec![
                (
                    digest(1),
                    PreheatOutcome::Ordered {
                        seed: host("seed-a"),
                    },
                ),
                (digest(2), PreheatOutcome::AlreadyWarm),
                (
                    digest(3),
                    PreheatOutcome::NoSeed {
                        reason: "no seed registered".into(),
                    },
                ),
            ],
        }),
        SchedulerReply::Error(ErrorReply::new(ErrorCode::UnknownHost, "register again")),
        SchedulerReply::PieceHashes(PieceHashesReply {
            blob: digest(1),
            first: 0,
            publisher: Some(host("seed-a")),
            hashes: vec![Some([1; 32]), None, Some([3; 32])],
        }),
    ]
}

#[test]
fn piece_hashes_are_bounded() {
    let codec = Codec::new(MAX_VERSION);
    let check = |m: &SchedulerRequest| {
        let bytes = codec.encode(m).unwrap();
        codec.decode::<SchedulerRequest>(&bytes).map(|_| ())
    };
    let too_many = SchedulerRequest::PieceHashes(PieceHashes {
        blob: digest(1),
        first: 0,
        hashes: vec![[0; 32]; MAX_HASHES_PER_MESSAGE + 1],
    });
    assert!(check(&too_many).is_err());
    let none = SchedulerRequest::PieceHashes(PieceHashes {
        blob: digest(1),
        first: 0,
        hashes: vec![],
    });
    assert!(check(&none).is_err());
    let past_the_end = SchedulerRequest::PieceHashes(PieceHashes {
        blob: digest(1),
        first: MAX_PIECES - 1,
        hashes: vec![[0; 32]; 2],
    });
    assert!(check(&past_the_end).is_err());
    let fine = SchedulerRequest::PieceHashes(PieceHashes {
        blob: digest(1),
        first: MAX_PIECES - 2,
        hashes: vec![[0; 32]; 2],
    });
    assert!(check(&fine).is_ok());
}

#[tokio::test]
async fn a_preheat_with_no_blobs_or_too_many_is_refused_on_the_wire() {
    let codec = Codec::default();
    for n in [0usize, MAX_PREHEAT_BLOBS + 1] {
        let req = SchedulerRequest::Preheat(Preheat {
            blobs: vec![task(); n],
            origin: origin(),
        });
        let frame = codec.encode(&req).unwrap();
        let err = codec.decode::<SchedulerRequest>(&frame).unwrap_err();
        assert!(
            err.to_string().contains("preheat blobs"),
            "{n} blobs: {err}"
        );
    }
}

async fn round_trip<M>(msgs: Vec<M>)
where
    M: Message + PartialEq + std::fmt::Debug + Clone + Send + Sync + 'static,
{
    let codec = Codec::default();
    let (mut a, mut b) = tokio::io::duplex(64 * 1024);
    let expected = msgs.clone();
    let writer = tokio::spawn(async move {
        for m in &msgs {
            codec.write(&mut a, m).await.unwrap();
        }
    });
    for want in expected {
        let got: M = codec.read(&mut b).await.unwrap();
        assert_eq!(got, want);
        // The synchronous decoder agrees with the async one.
        let frame = codec.encode(&got).unwrap();
        let (again, used) = codec.decode::<M>(&frame).unwrap();
        assert_eq!(again, want);
        assert_eq!(used, frame.len());
    }
    writer.await.unwrap();
    // Clean end of stream after the last frame.
    assert!(codec.read_or_eof::<_, M>(&mut b).await.unwrap().is_none());
}

#[tokio::test]
async fn scheduler_messages_round_trip() {
    round_trip(scheduler_requests()).await;
    round_trip(scheduler_replies()).await;
    round_trip(vec![
        SchedulerPush::FetchFromOrigin(FetchFromOrigin {
            task: task(),
            origin: origin(),
        }),
        SchedulerPush::PiecesUpdate(PiecesUpdate {
            blob: digest(1),
            parents: vec![parent()],
            removed: vec![host("node-c")],
        }),
    ])
    .await;
    round_trip(vec![
        PushReply::Accepted,
        PushReply::Refused(ErrorReply::new(ErrorCode::Refused, "not a seed")),
    ])
    .await;
}

#[tokio::test]
async fn piece_messages_round_trip() {
    round_trip(vec![
        PieceRequest::GetPiece {
            blob: digest(2),
            index: 7,
        },
        PieceRequest::HeldPieces { blob: digest(2) },
        PieceRequest::WatchHeld { blob: digest(3) },
    ])
    .await;
    round_trip(vec![
        PieceReply::Held(set(9, &[8])),
        PieceReply::Error(PieceError::new(PieceErrorCode::Busy, "8 uploads running")),
        PieceReply::Piece(PieceHeader {
            blob: digest(2),
            index: 1,
            len: 5,
            hash: [7; 32],
        }),
        PieceReply::Table(PieceTableReply {
            task: task(),
            table: vec![[3; 32]; 4],
        }),
        PieceReply::PartialTable(PartialTableReply {
            task: task(),
            hashes: vec![Some([3; 32]), Some([4; 32]), None, None],
        }),
    ])
    .await;
}

#[test]
fn a_partial_table_has_one_entry_per_piece() {
    let codec = Codec::new(MAX_VERSION);
    let check = |hashes: Vec<Option<Blake3Hash>>| {
        let reply = PieceReply::PartialTable(PartialTableReply {
            task: task(),
            hashes,
        });
        let bytes = codec.encode(&reply).unwrap();
        codec.decode::<PieceReply>(&bytes).map(|_| ())
    };
    assert!(check(vec![None; 4]).is_ok());
    let short = check(vec![Some([1; 32]); 3]).unwrap_err();
    assert!(short.to_string().contains("partial piece table"), "{short}");
    assert!(check(vec![None; 5]).is_err());
}

#[tokio::test]
async fn piece_header_then_raw_bytes() {
    let codec = Codec::default();
    let (mut server, mut client) = tokio::io::duplex(1 << 20);
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let header = PieceHeader {
        blob: digest(3),
        index: 4,
        len: body.len() as u32,
        hash: [5; 32],
    };
    let sent = body.clone();
    let writer = tokio::spawn(async move {
        write_piece(&codec, &mut server, &header, &sent)
            .await
            .unwrap();
        codec
            .write(
                &mut server,
                &PieceReply::Error(PieceError::new(PieceErrorCode::NotHeld, "evicted")),
            )
            .await
            .unwrap();
    });
    match read_piece(&codec, &mut client, &digest(3), 4, body.len() as u32)
        .await
        .unwrap()
    {
        PieceResponse::Piece { header: h, bytes } => {
            assert_eq!(h, header);
            assert_eq!(bytes, body);
        }
        other => panic!("expected a piece, got {other:?}"),
    }
    match read_piece(&codec, &mut client, &digest(3), 4, 10)
        .await
        .unwrap()
    {
        PieceResponse::Error(e) => assert_eq!(e.code, PieceErrorCode::NotHeld),
        other => panic!("expected an error, got {other:?}"),
    }
    writer.await.unwrap();
}

#[tokio::test]
async fn hello_negotiates_the_version() {
    let (c, s) = tokio::io::duplex(4096);
    let (mut cr, mut cw) = tokio::io::split(c);
    let (mut sr, mut sw) = tokio::io::split(s);
    let server = tokio::spawn(async move {
        server_handshake(&mut sr, &mut sw, Role::Scheduler, &host("sched-0"), |h| {
            if h.role == Role::Scheduler {
                Err("schedulers do not register".into())
            } else {
                Ok(())
            }
        })
        .await
    });
    let hello = Hello::new(Role::Seed, host("seed-1"));
    let client = client_handshake(&mut cr, &mut cw, &hello).await.unwrap();
    assert_eq!(client.codec, Codec::new(MAX_VERSION));
    assert_eq!(client.role, Role::Scheduler);
    assert_eq!(client.host_id, host("sched-0"));
    let (got, negotiated) = server.await.unwrap().unwrap();
    assert_eq!(got, hello);
    assert_eq!(negotiated.role, Role::Seed);
    assert_eq!(negotiated.host_id, host("seed-1"));
}
