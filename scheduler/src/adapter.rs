//! Maps `shoal-proto` scheduler messages onto core calls and core answers back onto replies;
//! the QUIC service reads a request, calls [`ProtoAdapter::handle`], writes the reply and sends
//! the push (if any) to the named host. No I/O here.

use std::collections::HashMap;
use std::time::Duration;

use shoal_proto as proto;
use shoal_proto::{
    ErrorCode, ErrorReply, FailureReason, ParentsReply, PieceReport, SchedulerPush, SchedulerReply,
    SchedulerRequest,
};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use shoal_origin::AllowedOrigins;

use crate::clock::Clock;
use crate::error::SchedulerError;
use crate::host::{HostLoad, HostRegistration, Locality};
use crate::preheat::PreheatDecision;
use crate::reports::FailureKind;
use crate::select::{Decision, Parent};
use crate::state::Scheduler;
use crate::task::{Held, TaskAnnouncement};
use shoal_types::{Digest, HostId};

/// The result of one request: the reply to the asker, and an order to push to another host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    /// Reply on the asker's stream.
    pub reply: SchedulerReply,
    /// Messages for other hosts (seeds told to fetch from the origin).
    pub pushes: Vec<(HostId, SchedulerPush)>,
}

impl Handled {
    fn reply(reply: SchedulerReply) -> Self {
        Self {
            reply,
            pushes: Vec::new(),
        }
    }
}

/// Keeps what the core does not: each blob's origin reference (for seed fetch orders), which
/// must be in the scheduler's `allowed_origins`, and the origins a seed refused to fetch.
/// Bounded by the core's task count: entries of blobs the core dropped go at [`Self::expire`].
#[derive(Debug)]
pub struct ProtoAdapter {
    origins: HashMap<Digest, proto::OriginRef>,
    allowed: AllowedOrigins,
    /// Blob -> (the origin reference a seed refused, the reason every asker is given).
    refused: HashMap<Digest, (String, String)>,
    /// `shoal_scheduler_origin_refusals{reason}`.
    refusals: Family<ReasonLabels, Counter>,
}

/// Label of `origin_refusals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `not_allowed` (a task or preheat naming an origin outside allowed_origins) or
    /// `seed_refused` (a seed refused the fetch order: outside its own list).
    pub reason: &'static str,
}

fn error_reply(e: &SchedulerError) -> SchedulerReply {
    let code = match e {
        SchedulerError::UnknownHost { .. } => ErrorCode::UnknownHost,
        SchedulerError::NotInTask { .. } => ErrorCode::UnknownTask,
        SchedulerError::LimitReached { .. } => ErrorCode::Busy,
        _ => ErrorCode::BadRequest,
    };
    SchedulerReply::Error(ErrorReply::new(code, e.to_string()))
}

