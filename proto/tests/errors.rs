//! One test per way a frame can be refused: each gives its own error, never a panic.

use shoal_proto::*;

fn frame(version: u8, flags: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![MAGIC[0], MAGIC[1], version, flags];
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn valid_request() -> Vec<u8> {
    Codec::default()
        .encode(&PieceRequest::HeldPieces {
            blob: Digest::from_bytes([1; 32]),
        })
        .unwrap()
}

async fn read_req(bytes: &[u8]) -> Result<PieceRequest, ProtoError> {
    let mut r = bytes;
    Codec::default().read(&mut r).await
}

#[tokio::test]
async fn bad_magic() {
    let mut f = valid_request();
    f[0] = b'G';
    f[1] = b'E';
    let e = read_req(&f).await.unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::BadMagic {
                found: [b'G', b'E'],
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("does not speak the Shoal protocol"));
    assert_eq!(e.close_code(), close_code::PROTOCOL_ERROR);
}

#[tokio::test]
async fn unknown_version() {
    let mut f = valid_request();
    f[2] = MAX_VERSION + 1;
    let e = read_req(&f).await.unwrap_err();
    assert!(
        matches!(e, ProtoError::UnsupportedVersion { found, .. } if found == MAX_VERSION + 1),
        "{e}"
    );
    assert_eq!(e.close_code(), close_code::UNSUPPORTED_VERSION);
    f[2] = 0;
    assert!(matches!(
        read_req(&f).await,
        Err(ProtoError::UnsupportedVersion { found: 0, .. })
    ));
}

#[tokio::test]
async fn reserved_flags() {
    let mut f = valid_request();
    f[3] = 0x80;
    assert!(matches!(
        read_req(&f).await,
        Err(ProtoError::ReservedFlags(0x80))
    ));
}

#[tokio::test]
async fn frame_too_large_is_refused_from_the_header_alone() {
    // Only the header exists: the refusal cannot have waited for (or allocated) the payload.
    let f = frame(MAX_VERSION, 0, MAX_FRAME_LEN + 1, &[]);
    let e = read_req(&f).await.unwrap_err();
    assert!(
        matches!(e, ProtoError::FrameTooLarge { len, max } if len == u64::from(MAX_FRAME_LEN) + 1 && max == MAX_FRAME_LEN),
        "{e}"
    );
    let small = Codec::default().with_max_frame_len(16);
    let mut r: &[u8] = &valid_request();
    assert!(matches!(
        small.read::<_, PieceRequest>(&mut r).await,
        Err(ProtoError::FrameTooLarge { .. })
    ));
}

#[tokio::test]
async fn sender_refuses_to_encode_an_oversize_frame() {
    let codec = Codec::default().with_max_frame_len(8);
    let e = codec
        .encode(&PieceRequest::HeldPieces {
            blob: Digest::from_bytes([1; 32]),
        })
        .unwrap_err();
    assert!(matches!(e, ProtoError::FrameTooLarge { max: 8, .. }), "{e}");
}

#[tokio::test]
async fn truncated_header_and_payload() {
    let f = valid_request();
    assert!(matches!(
        read_req(&f[..5]).await,
        Err(ProtoError::UnexpectedEof {
            what: "frame header"
        })
    ));
    assert!(matches!(
        read_req(&f[..f.len() - 1]).await,
        Err(ProtoError::UnexpectedEof {
            what: "frame payload"
        })
    ));
    assert!(matches!(
        read_req(&[]).await,
        Err(ProtoError::UnexpectedEof {
            what: "frame header"
        })
    ));
    let mut empty: &[u8] = &[];
    assert!(Codec::default()
        .read_or_eof::<_, PieceRequest>(&mut empty)
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        Codec::default().decode::<PieceRequest>(&f[..3]),
        Err(ProtoError::UnexpectedEof { .. })
    ));
}

