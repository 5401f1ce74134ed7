//! containerd's snapshots gRPC service on a unix socket: each call checks its input, runs the
//! matching [`Snapshots`] operation on the blocking pool (state transactions, directory work and
//! lazy mounts block), and maps errors to the gRPC codes containerd understands.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::api::snapshots::snapshots_server::{Snapshots as SnapshotsApi, SnapshotsServer};
use super::api::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind as ApiKind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use super::api::types::Mount as ApiMount;
use super::error::{Result, SnapshotterError};
use super::metrics::Metrics;
use super::overlay::Mount;
use super::snapshots::Snapshots;
use super::state::{Kind, Snapshot};

/// Longest snapshot key or name accepted (containerd's are well under 1 KiB).
const MAX_KEY: usize = 4096;
/// Most labels on one snapshot, and the longest label key plus value.
const MAX_LABELS: usize = 512;
const MAX_LABEL_BYTES: usize = 16 << 10;
/// Snapshots per List message.
const LIST_BATCH: usize = 100;

/// The gRPC service over the snapshotter.
pub struct Service {
    core: Arc<Snapshots>,
    metrics: Arc<Metrics>,
}

impl Service {
    /// A service over `core`.
    pub fn new(core: Arc<Snapshots>, metrics: Arc<Metrics>) -> Self {
        Service { core, metrics }
    }

    /// The tonic server of this service.
    pub fn into_server(self) -> SnapshotsServer<Service> {
        SnapshotsServer::new(self)
    }

    /// Runs `f` on the blocking pool in a span naming the call, counting it by outcome.
    async fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        key: &str,
        f: impl FnOnce(&Snapshots) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let core = Arc::clone(&self.core);
        let span = tracing::info_span!("snapshots", op, key = %key);
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || f(&core))
            .instrument(span.clone())
            .await
            .map_err(|e| Status::internal(format!("{op} did not finish: {e}")))?;
        let outcome = match &result {
            Ok(_) => "ok",
            // The expected answer for layers that need no download.
            Err(SnapshotterError::AlreadyExists(_)) => "already_exists",
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "snapshots call failed"));
                "error"
            }
        };
        self.metrics.observe(op, outcome, started.elapsed());
        result.map_err(|e| e.to_status())
    }
}

/// What Prepare and View do: check the request, then create the snapshot with `op`.
type CreateOp = fn(&Snapshots, &str, &str, BTreeMap<String, String>) -> Result<Vec<Mount>>;

impl Service {
    async fn create(
        &self,
        name: &'static str,
        key: String,
        parent: String,
        labels: std::collections::HashMap<String, String>,
        op: CreateOp,
    ) -> std::result::Result<Vec<ApiMount>, Status> {
        check_key("key", &key)?;
        check_key("parent", &parent)?;
        let labels = check_labels(labels)?;
        let span_key = key.clone();
        let mounts = self
            .call(name, &span_key, move |c| op(c, &key, &parent, labels))
            .await?;
        Ok(to_api_mounts(mounts))
    }
}

fn check_key(what: &str, key: &str) -> std::result::Result<(), Status> {
    if key.len() > MAX_KEY || key.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{what} is longer than {MAX_KEY} bytes or holds a NUL byte"
        )));
    }
    Ok(())
}

fn check_labels(
    labels: std::collections::HashMap<String, String>,
) -> std::result::Result<BTreeMap<String, String>, Status> {
    if labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!(
            "{} labels: at most {MAX_LABELS} are accepted",
            labels.len()
        )));
    }
    if let Some((k, _)) = labels
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() + v.len() > MAX_LABEL_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "label {:?}: empty, or key and value longer than {MAX_LABEL_BYTES} bytes",
            k.chars().take(100).collect::<String>()
        )));
    }
    Ok(labels.into_iter().collect())
}

fn to_api_mounts(mounts: Vec<Mount>) -> Vec<ApiMount> {
    mounts
        .into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: i32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0),
    }
}

