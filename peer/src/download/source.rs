//! Back to source: the origin (an OCI registry today) read with Range GETs. A blob without a
//! piece table is imported whole (the store hashes it into a table and checks its sha256); a
//! blob with one is read piece by piece, each piece verified before it is stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use shoal_origin::{
    AllowedOrigins, ByteRange, Origin, Reference, RegistryClient, RegistryOptions, RegistryOrigin,
};
use shoal_proto::{Digest, OriginRef};
use tokio::sync::mpsc;

use crate::convert::origin_digest;
use crate::credentials::SeenCredentials;
use crate::error::PeerError;

/// Chunks of origin bytes queued between the network and the blocking import.
pub(super) const IMPORT_QUEUE: usize = 16;

/// Origins by reference, sharing one registry client (connection pool, tokens), and only those
/// the operator allows.
#[derive(Debug)]
pub(crate) struct Origins {
    client: RegistryClient,
    allowed: Arc<AllowedOrigins>,
    cache: Mutex<HashMap<String, Arc<RegistryOrigin>>>,
    /// Credentials the registry proxy saw for a repository, for requests that bring none.
    seen: Arc<SeenCredentials>,
}

impl Origins {
    /// A pool with a registry client; `plain_http` hosts are spoken to without TLS; nothing
    /// outside `allowed` is reached (nor an unlisted loopback or link-local address through it).
    pub fn new(
        plain_http: &[String],
        allowed: Arc<AllowedOrigins>,
        seen: Arc<SeenCredentials>,
    ) -> Result<Self, PeerError> {
        let opts = RegistryOptions {
            plain_http: plain_http.iter().cloned().collect(),
            allowed: Some(Arc::clone(&allowed)),
            ..RegistryOptions::default()
        };
        Ok(Origins {
            client: RegistryClient::new(opts)?,
            allowed,
            cache: Mutex::new(HashMap::new()),
            seen,
        })
    }

    /// The operator's list (its refusal counters are metrics).
    pub fn allowed(&self) -> &Arc<AllowedOrigins> {
        &self.allowed
    }

    /// Whether `origin` is allowed; the refusal names the entry to add.
    pub fn check(&self, origin: &OriginRef) -> Result<(), PeerError> {
        Ok(self.allowed.check_reference(&origin.reference)?)
    }

    /// The origin named by `origin` (`docker://HOST/REPO`), if allowed; requests carry the
    /// client's forwarded Authorization when `origin` has one, else the one the registry proxy
    /// last saw accepted for that repository, else this peer's own credentials.
    pub fn get(&self, origin: &OriginRef) -> Result<Arc<RegistryOrigin>, PeerError> {
        self.check(origin)?;
        if origin.authorization.is_none() {
            if let Ok(r) = Reference::parse(&origin.reference) {
                if let Some(a) = self.seen.get(r.registry(), r.repository()) {
                    let with = OriginRef {
                        reference: origin.reference.clone(),
                        authorization: Some(a),
                    };
                    return self.get(&with);
                }
            }
        }
        // Keyed by reference and credential: one client's Authorization never serves another.
        let key = match &origin.authorization {
            Some(a) => format!(
                "{}\n{}",
                origin.reference,
                blake3::hash(a.as_bytes()).to_hex()
            ),
            None => origin.reference.clone(),
        };
        if let Some(o) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(o);
        }
        if !origin.reference.starts_with("docker://") {
            return Err(PeerError::BadRequest(format!(
                "origin {:?} is not supported: use docker://HOST/REPO",
                origin.reference
            )));
        }
        let reference = Reference::parse(&origin.reference)?;
        let client = self.client.with_authorization(origin.authorization.clone());
        let o = Arc::new(RegistryOrigin::new(client, reference));
        if let Ok(mut c) = self.cache.lock() {
            if c.len() > 1024 {
                c.clear(); // bounded: references are cheap to rebuild
            }
            c.insert(key, Arc::clone(&o));
        }
        Ok(o)
    }
}

