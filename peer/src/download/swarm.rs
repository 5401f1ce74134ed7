//! The swarm round of a download: ask the scheduler for parents, fetch each wanted piece from
//! the parent fastest for it now (several at once), keep parents' held sets fresh (watched, so
//! each parent pushes its set as it changes; polled where a watch is not possible), and drop and
//! report parents that fail, stall or send bytes that do not match the piece table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{AbortHandle, Abortable};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use shoal_proto::{
    FailureReason, HostId, ParentsReply, PieceSet, ReportPieceFailure, RequestParents,
    SchedulerReply, SchedulerRequest, TaskMeta,
};

use super::add;
use super::dht::HolderTable;
use super::driver::held_added;
use super::parents::{fetch_held, fetch_piece, FetchFailure, ParentTable};
use super::staging::StageError;
use super::task::Task;
use super::watches::{Watched, Watches};
use crate::error::PeerError;

/// After this many failed attempts from parents a piece is fetched from the origin.
const MAX_PIECE_FAILURES: u32 = 4;
/// How often parents' held sets are refreshed while nothing can be fetched.
const REFRESH_EVERY: Duration = Duration::from_millis(100);
/// How often the scheduler is asked for more parents while nothing can be fetched.
const ASK_EVERY: Duration = Duration::from_millis(500);
/// How often the scheduler is asked for more parents while pieces are flowing.
const REASK_EVERY: Duration = Duration::from_secs(1);
/// How often unwatched parents' held sets are refreshed while pieces are flowing.
const REFRESH_BUSY_EVERY: Duration = Duration::from_millis(300);
/// How often the rarest-first order is recomputed from parents' held sets.
const HOLDERS_EVERY: Duration = Duration::from_millis(100);
/// Held pieces are reported to the scheduler in batches at least this often.
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// How often a download without a whole piece table asks for newly published hashes.
const HASH_POLL_EVERY: Duration = Duration::from_millis(150);
/// How often a download without a whole table that the scheduler brings nothing new for asks
/// its parents (and, without a scheduler, the DHT's holders) for it, or for the hashes they know
/// so far.
const TABLE_ASK_EVERY: Duration = Duration::from_secs(1);
/// Endgame: when at most this many pieces are missing and all are in flight, each is also
/// asked of a second parent; the first answer wins and the other request is cancelled.
const ENDGAME_PIECES: usize = 4;
/// A piece only a seed holds is asked of the seed by one peer in n (n: this peer and its
/// non-seed parents; by host id order and piece index), so the seed's uplink sends it once
/// and peers pass it on; each time the piece has waited this long one more peer may ask (the
/// first may be gone or slow).
const SEED_TURN_WAIT: Duration = Duration::from_secs(2);

/// How a swarm round ended.
pub(super) enum SwarmEnd {
    /// Every wanted piece is held.
    Done,
    /// Go to the origin for these pieces (empty: for every missing one).
    BackToSource(String, Vec<u32>),
}

/// What one in-flight piece fetch came back with.
struct Fetched {
    host: HostId,
    index: u32,
    started: Instant,
    result: Result<u64, FetchFailure>,
}

/// What polling for streamed piece hashes found.
enum HashPoll {
    /// New hashes (more pieces can be fetched), or the whole table, adopted: the round goes on
    /// with it.
    New,
    /// Nothing new.
    Nothing,
}

/// The pieces of `missing` worth fetching from the origin when the swarm gives up: those no
/// parent holds and those that failed from [`MAX_PIECE_FAILURES`] parents. Pieces other peers
/// hold are left to them; when every missing piece is held somewhere (the holders all stalled),
/// all of `missing`.
pub(super) fn origin_pieces(
    missing: &[u32],
    held_somewhere: impl Fn(u32) -> bool,
    failures: &HashMap<u32, u32>,
) -> Vec<u32> {
    let mut out: Vec<u32> = missing
        .iter()
        .copied()
        .filter(|i| {
            !held_somewhere(*i) || failures.get(i).copied().unwrap_or(0) >= MAX_PIECE_FAILURES
        })
        .collect();
    if out.is_empty() {
        out = missing.to_vec();
    }
    out.sort_unstable();
    out
}