fn to_info(name: String, s: Snapshot) -> Info {
    Info {
        name,
        parent: s.parent.unwrap_or_default(),
        kind: match s.kind {
            Kind::View => ApiKind::View,
            Kind::Active => ApiKind::Active,
            Kind::Committed => ApiKind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created_ns)),
        updated_at: Some(timestamp(s.updated_ns)),
        labels: s.labels.into_iter().collect(),
    }
}

type ListStream =
    Pin<Box<dyn Stream<Item = std::result::Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotsApi for Service {
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> std::result::Result<Response<PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self
            .create("prepare", r.key, r.parent, r.labels, Snapshots::prepare)
            .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        req: Request<ViewSnapshotRequest>,
    ) -> std::result::Result<Response<ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self
            .create("view", r.key, r.parent, r.labels, Snapshots::view)
            .await?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        req: Request<MountsRequest>,
    ) -> std::result::Result<Response<MountsResponse>, Status> {
        let key = req.into_inner().key;
        check_key("key", &key)?;
        let mounts = self
            .call("mounts", &key.clone(), move |c| c.mounts(&key))
            .await?;
        Ok(Response::new(MountsResponse {
            mounts: to_api_mounts(mounts),
        }))
    }

    async fn commit(
        &self,
        req: Request<CommitSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = req.into_inner();
        check_key("key", &r.key)?;
        check_key("name", &r.name)?;
        if r.name.is_empty() {
            return Err(Status::invalid_argument("commit needs a name"));
        }
        let labels = check_labels(r.labels)?;
        let (name, key) = (r.name, r.key);
        self.call("commit", &key.clone(), move |c| {
            c.commit(&name, &key, labels)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<RemoveSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let key = req.into_inner().key;
        check_key("key", &key)?;
        self.call("remove", &key.clone(), move |c| c.remove(&key))
            .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<StatSnapshotRequest>,
    ) -> std::result::Result<Response<StatSnapshotResponse>, Status> {
        let key = req.into_inner().key;
        check_key("key", &key)?;
        let k = key.clone();
        let s = self.call("stat", &key, move |c| c.stat(&k)).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(to_info(key, s)),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateSnapshotRequest>,
    ) -> std::result::Result<Response<UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update needs the snapshot's info"))?;
        check_key("name", &info.name)?;
        let labels = check_labels(info.labels)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let key = info.name;
        let k = key.clone();
        let s = self
            .call("update", &key, move |c| c.update(&k, labels, &paths))
            .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(to_info(key, s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        let filters = req.into_inner().filters;
        let all = self.call("list", "", move |c| c.list(&filters)).await?;
        let mut batches = Vec::new();
        let mut infos: Vec<Info> = all.into_iter().map(|(n, s)| to_info(n, s)).collect();
        while !infos.is_empty() {
            let rest = infos.split_off(infos.len().min(LIST_BATCH));
            batches.push(Ok(ListSnapshotsResponse { info: infos }));
            infos = rest;
        }
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<UsageRequest>,
    ) -> std::result::Result<Response<UsageResponse>, Status> {
        let key = req.into_inner().key;
        check_key("key", &key)?;
        let u = self
            .call("usage", &key.clone(), move |c| c.usage(&key))
            .await?;
        Ok(Response::new(UsageResponse {
            size: i64::try_from(u.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(
        &self,
        _req: Request<CleanupRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        self.call("cleanup", "", |c| c.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// Serves `service` on the unix socket `path` until `shutdown` completes.
pub async fn serve(
    service: Service,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SnapshotterError::io("creating", dir, e))?;
    }
    // A socket left by a previous run refuses the bind; nobody listens on it any more.
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path)
            .map_err(|e| SnapshotterError::io("removing old socket", path, e))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| SnapshotterError::io("listening on", path, e))?;
    // Only root (containerd) may drive the snapshotter.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| SnapshotterError::io("restricting", path, e))?;
    tracing::info!(socket = %path.display(), "snapshotter listening");
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| SnapshotterError::io("serving", path, std::io::Error::other(e)))
}