/// The size of `blob` at its origin (a HEAD), failing after `idle` without an answer.
pub(crate) async fn stat(
    origin: &dyn Origin,
    blob: &Digest,
    label: &str,
    idle: Duration,
) -> Result<u64, PeerError> {
    match tokio::time::timeout(idle, origin.stat(&origin_digest(blob)?)).await {
        Ok(Ok(stat)) => Ok(stat.size),
        Ok(Err(e)) => Err(PeerError::download(blob, format!("origin {label}: {e}"))),
        Err(_) => Err(silent(blob, label, idle, "the size (HEAD)")),
    }
}

/// The error of an origin that sent nothing for `idle`.
pub(crate) fn silent(blob: &Digest, label: &str, idle: Duration, what: &str) -> PeerError {
    PeerError::download(
        blob,
        format!(
            "origin {label} sent nothing for {idle:?} while reading {what}: \
             the registry or the network to it is down (origin_idle_timeout_ms)"
        ),
    )
}

/// How an import reports to its caller: the origin's name for errors, how long the origin may
/// be silent, and each whole piece as it arrives (the seed hashes and publishes it).
pub(crate) struct ImportWatch<'a> {
    /// The origin reference, for error messages.
    pub label: &'a str,
    /// The longest the origin may send nothing.
    pub idle: Duration,
    /// Called with each whole piece, in order, as soon as its last byte arrived.
    pub on_piece: &'a mut (dyn FnMut(u32, Bytes) + Send),
}

/// Streams the whole blob from the origin into the store, which computes its piece table with
/// `piece_size` and installs it only if its sha256 matches. Returns the layout.
pub(crate) async fn import(
    store: &shoal_store::AsyncStore,
    origin: &dyn Origin,
    blob: &Digest,
    piece_size: u32,
    watch: ImportWatch<'_>,
) -> Result<shoal_store::PieceLayout, PeerError> {
    let ImportWatch {
        label,
        idle,
        on_piece,
    } = watch;
    let mut stream = match tokio::time::timeout(idle, origin.read(&origin_digest(blob)?)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(PeerError::download(blob, format!("origin {label}: {e}"))),
        Err(_) => return Err(silent(blob, label, idle, "the blob")),
    };
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(IMPORT_QUEUE);
    let import = store.import_blob(*blob, piece_size, ChannelReader::new(rx));
    let ps = piece_size as usize;
    let pump = async move {
        let mut pieces = Splitter::new(ps);
        loop {
            let chunk = match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(Ok(c))) => c,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return Err(PeerError::download(blob, format!("origin {label}: {e}")));
                }
                Err(_) => {
                    let e = silent(blob, label, idle, "the blob");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return Err(e);
                }
            };
            pieces.push(chunk.clone(), &mut *on_piece);
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(()); // the import stopped; its error is the one reported
            }
        }
        pieces.finish(on_piece);
        Ok(())
    };
    let (layout, pumped) = tokio::join!(import, pump);
    // The origin's own error names the origin and what it answered; it wins over the store's.
    pumped?;
    Ok(layout?)
}

/// Cuts a stream of chunks into whole pieces, copying only the bytes of pieces that span
/// chunks (each into one buffer of the piece's size).
struct Splitter {
    piece_size: usize,
    piece: BytesMut,
    index: u32,
}

impl Splitter {
    fn new(piece_size: usize) -> Self {
        Splitter {
            piece_size: piece_size.max(1),
            piece: BytesMut::new(),
            index: 0,
        }
    }

    /// Hands each piece `chunk` completes to `out`.
    fn push(&mut self, mut rest: Bytes, out: &mut (dyn FnMut(u32, Bytes) + Send)) {
        let ps = self.piece_size;
        while !rest.is_empty() {
            if self.piece.is_empty() && rest.len() >= ps {
                // A whole piece inside one chunk: a slice of it, not a copy.
                out(self.index, rest.split_to(ps));
                self.index += 1;
                continue;
            }
            if self.piece.capacity() == 0 {
                // One buffer per piece (grown by doubling, it was copied at each step).
                self.piece.reserve(ps);
            }
            let take = (ps - self.piece.len()).min(rest.len());
            self.piece.extend_from_slice(&rest.split_to(take));
            if self.piece.len() == ps {
                out(self.index, self.piece.split().freeze());
                self.index += 1;
            }
        }
    }

