//! The piece server: other peers connect over mutual-TLS QUIC, say Hello, and ask for pieces or
//! for the set of pieces held. Only pieces read (and so verified) from the store are served, the
//! pieces of a blob still downloading included. A child may watch a blob's held set instead of
//! polling it: it is sent again whenever it changes. Upload slots and a rate limit bound the load,
//! and the peer's piece memory budget (budget.rs) bounds the piece bytes read for uploading:
//! when it is full the asker is told "busy" rather than kept waiting.

mod limit;
mod superseed;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shoal_proto::{
    server_handshake, Codec, PieceError, PieceErrorCode, PieceHeader, PieceReply, PieceRequest,
    Role,
};
use shoal_store::AsyncStore;
use tokio::sync::Semaphore;

use crate::budget::PieceBudget;
use crate::held_news::HeldNews;
use crate::transport::{check_hello, Transport};

pub(crate) use limit::RateLimiter;
use superseed::{SentRecently, SEED_RESEND_AFTER};

/// How long a busy answer tells the asker to wait before retrying.
const BUSY_RETRY_MS: u32 = 100;
/// Pieces often land in bursts: a watcher gets one held set per burst of this length.
const WATCH_BATCH: std::time::Duration = std::time::Duration::from_millis(20);
/// Send priority of held-set watch streams: these small frames tell children where to fetch
/// next, so they go ahead of queued piece bytes.
const WATCH_PRIORITY: i32 = 8;

/// Counters of the piece server.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Pieces served.
    pub pieces: AtomicU64,
    /// Piece bytes served.
    pub bytes: AtomicU64,
    /// Requests refused because every slot was in use or the piece memory budget was full.
    pub busy: AtomicU64,
    /// Connections refused (bad Hello or certificate).
    pub refused: AtomicU64,
    /// Requests a seed refused because it had just sent the piece to another peer.
    pub resend_refused: AtomicU64,
}

/// The state every upload shares.
#[derive(Debug)]
pub(crate) struct Uploader {
    store: AsyncStore,
    /// Wakes held-set watchers when a blob gains pieces.
    news: Arc<HeldNews>,
    slots: Arc<Semaphore>,
    slot_count: u32,
    limiter: RateLimiter,
    budget: PieceBudget,
    /// Verified pieces of blobs whose piece table is not whole yet (download/staging.rs).
    staging: std::sync::OnceLock<Arc<crate::download::Staging>>,
    /// Seeds only: which peer each piece was just sent to (super-seeding).
    sent: Option<SentRecently>,
    /// Test hook (feature `test-hooks`, never in the shipped binary): flip a byte of every
    /// piece served.
    #[cfg(feature = "test-hooks")]
    pub(crate) corrupt: std::sync::atomic::AtomicBool,
    pub stats: Arc<UploadStats>,
}

impl Uploader {
    /// An uploader over `store` with `slots` concurrent uploads, a rate limit, and the peer's
    /// piece memory budget; a `seed` sends each piece to one peer at a time.
    pub fn new(
        store: AsyncStore,
        news: Arc<HeldNews>,
        slots: u32,
        bytes_per_sec: u64,
        budget: PieceBudget,
        seed: bool,
    ) -> Self {
        let sent = seed.then(|| SentRecently::new(SEED_RESEND_AFTER));
        Uploader {
            store,
            news,
            slots: Arc::new(Semaphore::new(slots as usize)),
            slot_count: slots,
            limiter: RateLimiter::new(bytes_per_sec),
            budget,
            staging: std::sync::OnceLock::new(),
            sent,
            #[cfg(feature = "test-hooks")]
            corrupt: Default::default(),
            stats: Arc::default(),
        }
    }

    /// Serves staged pieces too (pieces of blobs whose piece table is not whole yet).
    pub fn serve_staged(&self, staging: Arc<crate::download::Staging>) {
        let _ = self.staging.set(staging);
    }

    /// The answer to a piece-table request: the store's whole table (whatever pieces it holds:
    /// the table is what the asker needs to verify pieces from anyone); else, to a peer that
    /// speaks version 4, the hashes staging knows (this node imports or streams the blob in).
    fn table_reply(&self, codec: &Codec, blob: shoal_proto::Digest) -> PieceReply {
        if let Some(status) = self.store.blob_status(&blob) {
            return PieceReply::Table(shoal_proto::PieceTableReply {
                task: shoal_proto::TaskMeta {
                    blob,
                    size: status.layout.size(),
                    piece_size: status.layout.piece_size(),
                },
                table: status
                    .layout
                    .pieces()
                    .iter()
                    .map(|h| *h.as_bytes())
                    .collect(),
            });
        }
        let partial = (codec.version() >= shoal_proto::PARTIAL_TABLE_VERSION)
            .then(|| self.staging.get().and_then(|s| s.known(&blob)))
            .flatten();
        match partial {
            Some((task, hashes)) => {
                PieceReply::PartialTable(shoal_proto::PartialTableReply { task, hashes })
            }
            None => PieceReply::Error(PieceError::new(
                PieceErrorCode::NotHeld,
                format!("{blob} is not held here"),
            )),
        }
    }

