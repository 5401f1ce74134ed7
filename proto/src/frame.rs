//! Framing: an 8-byte header (magic, version, flags, length) and a postcard payload, plus raw
//! bodies of declared, bounded length. Byte layout and rules: docs/protocol.md, "Framing".

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{ProtoError, MAX_BODY_LEN, MAX_FRAME_LEN, MAX_VERSION, MIN_VERSION};

/// The two bytes every frame starts with: "SH".
pub const MAGIC: [u8; 2] = *b"SH";

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 8;

/// Buffer reserved before a payload starts arriving; the rest grows with the bytes received,
/// so a peer that declares a large frame and sends nothing costs little memory.
const INITIAL_PAYLOAD_CAPACITY: usize = 64 * 1024;

/// A message that can travel in a frame: encodable, decodable and checkable after decoding.
pub trait Message: Serialize + DeserializeOwned {
    /// The name used in error messages.
    const NAME: &'static str;

    /// Checks the rules serde cannot (lengths, ranges, cross-field agreement).
    fn validate(&self) -> Result<(), ProtoError> {
        Ok(())
    }
}

/// The decoded fixed header of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version the payload is encoded in.
    pub version: u8,
    /// Length of the postcard payload that follows, in bytes.
    pub len: u32,
}

impl FrameHeader {
    /// Encodes the header: magic, version, flags (0), length (u32 little-endian).
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let l = self.len.to_le_bytes();
        [MAGIC[0], MAGIC[1], self.version, 0, l[0], l[1], l[2], l[3]]
    }
}

/// Reads and writes frames of one protocol version with one size limit.
///
/// A connection starts with [`Codec::handshake`] for the Hello exchange and then uses
/// [`Codec::new`] with the negotiated version for every other stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    write_version: u8,
    accept_min: u8,
    accept_max: u8,
    max_frame_len: u32,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new(MAX_VERSION)
    }
}

impl Codec {
    /// A codec that writes and accepts exactly `version`, with the default [`MAX_FRAME_LEN`].
    pub const fn new(version: u8) -> Self {
        Codec {
            write_version: version,
            accept_min: version,
            accept_max: version,
            max_frame_len: MAX_FRAME_LEN,
        }
    }

    /// The codec for the Hello exchange: writes [`MIN_VERSION`] (which every node can read)
    /// and accepts any supported version; small frames only.
    pub const fn handshake() -> Self {
        Codec {
            write_version: MIN_VERSION,
            accept_min: MIN_VERSION,
            accept_max: MAX_VERSION,
            max_frame_len: crate::MAX_HELLO_FRAME_LEN,
        }
    }

    /// The same codec with a lower (or higher) frame size limit.
    pub const fn with_max_frame_len(mut self, max_frame_len: u32) -> Self {
        self.max_frame_len = max_frame_len;
        self
    }

    /// The version this codec writes.
    pub const fn version(&self) -> u8 {
        self.write_version
    }

