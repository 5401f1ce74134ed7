//! The swarm round of a download: ask the scheduler for parents, fetch each wanted piece from
//! the parent fastest for it now (several at once), keep parents' held sets fresh, and drop and
//! report parents that fail, stall or send bytes that do not match the piece table.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use shoal_proto::{
    FailureReason, HostId, ParentsReply, PieceSet, ReportPieceFailure, RequestParents,
    SchedulerReply, SchedulerRequest,
};
use shoal_store::PieceLayout;

use super::add;
use super::driver::held_added;
use super::parents::{fetch_held, fetch_piece, FetchFailure, ParentTable};
use super::task::Task;
use crate::convert::store_digest;
use crate::error::PeerError;

/// After this many failed attempts from parents a piece is fetched from the origin.
const MAX_PIECE_FAILURES: u32 = 4;
/// How often parents' held sets are refreshed while nothing can be fetched.
const REFRESH_EVERY: Duration = Duration::from_millis(100);
/// How often the scheduler is asked for more parents while nothing can be fetched.
const ASK_EVERY: Duration = Duration::from_millis(500);
/// How often the scheduler is asked for more parents while pieces are flowing.
const REASK_EVERY: Duration = Duration::from_secs(1);
/// How often parents' held sets are refreshed while pieces are flowing.
const REFRESH_BUSY_EVERY: Duration = Duration::from_millis(300);
/// Held pieces are reported to the scheduler in batches at least this often.
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// How a swarm round ended.
pub(super) enum SwarmEnd {
    /// Every wanted piece is held.
    Done,
    /// Go to the origin for what is missing.
    BackToSource(String),
}

/// What one in-flight piece fetch came back with.
struct Fetched {
    host: HostId,
    index: u32,
    started: Instant,
    result: Result<u64, FetchFailure>,
}

