//! Messages between a peer and the scheduler: registration, tasks, piece availability, parent
//! selection and failure reports. Fields: docs/protocol.md, "Scheduler".

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    check_text, Blake3Hash, Digest, HostId, Message, PieceSet, ProtoError, TaskMeta, MAX_ADDRESSES,
    MAX_PARENTS, MAX_TEXT_LEN,
};

/// Longest zone or rack label (a Kubernetes label value).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest origin reference in bytes.
pub const MAX_ORIGIN_REF_LEN: usize = 4096;
/// Longest forwarded Authorization header value in bytes.
pub const MAX_AUTHORIZATION_LEN: usize = 16 * 1024;
/// Most hosts one [`HostList`] carries.
pub const MAX_HOST_LIST: usize = 1024;
/// Most blobs one [`Preheat`] names (an image's config and layers, or several images).
pub const MAX_PREHEAT_BLOBS: usize = 1024;
/// Most piece hashes one [`PieceHashes`] or [`PieceHashesReply`] carries (page by `first`).
pub const MAX_HASHES_PER_MESSAGE: usize = 4096;

/// Where a host sits, for locality-aware parent selection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Locality {
    /// Zone label (e.g. `topology.kubernetes.io/zone`), if known.
    pub zone: Option<String>,
    /// Rack label, if known.
    pub rack: Option<String>,
}

/// Peer -> scheduler: "I exist, here is how to reach me". Sent first, and again after an
/// [`ErrorCode::UnknownHost`] reply (a restarted scheduler).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterHost {
    /// Must equal the host id of the connection's Hello.
    pub host_id: HostId,
    /// QUIC addresses other peers reach this host's piece server at (1 to [`MAX_ADDRESSES`]).
    pub addresses: Vec<SocketAddr>,
    /// Zone and rack.
    pub locality: Locality,
    /// Concurrent uploads this host serves.
    pub upload_slots: u32,
    /// Upload rate limit in bytes per second (0: unlimited).
    pub upload_bytes_per_sec: u64,
    /// True for `shoal peer --seed`.
    pub is_seed: bool,
}

/// Scheduler -> peer: the answer to [`RegisterHost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// How often to send [`Heartbeat`], in milliseconds.
    pub heartbeat_interval_ms: u32,
    /// After this long without a heartbeat the host is forgotten, in milliseconds.
    pub host_timeout_ms: u32,
}

/// Peer -> scheduler: "still here", with the load figures parent selection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Upload slots free right now.
    pub free_upload_slots: u32,
    /// Bytes per second uploaded over the last interval.
    pub upload_bytes_per_sec: u64,
    /// Bytes per second downloaded over the last interval.
    pub download_bytes_per_sec: u64,
}

/// Peer -> scheduler: "I want (or hold) this blob". Opens the task if the scheduler does not
/// know it, and re-announces held pieces after a scheduler restart or fail-over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterTask {
    /// Blob, size and piece size.
    pub task: TaskMeta,
    /// BLAKE3 of every piece, when the peer knows it (Shoal data blobs; after back-to-source).
    pub piece_table: Option<Vec<Blake3Hash>>,
    /// Pieces the peer already holds, if any.
    pub held: Option<PieceSet>,
    /// Where the blob comes from when nobody holds it.
    pub origin: Option<OriginRef>,
}

/// Scheduler -> peer: what the scheduler knows of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Blob, size and piece size (the scheduler's, which wins over the peer's guess).
    pub task: TaskMeta,
    /// The published piece table, once some peer has one.
    pub piece_table: Option<Vec<Blake3Hash>>,
}

/// How an origin is reached: a reference `shoal-origin` parses (`docker://HOST/REPO`,
/// `s3://BUCKET/PREFIX`, ...), plus the client's credentials to forward.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRef {
    /// The origin reference (at most [`MAX_ORIGIN_REF_LEN`] bytes).
    pub reference: String,
    /// The client's Authorization header, forwarded to the origin; never logged.
    pub authorization: Option<String>,
}

impl std::fmt::Debug for OriginRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginRef")
            .field("reference", &self.reference)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Peer -> scheduler: pieces of a blob this peer now holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiecesHeld {
    /// The blob.
    pub blob: Digest,
    /// The whole set, or only what was added since the last report.
    pub pieces: PieceReport,
}

