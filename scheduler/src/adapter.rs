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

/// Keeps what the core does not: each blob's origin reference (for seed fetch orders).
/// Bounded by the core's task count: entries of blobs the core dropped go at [`Self::expire`].
#[derive(Debug, Default)]
pub struct ProtoAdapter {
    origins: HashMap<Digest, proto::OriginRef>,
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
    /// An adapter with no origins known.
    pub fn new() -> Self {
        Self::default()
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
        let mut a = ProtoAdapter::new();
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
        let mut a = ProtoAdapter::new();
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
        let mut a = ProtoAdapter::new();
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