impl Task {
    /// Fetches wanted pieces from parents until all are held or the swarm cannot help. Without
    /// a whole piece table (a plain blob its origin fetcher is still reading), only pieces with
    /// a published hash are fetched, into staging (staging.rs), until the table is whole; the
    /// round then goes on with it, its parents, watches and requests in flight kept.
    pub(super) async fn swarm(self: &Arc<Self>, meta: &TaskMeta) -> Result<SwarmEnd, PeerError> {
        let cfg = &self.ctx.config;
        let me = self.ctx.me.clone();
        let count = meta.piece_count();
        let mut table = ParentTable::default();
        let mut inflight = FuturesUnordered::new();
        // Requests in flight per piece: more than one only in the endgame.
        let mut busy: HashMap<u32, Vec<(HostId, AbortHandle)>> = HashMap::new();
        let mut failures: HashMap<u32, u32> = HashMap::new();
        let mut last_ask: Option<Instant> = None;
        let mut last_refresh: Option<Instant> = None;
        let mut last_hashes: Option<Instant> = None;
        let mut last_dht: Option<Instant> = None;
        let mut last_progress = Instant::now();
        let mut report: Vec<u32> = Vec::new();
        let mut last_report = Instant::now();
        let want_all = self.lock().want_all;
        let rotate = fastrand::usize(..count.max(1) as usize);
        let mut holders: Vec<u16> = Vec::new();
        let mut holders_at: Option<Instant> = None;
        let mut wanted_since: Vec<Option<Instant>> = vec![None; count as usize];
        // Held sets asked for while pieces flow, in a task of its own: waiting for the answers
        // (they queue behind the parents' uploads) held back new requests.
        let mut refreshing: Option<Background<HeldAnswers>> = None;
        let mut watches = Watches::new();
        let mut pin = None;
        loop {
            if refreshing.as_ref().is_some_and(|r| r.0.is_finished()) {
                if let Some(mut r) = refreshing.take() {
                    if let Ok(answers) = (&mut r.0).await {
                        self.apply_held(answers, &mut table);
                    }
                }
            }
            for p in std::mem::take(&mut self.lock().new_parents) {
                table.add(p.host_id, p.addresses, Some(p.pieces), p.is_seed, &me);
            }
            for w in watches.drain() {
                self.apply_watched(w, &mut table, &mut watches);
            }
            let layout = self.lock().layout.clone();
            // The blob is in the store once its table is whole: kept from eviction meanwhile.
            if pin.is_none() && layout.is_some() {
                pin = Some(self.ctx.store.pin_blob(&self.blob)?);
            }
            let partial = layout.is_none();
            if partial && last_hashes.is_none_or(|t| t.elapsed() >= HASH_POLL_EVERY) {
                last_hashes = Some(Instant::now());
                let table_due = last_dht.is_none_or(|t| t.elapsed() >= TABLE_ASK_EVERY);
                if table_due {
                    last_dht = Some(Instant::now());
                }
                let parents = table_due.then(|| table.table_sources());
                match self.poll_hashes(meta, parents).await? {
                    HashPoll::New => last_progress = Instant::now(),
                    HashPoll::Nothing => {}
                }
            }
            // Without a whole table, the stall limit is how long a table may take to come.
            let stall_limit = match partial {
                true => Duration::from_millis(cfg.piece_table_wait_ms),
                false => cfg.piece_timeout() * 2,
            };
            let mut missing = match &layout {
                Some(l) => self.missing(l),
                None => self.fetchable(),
            };
            if want_all && !missing.is_empty() {
                // Peers that start together would all ask for the same pieces in the same order
                // and could only get them from the seed; a per-download rotation lets them trade.
                let at = rotate % missing.len();
                missing.rotate_left(at);
                // Rarest first (the rotation breaks ties): the seed's uplink goes to pieces
                // nobody else has yet, and peers soon hold different pieces to trade. Counts
                // are recomputed every HOLDERS_EVERY from the held sets parents pushed.
                if holders_at.is_none_or(|t| t.elapsed() >= HOLDERS_EVERY) {
                    holders = table.holder_counts(count);
                    holders_at = Some(Instant::now());
                }
                missing.sort_by_key(|i| holders.get(*i as usize).copied().unwrap_or(0));
            }
            if missing.is_empty() && inflight.is_empty() && !partial {
                self.flush(&mut report);
                return Ok(SwarmEnd::Done);
            }
            watches.start(&self.ctx.transport, self.blob, count, &table);
            let now = Instant::now();
            let (rank, share) = table.seed_turn(&me);
            for &i in &missing {
                if let Some(w) = wanted_since.get_mut(i as usize) {
                    w.get_or_insert(now);
                }
            }
            for &i in &missing {
                if inflight.len() >= cfg.download_concurrency {
                    break;
                }
                if busy.contains_key(&i) {
                    continue;
                }
                if failures.get(&i).copied().unwrap_or(0) >= MAX_PIECE_FAILURES {
                    if inflight.is_empty() {
                        self.flush(&mut report);
                        let pieces = origin_pieces(&missing, |i| table.anyone_holds(i), &failures);
                        return Ok(SwarmEnd::BackToSource(
                            format!("piece {i} failed from {MAX_PIECE_FAILURES} parents"),
                            pieces,
                        ));
                    }
                    continue;
                }
                let waited = wanted_since
                    .get(i as usize)
                    .copied()
                    .flatten()
                    .map_or(Duration::ZERO, |t| now.duration_since(t));
                let seed_ok = seed_turn(i, rank, share, waited);
                let Some((host, addrs)) =
                    table.pick(i, cfg.per_parent_concurrency, now, &[], seed_ok)
                else {
                    continue;
                };
                let Some(len) = piece_len(meta, i) else {
                    continue;
                };
                table.start(&host);
                let (fetch, abort) = self.fetch_one(host.clone(), addrs, i, len);
                busy.entry(i).or_default().push((host, abort));
                inflight.push(fetch);
            }
            // Endgame: the last pieces also go to a second parent, so one slow parent does not
            // hold up the end of the download. Not while the table streams in: the last pieces
            // then are the newest of an import, and asking twice would send them twice.
            if !partial
                && !missing.is_empty()
                && missing.len() <= ENDGAME_PIECES
                && missing.iter().all(|i| busy.contains_key(i))
            {
                for &i in &missing {
                    let asked: Vec<HostId> = match busy.get(&i) {
                        Some(v) if v.len() < 2 => v.iter().map(|(h, _)| h.clone()).collect(),
                        _ => continue,
                    };
                    let Some((host, addrs)) =
                        table.pick(i, cfg.per_parent_concurrency + 1, now, &asked, true)
                    else {
                        continue;
                    };
                    let Some(len) = piece_len(meta, i) else {
                        continue;
                    };
                    table.start(&host);
                    let (fetch, abort) = self.fetch_one(host.clone(), addrs, i, len);
                    busy.entry(i).or_default().push((host, abort));
                    inflight.push(fetch);
                }
            }
            if inflight.is_empty() {
                if last_progress.elapsed() > stall_limit {
                    self.flush(&mut report);
                    let pieces = origin_pieces(&missing, |i| table.anyone_holds(i), &failures);
                    return Ok(SwarmEnd::BackToSource(
                        format!("no parent served a piece for {stall_limit:?}"),
                        pieces,
                    ));
                }
                let ask_due = last_ask.is_none_or(|t| t.elapsed() >= ASK_EVERY);
                if ask_due && (table.len() == 0 || !missing.iter().any(|i| table.anyone_holds(*i)))
                {
                    last_ask = Some(Instant::now());
                    if let Some(end) = self
                        .ask_parents(count, &missing, partial, &mut table)
                        .await?
                    {
                        self.flush(&mut report);
                        return Ok(end);
                    }
                }
                if refreshing.is_none() && last_refresh.is_none_or(|t| t.elapsed() >= REFRESH_EVERY)
                {
                    last_refresh = Some(Instant::now());
                    let unwatched = table.all(|h| !watches.is_watched(h));
                    self.refresh(count, unwatched, &mut table).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH_EVERY) => {}
                    _ = self.wake.notified() => {}
                    w = watches.next() => self.apply_watched(w, &mut table, &mut watches),
                }
                continue;
            }
            let done = tokio::select! {
                done = inflight.next() => done,
                _ = tokio::time::sleep(REPORT_EVERY) => None,
                _ = self.wake.notified() => None,
                w = watches.next() => {
                    self.apply_watched(w, &mut table, &mut watches);
                    None
                }
            };
            if let Some(f) = done {
                let won = f.result.is_ok();
                if let Some(asked) = busy.get_mut(&f.index) {
                    asked.retain(|(h, abort)| {
                        // The first good answer wins: the other requests for it are cancelled.
                        if won && h != &f.host {
                            abort.abort();
                        }
                        h != &f.host
                    });
                    if won || asked.is_empty() {
                        busy.remove(&f.index);
                    }
                }
                match f.result {
                    Ok(bytes) => {
                        tracing::debug!(blob = %self.blob, piece = f.index, parent = %f.host, ms = f.started.elapsed().as_millis() as u64, "piece fetched");
                        table.finish(&f.host, Some((bytes, f.started.elapsed())));
                        last_progress = Instant::now();
                        report.push(f.index);
                    }
                    Err(FetchFailure::Cancelled) => table.finish(&f.host, None),
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
                let _ = self
                    .ask_parents(count, &missing, partial, &mut table)
                    .await?;
            }
            if refreshing.is_none()
                && last_refresh.is_none_or(|t| t.elapsed() >= REFRESH_BUSY_EVERY)
            {
                let unwatched = table.all(|h| !watches.is_watched(h));
                if !unwatched.is_empty() {
                    last_refresh = Some(Instant::now());
                    refreshing = Some(self.start_refresh(count, unwatched));
                }
            }
            if report.len() >= 32 || (!report.is_empty() && last_report.elapsed() >= REPORT_EVERY) {
                self.flush(&mut report);
                last_report = Instant::now();
            }
        }
    }

