//! A download's side of the DHT fallback (discovery/): when no scheduler answers, parents and
//! the piece table come from the peers the DHT names as holders, over the same mutual-TLS QUIC
//! piece protocol; when the DHT names nobody, the download goes to the origin. A holder still
//! importing or streaming the blob in gives the hashes it knows (protocol version 4), so a
//! download started while no scheduler runs follows that import instead of repeating it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{Digest, HostId, PieceReply, PieceRequest, TaskMeta};

use super::parents::{ask, ParentTable};
use super::swarm::SwarmEnd;
use super::task::Task;
use crate::discovery::Holder;
use crate::error::PeerError;
use crate::transport::Transport;

/// Holders asked for a piece table before giving up on them.
const TABLE_TRIES: usize = 3;

/// What a DHT holder knows of a blob's piece table.
#[derive(Debug)]
pub(super) enum HolderTable {
    /// Geometry and the whole table.
    Whole(TaskMeta, Vec<[u8; 32]>),
    /// Geometry and the hashes known so far, and who gave them.
    Partial(TaskMeta, Vec<Option<[u8; 32]>>, HostId),
}

impl HolderTable {
    fn meta(&self) -> &TaskMeta {
        match self {
            HolderTable::Whole(m, _) | HolderTable::Partial(m, _, _) => m,
        }
    }

    /// How many piece hashes it gives.
    fn known(&self) -> usize {
        match self {
            HolderTable::Whole(_, t) => t.len(),
            HolderTable::Partial(_, h, _) => h.iter().flatten().count(),
        }
    }
}

impl Task {
    /// The holders of this blob the DHT knows, this peer excluded (empty without a DHT).
    pub(super) async fn dht_holders(&self) -> Vec<Holder> {
        let Some(d) = &self.ctx.dht else {
            return Vec::new();
        };
        let mut holders = d.find_holders(self.blob).await;
        holders.retain(|h| h.host_id != self.ctx.me);
        holders
    }

    /// Adds the DHT's holders as parents; `Some` ends the swarm round (nobody to ask: origin).
    pub(super) async fn dht_parents(&self, table: &mut ParentTable, why: &str) -> Option<SwarmEnd> {
        if self.ctx.dht.is_none() {
            return Some(SwarmEnd::BackToSource(why.to_string(), Vec::new()));
        }
        let holders = self.dht_holders().await;
        if holders.is_empty() {
            return Some(SwarmEnd::BackToSource(
                format!("{why}; the DHT knows no other holder"),
                Vec::new(),
            ));
        }
        tracing::debug!(blob = %self.blob, holders = holders.len(), "parents from the DHT");
        for h in holders {
            // Held sets are unknown until asked (the swarm round refreshes them).
            table.add(h.host_id, h.addresses, None, false, &self.ctx.me);
        }
        None
    }

    /// A holder's geometry and piece table of this blob, if one of the DHT's holders has it and
    /// its geometry fits `fits` (see [`Task::table_from`]).
    pub(super) async fn table_from_holders(
        &self,
        fits: impl Fn(&TaskMeta) -> bool,
    ) -> Result<Option<HolderTable>, PeerError> {
        let holders = self.dht_holders().await;
        let hosts = holders.into_iter().map(|h| (h.host_id, h.addresses));
        Ok(self.table_from(hosts, fits).await)
    }

    /// The first whole piece table of this blob one of `hosts` (the first [`TABLE_TRIES`]) has
    /// with a geometry that fits `fits`, else the partial one that knows the most hashes.
    /// Trusted like a scheduler-published table: the store checks every piece against it and
    /// the whole blob against its sha256.
    pub(super) async fn table_from(
        &self,
        hosts: impl IntoIterator<Item = (HostId, Vec<SocketAddr>)>,
        fits: impl Fn(&TaskMeta) -> bool,
    ) -> Option<HolderTable> {
        let timeout = self.ctx.config.piece_timeout().min(Duration::from_secs(5));
        let mut best: Option<HolderTable> = None;
        for (host, addrs) in hosts.into_iter().take(TABLE_TRIES) {
            match fetch_table(&self.ctx.transport, &host, &addrs, self.blob, timeout).await {
                Ok(Some(t)) if fits(t.meta()) => {
                    if let HolderTable::Whole(..) = t {
                        tracing::info!(blob = %self.blob, holder = %host, "piece table from a holder");
                        return Some(t);
                    }
                    if best.as_ref().is_none_or(|b| t.known() > b.known()) {
                        best = Some(t);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(blob = %self.blob, holder = %host, error = %e, "no piece table from holder")
                }
            }
        }
        best
    }

    /// Takes what a DHT holder knows of the table of a task whose geometry is already fixed: a
    /// whole table is adopted, known hashes are staged for a streaming round. False if nothing.
    pub(super) async fn table_from_dht(
        self: &Arc<Self>,
        meta: &TaskMeta,
    ) -> Result<bool, PeerError> {
        match self.table_from_holders(|m| m == meta).await? {
            Some(HolderTable::Whole(m, table)) => {
                self.adopt_table(&m, table).await?;
                Ok(true)
            }
            Some(HolderTable::Partial(m, hashes, from)) => {
                let known = hashes.iter().flatten().count();
                tracing::info!(blob = %self.blob, holder = %from, known, "following a DHT holder's import: piece hashes so far");
                self.ctx.staging.open(m);
                self.ctx.staging.learn(&self.blob, 0, &hashes, Some(from));
                Ok(self.ctx.staging.known(&self.blob).is_some())
            }
            None => Ok(false),
        }
    }
}

/// Asks `host` for its geometry and piece table of `blob` (a holder found through the DHT);
/// `None` when it has none.
async fn fetch_table(
    transport: &Transport,
    host: &HostId,
    addrs: &[SocketAddr],
    blob: Digest,
    timeout: Duration,
) -> Result<Option<HolderTable>, String> {
    let attempt = async {
        let (codec, mut recv) = ask(transport, host, addrs, &PieceRequest::PieceTable { blob })
            .await
            .map_err(|(_, e)| e)?;
        match codec
            .read::<_, PieceReply>(&mut recv)
            .await
            .map_err(|e| e.to_string())?
        {
            PieceReply::Table(t) if t.task.blob == blob => {
                Ok(Some(HolderTable::Whole(t.task, t.table)))
            }
            PieceReply::PartialTable(t) if t.task.blob == blob => {
                Ok(Some(HolderTable::Partial(t.task, t.hashes, host.clone())))
            }
            PieceReply::Error(_) => Ok(None),
            _ => Err(format!(
                "{host} answered PieceTable for {blob} with something else"
            )),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("{host}: no piece table within {timeout:?}")),
    }
}