impl Task {
    /// Fetches wanted pieces from parents until all are held or the swarm cannot help.
    pub(super) async fn swarm(
        self: &Arc<Self>,
        layout: &PieceLayout,
    ) -> Result<SwarmEnd, PeerError> {
        let cfg = &self.ctx.config;
        let me = self.ctx.me.clone();
        let mut table = ParentTable::default();
        let mut inflight = FuturesUnordered::new();
        let mut busy_pieces: HashSet<u32> = HashSet::new();
        let mut failures: HashMap<u32, u32> = HashMap::new();
        let mut last_ask: Option<Instant> = None;
        let mut last_refresh: Option<Instant> = None;
        let mut last_progress = Instant::now();
        let mut report: Vec<u32> = Vec::new();
        let mut last_report = Instant::now();
        let stall_limit = cfg.piece_timeout() * 2;
        let want_all = self.lock().want_all;
        let rotate = fastrand::usize(..layout.piece_count().max(1) as usize);
        let mut holders: Vec<u16> = Vec::new();
        let mut holders_at: Option<Instant> = None;
        loop {
            for p in std::mem::take(&mut self.lock().new_parents) {
                table.add(p.host_id, p.addresses, Some(p.pieces), p.is_seed, &me);
            }
            let mut missing = self.missing(layout);
            if want_all && !missing.is_empty() {
                // Peers that start together would all ask for the same pieces in the same order
                // and could only get them from the seed; a per-download rotation lets them trade.
                let at = rotate % missing.len();
                missing.rotate_left(at);
                // Rarest first (the rotation breaks ties): the seed's uplink goes to pieces
                // nobody else has yet, and peers soon hold different pieces to trade. Counts
                // are refreshed as often as the parents' held sets.
                if holders_at.is_none_or(|t| t.elapsed() >= REFRESH_BUSY_EVERY) {
                    holders = table.holder_counts(layout.piece_count());
                    holders_at = Some(Instant::now());
                }
                missing.sort_by_key(|i| holders.get(*i as usize).copied().unwrap_or(0));
            }
            if missing.is_empty() && inflight.is_empty() {
                self.flush(&mut report);
                return Ok(SwarmEnd::Done);
            }
            let now = Instant::now();
            for &i in &missing {
                if inflight.len() >= cfg.download_concurrency {
                    break;
                }
                if busy_pieces.contains(&i) {
                    continue;
                }
                if failures.get(&i).copied().unwrap_or(0) >= MAX_PIECE_FAILURES {
                    if inflight.is_empty() {
                        self.flush(&mut report);
                        return Ok(SwarmEnd::BackToSource(format!(
                            "piece {i} failed from {MAX_PIECE_FAILURES} parents"
                        )));
                    }
                    continue;
                }
                let Some((host, addrs)) = table.pick(i, cfg.per_parent_concurrency, now) else {
                    continue;
                };
                let Some(len) = layout.piece_len(i).and_then(|l| u32::try_from(l).ok()) else {
                    continue;
                };
                table.start(&host);
                busy_pieces.insert(i);
                inflight.push(self.fetch_one(host, addrs, i, len));
            }
            if inflight.is_empty() {
                if last_progress.elapsed() > stall_limit {
                    self.flush(&mut report);
                    return Ok(SwarmEnd::BackToSource(format!(
                        "no parent served a piece for {stall_limit:?}"
                    )));
                }
                let ask_due = last_ask.is_none_or(|t| t.elapsed() >= ASK_EVERY);
                if ask_due && (table.len() == 0 || !missing.iter().any(|i| table.anyone_holds(*i)))
                {
                    last_ask = Some(Instant::now());
                    if let Some(end) = self.ask_parents(layout, &missing, &mut table).await? {
                        self.flush(&mut report);
                        return Ok(end);
                    }
                }
                if last_refresh.is_none_or(|t| t.elapsed() >= REFRESH_EVERY) {
                    last_refresh = Some(Instant::now());
                    self.refresh(layout, &mut table).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH_EVERY) => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            let done = tokio::select! {
                done = inflight.next() => done,
                _ = tokio::time::sleep(REPORT_EVERY) => None,
                _ = self.wake.notified() => None,
            };
            if let Some(f) = done {
                busy_pieces.remove(&f.index);
                match f.result {
                    Ok(bytes) => {
                        table.finish(&f.host, Some((bytes, f.started.elapsed())));
                        last_progress = Instant::now();
                        report.push(f.index);
                    }
                    Err(FetchFailure::NotHeld) => {
                        table.finish(&f.host, None);
                        table.not_held(&f.host, f.index);
                    }
                    Err(FetchFailure::Busy(wait)) => {
                        table.finish(&f.host, None);
                        table.busy(&f.host, Instant::now() + wait);
                    }
                    // Requests in flight to a parent just dropped fail too: not news.
                    Err(FetchFailure::Drop(..)) if table.is_excluded(&f.host) => {}
                    Err(FetchFailure::Drop(reason, detail)) => {
                        *failures.entry(f.index).or_default() += 1;
                        self.drop_parent(&mut table, &f.host, Some(f.index), reason, detail);
                    }
                }
            }
            // While pieces flow, keep learning: peers that started with us now hold pieces
            // too, and spreading requests over them spares the seed.
            if last_ask.is_none_or(|t| t.elapsed() >= REASK_EVERY) {
                last_ask = Some(Instant::now());
                // An answer to go to the origin is for when the swarm stops giving: ignored here.
                let _ = self.ask_parents(layout, &missing, &mut table).await?;
            }
            if last_refresh.is_none_or(|t| t.elapsed() >= REFRESH_BUSY_EVERY) {
                last_refresh = Some(Instant::now());
                self.refresh(layout, &mut table).await;
            }
            if report.len() >= 32 || (!report.is_empty() && last_report.elapsed() >= REPORT_EVERY) {
                self.flush(&mut report);
                last_report = Instant::now();
            }
        }
    }

    /// Fetches one piece from `host` and stores it; the store verifies it against the table.
    fn fetch_one(
        self: &Arc<Self>,
        host: HostId,
        addrs: Vec<std::net::SocketAddr>,
        index: u32,
        len: u32,
    ) -> impl std::future::Future<Output = Fetched> + Send + 'static {
        let this = Arc::clone(self);
        async move {
            let started = Instant::now();
            let timeout = this.ctx.config.piece_timeout();
            let result = match fetch_piece(
                &this.ctx.transport,
                &host,
                &addrs,
                this.blob,
                index,
                len,
                timeout,
            )
            .await
            {
                Ok(bytes) => {
                    let n = bytes.len() as u64;
                    match this
                        .ctx
                        .store
                        .put_piece(store_digest(&this.blob), index, bytes)
                        .await
                    {
                        Ok(_) => {
                            this.ctx.stats.piece_latency.observe(started.elapsed());
                            add(&this.ctx.stats.bytes_from_peers, n);
                            this.lock().bytes_from_peers += n;
                            this.notify();
                            Ok(n)
                        }
                        Err(e) if matches!(e.root(), shoal_store::Error::HashMismatch { .. }) => {
                            add(&this.ctx.stats.corrupt_pieces, 1);
                            Err(FetchFailure::Drop(
                                FailureReason::Corrupt,
                                format!("piece {index} failed BLAKE3 verification"),
                            ))
                        }
                        Err(e) => {
                            tracing::warn!(blob = %this.blob, piece = index, error = %e, "storing a piece failed");
                            Err(FetchFailure::Busy(Duration::from_millis(100)))
                        }
                    }
                }
                Err(f) => Err(f),
            };
            Fetched {
                host,
                index,
                started,
                result,
            }
        }
    }