/// A full or incremental report of held pieces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceReport {
    /// Every piece held now (replaces what the scheduler knew).
    Full(PieceSet),
    /// Pieces newly held since the last report.
    Added(Vec<u32>),
    /// Pieces no longer held (evicted).
    Removed(Vec<u32>),
}

/// Peer -> scheduler: "whom should I fetch these pieces from?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestParents {
    /// The blob.
    pub blob: Digest,
    /// The pieces still wanted (a byte-range download wants only some).
    pub wanted: PieceSet,
    /// Parents to leave out (already tried and failed).
    pub exclude: Vec<HostId>,
}

/// One candidate parent for a download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    /// The parent's host id (its certificate's name).
    pub host_id: HostId,
    /// Its piece server's QUIC addresses.
    pub addresses: Vec<SocketAddr>,
    /// Pieces of the blob it holds now.
    pub pieces: PieceSet,
    /// True for a seed.
    pub is_seed: bool,
}

/// Scheduler -> peer: the answer to [`RequestParents`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParentsReply {
    /// Fetch from these parents, best first.
    Parents(Vec<Parent>),
    /// Nobody holds the pieces and no seed is available: fetch from the origin.
    BackToSource {
        /// Why, for logs.
        reason: String,
    },
    /// A seed is fetching from the origin; ask again after this many milliseconds.
    WaitForSeed {
        /// Suggested delay before the next [`RequestParents`].
        retry_after_ms: u32,
    },
}

/// Why a parent failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureReason {
    /// Could not connect or the TLS handshake failed.
    Connect,
    /// The parent answered with an error (not held, bad request).
    Refused,
    /// The parent was busy (upload slots full).
    Busy,
    /// The transfer stalled or timed out.
    Timeout,
    /// The bytes did not match the piece table: the parent is serving bad data.
    Corrupt,
    /// The parent broke the protocol.
    Protocol,
}

/// Peer -> scheduler: a parent failed for one piece (the scheduler blocks it for this task).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportPieceFailure {
    /// The blob.
    pub blob: Digest,
    /// The parent that failed.
    pub parent: HostId,
    /// The piece, when the failure concerns one.
    pub piece: Option<u32>,
    /// What went wrong.
    pub reason: FailureReason,
    /// Details for the operator (at most [`MAX_TEXT_LEN`] bytes).
    pub detail: String,
}

/// Peer -> scheduler: the whole blob is stored and matches its sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadFinished {
    /// The blob.
    pub blob: Digest,
    /// Bytes received from other peers.
    pub bytes_from_peers: u64,
    /// Bytes received from the origin.
    pub bytes_from_origin: u64,
    /// Wall time of the download in milliseconds.
    pub elapsed_ms: u64,
}

/// Peer -> scheduler: the download was given up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadFailed {
    /// The blob.
    pub blob: Digest,
    /// Why (at most [`MAX_TEXT_LEN`] bytes).
    pub reason: String,
}

/// Back-to-source peer -> scheduler (version 2): BLAKE3 of pieces `first..first+len` of a plain
/// blob, computed as they arrive from the origin, before the whole blob's sha256 could be
/// checked. The scheduler takes them only from a host it sent to the origin for the blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceHashes {
    /// The blob.
    pub blob: Digest,
    /// Index of the first hash.
    pub first: u32,
    /// One hash per piece from `first` on (1 to [`MAX_HASHES_PER_MESSAGE`]).
    pub hashes: Vec<Blake3Hash>,
}

/// Scheduler -> peer (version 2): the piece hashes published so far, from `first` on; `None`
/// where none is known yet. Answer to [`SchedulerRequest::GetPieceHashes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceHashesReply {
    /// The blob.
    pub blob: Digest,
    /// Index of the first entry.
    pub first: u32,
    /// The host that published them (to report if the blob's sha256 later fails).
    pub publisher: Option<HostId>,
    /// At most [`MAX_HASHES_PER_MESSAGE`] entries.
    pub hashes: Vec<Option<Blake3Hash>>,
}

fn check_hash_count(field: &'static str, n: usize, need_one: bool) -> Result<(), ProtoError> {
    if n > MAX_HASHES_PER_MESSAGE || (need_one && n == 0) {
        return Err(ProtoError::invalid(
            field,
            format!("{n} hashes; at most {MAX_HASHES_PER_MESSAGE} are allowed"),
        ));
    }
    Ok(())
}

