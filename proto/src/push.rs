//! Messages the scheduler pushes to a peer on a stream it opens: back-to-source orders for
//! seeds and parent updates. Fields: docs/protocol.md, "Messages".

use serde::{Deserialize, Serialize};

use crate::scheduler::check_parents;
use crate::{
    Digest, ErrorReply, HostId, Message, OriginRef, Parent, ProtoError, TaskMeta, MAX_PARENTS,
};

/// Scheduler -> seed: fetch this blob from its origin now (back-to-source on the scheduler's behalf).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchFromOrigin {
    /// Blob, size and piece size.
    pub task: TaskMeta,
    /// Where to fetch it.
    pub origin: OriginRef,
}

/// Scheduler -> peer: the parents of an ongoing download changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiecesUpdate {
    /// The blob.
    pub blob: Digest,
    /// New parents, or parents whose held pieces changed.
    pub parents: Vec<Parent>,
    /// Parents that are gone or blocked.
    pub removed: Vec<HostId>,
}

/// Every message the scheduler pushes to a peer: on a stream the scheduler opens on the
/// connection the peer made, one [`PushReply`] each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerPush {
    /// Seed only: fetch a blob from its origin.
    FetchFromOrigin(FetchFromOrigin),
    /// Parents of a download changed.
    PiecesUpdate(PiecesUpdate),
}

/// The peer's answer to a [`SchedulerPush`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushReply {
    /// Taken on.
    Accepted,
    /// Refused, with why.
    Refused(ErrorReply),
}

impl Message for SchedulerPush {
    const NAME: &'static str = "SchedulerPush";
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            SchedulerPush::FetchFromOrigin(f) => {
                f.task.validate()?;
                f.origin.validate()
            }
            SchedulerPush::PiecesUpdate(u) => {
                check_parents(&u.parents)?;
                if u.removed.len() > MAX_PARENTS * 4 {
                    return Err(ProtoError::invalid(
                        "removed parents",
                        format!("{} hosts; at most {}", u.removed.len(), MAX_PARENTS * 4),
                    ));
                }
                Ok(u.removed.iter().try_for_each(HostId::validate)?)
            }
        }
    }
}

impl Message for PushReply {
    const NAME: &'static str = "PushReply";
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            PushReply::Accepted => Ok(()),
            PushReply::Refused(e) => e.validate(),
        }
    }
}