fn no_seed(mut reason: String) -> proto::PreheatOutcome {
    if reason.len() > proto::MAX_TEXT_LEN {
        let mut cut = proto::MAX_TEXT_LEN;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    proto::PreheatOutcome::NoSeed { reason }
}

fn failure_kind(reason: FailureReason) -> Option<FailureKind> {
    match reason {
        FailureReason::Connect => Some(FailureKind::Unreachable),
        FailureReason::Refused | FailureReason::Protocol => Some(FailureKind::Refused),
        FailureReason::Timeout => Some(FailureKind::Stalled),
        FailureReason::Corrupt => Some(FailureKind::BadData),
        // Busy is transient: the slot is released, the parent is not blocked.
        FailureReason::Busy => None,
    }
}

impl ProtoAdapter {
    /// An adapter with no origins known that accepts those in `allowed`; its refusal counter
    /// goes to `registry`.
    pub fn new(allowed: AllowedOrigins, registry: &mut Registry) -> Self {
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "shoal_scheduler_origin_refusals",
            "Task origins refused: not_allowed (outside allowed_origins), seed_refused (by a seed)",
            refusals.clone(),
        );
        Self {
            origins: HashMap::new(),
            allowed,
            refused: HashMap::new(),
            refusals,
        }
    }

    /// The refusal of `origin` when it is not in the scheduler's list.
    fn check_origin(&self, origin: &proto::OriginRef) -> Option<Handled> {
        let refusal = self.allowed.check_reference(&origin.reference).err()?;
        self.count("not_allowed");
        Some(Handled::reply(SchedulerReply::Error(ErrorReply::new(
            ErrorCode::Refused,
            refusal.message,
        ))))
    }

    fn count(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Why `task` is refused to every asker: a seed refused its current origin.
    fn refused_reason(&self, task: &Digest) -> Option<&str> {
        let (origin, why) = self.refused.get(task)?;
        let current = self.origins.get(task)?;
        (current.reference == *origin).then_some(why.as_str())
    }

    /// Host `from` refused `push` with `reply`. For an origin fetch order: the host leaves the
    /// task, and the task's origin is refused to every asker from now on (no other seed and no
    /// peer is sent to it), with the host's reason.
    pub fn push_refused<C: Clock>(
        &mut self,
        s: &mut Scheduler<C>,
        from: &HostId,
        push: &SchedulerPush,
        reply: &ErrorReply,
    ) {
        let SchedulerPush::FetchFromOrigin(order) = push else {
            return;
        };
        let task = order.task.blob;
        tracing::warn!(seed = %from, blob = %task, origin = %order.origin.reference, reason = %reply.message,
            "seed refused to fetch from the origin; the task fails for every peer");
        let _ = s.leave_task(from, &task);
        self.count("seed_refused");
        let why = format!(
            "seed {from} refused to fetch it from {}: {}",
            order.origin.reference, reply.message
        );
        self.refused
            .insert(task, (order.origin.reference.clone(), why));
    }

    /// Handles one request from `from` (the host id its certificate and Hello proved).
    pub fn handle<C: Clock>(
        &mut self,
        s: &mut Scheduler<C>,
        from: &proto::HostId,
        req: SchedulerRequest,
    ) -> Handled {
        match self.dispatch(s, from, req) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(host = %from.as_str(), error = %e, "scheduler request refused");
                Handled::reply(error_reply(&e))
            }
        }
    }

    /// Expires silent hosts and forgets origins of blobs no peer takes part in any more.
    pub fn expire<C: Clock>(&mut self, s: &mut Scheduler<C>) -> Vec<HostId> {
        let gone = s.expire_hosts();
        self.origins.retain(|t, _| s.task_peer_count(t) > 0);
        self.refused.retain(|t, _| s.task_peer_count(t) > 0);
        gone
    }

    fn dispatch<C: Clock>(
        &mut self,
        s: &mut Scheduler<C>,
        from: &proto::HostId,
        req: SchedulerRequest,
    ) -> Result<Handled, SchedulerError> {
        let me = from.clone();
        let ok = || Ok(Handled::reply(SchedulerReply::Ok));
        match req {
            SchedulerRequest::RegisterHost(r) => {
                if r.host_id.as_str() != me.as_str() {
                    return Ok(Handled::reply(SchedulerReply::Error(ErrorReply::new(
                        ErrorCode::Refused,
                        format!(
                            "host {me} may not register as {}: the id must match its certificate",
                            r.host_id.as_str()
                        ),
                    ))));
                }
                s.register_host(HostRegistration {
                    id: me,
                    addresses: r.addresses,
                    locality: Locality {
                        zone: r.locality.zone.unwrap_or_default(),
                        rack: r.locality.rack.unwrap_or_default(),
                    },
                    upload_slots: r.upload_slots,
                    upload_limit: r.upload_bytes_per_sec,
                    is_seed: r.is_seed,
                })?;
                let timeout = s.config().host_timeout();
                let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
                Ok(Handled::reply(SchedulerReply::Registered(
                    proto::Registered {
                        heartbeat_interval_ms: ms(timeout / 3),
                        host_timeout_ms: ms(timeout),
                    },
                )))
            }
            SchedulerRequest::Heartbeat(h) => {
                s.heartbeat(
                    &me,
                    HostLoad {
                        free_upload_slots: Some(h.free_upload_slots),
                        upload_bytes_per_sec: Some(h.upload_bytes_per_sec),
                        download_bytes_per_sec: Some(h.download_bytes_per_sec),
                    },
                )?;
                ok()
            }
            SchedulerRequest::LeaveHost => {
                s.leave_host(&me);
                ok()
            }
            SchedulerRequest::RegisterTask(t) => {
                let task = t.task.blob;
                // Checked before the task exists: an origin outside the list never reaches a seed.
                if let Some(refused) = t.origin.as_ref().and_then(|o| self.check_origin(o)) {
                    return Ok(refused);
                }
                let held = match &t.held {
                    Some(set) => Held::Set(set.clone()),
                    None => Held::Nothing,
                };
                s.announce_task(
                    &me,
                    TaskAnnouncement {
                        task,
                        size: t.task.size,
                        piece_size: t.task.piece_size,
                        held,
                    },
                )?;
                if let Some(table) = t.piece_table {
                    s.publish_piece_table(&me, &task, table)?;
                }
                if let Some(origin) = t.origin {
                    self.origins.insert(task, origin);
                }
                Ok(Handled::reply(SchedulerReply::Task(proto::TaskInfo {
                    task: t.task,
                    piece_table: s.piece_table(&task).map(|p| p.to_vec()),
                })))
            }
            SchedulerRequest::PiecesHeld(p) => {
                let task = p.blob;
                match p.pieces {
                    PieceReport::Full(set) => s.report_held(&me, &task, &set)?,
                    PieceReport::Added(i) => {
                        s.report_pieces(&me, &task, &i)?;
                    }
                    PieceReport::Removed(i) => {
                        s.report_pieces_removed(&me, &task, &i)?;
                    }
                }
                ok()
            }
            SchedulerRequest::RequestParents(r) => {
                let task = r.blob;
                if let Some(why) = self.refused_reason(&task) {
                    return Ok(Handled::reply(SchedulerReply::Error(ErrorReply::new(
                        ErrorCode::Refused,
                        why,
                    ))));
                }
                let exclude: Vec<HostId> = r.exclude.clone();
                s.block_parents(&me, &task, &exclude)?;
                let decision = s.decide(&me, &task)?;
                Ok(self.answer(s, &task, r.blob, decision))
            }
            SchedulerRequest::ReportPieceFailure(f) => {
                let task = f.blob;
                let parent = f.parent.clone();
                // Busy is not held against the parent: the child asks again and its edges go.
                if let Some(kind) = failure_kind(f.reason) {
                    s.report_failure(&me, &task, &parent, kind)?;
                }
                ok()
            }
            SchedulerRequest::DownloadFinished(d) => {
                let task = d.blob;
                let Some(summary) = s.task_summary(&task) else {
                    return Err(SchedulerError::NotInTask { host: me, task });
                };
                let all: Vec<u32> = (0..summary.piece_count).collect();
                s.report_pieces(&me, &task, &all)?;
                ok()
            }
            SchedulerRequest::DownloadFailed(d) => {
                let task = d.blob;
                tracing::info!(host = %me, blob = %task, reason = %d.reason, "download given up");
                s.leave_task(&me, &task)?;
                ok()
            }
            SchedulerRequest::ListHosts { limit } => {
                let limit = (limit as usize).min(proto::MAX_HOST_LIST);
                let hosts = s
                    .list_hosts(limit)
                    .into_iter()
                    .map(|h| proto::HostInfo {
                        host_id: h.id,
                        addresses: h
                            .addresses
                            .iter()
                            .copied()
                            .take(proto::MAX_ADDRESSES)
                            .collect(),
                        locality: proto::Locality {
                            zone: Some(h.locality.zone).filter(|z| !z.is_empty()),
                            rack: Some(h.locality.rack).filter(|r| !r.is_empty()),
                        },
                        is_seed: h.is_seed,
                    })
                    .collect();
                Ok(Handled::reply(SchedulerReply::Hosts(proto::HostList {
                    hosts,
                })))
            }
            SchedulerRequest::Preheat(p) => Ok(self.preheat(s, p)),
            SchedulerRequest::PieceHashes(h) => {
                let task = h.blob;
                s.publish_piece_hashes(&me, &task, h.first, &h.hashes)?;
                ok()
            }
            SchedulerRequest::GetPieceHashes { blob, first } => {
                let task = blob;
                s.member(&me, &task)?;
                let (publisher, hashes) =
                    s.piece_hashes(&task, first, proto::MAX_HASHES_PER_MESSAGE);
                Ok(Handled::reply(SchedulerReply::PieceHashes(
                    proto::PieceHashesReply {
                        blob,
                        first,
                        publisher,
                        hashes,
                    },
                )))
            }
        }
    }

    /// Orders a seed to fetch each blob of a preheat that no seed holds or fetches yet.
    fn preheat<C: Clock>(&mut self, s: &mut Scheduler<C>, p: proto::Preheat) -> Handled {
        if let Some(refused) = self.check_origin(&p.origin) {
            return refused;
        }
        let mut outcomes = Vec::with_capacity(p.blobs.len());
        let mut pushes = Vec::new();
        for meta in p.blobs {
            let t = meta.blob;
            let decision = s.preheat(&t, meta.size, meta.piece_size).map(|d| (d, t));
            let outcome = match decision {
                Ok((PreheatDecision::Ordered(seed), task)) => {
                    self.origins.insert(task, p.origin.clone());
                    pushes.push((
                        seed.clone(),
                        SchedulerPush::FetchFromOrigin(proto::FetchFromOrigin {
                            task: meta,
                            origin: p.origin.clone(),
                        }),
                    ));
                    proto::PreheatOutcome::Ordered { seed }
                }
                Ok((PreheatDecision::AlreadyWarm, task)) => {
                    self.origins.entry(task).or_insert_with(|| p.origin.clone());
                    proto::PreheatOutcome::AlreadyWarm
                }
                Ok((PreheatDecision::NoSeed(reason), _)) => no_seed(reason),
                Err(e) => no_seed(e.to_string()),
            };
            outcomes.push((meta.blob, outcome));
        }
        Handled {
            reply: SchedulerReply::Preheated(proto::PreheatReply { outcomes }),
            pushes,
        }
    }

    /// Turns a decision into the reply (and, for a seed fetch, the order to the seed).
    fn answer<C: Clock>(
        &self,
        s: &Scheduler<C>,
        task: &Digest,
        blob: proto::Digest,
        decision: Decision,
    ) -> Handled {
        let parents = |list: &[Parent]| -> Vec<proto::Parent> {
            list.iter()
                .filter_map(|p| {
                    let pieces = s.held_set(&p.host, task)?;
                    Some(proto::Parent {
                        host_id: p.host.clone(),
                        addresses: p
                            .addresses
                            .iter()
                            .copied()
                            .take(proto::MAX_ADDRESSES)
                            .collect(),
                        pieces,
                        is_seed: p.is_seed,
                    })
                })
                .collect()
        };
        match decision {
            Decision::Parents(list) => Handled::reply(SchedulerReply::Parents(
                ParentsReply::Parents(parents(&list)),
            )),
            Decision::Done => {
                Handled::reply(SchedulerReply::Parents(ParentsReply::Parents(vec![])))
            }
            Decision::BackToSource => {
                Handled::reply(SchedulerReply::Parents(ParentsReply::BackToSource {
                    reason: format!("nobody holds some pieces of {task} and no seed can fetch it"),
                }))
            }
            Decision::Wait { retry_after } => {
                Handled::reply(SchedulerReply::Parents(ParentsReply::WaitForSeed {
                    retry_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
                }))
            }
            Decision::SeedFetch {
                seed,
                parents: list,
            } => {
                let reply = SchedulerReply::Parents(ParentsReply::Parents(parents(&list)));
                let pushes = match (self.origins.get(task), s.task_summary(task)) {
                    (Some(origin), Some(summary)) => vec![(
                        seed.host.clone(),
                        SchedulerPush::FetchFromOrigin(proto::FetchFromOrigin {
                            task: proto::TaskMeta {
                                blob,
                                size: summary.size,
                                piece_size: summary.piece_size,
                            },
                            origin: origin.clone(),
                        }),
                    )],
                    _ => {
                        tracing::warn!(blob = %task, seed = %seed.host,
                            "seed fetch ordered but no peer announced the blob's origin");
                        Vec::new()
                    }
                };
                Handled { reply, pushes }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::SchedulerConfig;
    use prometheus_client::registry::Registry;

    fn pid(name: &str) -> proto::HostId {
        proto::HostId::new(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An adapter allowing the registry the tests' origins name.
    fn adapter(registry: &mut Registry) -> ProtoAdapter {
        let list = ["registry.invalid".to_string()];
        let allowed = AllowedOrigins::parse(&list, shoal_origin::ListOwner::Scheduler)
            .unwrap_or_else(|e| panic!("{e}"));
        ProtoAdapter::new(allowed, registry)
    }

    fn origin(reference: &str) -> proto::OriginRef {
        proto::OriginRef {
            reference: reference.into(),
            authorization: None,
        }
    }

    fn register_task(
        a: &mut ProtoAdapter,
        s: &mut Scheduler<ManualClock>,
        peer: &str,
        meta: proto::TaskMeta,
        reference: &str,
    ) -> Handled {
        let req = SchedulerRequest::RegisterTask(proto::RegisterTask {
            task: meta,
            piece_table: None,
            held: None,
            origin: Some(origin(reference)),
        });
        a.handle(s, &pid(peer), req)
    }

    fn ask(
        a: &mut ProtoAdapter,
        s: &mut Scheduler<ManualClock>,
        peer: &str,
        meta: proto::TaskMeta,
    ) -> Handled {
        let req = SchedulerRequest::RequestParents(proto::RequestParents {
            blob: meta.blob,
            wanted: proto::PieceSet::full(meta.piece_count()),
            exclude: vec![],
        });
        a.handle(s, &pid(peer), req)
    }

    fn refused(h: &Handled) -> &str {
        match &h.reply {
            SchedulerReply::Error(e) if e.code == ErrorCode::Refused => &e.message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn counted(registry: &Registry, reason: &str) -> bool {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry)
            .unwrap_or_else(|e| panic!("{e}"));
        text.contains(&format!(
            "shoal_scheduler_origin_refusals_total{{reason=\"{reason}\"}} 1"
        ))
    }

    #[test]
    fn origins_outside_the_list_are_refused_before_a_task_or_a_seed_order_exists() {
        let mut registry = Registry::default();
        let mut s = Scheduler::new(
            SchedulerConfig::default(),
            ManualClock::new(),
            &mut registry,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut a = adapter(&mut registry);
        register(&mut a, &mut s, "seed-1", true);
        register(&mut a, &mut s, "peer-1", false);
        let meta = proto::TaskMeta {
            blob: proto::Digest::from_bytes([5; 32]),
            size: 4 << 20,
            piece_size: 1 << 20,
        };
        let h = register_task(
            &mut a,
            &mut s,
            "peer-1",
            meta,
            "docker://169.254.169.254/app",
        );
        let why = refused(&h);
        assert!(
            why.contains("registry 169.254.169.254 is not an allowed origin of the scheduler"),
            "{why}"
        );
        assert!(
            why.contains("allowed_origins in the `shoal scheduler` config"),
            "{why}"
        );
        assert!(counted(&registry, "not_allowed"));
        // No task: asking for parents finds none, and no seed is ordered anywhere.
        let h = ask(&mut a, &mut s, "peer-1", meta);
        assert!(
            matches!(&h.reply, SchedulerReply::Error(e) if e.code == ErrorCode::UnknownTask),
            "{h:?}"
        );
        assert!(h.pushes.is_empty());
        let preheat = SchedulerRequest::Preheat(proto::Preheat {
            blobs: vec![meta],
            origin: origin("docker://127.0.0.1:5000/app"),
        });
        let h = a.handle(&mut s, &pid("peer-1"), preheat);
        assert!(refused(&h).contains("registry 127.0.0.1:5000"), "{h:?}");
        assert!(h.pushes.is_empty());
    }

    #[test]
    fn a_seed_refusing_an_origin_fails_that_task_for_everyone_and_it_is_not_ordered_elsewhere() {
        let mut registry = Registry::default();
        let mut s = Scheduler::new(
            SchedulerConfig::default(),
            ManualClock::new(),
            &mut registry,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut a = adapter(&mut registry);
        register(&mut a, &mut s, "seed-1", true);
        register(&mut a, &mut s, "seed-2", true);
        register(&mut a, &mut s, "peer-1", false);
        register(&mut a, &mut s, "peer-2", false);
        let meta = |b: u8| proto::TaskMeta {
            blob: proto::Digest::from_bytes([b; 32]),
            size: 4 << 20,
            piece_size: 1 << 20,
        };
        let (foreign, other) = (meta(6), meta(7));
        let reference = "docker://registry.invalid/foreign";
        let h = register_task(&mut a, &mut s, "peer-1", foreign, reference);
        assert!(matches!(h.reply, SchedulerReply::Task(_)), "{h:?}");
        let h = ask(&mut a, &mut s, "peer-1", foreign);
        let [(seed, push)] = &h.pushes[..] else {
            panic!("one seed ordered: {h:?}");
        };
        let reply = ErrorReply::new(ErrorCode::Refused, "not an allowed origin of this seed");
        a.push_refused(&mut s, seed, push, &reply);
        assert!(counted(&registry, "seed_refused"));
        for peer in ["peer-1", "peer-2"] {
            if peer == "peer-2" {
                let h = register_task(&mut a, &mut s, peer, foreign, reference);
                assert!(matches!(h.reply, SchedulerReply::Task(_)), "{h:?}");
            }
            let h = ask(&mut a, &mut s, peer, foreign);
            let why = refused(&h);
            assert!(
                why.contains(&format!("seed {seed} refused to fetch it from {reference}")),
                "{why}"
            );
            assert!(why.contains("not an allowed origin of this seed"), "{why}");
            assert!(h.pushes.is_empty(), "not ordered elsewhere: {h:?}");
        }
        // Another blob goes on as usual: a seed is ordered for it.
        let h = register_task(
            &mut a,
            &mut s,
            "peer-2",
            other,
            "docker://registry.invalid/app",
        );
        assert!(matches!(h.reply, SchedulerReply::Task(_)), "{h:?}");
        let h = ask(&mut a, &mut s, "peer-2", other);
        assert_eq!(h.pushes.len(), 1, "{h:?}");
        // The same blob from an origin the seeds take is a task again.
        let h = register_task(
            &mut a,
            &mut s,
            "peer-2",
            foreign,
            "docker://registry.invalid/app",
        );
        assert!(matches!(h.reply, SchedulerReply::Task(_)), "{h:?}");
        let h = ask(&mut a, &mut s, "peer-2", foreign);
        assert!(!matches!(h.reply, SchedulerReply::Error(_)), "{h:?}");
    }

    fn register(a: &mut ProtoAdapter, s: &mut Scheduler<ManualClock>, name: &str, seed: bool) {
        let req = SchedulerRequest::RegisterHost(proto::RegisterHost {
            host_id: pid(name),
            addresses: vec!["127.0.0.1:4470".parse().unwrap_or_else(|e| panic!("{e}"))],
            locality: proto::Locality::default(),
            upload_slots: 8,
            upload_bytes_per_sec: 0,
            is_seed: seed,
        });
        let h = a.handle(s, &pid(name), req);
        assert!(matches!(h.reply, SchedulerReply::Registered(_)), "{h:?}");
    }

    #[test]
    fn a_request_for_an_unheld_blob_orders_the_seed_to_fetch_it() {
        let mut registry = Registry::default();
        let mut s = Scheduler::new(
            SchedulerConfig::default(),
            ManualClock::new(),
            &mut registry,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut a = adapter(&mut registry);
        register(&mut a, &mut s, "seed-1", true);
        register(&mut a, &mut s, "peer-1", false);
        let meta = proto::TaskMeta {
            blob: proto::Digest::from_bytes([7; 32]),
            size: 10 << 20,
            piece_size: 1 << 20,
        };
        let origin = proto::OriginRef {
            reference: "docker://registry.invalid/app".into(),
            authorization: None,
        };
        let h = a.handle(
            &mut s,
            &pid("peer-1"),
            SchedulerRequest::RegisterTask(proto::RegisterTask {
                task: meta,
                piece_table: None,
                held: None,
                origin: Some(origin.clone()),
            }),
        );
        assert!(matches!(h.reply, SchedulerReply::Task(_)), "{h:?}");
        let h = a.handle(
            &mut s,
            &pid("peer-1"),
            SchedulerRequest::RequestParents(proto::RequestParents {
                blob: meta.blob,
                wanted: proto::PieceSet::full(10),
                exclude: vec![],
            }),
        );
        match &h.reply {
            SchedulerReply::Parents(ParentsReply::Parents(p)) => {
                assert_eq!(p.len(), 1);
                assert_eq!(p[0].host_id.as_str(), "seed-1");
                assert!(p[0].is_seed);
            }
            other => panic!("expected parents, got {other:?}"),
        }
        let expected =
            SchedulerPush::FetchFromOrigin(proto::FetchFromOrigin { task: meta, origin });
        assert_eq!(
            h.pushes,
            vec![(
                HostId::new("seed-1").unwrap_or_else(|e| panic!("{e}")),
                expected
            )]
        );
    }

    #[test]
    fn errors_map_to_codes_the_peer_acts_on() {
        let mut registry = Registry::default();
        let mut s = Scheduler::new(
            SchedulerConfig::default(),
            ManualClock::new(),
            &mut registry,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut a = adapter(&mut registry);
        let beat = SchedulerRequest::Heartbeat(proto::Heartbeat {
            free_upload_slots: 1,
            upload_bytes_per_sec: 0,
            download_bytes_per_sec: 0,
        });
        let h = a.handle(&mut s, &pid("ghost"), beat);
        assert!(
            matches!(&h.reply, SchedulerReply::Error(e) if e.code == ErrorCode::UnknownHost),
            "{h:?}"
        );
        register(&mut a, &mut s, "peer-1", false);
        let impostor = SchedulerRequest::RegisterHost(proto::RegisterHost {
            host_id: pid("peer-2"),
            addresses: vec![],
            locality: proto::Locality::default(),
            upload_slots: 1,
            upload_bytes_per_sec: 0,
            is_seed: true,
        });
        let h = a.handle(&mut s, &pid("peer-1"), impostor);
        assert!(matches!(&h.reply, SchedulerReply::Error(e) if e.code == ErrorCode::Refused));
        let ask = SchedulerRequest::RequestParents(proto::RequestParents {
            blob: proto::Digest::from_bytes([1; 32]),
            wanted: proto::PieceSet::full(1),
            exclude: vec![],
        });
        let h = a.handle(&mut s, &pid("peer-1"), ask);
        assert!(matches!(&h.reply, SchedulerReply::Error(e) if e.code == ErrorCode::UnknownTask));
    }

    #[test]
    fn only_the_origin_fetcher_streams_piece_hashes_and_they_go_with_it() {
        let mut registry = Registry::default();
        let mut s = Scheduler::new(
            SchedulerConfig::default(),
            ManualClock::new(),
            &mut registry,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut a = adapter(&mut registry);
        register(&mut a, &mut s, "seed-1", true);
        register(&mut a, &mut s, "peer-1", false);
        register(&mut a, &mut s, "peer-2", false);
        let meta = proto::TaskMeta {
            blob: proto::Digest::from_bytes([9; 32]),
            size: 4 << 20,
            piece_size: 1 << 20,
        };
        for peer in ["peer-1", "peer-2"] {
            let h = a.handle(
                &mut s,
                &pid(peer),
                SchedulerRequest::RegisterTask(proto::RegisterTask {
                    task: meta,
                    piece_table: None,
                    held: None,
                    origin: Some(proto::OriginRef {
                        reference: "docker://registry.invalid/app".into(),
                        authorization: None,
                    }),
                }),
            );
            assert!(matches!(h.reply, SchedulerReply::Task(_)), "{h:?}");
        }
        let ask = SchedulerRequest::RequestParents(proto::RequestParents {
            blob: meta.blob,
            wanted: proto::PieceSet::full(4),
            exclude: vec![],
        });
        let h = a.handle(&mut s, &pid("peer-1"), ask);
        assert_eq!(h.pushes.len(), 1, "the seed is sent to the origin: {h:?}");
        let publish = |first: u32, hashes: Vec<[u8; 32]>| {
            SchedulerRequest::PieceHashes(proto::PieceHashes {
                blob: meta.blob,
                first,
                hashes,
            })
        };
        // A peer that was not sent to the origin may not publish hashes.
        let h = a.handle(&mut s, &pid("peer-2"), publish(0, vec![[1; 32]]));
        assert!(matches!(h.reply, SchedulerReply::Error(_)), "{h:?}");
        let h = a.handle(&mut s, &pid("seed-1"), publish(0, vec![[1; 32], [2; 32]]));
        assert_eq!(h.reply, SchedulerReply::Ok);
        // A hash that changes is refused.
        let h = a.handle(&mut s, &pid("seed-1"), publish(1, vec![[5; 32]]));
        assert!(matches!(h.reply, SchedulerReply::Error(_)), "{h:?}");
        let get = SchedulerRequest::GetPieceHashes {
            blob: meta.blob,
            first: 1,
        };
        let h = a.handle(&mut s, &pid("peer-2"), get.clone());
        match &h.reply {
            SchedulerReply::PieceHashes(r) => {
                assert_eq!(r.first, 1);
                assert_eq!(r.hashes, vec![Some([2; 32]), None, None]);
                assert_eq!(r.publisher.as_ref().map(|p| p.as_str()), Some("seed-1"));
            }
            other => panic!("expected hashes, got {other:?}"),
        }
        // Its pieces turn out bad: the seed is blocked and its hashes are forgotten.
        let bad = SchedulerRequest::ReportPieceFailure(proto::ReportPieceFailure {
            blob: meta.blob,
            parent: pid("seed-1"),
            piece: None,
            reason: FailureReason::Corrupt,
            detail: "whole blob failed its sha256".into(),
        });
        assert_eq!(
            a.handle(&mut s, &pid("peer-2"), bad).reply,
            SchedulerReply::Ok
        );
        match a.handle(&mut s, &pid("peer-2"), get).reply {
            SchedulerReply::PieceHashes(r) => {
                assert_eq!(r.hashes, vec![None, None, None]);
                assert!(r.publisher.is_none());
            }
            other => panic!("expected hashes, got {other:?}"),
        }
    }
}