/// One known host, for DHT bootstrap and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host id.
    pub host_id: HostId,
    /// Its QUIC addresses.
    pub addresses: Vec<SocketAddr>,
    /// Zone and rack.
    pub locality: Locality,
    /// True for a seed.
    pub is_seed: bool,
}

/// Scheduler -> peer: some known hosts (answer to [`SchedulerRequest::ListHosts`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostList {
    /// At most [`MAX_HOST_LIST`] hosts.
    pub hosts: Vec<HostInfo>,
}

/// Operator (`shoal preheat`) -> scheduler: have seeds fetch these blobs from `origin` now,
/// before any peer asks. Sent on a connection with a cluster certificate; no registration needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preheat {
    /// Blob, size and piece size of each blob (1 to [`MAX_PREHEAT_BLOBS`]).
    pub blobs: Vec<TaskMeta>,
    /// Where the seeds fetch them (`docker://HOST/REPO`).
    pub origin: OriginRef,
}

/// What the scheduler did with one blob of a [`Preheat`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreheatOutcome {
    /// This seed was ordered to fetch the blob from the origin.
    Ordered {
        /// The seed.
        seed: HostId,
    },
    /// A seed holds the blob already or is fetching it.
    AlreadyWarm,
    /// No registered seed can take the blob (none, all full, or limits reached).
    NoSeed {
        /// Why, for the operator.
        reason: String,
    },
}

/// Scheduler -> operator: the answer to [`Preheat`], one outcome per blob in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreheatReply {
    /// (blob, outcome) for every blob asked for.
    pub outcomes: Vec<(Digest, PreheatOutcome)>,
}

/// Every request a peer sends the scheduler: one per bidirectional stream, one
/// [`SchedulerReply`] each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerRequest {
    /// Register this host; reply [`SchedulerReply::Registered`].
    RegisterHost(RegisterHost),
    /// Keep-alive; reply `Ok`, or `Error(UnknownHost)` to ask for a new RegisterHost.
    Heartbeat(Heartbeat),
    /// This host is going away; reply `Ok`.
    LeaveHost,
    /// Open or announce a task; reply [`SchedulerReply::Task`].
    RegisterTask(RegisterTask),
    /// Report held pieces; reply `Ok`.
    PiecesHeld(PiecesHeld),
    /// Ask for parents; reply [`SchedulerReply::Parents`].
    RequestParents(RequestParents),
    /// Report a failed parent; reply `Ok`.
    ReportPieceFailure(ReportPieceFailure),
    /// The blob is complete and verified; reply `Ok`.
    DownloadFinished(DownloadFinished),
    /// The download was given up; reply `Ok`.
    DownloadFailed(DownloadFailed),
    /// Ask for up to `limit` known hosts (DHT bootstrap); reply [`SchedulerReply::Hosts`].
    ListHosts {
        /// Most hosts wanted (capped at [`MAX_HOST_LIST`]).
        limit: u32,
    },
    /// Have seeds fetch blobs ahead of time; reply [`SchedulerReply::Preheated`].
    Preheat(Preheat),
    /// Version 2: piece hashes a back-to-source peer computed; reply `Ok`.
    PieceHashes(PieceHashes),
    /// Version 2: ask for published piece hashes from `first` on; reply
    /// [`SchedulerReply::PieceHashes`].
    GetPieceHashes {
        /// The blob.
        blob: Digest,
        /// First piece index wanted.
        first: u32,
    },
}

/// The scheduler's answer to one [`SchedulerRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerReply {
    /// Done; nothing to return.
    Ok,
    /// Answer to RegisterHost.
    Registered(Registered),
    /// Answer to RegisterTask.
    Task(TaskInfo),
    /// Answer to RequestParents.
    Parents(ParentsReply),
    /// Answer to ListHosts.
    Hosts(HostList),
    /// Answer to Preheat.
    Preheated(PreheatReply),
    /// The request failed.
    Error(ErrorReply),
    /// Version 2: answer to GetPieceHashes.
    PieceHashes(PieceHashesReply),
}