    /// Asks the scheduler for parents; `Some` ends the swarm round (go to the origin).
    async fn ask_parents(
        &self,
        layout: &PieceLayout,
        missing: &[u32],
        table: &mut ParentTable,
    ) -> Result<Option<SwarmEnd>, PeerError> {
        let Some(s) = self.ctx.scheduler(&self.blob) else {
            return Ok(self.dht_parents(table, "no scheduler answers").await);
        };
        let mut wanted = PieceSet::empty(layout.piece_count())?;
        for &i in missing {
            wanted.insert(i)?;
        }
        let req = SchedulerRequest::RequestParents(RequestParents {
            blob: self.blob,
            wanted,
            exclude: table
                .excluded
                .iter()
                .take(shoal_proto::MAX_PARENTS * 4)
                .cloned()
                .collect(),
        });
        match s.request(&req).await {
            Ok(SchedulerReply::Parents(ParentsReply::Parents(list))) => {
                for p in list {
                    table.add(
                        p.host_id,
                        p.addresses,
                        Some(p.pieces),
                        p.is_seed,
                        &self.ctx.me,
                    );
                }
                Ok(None)
            }
            Ok(SchedulerReply::Parents(ParentsReply::BackToSource { reason })) => {
                Ok(Some(SwarmEnd::BackToSource(reason)))
            }
            Ok(SchedulerReply::Parents(ParentsReply::WaitForSeed { retry_after_ms })) => {
                tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms.min(1000))))
                    .await;
                Ok(None)
            }
            Ok(SchedulerReply::Error(e)) if e.code == shoal_proto::ErrorCode::UnknownTask => {
                // A restarted scheduler: announce the task again, then ask next round.
                if let Some(a) = self.announcement() {
                    let _ = s.request(&SchedulerRequest::RegisterTask(a)).await;
                }
                Ok(None)
            }
            Ok(other) => {
                tracing::warn!(blob = %self.blob, reply = ?other, "unexpected answer to RequestParents");
                Ok(None)
            }
            Err(e) => Ok(self
                .dht_parents(table, &format!("scheduler unreachable: {e}"))
                .await),
        }
    }

    /// Asks every parent which pieces it holds now (parents still downloading gain pieces).
    async fn refresh(&self, layout: &PieceLayout, table: &mut ParentTable) {
        let timeout = self.ctx.config.piece_timeout().min(Duration::from_secs(2));
        let asks = table.all().into_iter().map(|(host, addrs)| async move {
            let r = fetch_held(
                &self.ctx.transport,
                &host,
                &addrs,
                self.blob,
                layout.piece_count(),
                timeout,
            )
            .await;
            (host, r)
        });
        let answers: Vec<_> = futures::future::join_all(asks).await;
        for (host, r) in answers {
            match r {
                Ok(Some(set)) => table.set_pieces(&host, set),
                Ok(None) => {}
                Err(FetchFailure::Drop(reason, detail)) => {
                    self.drop_parent(table, &host, None, reason, detail)
                }
                Err(_) => {}
            }
        }
    }

    fn drop_parent(
        &self,
        table: &mut ParentTable,
        host: &HostId,
        piece: Option<u32>,
        reason: FailureReason,
        detail: String,
    ) {
        tracing::warn!(blob = %self.blob, parent = %host, ?piece, ?reason, %detail, "dropping parent");
        table.drop_parent(host);
        self.ctx.transport.forget(host);
        add(&self.ctx.stats.parents_dropped, 1);
        self.ctx
            .report(SchedulerRequest::ReportPieceFailure(ReportPieceFailure {
                blob: self.blob,
                parent: host.clone(),
                piece,
                reason,
                detail: detail.chars().take(shoal_proto::MAX_TEXT_LEN / 2).collect(),
            }));
    }

    fn flush(&self, report: &mut Vec<u32>) {
        if !report.is_empty() {
            self.ctx
                .report(held_added(self.blob, std::mem::take(report)));
        }
    }
}
