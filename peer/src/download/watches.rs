//! Held-set watches: each parent of a swarm round is asked to push its held set whenever it
//! changes (`WatchHeld`, protocol version 3), so a piece stored at a parent is known here within
//! milliseconds; parents that cannot be watched are polled (swarm.rs).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use shoal_proto::{Digest, HostId, PieceRequest, PieceSet};
use tokio::sync::mpsc;

use super::parents::ParentTable;
use super::swarm::Background;
use crate::transport::Transport;

/// The watches of one swarm round; dropping it ends them.
pub(super) struct Watches {
    tx: mpsc::UnboundedSender<Watched>,
    rx: mpsc::UnboundedReceiver<Watched>,
    running: HashMap<HostId, Background<()>>,
    /// Parents whose watch ended: polled from then on.
    unwatchable: HashSet<HostId>,
}

impl Watches {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Watches {
            tx,
            rx,
            running: HashMap::new(),
            unwatchable: HashSet::new(),
        }
    }

    /// Whether `host`'s held set is pushed here (else it is polled).
    pub fn is_watched(&self, host: &HostId) -> bool {
        self.running.contains_key(host)
    }

    /// Starts a watch of every parent of `table` not watched yet; ends those of parents gone.
    pub fn start(
        &mut self,
        transport: &Arc<Transport>,
        blob: Digest,
        count: u32,
        table: &ParentTable,
    ) {
        self.running.retain(|h, _| table.contains(h));
        for (host, addrs) in
            table.all(|h| !self.running.contains_key(h) && !self.unwatchable.contains(h))
        {
            let (transport, tx, h) = (Arc::clone(transport), self.tx.clone(), host.clone());
            let watch =
                tokio::spawn(
                    async move { watch_held(&transport, h, addrs, blob, count, tx).await },
                );
            self.running.insert(host, Background(watch));
        }
    }

    /// What the watches brought since the last call.
    pub fn drain(&mut self) -> Vec<Watched> {
        let mut out = Vec::new();
        while let Ok(w) = self.rx.try_recv() {
            out.push(w);
        }
        out
    }

    /// The next thing a watch brings (pending forever while nothing does).
    pub async fn next(&mut self) -> Watched {
        match self.rx.recv().await {
            Some(w) => w,
            // Never: this struct holds a sender.
            None => std::future::pending().await,
        }
    }

    /// Notes that `host`'s watch ended: it is polled from now on.
    pub fn ended(&mut self, host: &HostId) {
        self.running.remove(host);
        self.unwatchable.insert(host.clone());
    }
}

/// What a held-set watch of one parent brought.
#[derive(Debug)]
pub(super) enum Watched {
    /// The parent's held set now.
    Held(HostId, PieceSet),
    /// The parent sent a set that does not fit the blob: drop it.
    Broken(HostId, String),
    /// The watch ended (an older parent, a reset stream, a lost link): poll that parent instead.
    Ended(HostId),
}

/// Watches `host`'s held set of `blob` (`WatchHeld`, protocol version 3): every set it sends
/// goes to `news`, and so does the watch's end. Returns when the watch ends or nobody listens.
async fn watch_held(
    transport: &Transport,
    host: HostId,
    addrs: Vec<SocketAddr>,
    blob: Digest,
    count: u32,
    news: mpsc::UnboundedSender<Watched>,
) {
    let watched = async {
        let link = transport.parent(&host, &addrs).await.ok()?;
        if link.codec.version() < shoal_proto::WATCH_HELD_VERSION {
            return None;
        }
        let (mut send, mut recv) = link.conn.open_bi().await.ok()?;
        link.codec
            .write(&mut send, &PieceRequest::WatchHeld { blob })
            .await
            .ok()?;
        let _ = send.finish();
        loop {
            match link
                .codec
                .read::<_, shoal_proto::PieceReply>(&mut recv)
                .await
            {
                Ok(shoal_proto::PieceReply::Held(set)) => {
                    if let Err(e) = set.check_len(count) {
                        return Some(Watched::Broken(host.clone(), e.to_string()));
                    }
                    if news.send(Watched::Held(host.clone(), set)).is_err() {
                        return None;
                    }
                }
                Ok(shoal_proto::PieceReply::Error(_)) | Err(_) => return None,
                Ok(_) => {
                    return Some(Watched::Broken(
                        host.clone(),
                        "answered WatchHeld with a piece or a table".into(),
                    ))
                }
            }
        }
    };
    let end = watched.await.unwrap_or(Watched::Ended(host.clone()));
    let _ = news.send(end);
}
