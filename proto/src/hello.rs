//! The first exchange on every connection: who is speaking, in which role, at which version.
//! Rules: docs/protocol.md, "Versioning and the Hello".

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{check_text, Codec, HostId, Message, ProtoError, MAX_VERSION, MIN_VERSION};

/// What a node is to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A peer daemon.
    Peer,
    /// A peer daemon in seed mode (`shoal peer --seed`).
    Seed,
    /// The scheduler.
    Scheduler,
}

/// Sent by the connecting side on the first stream of every connection, in a
/// [`Codec::handshake`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest protocol version the sender speaks.
    pub min_version: u8,
    /// Highest protocol version the sender speaks.
    pub max_version: u8,
    /// The sender's role.
    pub role: Role,
    /// The sender's host id (the scheduler checks it against RegisterHost).
    pub host_id: HostId,
    /// Software name and version, for logs (at most 64 bytes), e.g. `shoal/0.1.0`.
    pub software: String,
}

/// The answer to a [`Hello`], in a [`Codec::handshake`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The connection goes on at `version`.
    Accepted {
        /// The negotiated version: the highest both sides speak.
        version: u8,
        /// The answering side's role.
        role: Role,
        /// The answering side's host id.
        host_id: HostId,
    },
    /// The connection is refused; the sender closes it after this frame.
    Rejected {
        /// Why, for the operator.
        reason: String,
        /// Lowest version the answering side speaks.
        min_version: u8,
        /// Highest version the answering side speaks.
        max_version: u8,
    },
}

impl Message for Hello {
    const NAME: &'static str = "Hello";
    fn validate(&self) -> Result<(), ProtoError> {
        self.host_id.validate()?;
        check_text("software", &self.software, 64)?;
        if self.min_version > self.max_version {
            return Err(ProtoError::invalid(
                "Hello versions",
                format!("min {} > max {}", self.min_version, self.max_version),
            ));
        }
        Ok(())
    }
}

impl Message for HelloReply {
    const NAME: &'static str = "HelloReply";
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            HelloReply::Accepted { host_id, .. } => Ok(host_id.validate()?),
            HelloReply::Rejected { reason, .. } => {
                check_text("reason", reason, crate::MAX_TEXT_LEN)
            }
        }
    }
}

impl Hello {
    /// A Hello offering every version this build speaks.
    pub fn new(role: Role, host_id: HostId) -> Self {
        Hello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            role,
            host_id,
            software: concat!("shoal/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }

    /// The highest version both this build and the sender speak.
    pub fn negotiate(&self) -> Result<u8, ProtoError> {
        let top = self.max_version.min(MAX_VERSION);
        if top < self.min_version.max(MIN_VERSION) {
            return Err(ProtoError::UnsupportedVersion {
                found: self.max_version,
                min: MIN_VERSION,
                max: MAX_VERSION,
            });
        }
        Ok(top)
    }
}

/// The outcome of a successful Hello exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The codec for every later stream of this connection.
    pub codec: Codec,
    /// The other side's role.
    pub role: Role,
    /// The other side's host id.
    pub host_id: HostId,
}

/// Runs the connecting side of the Hello exchange on one stream.
pub async fn client_handshake<R, W>(
    r: &mut R,
    w: &mut W,
    hello: &Hello,
) -> Result<Negotiated, ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let codec = Codec::handshake();
    codec.write(w, hello).await?;
    match codec.read::<_, HelloReply>(r).await? {
        HelloReply::Accepted {
            version,
            role,
            host_id,
        } => {
            if version < hello.min_version.max(MIN_VERSION) || version > hello.max_version.min(MAX_VERSION) {
                return Err(ProtoError::UnsupportedVersion {
                    found: version,
                    min: MIN_VERSION,
                    max: MAX_VERSION,
                });
            }
            Ok(Negotiated {
                codec: Codec::new(version),
                role,
                host_id,
            })
        }
        HelloReply::Rejected {
            reason,
            min_version,
            max_version,
        } => Err(ProtoError::invalid(
            "Hello",
            format!("refused by the other side (it speaks versions {min_version}..={max_version}): {reason}"),
        )),
    }
}

/// Runs the accepting side of the Hello exchange: reads the Hello, calls `accept` to check the
/// caller (its `Err` text is sent back as the rejection reason), and answers.
pub async fn server_handshake<R, W, F>(
    r: &mut R,
    w: &mut W,
    role: Role,
    host_id: &HostId,
    accept: F,
) -> Result<(Hello, Negotiated), ProtoError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
    F: FnOnce(&Hello) -> Result<(), String>,
{
    let codec = Codec::handshake();
    let hello: Hello = codec.read(r).await?;
    let reject = |reason: String| HelloReply::Rejected {
        reason,
        min_version: MIN_VERSION,
        max_version: MAX_VERSION,
    };
    let version = match hello.negotiate() {
        Ok(v) => v,
        Err(e) => {
            codec.write(w, &reject(e.to_string())).await?;
            return Err(e);
        }
    };
    if let Err(reason) = accept(&hello) {
        let reason: String = reason.chars().take(crate::MAX_TEXT_LEN / 4).collect();
        codec.write(w, &reject(reason.clone())).await?;
        return Err(ProtoError::invalid(
            "Hello",
            format!("refused {}: {reason}", hello.host_id),
        ));
    }
    codec
        .write(
            w,
            &HelloReply::Accepted {
                version,
                role,
                host_id: host_id.clone(),
            },
        )
        .await?;
    let negotiated = Negotiated {
        codec: Codec::new(version),
        role: hello.role,
        host_id: hello.host_id.clone(),
    };
    Ok((hello, negotiated))
}