    /// Held pieces of `blob`: in the store, plus staged ones.
    fn held_reply(&self, blob: &shoal_proto::Digest) -> PieceReply {
        let staged = self.staging.get().and_then(|s| s.held(blob));
        let stored = self.store.blob_status(blob);
        let (mut set, staged) = match (stored, staged) {
            (Some(status), staged) => (status.held, staged.map(|s| s.1).unwrap_or_default()),
            (None, Some((count, pieces))) => (shoal_proto::PieceSet::empty(count), pieces),
            (None, None) => {
                return PieceReply::Error(PieceError::new(
                    PieceErrorCode::NotHeld,
                    format!("{blob} is not held here"),
                ))
            }
        };
        for i in staged {
            set.insert(i);
        }
        PieceReply::Held(set)
    }

    /// A "busy" answer (counted), telling the asker when to retry.
    fn busy(&self, why: &str) -> PieceReply {
        self.stats.busy.fetch_add(1, Ordering::Relaxed);
        let mut e = PieceError::new(PieceErrorCode::Busy, why);
        e.retry_after_ms = BUSY_RETRY_MS;
        PieceReply::Error(e)
    }

    /// Sends a staged piece, if there is one: room in the budget first (else "busy"), then the
    /// rate limit, then its bytes read back from the staging file and checked against their
    /// published hash; `None` when it is not staged (or went bad).
    async fn send_staged(
        &self,
        codec: &Codec,
        send: &mut quinn::SendStream,
        blob: shoal_proto::Digest,
        index: u32,
    ) -> Option<Result<(), shoal_proto::ProtoError>> {
        let staging = Arc::clone(self.staging.get()?);
        let len = staging.staged_len(&blob, index)?;
        let Some(room) = self.budget.try_upload(u64::from(len)) else {
            return Some(
                codec
                    .write(send, &self.busy("the piece memory budget is full"))
                    .await,
            );
        };
        self.limiter.take(u64::from(len)).await;
        let (bytes, hash) = tokio::task::spawn_blocking(move || staging.piece(&blob, index))
            .await
            .ok()
            .flatten()?;
        let bytes = self.tampered(bytes);
        let header = PieceHeader {
            blob,
            index,
            len,
            hash,
        };
        let sent = async {
            codec.write(send, &PieceReply::Piece(header)).await?;
            send.write_chunk(room.attach(bytes))
                .await
                .map_err(|e| shoal_proto::ProtoError::from(std::io::Error::from(e)))
        }
        .await;
        if sent.is_ok() {
            self.stats.pieces.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes
                .fetch_add(u64::from(len), Ordering::Relaxed);
        }
        Some(sent)
    }

    /// Upload slots free right now.
    pub fn free_slots(&self) -> u32 {
        u32::try_from(self.slots.available_permits()).unwrap_or(self.slot_count)
    }