    /// Hands the last, short piece to `out`, if any.
    fn finish(mut self, out: &mut (dyn FnMut(u32, Bytes) + Send)) {
        if !self.piece.is_empty() {
            out(self.index, self.piece.split().freeze());
        }
    }
}

/// Reads pieces `first..first+lens.len()` (contiguous) from the origin with one Range GET and
/// hands each whole piece to `each` as soon as its last byte arrives. Each piece holds room in
/// `budget` from its first byte until it is dropped.
pub(crate) async fn read_pieces<F, Fut>(
    (origin, label, idle): (&dyn Origin, &str, Duration),
    blob: &Digest,
    start: u64,
    first: u32,
    lens: &[u64],
    budget: &crate::budget::PieceBudget,
    mut each: F,
) -> Result<(), PeerError>
where
    F: FnMut(u32, Bytes) -> Fut,
    Fut: std::future::Future<Output = Result<(), PeerError>>,
{
    let total: u64 = lens.iter().sum();
    let range = ByteRange::new(start, start + total);
    let what = || format!("bytes {start}..{}", start + total);
    let origin_err =
        |e: shoal_origin::OriginError| PeerError::download(blob, format!("origin {label}: {e}"));
    let mut stream =
        match tokio::time::timeout(idle, origin.read_range(&origin_digest(blob)?, range)).await {
            Ok(r) => r.map_err(origin_err)?,
            Err(_) => return Err(silent(blob, label, idle, &what())),
        };
    let mut buf = BytesMut::new();
    let mut next = 0usize;
    let mut room = None;
    loop {
        let chunk = match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(c)) => c.map_err(origin_err)?,
            Ok(None) => break,
            Err(_) => return Err(silent(blob, label, idle, &what())),
        };
        if let (None, Some(&len)) = (&room, lens.get(next)) {
            room = Some(budget.download(len).await);
            buf.reserve((len as usize).saturating_sub(buf.len()));
        }
        buf.extend_from_slice(&chunk);
        while let Some(&len) = lens.get(next) {
            if (buf.len() as u64) < len {
                break;
            }
            // Pieces smaller than a chunk: the next one may be whole before it had room.
            let held = match room.take() {
                Some(r) => r,
                None => budget.download(len).await,
            };
            let piece = held.attach(buf.split_to(len as usize).freeze());
            each(first + next as u32, piece).await?;
            next += 1;
        }
    }
    if next < lens.len() {
        return Err(PeerError::download(
            blob,
            format!(
                "origin {label} ended the stream after {next} of {} pieces",
                lens.len()
            ),
        ));
    }
    Ok(())
}

/// A blocking `Read` over chunks sent from async code (the store's import runs on a blocking
/// thread; the origin stream is async).
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    pub(super) fn new(rx: mpsc::Receiver<std::io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_cut_into_whole_pieces() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for chunk in [1usize, 3, 999, 1000, 1001, 2500, 4096, 10_000] {
            let mut got: Vec<(u32, Bytes)> = Vec::new();
            let mut out = |i: u32, b: Bytes| got.push((i, b));
            let mut s = Splitter::new(1000);
            for c in data.chunks(chunk) {
                s.push(Bytes::copy_from_slice(c), &mut out);
            }
            s.finish(&mut out);
            assert_eq!(got.len(), 10, "chunks of {chunk}");
            for (k, (i, b)) in got.iter().enumerate() {
                assert_eq!(*i as usize, k);
                assert_eq!(
                    &b[..],
                    &data[k * 1000..(k + 1) * 1000],
                    "piece {k}, chunks of {chunk}"
                );
            }
        }
        // A short last piece.
        let mut got = Vec::new();
        let mut out = |i: u32, b: Bytes| got.push((i, b.len()));
        let mut s = Splitter::new(4096);
        s.push(Bytes::from(vec![1u8; 5000]), &mut out);
        s.finish(&mut out);
        assert_eq!(got, vec![(0, 4096), (1, 904)]);
    }
}