#[tokio::test]
async fn malformed_payload() {
    // Variant index 9 does not exist in PieceRequest.
    let f = frame(MAX_VERSION, 0, 1, &[9]);
    let e = read_req(&f).await.unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::Malformed {
                message: "PieceRequest",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn trailing_bytes() {
    let mut f = valid_request();
    let len = u32::from_le_bytes([f[4], f[5], f[6], f[7]]) + 2;
    f[4..8].copy_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&[0, 0]);
    let e = read_req(&f).await.unwrap_err();
    assert!(
        matches!(e, ProtoError::TrailingBytes { extra: 2, .. }),
        "{e}"
    );
}

#[tokio::test]
async fn invalid_field_after_decoding() {
    // A piece set whose bitmap is too short for its count is refused as it is decoded (a
    // PieceSet is always whole); one over the protocol's piece limit after decoding.
    let codec = Codec::default();
    let bytes = {
        // PieceReply::Held = variant 1; PieceSet { count: varint 20, bits: len 1, [0] }
        frame(MAX_VERSION, 0, 4, &[1, 20, 1, 0])
    };
    let mut r: &[u8] = &bytes;
    let e = codec.read::<_, PieceReply>(&mut r).await.unwrap_err();
    assert!(matches!(e, ProtoError::Malformed { .. }), "{e}");
    let too_many = PieceReply::Held(PieceSet::empty(shoal_proto::MAX_PIECES + 1));
    let f = codec.encode(&too_many).unwrap();
    assert!(matches!(
        codec.decode::<PieceReply>(&f),
        Err(ProtoError::Invalid {
            field: "piece set",
            ..
        })
    ));

    let bad_host = SchedulerRequest::ReportPieceFailure(ReportPieceFailure {
        blob: Digest::from_bytes([0; 32]),
        parent: serde_host("bad host/"),
        piece: None,
        reason: FailureReason::Timeout,
        detail: String::new(),
    });
    let f = codec.encode(&bad_host).unwrap();
    assert!(matches!(
        codec.decode::<SchedulerRequest>(&f),
        Err(ProtoError::Invalid {
            field: "host id",
            ..
        })
    ));

    let bad_task = SchedulerRequest::RegisterTask(RegisterTask {
        task: TaskMeta {
            blob: Digest::from_bytes([0; 32]),
            size: 10,
            piece_size: 1 << 20,
        },
        piece_table: Some(vec![[0; 32]; 2]),
        held: None,
        origin: None,
    });
    let f = codec.encode(&bad_task).unwrap();
    assert!(matches!(
        codec.decode::<SchedulerRequest>(&f),
        Err(ProtoError::Invalid {
            field: "piece table",
            ..
        })
    ));

    let long_text = SchedulerRequest::DownloadFailed(DownloadFailed {
        blob: Digest::from_bytes([0; 32]),
        reason: "x".repeat(MAX_TEXT_LEN + 1),
    });
    let f = codec.encode(&long_text).unwrap();
    assert!(matches!(
        codec.decode::<SchedulerRequest>(&f),
        Err(ProtoError::Invalid {
            field: "failure reason",
            ..
        })
    ));
}

/// Builds a HostId that skipped validation, as a hostile sender could put on the wire.
fn serde_host(text: &str) -> HostId {
    let wire = postcard::to_allocvec(&text.to_string()).unwrap();
    let (id, _) = postcard::take_from_bytes::<HostId>(&wire).unwrap();
    id
}

#[tokio::test]
async fn oversize_piece_header_is_refused_before_the_body() {
    let codec = Codec::default();
    let header = PieceHeader {
        blob: Digest::from_bytes([1; 32]),
        index: 0,
        len: MAX_PIECE_SIZE + 1,
        hash: [0; 32],
    };
    let f = codec.encode(&PieceReply::Piece(header)).unwrap();
    let mut r: &[u8] = &f;
    let e = read_piece(&codec, &mut r, &header.blob, 0, MAX_PIECE_SIZE + 1)
        .await
        .unwrap_err();
    assert!(matches!(e, ProtoError::BodyTooLarge { .. }), "{e}");
    let mut r: &[u8] = &[];
    assert!(matches!(
        codec.read_body(&mut r, 100, 10).await,
        Err(ProtoError::BodyTooLarge { len: 100, max: 10 })
    ));
}

#[tokio::test]
async fn piece_header_must_match_the_request() {
    let codec = Codec::default();
    let header = PieceHeader {
        blob: Digest::from_bytes([1; 32]),
        index: 3,
        len: 4,
        hash: [0; 32],
    };
    let mut buf = Vec::new();
    write_piece(&codec, &mut buf, &header, b"abcd")
        .await
        .unwrap();
    let mut r: &[u8] = &buf;
    let e = read_piece(&codec, &mut r, &header.blob, 2, 4)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::Invalid {
                field: "piece header",
                ..
            }
        ),
        "{e}"
    );
    let mut r: &[u8] = &buf;
    let e = read_piece(&codec, &mut r, &header.blob, 3, 5)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("should be 5 bytes"), "{e}");
    // Short body: the stream ends inside the piece.
    let mut r: &[u8] = &buf[..buf.len() - 1];
    assert!(matches!(
        read_piece(&codec, &mut r, &header.blob, 3, 4).await,
        Err(ProtoError::UnexpectedEof { what: "piece body" })
    ));
    // A body that disagrees with its header is refused on the sending side.
    assert!(matches!(
        write_piece(&codec, &mut Vec::new(), &header, b"abc").await,
        Err(ProtoError::BodyLengthMismatch {
            declared: 4,
            actual: 3
        })
    ));
}

#[tokio::test]
async fn hello_with_no_common_version_is_rejected_with_a_reply() {
    let (c, s) = tokio::io::duplex(4096);
    let (mut cr, mut cw) = tokio::io::split(c);
    let (mut sr, mut sw) = tokio::io::split(s);
    let me = HostId::new("sched").unwrap();
    let server = tokio::spawn(async move {
        server_handshake(&mut sr, &mut sw, Role::Scheduler, &me, |_| Ok(())).await
    });
    let mut hello = Hello::new(Role::Peer, HostId::new("future-node").unwrap());
    hello.min_version = MAX_VERSION + 1;
    hello.max_version = MAX_VERSION + 3;
    let e = client_handshake(&mut cr, &mut cw, &hello)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refused by the other side"), "{e}");
    assert!(matches!(
        server.await.unwrap(),
        Err(ProtoError::UnsupportedVersion { .. })
    ));
}

#[tokio::test]
async fn hello_refused_by_the_accept_check() {
    let (c, s) = tokio::io::duplex(4096);
    let (mut cr, mut cw) = tokio::io::split(c);
    let (mut sr, mut sw) = tokio::io::split(s);
    let me = HostId::new("peer-a").unwrap();
    let server = tokio::spawn(async move {
        server_handshake(&mut sr, &mut sw, Role::Peer, &me, |h| {
            Err(format!("{} is not in this cluster", h.host_id))
        })
        .await
    });
    let hello = Hello::new(Role::Peer, HostId::new("stranger").unwrap());
    let e = client_handshake(&mut cr, &mut cw, &hello)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("stranger is not in this cluster"),
        "{e}"
    );
    assert!(server.await.unwrap().is_err());
}
