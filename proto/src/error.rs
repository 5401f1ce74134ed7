//! The one error type of the protocol crate: every way a frame or message can be refused.

/// Why a frame could not be read, written or accepted. Every variant closes the stream it came
/// from; see docs/protocol.md, "Errors".
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The underlying stream failed.
    #[error("stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended before a whole frame (or a declared body) had arrived.
    #[error(
        "stream ended in the middle of {what}: the sender closed early or the connection broke"
    )]
    UnexpectedEof {
        /// What was being read: "frame header", "frame payload" or "piece body".
        what: &'static str,
    },
    /// The first two bytes were not the Shoal frame magic: the other end does not speak this protocol.
    #[error("bad frame magic {found:02x?} (expected {expected:02x?}): the other end does not speak the Shoal protocol")]
    BadMagic {
        /// The two bytes received.
        found: [u8; 2],
        /// The magic this side expects.
        expected: [u8; 2],
    },
    /// The frame's version byte is not one this side speaks (or not the negotiated one).
    #[error("unsupported protocol version {found} (this side speaks {min}..={max}): upgrade the older node")]
    UnsupportedVersion {
        /// The version byte received.
        found: u8,
        /// Lowest version accepted here.
        min: u8,
        /// Highest version accepted here.
        max: u8,
    },
    /// Reserved header bits were set: a newer sender is using a feature this side lacks.
    #[error("frame flags {0:#04x} are reserved and must be zero")]
    ReservedFlags(u8),
    /// The declared payload length is larger than allowed; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Declared (or encoded) payload length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The declared raw body length is larger than allowed; nothing was allocated for it.
    #[error("piece body of {len} bytes exceeds the limit of {max} bytes")]
    BodyTooLarge {
        /// Declared body length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The caller's body does not have the length its header declares.
    #[error("piece body is {actual} bytes but its header declares {declared}")]
    BodyLengthMismatch {
        /// Length in the header.
        declared: u32,
        /// Length of the bytes given.
        actual: usize,
    },
    /// The payload is not a valid encoding of the expected message.
    #[error("malformed {message} payload: {source}")]
    Malformed {
        /// The Rust type that was expected.
        message: &'static str,
        /// What postcard could not decode.
        source: postcard::Error,
    },
    /// The payload decoded but left bytes over: sender and receiver disagree on the message.
    #[error("malformed {message} payload: {extra} trailing bytes after the message")]
    TrailingBytes {
        /// The Rust type that was expected.
        message: &'static str,
        /// Number of bytes left over.
        extra: usize,
    },
    /// The message could not be encoded (a bug on the sending side).
    #[error("could not encode {message}: {source}")]
    Encode {
        /// The Rust type being encoded.
        message: &'static str,
        /// What postcard reported.
        source: postcard::Error,
    },
    /// A field decoded but breaks a rule of the protocol (named in the message).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field or value that is wrong.
        field: &'static str,
        /// What rule it breaks.
        reason: String,
    },
}

impl ProtoError {
    /// The QUIC application error code to reset or close with after this error.
    pub fn close_code(&self) -> u32 {
        match self {
            ProtoError::UnsupportedVersion { .. } => crate::close_code::UNSUPPORTED_VERSION,
            ProtoError::Io(_) | ProtoError::UnexpectedEof { .. } => crate::close_code::CANCELLED,
            _ => crate::close_code::PROTOCOL_ERROR,
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ProtoError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl From<shoal_types::IdError> for ProtoError {
    /// A digest, host id or piece set that breaks its rule is an invalid field.
    fn from(e: shoal_types::IdError) -> Self {
        ProtoError::Invalid {
            field: e.what,
            reason: e.reason,
        }
    }
}
