//! Messages between peers: ask for one piece (answered by a header and the raw bytes) or for
//! the set of pieces held. Fields: docs/protocol.md, "Piece exchange".

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    check_text, Blake3Hash, Codec, Digest, Message, PieceSet, ProtoError, MAX_PIECE_SIZE,
    MAX_TEXT_LEN,
};

/// A request from one peer to another: one per bidirectional stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceRequest {
    /// Send piece `index` of `blob`; reply [`PieceReply::Piece`] followed by the bytes.
    GetPiece {
        /// The blob.
        blob: Digest,
        /// Zero-based piece index.
        index: u32,
    },
    /// Which pieces of `blob` do you hold? Reply [`PieceReply::Held`].
    HeldPieces {
        /// The blob.
        blob: Digest,
    },
    /// Send your geometry and piece table of `blob`; reply [`PieceReply::Table`], or from
    /// version 4 [`PieceReply::PartialTable`] while the holder's own table is not whole. Used
    /// when no scheduler answers (holders found through the DHT); the table is trusted no more
    /// than a scheduler-published one: the whole blob is checked against its sha256 before it
    /// counts.
    PieceTable {
        /// The blob.
        blob: Digest,
    },
    /// Version 3: keep me told which pieces of `blob` you hold. The reply is a
    /// [`PieceReply::Held`] frame whenever the set changes (the first as soon as any piece is
    /// held), until the asker stops reading; so a child learns of a new piece within
    /// milliseconds instead of at its next [`PieceRequest::HeldPieces`] poll.
    WatchHeld {
        /// The blob.
        blob: Digest,
    },
}

/// A holder's geometry and piece table of one blob (answer to [`PieceRequest::PieceTable`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceTableReply {
    /// Size and piece size.
    pub task: crate::TaskMeta,
    /// One BLAKE3 hash per piece.
    pub table: Vec<Blake3Hash>,
}

/// Version 4: a holder's geometry and the piece hashes it knows so far, while it still imports
/// the blob or streams it in (answer to [`PieceRequest::PieceTable`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialTableReply {
    /// Size and piece size.
    pub task: crate::TaskMeta,
    /// One entry per piece: its BLAKE3 hash, or `None` while the holder does not know it.
    pub hashes: Vec<Option<Blake3Hash>>,
}

/// Announces the raw piece bytes that follow this frame on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceHeader {
    /// The blob.
    pub blob: Digest,
    /// The piece index.
    pub index: u32,
    /// Exactly this many raw bytes follow (at most [`MAX_PIECE_SIZE`]).
    pub len: u32,
    /// BLAKE3 of those bytes as the sender's piece table records it; the receiver checks the
    /// bytes against its own copy of the table, never against this field alone.
    pub hash: Blake3Hash,
}

/// Why a peer did not send what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PieceErrorCode {
    /// This peer does not hold the piece (or the blob).
    NotHeld,
    /// All upload slots are in use; retry after `retry_after_ms` or ask another parent.
    Busy,
    /// The request broke a rule (e.g. index past the end).
    BadRequest,
    /// The piece is held but could not be read.
    Internal,
}

/// A refused piece request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceError {
    /// What to do about it.
    pub code: PieceErrorCode,
    /// Details (at most [`MAX_TEXT_LEN`] bytes).
    pub message: String,
    /// For [`PieceErrorCode::Busy`]: suggested wait before retrying, in milliseconds.
    pub retry_after_ms: u32,
}

/// The answer to a [`PieceRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceReply {
    /// The piece: `len` raw bytes follow this frame.
    Piece(PieceHeader),
    /// The pieces of the blob this peer holds.
    Held(PieceSet),
    /// Refused.
    Error(PieceError),
    /// The geometry and piece table asked for.
    Table(PieceTableReply),
    /// Version 4: the geometry and the hashes known so far (the holder's table is not whole).
    PartialTable(PartialTableReply),
}

impl PieceError {
    /// Builds an error, cutting the message to [`MAX_TEXT_LEN`] bytes.
    pub fn new(code: PieceErrorCode, message: impl Into<String>) -> Self {
        PieceError {
            code,
            message: crate::truncate_text(message.into(), MAX_TEXT_LEN),
            retry_after_ms: 0,
        }
    }
}

impl Message for PieceRequest {
    const NAME: &'static str = "PieceRequest";
}

impl Message for PieceReply {
    const NAME: &'static str = "PieceReply";
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            PieceReply::Piece(h) if h.len > MAX_PIECE_SIZE => Err(ProtoError::BodyTooLarge {
                len: u64::from(h.len),
                max: MAX_PIECE_SIZE,
            }),
            PieceReply::Piece(_) => Ok(()),
            PieceReply::Held(set) => crate::check_piece_set(set),
            PieceReply::Error(e) => check_text("piece error message", &e.message, MAX_TEXT_LEN),
            PieceReply::Table(t) => {
                t.task.validate()?;
                t.task.validate_piece_table(&t.table)
            }
            PieceReply::PartialTable(t) => {
                t.task.validate()?;
                t.task
                    .check_table_len("partial piece table", t.hashes.len())
            }
        }
    }
}

/// What a piece request brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceResponse {
    /// The header and the bytes, not yet verified against the piece table.
    Piece {
        /// The header as received.
        header: PieceHeader,
        /// Exactly `header.len` bytes.
        bytes: Vec<u8>,
    },
    /// The held set.
    Held(PieceSet),
    /// The other peer refused.
    Error(PieceError),
}

/// Server side: answers a GetPiece with the header frame and then the raw bytes.
pub async fn write_piece<W>(
    codec: &Codec,
    w: &mut W,
    header: &PieceHeader,
    bytes: &[u8],
) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    if bytes.len() != header.len as usize {
        return Err(ProtoError::BodyLengthMismatch {
            declared: header.len,
            actual: bytes.len(),
        });
    }
    codec.write(w, &PieceReply::Piece(*header)).await?;
    codec.write_body(w, header.len, bytes).await
}

/// Client side: reads the reply to `GetPiece { blob, index }`; a piece must be the one asked
/// for and exactly `expected_len` bytes long (from the task's geometry), checked before the
/// body is allocated.
pub async fn read_piece<R>(
    codec: &Codec,
    r: &mut R,
    blob: &Digest,
    index: u32,
    expected_len: u32,
) -> Result<PieceResponse, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    match codec.read::<_, PieceReply>(r).await? {
        PieceReply::Piece(header) => {
            if header.blob != *blob || header.index != index {
                return Err(ProtoError::invalid(
                    "piece header",
                    format!(
                        "asked for piece {index} of {blob}, got piece {} of {}",
                        header.index, header.blob
                    ),
                ));
            }
            if header.len != expected_len {
                return Err(ProtoError::invalid(
                    "piece header",
                    format!(
                        "piece {index} of {blob} should be {expected_len} bytes, header says {}",
                        header.len
                    ),
                ));
            }
            let bytes = codec.read_body(r, header.len, MAX_PIECE_SIZE).await?;
            Ok(PieceResponse::Piece { header, bytes })
        }
        PieceReply::Held(set) => Ok(PieceResponse::Held(set)),
        PieceReply::Error(e) => Ok(PieceResponse::Error(e)),
        PieceReply::Table(_) | PieceReply::PartialTable(_) => Err(ProtoError::invalid(
            "piece reply",
            format!("asked for piece {index} of {blob}, got a piece table"),
        )),
    }
}