/// What kind of failure an [`ErrorReply`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request broke a rule; do not retry it unchanged.
    BadRequest,
    /// The scheduler does not know this host: send RegisterHost again.
    UnknownHost,
    /// The scheduler does not know this task: send RegisterTask again.
    UnknownTask,
    /// Overloaded; retry later.
    Busy,
    /// Not allowed (e.g. a non-seed asked to fetch from origin).
    Refused,
    /// An internal failure on the answering side.
    Internal,
}

/// A failed request: a code to act on and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What to do about it.
    pub code: ErrorCode,
    /// Details (at most [`MAX_TEXT_LEN`] bytes).
    pub message: String,
}

impl ErrorReply {
    /// Builds an error reply, cutting the message to [`MAX_TEXT_LEN`] bytes.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: crate::truncate_text(message.into(), MAX_TEXT_LEN),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ProtoError> {
        check_text("error message", &self.message, MAX_TEXT_LEN)
    }
}

fn check_label(field: &'static str, label: &Option<String>) -> Result<(), ProtoError> {
    match label {
        Some(l) => check_text(field, l, MAX_LABEL_LEN),
        None => Ok(()),
    }
}

fn check_addresses(addresses: &[SocketAddr], need_one: bool) -> Result<(), ProtoError> {
    if addresses.len() > MAX_ADDRESSES || (need_one && addresses.is_empty()) {
        return Err(ProtoError::invalid(
            "addresses",
            format!(
                "{} addresses; 1 to {MAX_ADDRESSES} are allowed",
                addresses.len()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_parents(parents: &[Parent]) -> Result<(), ProtoError> {
    if parents.len() > MAX_PARENTS {
        return Err(ProtoError::invalid(
            "parents",
            format!(
                "{} parents; at most {MAX_PARENTS} are allowed",
                parents.len()
            ),
        ));
    }
    for p in parents {
        p.host_id.validate()?;
        check_addresses(&p.addresses, true)?;
        crate::check_piece_set(&p.pieces)?;
    }
    Ok(())
}

fn check_indices(field: &'static str, indices: &[u32]) -> Result<(), ProtoError> {
    if indices.len() > crate::MAX_PIECES as usize {
        return Err(ProtoError::invalid(
            field,
            format!(
                "{} indices; at most {} are allowed",
                indices.len(),
                crate::MAX_PIECES
            ),
        ));
    }
    Ok(())
}

impl OriginRef {
    /// Checks lengths (the credential is never echoed in the error).
    pub fn validate(&self) -> Result<(), ProtoError> {
        if self.reference.is_empty() {
            return Err(ProtoError::invalid("origin reference", "empty"));
        }
        check_text("origin reference", &self.reference, MAX_ORIGIN_REF_LEN)?;
        if let Some(auth) = &self.authorization {
            // Checked without echoing the value: it is a credential.
            if auth.len() > MAX_AUTHORIZATION_LEN {
                return Err(ProtoError::invalid(
                    "authorization",
                    format!("{} bytes; at most {MAX_AUTHORIZATION_LEN}", auth.len()),
                ));
            }
        }
        Ok(())
    }
}

impl RegisterTask {
    fn validate(&self) -> Result<(), ProtoError> {
        self.task.validate()?;
        if let Some(table) = &self.piece_table {
            self.task.validate_piece_table(table)?;
        }
        if let Some(held) = &self.held {
            crate::check_piece_set(held)?;
            held.check_len(self.task.piece_count())?;
        }
        if let Some(origin) = &self.origin {
            origin.validate()?;
        }
        Ok(())
    }
}

/// `first..first+n` stays within [`crate::MAX_PIECES`].
fn check_hash_range(first: u32, n: usize) -> Result<(), ProtoError> {
    if u64::from(first) + n as u64 > u64::from(crate::MAX_PIECES) {
        return Err(ProtoError::invalid(
            "piece hashes",
            format!(
                "pieces {first}..+{n} pass the limit of {}",
                crate::MAX_PIECES
            ),
        ));
    }
    Ok(())
}

fn check_preheat_count(n: usize) -> Result<(), ProtoError> {
    if n == 0 || n > MAX_PREHEAT_BLOBS {
        return Err(ProtoError::invalid(
            "preheat blobs",
            format!("{n} blobs; 1 to {MAX_PREHEAT_BLOBS} are allowed"),
        ));
    }
    Ok(())
}

impl Preheat {
    /// Checks the blob count, every blob's geometry and the origin.
    pub fn validate(&self) -> Result<(), ProtoError> {
        check_preheat_count(self.blobs.len())?;
        self.blobs.iter().try_for_each(TaskMeta::validate)?;
        self.origin.validate()
    }
}

impl Message for SchedulerRequest {
    const NAME: &'static str = "SchedulerRequest";
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            SchedulerRequest::RegisterHost(r) => {
                r.host_id.validate()?;
                check_addresses(&r.addresses, true)?;
                check_label("zone", &r.locality.zone)?;
                check_label("rack", &r.locality.rack)
            }
            SchedulerRequest::Heartbeat(_)
            | SchedulerRequest::LeaveHost
            | SchedulerRequest::DownloadFinished(_)
            | SchedulerRequest::ListHosts { .. } => Ok(()),
            SchedulerRequest::RegisterTask(t) => t.validate(),
            SchedulerRequest::PiecesHeld(p) => match &p.pieces {
                PieceReport::Full(set) => crate::check_piece_set(set),
                PieceReport::Added(i) | PieceReport::Removed(i) => {
                    check_indices("piece indices", i)
                }
            },
            SchedulerRequest::RequestParents(r) => {
                crate::check_piece_set(&r.wanted)?;
                if r.exclude.len() > MAX_PARENTS * 4 {
                    return Err(ProtoError::invalid(
                        "exclude",
                        format!("{} hosts; at most {}", r.exclude.len(), MAX_PARENTS * 4),
                    ));
                }
                Ok(r.exclude.iter().try_for_each(HostId::validate)?)
            }
            SchedulerRequest::ReportPieceFailure(r) => {
                r.parent.validate()?;
                check_text("failure detail", &r.detail, MAX_TEXT_LEN)
            }
            SchedulerRequest::DownloadFailed(f) => {
                check_text("failure reason", &f.reason, MAX_TEXT_LEN)
            }
            SchedulerRequest::Preheat(p) => p.validate(),
            SchedulerRequest::PieceHashes(h) => {
                check_hash_count("piece hashes", h.hashes.len(), true)?;
                check_hash_range(h.first, h.hashes.len())
            }
            SchedulerRequest::GetPieceHashes { first, .. } => check_hash_range(*first, 0),
        }
    }
}

impl Message for SchedulerReply {
    const NAME: &'static str = "SchedulerReply";
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            SchedulerReply::Ok | SchedulerReply::Registered(_) => Ok(()),
            SchedulerReply::Task(t) => {
                t.task.validate()?;
                match &t.piece_table {
                    Some(table) => t.task.validate_piece_table(table),
                    None => Ok(()),
                }
            }
            SchedulerReply::Parents(ParentsReply::Parents(p)) => check_parents(p),
            SchedulerReply::Parents(ParentsReply::BackToSource { reason }) => {
                check_text("reason", reason, MAX_TEXT_LEN)
            }
            SchedulerReply::Parents(ParentsReply::WaitForSeed { .. }) => Ok(()),
            SchedulerReply::Hosts(list) => {
                if list.hosts.len() > MAX_HOST_LIST {
                    return Err(ProtoError::invalid(
                        "host list",
                        format!("{} hosts; at most {MAX_HOST_LIST}", list.hosts.len()),
                    ));
                }
                for h in &list.hosts {
                    h.host_id.validate()?;
                    check_addresses(&h.addresses, false)?;
                    check_label("zone", &h.locality.zone)?;
                    check_label("rack", &h.locality.rack)?;
                }
                Ok(())
            }
            SchedulerReply::Preheated(r) => {
                check_preheat_count(r.outcomes.len())?;
                for (_, outcome) in &r.outcomes {
                    match outcome {
                        PreheatOutcome::Ordered { seed } => seed.validate()?,
                        PreheatOutcome::AlreadyWarm => {}
                        PreheatOutcome::NoSeed { reason } => {
                            check_text("reason", reason, MAX_TEXT_LEN)?
                        }
                    }
                }
                Ok(())
            }
            SchedulerReply::Error(e) => e.validate(),
            SchedulerReply::PieceHashes(r) => {
                check_hash_count("piece hashes", r.hashes.len(), false)?;
                if let Some(p) = &r.publisher {
                    p.validate()?;
                }
                check_hash_range(r.first, r.hashes.len())
            }
        }
    }
}
