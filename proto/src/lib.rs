//! Shoal's wire protocol: messages between peers and the scheduler, framing, versions and limits.
//!
//! This crate defines bytes, not policy: what each message holds, how it is framed
//! ([`Codec`]), which versions are spoken ([`Hello`]) and how large anything may be. It does no
//! networking of its own; the codec works over any tokio `AsyncRead`/`AsyncWrite` (a QUIC stream).
//! The contract, with byte layouts, is docs/protocol.md.
//!
//! Streams: every request opens its own QUIC bidirectional stream, writes one frame, finishes
//! its side, and reads one reply frame (plus, for a piece, the raw bytes the reply declares).

mod error;
mod exchange;
mod frame;
mod hello;
mod pieces;
mod push;
mod scheduler;

/// A BLAKE3 hash of one piece (or chunk): 32 raw bytes.
pub type Blake3Hash = [u8; 32];
pub use error::ProtoError;
pub use exchange::{
    read_piece, write_piece, PartialTableReply, PieceError, PieceErrorCode, PieceHeader,
    PieceReply, PieceRequest, PieceResponse, PieceTableReply,
};
pub use frame::{Codec, FrameHeader, Message, HEADER_LEN, MAGIC};
pub use hello::{client_handshake, server_handshake, Hello, HelloReply, Negotiated, Role};
pub use pieces::{check_piece_set, default_piece_size, TaskMeta};
pub use push::{FetchFromOrigin, PiecesUpdate, PushReply, SchedulerPush};
pub use scheduler::{
    DownloadFailed, DownloadFinished, ErrorCode, ErrorReply, FailureReason, Heartbeat, HostInfo,
    HostList, Locality, OriginRef, Parent, ParentsReply, PieceHashes, PieceHashesReply,
    PieceReport, PiecesHeld, Preheat, PreheatOutcome, PreheatReply, RegisterHost, RegisterTask,
    Registered, ReportPieceFailure, RequestParents, SchedulerReply, SchedulerRequest, TaskInfo,
    MAX_AUTHORIZATION_LEN, MAX_HASHES_PER_MESSAGE, MAX_HOST_LIST, MAX_LABEL_LEN,
    MAX_ORIGIN_REF_LEN, MAX_PREHEAT_BLOBS,
};
/// The shared identities, carried on the wire as they are (crates/shoal-types).
pub use shoal_types::{Digest, HostId, IdError, PieceSet, MAX_HOST_ID_LEN};

/// Lowest protocol version this build speaks.
pub const MIN_VERSION: u8 = 1;
/// Highest protocol version this build speaks (the one it prefers). Version 2 appends
/// `SchedulerRequest::{PieceHashes, GetPieceHashes}` and `SchedulerReply::PieceHashes`; every
/// version-1 message encodes the same in both, and a version-1 connection never carries them.
/// Version 3 appends `PieceRequest::WatchHeld` in the same way, and version 4
/// `PieceReply::PartialTable`.
pub const MAX_VERSION: u8 = 4;
/// First version with streamed piece hashes ([`PieceHashes`]).
pub const PIECE_HASHES_VERSION: u8 = 2;
/// First version with pushed held sets ([`PieceRequest::WatchHeld`]).
pub const WATCH_HELD_VERSION: u8 = 3;
/// First version whose holders answer a piece-table request with the hashes they know so far
/// ([`PieceReply::PartialTable`]).
pub const PARTIAL_TABLE_VERSION: u8 = 4;

/// ALPN of a peer's piece server (peer <-> peer connections), version 1.
pub const ALPN_PEER: &[u8] = b"shoal-peer/1";
/// ALPN of the scheduler (peer -> scheduler connections), version 1.
pub const ALPN_SCHEDULER: &[u8] = b"shoal-sched/1";

/// Largest frame payload: 4 MiB (a full piece table of [`MAX_PIECES`] hashes is 2 MiB).
pub const MAX_FRAME_LEN: u32 = 4 << 20;
/// Largest Hello or HelloReply payload.
pub const MAX_HELLO_FRAME_LEN: u32 = 4 << 10;
/// Largest raw body after a frame: one piece.
pub const MAX_BODY_LEN: u32 = MAX_PIECE_SIZE;
/// Smallest piece size: 64 KiB.
pub const MIN_PIECE_SIZE: u32 = 64 << 10;
/// Largest piece size: 16 MiB.
pub const MAX_PIECE_SIZE: u32 = 16 << 20;
/// Most pieces in one blob.
pub const MAX_PIECES: u32 = 1 << 16;
/// Most addresses of one host.
pub const MAX_ADDRESSES: usize = 16;
/// Most parents in one reply or update.
pub const MAX_PARENTS: usize = 64;
/// Longest free-text field (error messages, reasons) in bytes.
pub const MAX_TEXT_LEN: usize = 1024;

/// QUIC application error codes used to close a stream or connection after an error.
pub mod close_code {
    /// Normal end.
    pub const OK: u32 = 0;
    /// The other side broke the protocol (bad frame, bad message).
    pub const PROTOCOL_ERROR: u32 = 1;
    /// No common protocol version.
    pub const UNSUPPORTED_VERSION: u32 = 2;
    /// The request was abandoned (timeout, shutdown, broken stream).
    pub const CANCELLED: u32 = 3;
    /// The Hello was refused (wrong role or host id).
    pub const REFUSED: u32 = 4;
}

/// Checks a free-text field's length.
pub(crate) fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), ProtoError> {
    if text.len() > max {
        return Err(ProtoError::invalid(
            field,
            format!("{} bytes; at most {max} are allowed", text.len()),
        ));
    }
    Ok(())
}

/// Cuts text to at most `max` bytes on a character boundary.
pub(crate) fn truncate_text(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}