    /// Accepts connections on the transport's endpoint until it is closed.
    pub fn spawn(self: &Arc<Self>, transport: Arc<Transport>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            while let Some(incoming) = transport.endpoint().accept().await {
                let this = Arc::clone(&this);
                let me = transport.host_id().clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => this.serve_connection(conn, me).await,
                        Err(e) => {
                            this.stats.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(error = %e, "piece server: connection refused during TLS handshake");
                        }
                    }
                });
            }
        })
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection, me: shoal_proto::HostId) {
        let remote = conn.remote_address();
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let role = Role::Peer;
        let hello = server_handshake(&mut recv, &mut send, role, &me, |h| {
            check_hello(&conn, h, &[Role::Peer, Role::Seed])
        })
        .await;
        let _ = send.finish();
        let (codec, peer) = match hello {
            Ok((hello, negotiated)) => {
                tracing::debug!(peer = %hello.host_id, %remote, "piece server: peer connected");
                (negotiated.codec, hello.host_id)
            }
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%remote, error = %e, "piece server: Hello refused");
                conn.close(e.close_code().into(), b"hello refused");
                return;
            }
        };
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (this, peer) = (Arc::clone(&self), peer.clone());
            tokio::spawn(async move { this.serve_stream(codec, &peer, send, recv).await });
        }
    }

    async fn serve_stream(
        &self,
        codec: Codec,
        peer: &shoal_proto::HostId,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let request = match codec.read::<_, PieceRequest>(&mut recv).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "piece server: bad request frame");
                let _ = send.reset(e.close_code().into());
                return;
            }
        };
        let outcome = match request {
            PieceRequest::HeldPieces { blob } => {
                let reply = self.held_reply(&blob);
                codec.write(&mut send, &reply).await
            }
            PieceRequest::WatchHeld { blob } => self.watch_held(&codec, &mut send, blob).await,
            PieceRequest::GetPiece { blob, index } => {
                self.send_piece(&codec, peer, &mut send, blob, index).await
            }
            PieceRequest::PieceTable { blob } => {
                let reply = self.table_reply(&codec, blob);
                codec.write(&mut send, &reply).await
            }
        };
        if let Err(e) = outcome {
            tracing::debug!(error = %e, "piece server: reply failed");
            let _ = send.reset(e.close_code().into());
            return;
        }
        let _ = send.finish();
    }

    /// Sends the held set of `blob`, and again whenever it changes, until the watcher stops
    /// reading or the connection ends. Nothing is sent while nothing of the blob is held.
    async fn watch_held(
        &self,
        codec: &Codec,
        send: &mut quinn::SendStream,
        blob: shoal_proto::Digest,
    ) -> Result<(), shoal_proto::ProtoError> {
        let _ = send.set_priority(WATCH_PRIORITY);
        let mut news = self.news.watch(blob);
        let mut last: Option<shoal_proto::PieceSet> = None;
        loop {
            news.borrow_and_update();
            if let PieceReply::Held(set) = self.held_reply(&blob) {
                if last.as_ref() != Some(&set) {
                    codec.write(send, &PieceReply::Held(set.clone())).await?;
                    last = Some(set);
                }
            }
            tokio::select! {
                changed = news.changed() => if changed.is_err() { return Ok(()) },
                _ = send.stopped() => return Ok(()),
            }
            tokio::time::sleep(WATCH_BATCH).await;
        }
    }

    /// The bytes to send: `piece` itself, except under the `corrupt` test hook (one byte
    /// flipped, so a child's verification must catch it).
    #[inline]
    fn tampered(&self, piece: bytes::Bytes) -> bytes::Bytes {
        #[cfg(feature = "test-hooks")]
        if self.corrupt.load(Ordering::Relaxed) {
            let mut bad = piece.to_vec();
            let middle = bad.len() / 2;
            if let Some(b) = bad.get_mut(middle) {
                *b ^= 0x01;
            }
            return bytes::Bytes::from(bad);
        }
        piece
    }

    async fn send_piece(
        &self,
        codec: &Codec,
        peer: &shoal_proto::HostId,
        send: &mut quinn::SendStream,
        blob: shoal_proto::Digest,
        index: u32,
    ) -> Result<(), shoal_proto::ProtoError> {
        let refuse = |code, msg: String| PieceReply::Error(PieceError::new(code, msg));
        if self
            .sent
            .as_ref()
            .is_some_and(|s| !s.claim(blob, index, peer))
        {
            self.stats.resend_refused.fetch_add(1, Ordering::Relaxed);
            let msg = format!("piece {index} of {blob} was just sent to another peer: ask it");
            return codec
                .write(send, &refuse(PieceErrorCode::NotHeld, msg))
                .await;
        }
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            return codec
                .write(send, &self.busy("all upload slots are in use"))
                .await;
        };
        let digest = blob;
        let stored = self
            .store
            .blob_status(&digest)
            .is_some_and(|s| s.held.contains(index));
        if !stored {
            if let Some(sent) = self.send_staged(codec, send, blob, index).await {
                return sent;
            }
        }
        let Some(status) = self.store.blob_status(&digest) else {
            return codec
                .write(
                    send,
                    &refuse(PieceErrorCode::NotHeld, format!("{blob} is not held here")),
                )
                .await;
        };
        let Some(hash) = status.layout.piece_hash(index).copied() else {
            return codec
                .write(
                    send,
                    &refuse(
                        PieceErrorCode::BadRequest,
                        format!(
                            "{blob} has {} pieces; no piece {index}",
                            status.layout.piece_count()
                        ),
                    ),
                )
                .await;
        };
        let len = status.layout.piece_len(index).unwrap_or(0);
        // Room for the piece before it is read (else "busy"); then the rate limit, waited for
        // with the room held but nothing read yet, so a queue of uploads costs no memory.
        let Some(room) = self.budget.try_upload(len) else {
            return codec
                .write(send, &self.busy("the piece memory budget is full"))
                .await;
        };
        self.limiter.take(len).await;
        // The store verifies the bytes against the piece table as it reads them.
        let bytes = match self.store.read_piece(digest, index).await {
            Ok(b) => b,
            Err(e) if e.is_not_present() || e.is_corrupt() => {
                return codec
                    .write(
                        send,
                        &refuse(
                            PieceErrorCode::NotHeld,
                            format!("piece {index} of {blob} is not held here"),
                        ),
                    )
                    .await
            }
            Err(e) => {
                tracing::warn!(blob = %blob, piece = index, error = %e, "piece server: store read failed");
                return codec
                    .write(send, &refuse(PieceErrorCode::Internal, e.to_string()))
                    .await;
            }
        };
        let Ok(len) = u32::try_from(bytes.len()) else {
            return codec
                .write(
                    send,
                    &refuse(PieceErrorCode::Internal, "piece too large".into()),
                )
                .await;
        };
        let header = PieceHeader {
            blob,
            index,
            len,
            hash: *hash.as_bytes(),
        };
        let body = self.tampered(bytes);
        // The header frame, then the bytes handed to QUIC without a copy; the room goes with
        // them until QUIC has sent them and lets go.
        codec.write(send, &PieceReply::Piece(header)).await?;
        send.write_chunk(room.attach(body))
            .await
            .map_err(|e| shoal_proto::ProtoError::from(std::io::Error::from(e)))?;
        self.stats.pieces.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(u64::from(len), Ordering::Relaxed);
        Ok(())
    }
}
