//! A download's side of the DHT fallback (discovery/): when no scheduler answers, parents and
//! the piece table come from the peers the DHT names as holders, over the same mutual-TLS QUIC
//! piece protocol; when the DHT names nobody, the download goes to the origin.

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::TaskMeta;

use super::parents::{fetch_table, ParentTable};
use super::swarm::SwarmEnd;
use super::task::Task;
use crate::discovery::Holder;
use crate::error::PeerError;

/// Holders asked for a piece table before giving up on them.
const TABLE_TRIES: usize = 3;

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
    /// its geometry fits `fits`. Trusted like a scheduler-published table: the store checks
    /// every piece against it and the whole blob against its sha256.
    pub(super) async fn table_from_holders(
        &self,
        fits: impl Fn(&TaskMeta) -> bool,
    ) -> Result<Option<(TaskMeta, Vec<[u8; 32]>)>, PeerError> {
        let timeout = self.ctx.config.piece_timeout().min(Duration::from_secs(5));
        for h in self.dht_holders().await.into_iter().take(TABLE_TRIES) {
            match fetch_table(
                &self.ctx.transport,
                &h.host_id,
                &h.addresses,
                self.blob,
                timeout,
            )
            .await
            {
                Ok(Some(reply)) if fits(&reply.task) => {
                    tracing::info!(blob = %self.blob, holder = %h.host_id, "piece table from a DHT holder");
                    let table = reply.table;
                    return Ok(Some((reply.task, table)));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(blob = %self.blob, holder = %h.host_id, error = %e, "no piece table from holder")
                }
            }
        }
        Ok(None)
    }

    /// Takes a DHT holder's table for a task whose geometry is already fixed; true if adopted.
    pub(super) async fn adopt_table_from_holders(
        self: &Arc<Self>,
        meta: &TaskMeta,
    ) -> Result<bool, PeerError> {
        match self.table_from_holders(|m| m == meta).await? {
            Some((m, table)) => {
                self.adopt_table(&m, table).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