    /// Wanted pieces that have a published hash but are not staged yet (no whole table).
    fn fetchable(&self) -> Vec<u32> {
        let all = self.ctx.staging.fetchable(&self.blob);
        let inner = self.lock();
        if inner.want_all {
            all
        } else {
            all.into_iter()
                .filter(|i| inner.wanted.contains(i))
                .collect()
        }
    }

    /// Learns newly published piece hashes of a blob whose table is not whole: from the
    /// scheduler, and, when it brings nothing new (or there is none), from `parents` (given
    /// once a [`TABLE_ASK_EVERY`]) and, without a scheduler, the DHT's holders. Parents the swarm
    /// already exchanges pieces with hold the table or follow the import that streams it, so a
    /// lost scheduler does not stall the download; a whole table is adopted at once.
    async fn poll_hashes(
        self: &Arc<Self>,
        meta: &TaskMeta,
        parents: Option<Vec<(HostId, Vec<SocketAddr>)>>,
    ) -> Result<HashPoll, PeerError> {
        let staging = &self.ctx.staging;
        let mut new = false;
        if let Some(first) = staging.first_unknown(&self.blob) {
            let scheduler = self.ctx.scheduler(&self.blob);
            if let Some(s) = &scheduler {
                let ask = SchedulerRequest::GetPieceHashes {
                    blob: self.blob,
                    first,
                };
                if let Ok(SchedulerReply::PieceHashes(r)) = s.request(&ask).await {
                    if r.blob == self.blob {
                        new = staging.learn(&self.blob, r.first, &r.hashes, r.publisher) > 0;
                    }
                }
            }
            if let Some(mut hosts) = parents.filter(|_| !new) {
                if scheduler.is_none() {
                    let holders = self.dht_holders().await;
                    let known: Vec<HostId> = hosts.iter().map(|(h, _)| h.clone()).collect();
                    hosts.extend(
                        holders
                            .into_iter()
                            .filter(|h| !known.contains(&h.host_id))
                            .map(|h| (h.host_id, h.addresses)),
                    );
                }
                match self.table_from(hosts, |m| m == meta).await {
                    Some(HolderTable::Whole(m, table)) => {
                        self.adopt_streamed(&m, table).await?;
                        return Ok(HashPoll::New);
                    }
                    Some(HolderTable::Partial(_, hashes, from)) => {
                        new = staging.learn(&self.blob, 0, &hashes, Some(from)) > 0;
                    }
                    None => {}
                }
            }
        }
        if staging.first_unknown(&self.blob).is_none() {
            if let Some(table) = staging.table(&self.blob) {
                self.lock().table_from = staging.publisher(&self.blob);
                self.adopt_streamed(meta, table).await?;
                return Ok(HashPoll::New);
            }
        }
        Ok(if new {
            HashPoll::New
        } else {
            HashPoll::Nothing
        })
    }