    /// The frame size limit in force.
    pub const fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Checks a received header; the length is checked before anything is allocated for it.
    pub fn parse_header(&self, bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, ProtoError> {
        let [m0, m1, version, flags, l0, l1, l2, l3] = *bytes;
        if [m0, m1] != MAGIC {
            return Err(ProtoError::BadMagic {
                found: [m0, m1],
                expected: MAGIC,
            });
        }
        if version < self.accept_min || version > self.accept_max {
            return Err(ProtoError::UnsupportedVersion {
                found: version,
                min: self.accept_min,
                max: self.accept_max,
            });
        }
        if flags != 0 {
            return Err(ProtoError::ReservedFlags(flags));
        }
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if len > self.max_frame_len {
            return Err(ProtoError::FrameTooLarge {
                len: u64::from(len),
                max: self.max_frame_len,
            });
        }
        Ok(FrameHeader { version, len })
    }

    /// Encodes one message as a whole frame (header and payload).
    pub fn encode<M: Message>(&self, msg: &M) -> Result<Vec<u8>, ProtoError> {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&[0u8; HEADER_LEN]);
        let mut buf = postcard::to_extend(msg, buf).map_err(|source| ProtoError::Encode {
            message: M::NAME,
            source,
        })?;
        let payload_len = buf.len() - HEADER_LEN;
        let len = u32::try_from(payload_len)
            .ok()
            .filter(|len| *len <= self.max_frame_len)
            .ok_or(ProtoError::FrameTooLarge {
                len: payload_len as u64,
                max: self.max_frame_len,
            })?;
        let header = FrameHeader {
            version: self.write_version,
            len,
        };
        buf[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(buf)
    }

    /// Decodes one frame from the start of `bytes`; returns the message and the bytes used.
    pub fn decode<M: Message>(&self, bytes: &[u8]) -> Result<(M, usize), ProtoError> {
        let Some((head, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(ProtoError::UnexpectedEof {
                what: "frame header",
            });
        };
        let header = self.parse_header(head)?;
        let payload = rest
            .get(..header.len as usize)
            .ok_or(ProtoError::UnexpectedEof {
                what: "frame payload",
            })?;
        let msg = decode_payload::<M>(payload)?;
        Ok((msg, HEADER_LEN + payload.len()))
    }

    /// Writes one message as a frame.
    pub async fn write<W, M>(&self, w: &mut W, msg: &M) -> Result<(), ProtoError>
    where
        W: AsyncWrite + Unpin + ?Sized,
        M: Message,
    {
        let frame = self.encode(msg)?;
        w.write_all(&frame).await?;
        w.flush().await?;
        Ok(())
    }

    /// Reads exactly one frame; the end of the stream before it is an error.
    pub async fn read<R, M>(&self, r: &mut R) -> Result<M, ProtoError>
    where
        R: AsyncRead + Unpin + ?Sized,
        M: Message,
    {
        self.read_or_eof(r).await?.ok_or(ProtoError::UnexpectedEof {
            what: "frame header",
        })
    }

    /// Reads one frame, or `None` if the stream ended cleanly before its first byte.
    pub async fn read_or_eof<R, M>(&self, r: &mut R) -> Result<Option<M>, ProtoError>
    where
        R: AsyncRead + Unpin + ?Sized,
        M: Message,
    {
        let mut head = [0u8; HEADER_LEN];
        let mut filled = 0;
        while filled < HEADER_LEN {
            let n = r.read(&mut head[filled..]).await?;
            if n == 0 {
                if filled == 0 {
                    return Ok(None);
                }
                return Err(ProtoError::UnexpectedEof {
                    what: "frame header",
                });
            }
            filled += n;
        }
        let header = self.parse_header(&head)?;
        let len = header.len as usize;
        let mut payload = Vec::with_capacity(len.min(INITIAL_PAYLOAD_CAPACITY));
        r.take(u64::from(header.len))
            .read_to_end(&mut payload)
            .await?;
        if payload.len() != len {
            return Err(ProtoError::UnexpectedEof {
                what: "frame payload",
            });
        }
        decode_payload::<M>(&payload).map(Some)
    }

    /// Writes a raw body (piece bytes) that a preceding frame declared to be `declared` bytes long.
    pub async fn write_body<W>(
        &self,
        w: &mut W,
        declared: u32,
        body: &[u8],
    ) -> Result<(), ProtoError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        if body.len() != declared as usize {
            return Err(ProtoError::BodyLengthMismatch {
                declared,
                actual: body.len(),
            });
        }
        check_body_len(u64::from(declared), MAX_BODY_LEN)?;
        w.write_all(body).await?;
        w.flush().await?;
        Ok(())
    }

    /// Reads a raw body of `declared` bytes, refusing (before allocating) more than `max`.
    pub async fn read_body<R>(
        &self,
        r: &mut R,
        declared: u32,
        max: u32,
    ) -> Result<Vec<u8>, ProtoError>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        check_body_len(u64::from(declared), max.min(MAX_BODY_LEN))?;
        let mut body = vec![0u8; declared as usize];
        self.read_body_into(r, &mut body).await?;
        Ok(body)
    }

    /// Reads a raw body into the caller's buffer, which must be exactly the declared length.
    pub async fn read_body_into<R>(&self, r: &mut R, body: &mut [u8]) -> Result<(), ProtoError>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        check_body_len(body.len() as u64, MAX_BODY_LEN)?;
        match r.read_exact(body).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(ProtoError::UnexpectedEof { what: "piece body" })
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn check_body_len(len: u64, max: u32) -> Result<(), ProtoError> {
    if len > u64::from(max) {
        return Err(ProtoError::BodyTooLarge { len, max });
    }
    Ok(())
}

/// Decodes and validates one payload; every byte must belong to the message.
fn decode_payload<M: Message>(payload: &[u8]) -> Result<M, ProtoError> {
    let (msg, rest) =
        postcard::take_from_bytes::<M>(payload).map_err(|source| ProtoError::Malformed {
            message: M::NAME,
            source,
        })?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes {
            message: M::NAME,
            extra: rest.len(),
        });
    }
    msg.validate()?;
    Ok(msg)
}