    /// Fetches one piece from `host` and stores it: into the store, which verifies it against
    /// the piece table, or (no whole table yet) into staging, which verifies it against its
    /// published hash. The handle cancels it (the endgame's losing duplicate).
    fn fetch_one(
        self: &Arc<Self>,
        host: HostId,
        addrs: Vec<std::net::SocketAddr>,
        index: u32,
        len: u32,
    ) -> (
        impl std::future::Future<Output = Fetched> + Send + 'static,
        AbortHandle,
    ) {
        let this = Arc::clone(self);
        let (abort, registration) = AbortHandle::new_pair();
        let who = host.clone();
        let started = Instant::now();
        let work = async move {
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
                // Storing runs as a task of its own that a cancelled fetch does not stop, so a
                // piece that lands in staging or the store is always counted.
                Ok(bytes) => {
                    let keeper = Arc::clone(&this);
                    tokio::spawn(async move { keeper.keep(index, bytes).await })
                        .await
                        .unwrap_or(Err(FetchFailure::Cancelled))
                }
                Err(f) => Err(f),
            };
            Fetched {
                host,
                index,
                started,
                result,
            }
        };
        // A task of its own, so the piece is read off the connection as it arrives even while
        // this driver awaits the scheduler or a refresh. Polled inline, its bytes piled up in
        // QUIC's buffers meanwhile and filled the connection's window, which every download
        // from that parent shares (docs/benchmarks.md, "Peer memory"). Dropping the returned
        // future (the swarm round ended) still cancels it.
        let running = tokio::spawn(Abortable::new(work, registration));
        let on_drop = AbortOnDrop(abort.clone());
        let fut = async move {
            let _on_drop = on_drop;
            match running.await {
                Ok(Ok(f)) => f,
                Ok(Err(_)) | Err(_) => Fetched {
                    host: who,
                    index,
                    started,
                    result: Err(FetchFailure::Cancelled),
                },
            }
        };
        (fut, abort)
    }

    /// Stores a fetched piece where it belongs now (store or staging), verified.
    async fn keep(&self, index: u32, bytes: bytes::Bytes) -> Result<u64, FetchFailure> {
        let n = bytes.len() as u64;
        let corrupt = |this: &Self| {
            add(&this.ctx.stats.corrupt_pieces, 1);
            FetchFailure::Drop(
                FailureReason::Corrupt,
                format!("piece {index} failed BLAKE3 verification"),
            )
        };
        let to_store = self.lock().layout.is_some();
        if !to_store {
            // Hashing and writing the staging file run on the blocking pool.
            let (staging, blob, piece) = (Arc::clone(&self.ctx.staging), self.blob, bytes.clone());
            let staged = tokio::task::spawn_blocking(move || staging.put(&blob, index, &piece))
                .await
                .unwrap_or(Err(StageError::Full));
            match staged {
                Ok(new) => {
                    if new {
                        self.counted(n);
                    }
                    return Ok(n);
                }
                Err(StageError::Mismatch) => return Err(corrupt(self)),
                Err(StageError::Full) => {
                    return Err(FetchFailure::Busy(Duration::from_millis(200)))
                }
                // The table became whole meanwhile: the piece goes to the store.
                Err(StageError::NoHash) if self.lock().layout.is_some() => {}
                Err(StageError::NoHash) => {
                    return Err(FetchFailure::Busy(Duration::from_millis(50)))
                }
            }
        }
        // A copy staged before the table was whole was counted then; it may reach the store
        // here before the staged one is moved there.
        let staged = self.ctx.staging.staged_len(&self.blob, index).is_some();
        match self.ctx.store.put_piece(self.blob, index, bytes).await {
            // A copy that lost the endgame race (the fetches run as tasks of their own, so both
            // may arrive) is not counted twice.
            Ok(shoal_store::PutOutcome::AlreadyHeld) => Ok(n),
            Ok(shoal_store::PutOutcome::Stored) => {
                if !staged {
                    self.counted(n);
                }
                Ok(n)
            }
            Err(e) if matches!(e.root(), shoal_store::Error::HashMismatch { .. }) => {
                Err(corrupt(self))
            }
            Err(e) => {
                tracing::warn!(blob = %self.blob, piece = index, error = %e, "storing a piece failed");
                Err(FetchFailure::Busy(Duration::from_millis(100)))
            }
        }
    }

    fn counted(&self, n: u64) {
        add(&self.ctx.stats.bytes_from_peers, n);
        self.lock().bytes_from_peers += n;
        self.notify();
    }

    /// Asks the scheduler for parents; `Some` ends the swarm round (go to the origin).
    /// Without a scheduler the DHT's holders are added instead. While the table streams in
    /// (`partial`), that never ends the round: the origin fetcher gives its whole table to the
    /// DHT when its import ends, and going to the origin instead would import the blob again;
    /// the round's stall limit (`piece_table_wait_ms`) bounds the wait.
    async fn ask_parents(
        self: &Arc<Self>,
        count: u32,
        missing: &[u32],
        partial: bool,
        table: &mut ParentTable,
    ) -> Result<Option<SwarmEnd>, PeerError> {
        // Without a scheduler the origin gets only what no known parent holds.
        let narrow = |end: Option<SwarmEnd>, table: &ParentTable| match end {
            _ if partial => None,
            Some(SwarmEnd::BackToSource(why, p)) if p.is_empty() => Some(SwarmEnd::BackToSource(
                why,
                origin_pieces(missing, |i| table.anyone_holds(i), &HashMap::new()),
            )),
            other => other,
        };
        let Some(s) = self.ctx.scheduler(&self.blob) else {
            // Held sets may be stale (a parent's import went on since it last said): they are
            // asked afresh before the origin gets anything.
            if !partial && table.len() > 0 {
                self.refresh(count, table.all(|_| true), table).await;
                if missing.iter().all(|&i| table.anyone_holds(i)) {
                    return Ok(None);
                }
            }
            let end = self.dht_parents(table, "no scheduler answers").await;
            return Ok(narrow(end, table));
        };
        let mut wanted = PieceSet::empty(count);
        for &i in missing {
            wanted.insert(i);
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
                tracing::debug!(blob = %self.blob, parents = ?list.iter().map(|p| p.host_id.as_str()).collect::<Vec<_>>(), "parents named");
                if let Some(dht) = &self.ctx.dht {
                    // Peers the DHT can bootstrap from after the scheduler is gone (it skips
                    // those it has verified already).
                    dht.bootstrap(list.iter().flat_map(|p| p.addresses.clone()).collect());
                }
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
                let pieces = origin_pieces(missing, |i| table.anyone_holds(i), &HashMap::new());
                Ok(Some(SwarmEnd::BackToSource(reason, pieces)))
            }
            Ok(SchedulerReply::Parents(ParentsReply::WaitForSeed { retry_after_ms })) => {
                tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms.min(1000))))
                    .await;
                Ok(None)
            }
            Ok(SchedulerReply::Error(e)) if e.code == shoal_proto::ErrorCode::Refused => {
                Err(super::refused_by_scheduler(&self.blob, &e))
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
            Err(e) => {
                let end = self
                    .dht_parents(table, &format!("scheduler unreachable: {e}"))
                    .await;
                Ok(narrow(end, table))
            }
        }
    }

    /// Records what a held-set watch brought: a set, a broken parent, or the end of the watch
    /// (that parent is polled from then on).
    fn apply_watched(&self, w: Watched, table: &mut ParentTable, watches: &mut Watches) {
        match w {
            Watched::Held(host, set) => table.set_pieces(&host, set),
            // Its watch ends with it (Watches::start).
            Watched::Broken(host, detail) => {
                self.drop_parent(table, &host, None, FailureReason::Protocol, detail)
            }
            Watched::Ended(host) => watches.ended(&host),
        }
    }

    /// Asks `parents` which pieces they hold now, and records the answers in `table`.
    async fn refresh(self: &Arc<Self>, count: u32, parents: Parents, table: &mut ParentTable) {
        let mut asked = self.start_refresh(count, parents);
        if let Ok(answers) = (&mut asked.0).await {
            self.apply_held(answers, table);
        }
    }

    /// Asks `parents` which pieces they hold, in a task of its own.
    fn start_refresh(self: &Arc<Self>, count: u32, parents: Parents) -> Background<HeldAnswers> {
        let this = Arc::clone(self);
        Background(tokio::spawn(async move {
            let timeout = this.ctx.config.piece_timeout().min(Duration::from_secs(2));
            let asks = parents.into_iter().map(|(host, addrs)| {
                let this = &this;
                async move {
                    let r = fetch_held(
                        &this.ctx.transport,
                        &host,
                        &addrs,
                        this.blob,
                        count,
                        timeout,
                    )
                    .await;
                    (host, r)
                }
            });
            futures::future::join_all(asks).await
        }))
    }

    /// Records parents' held sets; drops a parent whose answer was broken.
    fn apply_held(&self, answers: HeldAnswers, table: &mut ParentTable) {
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

/// Whether piece `index`, which only a seed holds, is this peer's to ask the seed for: its
/// turn (`rank` of `share`, [`ParentTable::seed_turn`]), or, after `waited`, one of the next
/// peers' turns too, one more per [`SEED_TURN_WAIT`].
fn seed_turn(index: u32, rank: u64, share: u64, waited: Duration) -> bool {
    let share = share.max(1);
    let behind = (rank + share - u64::from(index) % share) % share;
    let allowed = 1 + waited.as_millis() / SEED_TURN_WAIT.as_millis();
    u128::from(behind) < allowed
}

/// Length of piece `index` of the blob `meta` describes, if it has that piece.
pub(super) fn piece_len(meta: &TaskMeta, index: u32) -> Option<u32> {
    let start = u64::from(index) * u64::from(meta.piece_size);
    if index >= meta.piece_count() || start >= meta.size {
        return None;
    }
    u32::try_from((meta.size - start).min(u64::from(meta.piece_size))).ok()
}

/// Cancels a spawned piece fetch when whoever waits for it goes away.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Host ids and addresses of some parents ([`ParentTable::all`]).
type Parents = Vec<(HostId, Vec<std::net::SocketAddr>)>;

/// Parents' answers to "which pieces do you hold".
type HeldAnswers = Vec<(HostId, Result<Option<PieceSet>, FetchFailure>)>;

/// A task of a swarm round, aborted when the round ends.
pub(super) struct Background<T>(pub(super) tokio::task::JoinHandle<T>);

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_origin_gets_only_what_no_peer_can_give() {
        let missing = [1, 2, 3, 4, 5];
        let held = |i: u32| i % 2 == 1; // peers hold 1, 3, 5
        let mut failures = HashMap::new();
        assert_eq!(origin_pieces(&missing, held, &failures), vec![2, 4]);
        failures.insert(3, MAX_PIECE_FAILURES);
        assert_eq!(origin_pieces(&missing, held, &failures), vec![2, 3, 4]);
        // Every missing piece is held somewhere but the holders stalled: all of them.
        assert_eq!(origin_pieces(&[1, 3], held, &HashMap::new()), vec![1, 3]);
    }

    #[test]
    fn a_seed_only_piece_goes_to_one_more_peer_per_wait() {
        let askers = |index: u32, waited: Duration| -> Vec<u64> {
            (0..4)
                .filter(|rank| seed_turn(index, *rank, 4, waited))
                .collect()
        };
        assert_eq!(askers(6, Duration::ZERO), vec![2]);
        assert_eq!(askers(6, SEED_TURN_WAIT), vec![2, 3]);
        assert_eq!(askers(7, SEED_TURN_WAIT * 2), vec![0, 1, 3]);
        assert_eq!(askers(7, SEED_TURN_WAIT * 9), vec![0, 1, 2, 3]);
        // Alone (no peer parents), this peer asks for everything at once.
        assert!(seed_turn(5, 0, 1, Duration::ZERO));
    }

    #[test]
    fn piece_lengths_follow_the_geometry() {
        let meta = TaskMeta {
            blob: shoal_proto::Digest::from_bytes([1; 32]),
            size: 3 * 65536 + 5,
            piece_size: 65536,
        };
        assert_eq!(piece_len(&meta, 0), Some(65536));
        assert_eq!(piece_len(&meta, 3), Some(5));
        assert_eq!(piece_len(&meta, 4), None);
    }
}
