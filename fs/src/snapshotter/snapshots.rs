//! containerd's snapshotter model over the state ([`State`]), the snapshot directories and the
//! lazy images: every call of the snapshots API, without the gRPC around it.
//!
//! Plain OCI layers behave exactly as with containerd's overlayfs snapshotter (`snapshots/<id>/fs`
//! and `work`, containerd applies the layer's tar, then commits). A layer of a Shoal image is
//! never downloaded: its Prepare commits it at once under the chain id containerd asked for
//! and answers AlreadyExists; the top layer (the bootstrap) mounts the image lazily first. A
//! layer of a plain image with a Shoal index (indexes.rs) is committed the same way as its own
//! lazy mount (that layer's bootstrap, in overlay form); a container's overlay stacks every
//! layer's mount. Without an index, or when its mount cannot be made, the ordinary unpack.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::{Result, SnapshotterError};
use super::filter::Filters;
use super::images::{LazyImages, MountState};
use super::indexes::Indexes;
use super::labels::{self, PlainLayer, ShoalLayer};
use super::overlay::{self, Layers, Mount};
use super::state::{Content, Kind, LazyImage, Snapshot, State, Usage};
use super::usage::disk_usage;

/// The snapshotter: state, directories and lazy images under one root.
#[derive(Debug)]
pub struct Snapshots {
    root: PathBuf,
    state: State,
    images: LazyImages,
    /// Shoal indexes of plain images (`None`: plain images are always unpacked).
    indexes: Option<Indexes>,
    index_off: bool,
}

impl Snapshots {
    /// Opens the state under `root` and reconciles it with what is on disk: lazy mounts that
    /// kept serving are adopted, dead ones mounted again, leftovers removed.
    pub fn open(root: &Path, images: LazyImages, indexes: Option<Indexes>) -> Result<Snapshots> {
        let dir = root.join("snapshots");
        std::fs::create_dir_all(&dir).map_err(|e| SnapshotterError::io("creating", &dir, e))?;
        let state = State::open(&root.join("state.redb"))?;
        let s = Snapshots {
            root: root.to_path_buf(),
            state,
            images,
            indexes,
            index_off: overlay::kernel_has_overlay_index(),
        };
        let known = s.state.images()?;
        for (key, e) in s.images.reconcile(&known) {
            tracing::warn!(image = %key, error = %e, "a lazy image could not be mounted again at start; its next use retries");
        }
        s.cleanup()?;
        Ok(s)
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// Prepare: a writable snapshot on `parent`; for a Shoal layer, the committed layer
    /// (AlreadyExists tells containerd not to download it).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        match labels::shoal_layer(&labels)? {
            Some(ShoalLayer::Blob { target }) => {
                self.commit_remote(&target, parent, labels, Content::Placeholder)
            }
            Some(ShoalLayer::Bootstrap {
                target,
                digest,
                reference,
            }) => {
                let image = LazyImage {
                    bootstrap: digest,
                    origin: format!(
                        "docker://{}/{}",
                        reference.registry(),
                        reference.repository()
                    ),
                    reference: reference
                        .to_string()
                        .trim_start_matches("docker://")
                        .to_string(),
                    pid: 0,
                    layer: None,
                };
                self.commit_lazy(&target, parent, labels, image, true)
            }
            None => match self.indexed(&labels) {
                Some((layer, image)) => {
                    match self.commit_lazy(&layer.target, parent, labels.clone(), image, false) {
                        Err(SnapshotterError::AlreadyExists(m)) => {
                            Err(SnapshotterError::AlreadyExists(m))
                        }
                        // Not mounted (bootstrap not fetched, mount not up): the layer is
                        // still an ordinary one, and containerd unpacks it.
                        Err(e) => {
                            tracing::warn!(layer = %layer.layer, error = %e, "the layer's lazy mount failed: unpacking it the ordinary way");
                            self.create(Kind::Active, key, parent, labels)
                        }
                        Ok(m) => Ok(m),
                    }
                }
                None => self.create(Kind::Active, key, parent, labels),
            },
        }
    }

    /// The lazy image of a plain layer whose image has a Shoal index listing it.
    fn indexed(&self, labels: &BTreeMap<String, String>) -> Option<(PlainLayer, LazyImage)> {
        let layer = labels::plain_layer(labels)?;
        let boot = self.indexes.as_ref()?.layer_bootstrap(&layer)?;
        let r = &layer.reference;
        let image = LazyImage {
            bootstrap: boot.digest().to_string(),
            origin: format!("docker://{}/{}", r.registry(), r.repository()),
            reference: r.to_string().trim_start_matches("docker://").to_string(),
            pid: 0,
            layer: Some(layer.layer.clone()),
        };
        Some((layer, image))
    }

    /// Mounts `image` lazily (once per bootstrap, shared by every snapshot of it) and records
    /// the layer as committed snapshot `target` backed by that mount; answers AlreadyExists.
    fn commit_lazy(
        &self,
        target: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        new: LazyImage,
        whole: bool,
    ) -> Result<Vec<Mount>> {
        if self.state.get(target)?.is_some() {
            return Err(SnapshotterError::AlreadyExists(format!(
                "snapshot {target}"
            )));
        }
        let key = new.bootstrap.trim_start_matches("sha256:").to_string();
        let recorded = self.state.image(&key)?;
        let mut image = recorded.clone().unwrap_or(new);
        image.pid = match self.images.ensure(&key, &image) {
            Ok(pid) => pid,
            Err(e) => {
                // A mount no snapshot ever used: nothing of it stays behind (its directory).
                if recorded.is_none() && self.state.image(&key)?.is_none() {
                    self.images.release(&key, &image);
                }
                return Err(e);
            }
        };
        self.state.put_image(&key, &image)?;
        let content = Content::Lazy {
            image: key.clone(),
            whole,
        };
        let result = self.commit_remote(target, parent, labels, content);
        if !matches!(result, Err(SnapshotterError::AlreadyExists(_))) {
            // Not recorded: take the mount down again unless another snapshot uses it.
            if let Ok(Some(unused)) = self.state.drop_unused_image(&key) {
                self.images.release(&key, &unused);
            }
        }
        result
    }

    /// View: a read-only snapshot of `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    /// Records a layer that needs no download as committed snapshot `target`, then answers
    /// AlreadyExists, which containerd's unpacker takes as "this layer is ready".
    fn commit_remote(
        &self,
        target: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        content: Content,
    ) -> Result<Vec<Mount>> {
        let mut s = Snapshot::new(0, Kind::Committed, non_empty(parent), labels);
        s.content = content;
        match self.state.create(target, s) {
            Ok(_) | Err(SnapshotterError::AlreadyExists(_)) => Err(
                SnapshotterError::AlreadyExists(format!("snapshot {target} (remote layer)")),
            ),
            Err(e) => Err(e),
        }
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(SnapshotterError::InvalidArgument(
                "empty snapshot key".into(),
            ));
        }
        // The directory is made first under a temporary name and renamed once the state holds
        // the snapshot, so neither a crash nor a refused create leaves a half snapshot.
        let snapshots = self.root.join("snapshots");
        let tmp = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(&snapshots)
            .map_err(|e| SnapshotterError::io("creating a snapshot directory in", &snapshots, e))?;
        let fs = tmp.path().join("fs");
        std::fs::create_dir(&fs).map_err(|e| SnapshotterError::io("creating", &fs, e))?;
        if kind == Kind::Active {
            let work = tmp.path().join("work");
            std::fs::create_dir(&work).map_err(|e| SnapshotterError::io("creating", &work, e))?;
        }
        // Lower directories first: a lazy image that must be mounted again can fail, and then
        // nothing is recorded.
        let lowers = self.lowers(non_empty(parent).as_deref())?;
        let snapshot = self
            .state
            .create(key, Snapshot::new(0, kind, non_empty(parent), labels))?;
        if let Some(top) = lowers.first() {
            // A new upper directory belongs to whoever owns the image's root, as containerd does.
            if let Ok(m) = std::fs::metadata(top) {
                let _ = std::os::unix::fs::lchown(&fs, Some(m.uid()), Some(m.gid()));
            }
        }
        let dir = self.snapshot_dir(snapshot.id);
        let tmp_path = tmp.keep();
        if let Err(e) = std::fs::rename(&tmp_path, &dir) {
            let _ = self.state.remove(key);
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Err(SnapshotterError::io("creating", &dir, e));
        }
        Ok(self.mounts_of(&snapshot, &lowers))
    }

    /// Mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let s = self.state.get(key)?.ok_or_else(|| not_found(key))?;
        if s.kind == Kind::Committed {
            return Err(SnapshotterError::FailedPrecondition(format!(
                "snapshot {key} is committed: only active snapshots and views have mounts"
            )));
        }
        let lowers = self.lowers(s.parent.as_deref())?;
        Ok(self.mounts_of(&s, &lowers))
    }

    fn mounts_of(&self, s: &Snapshot, lowers: &[PathBuf]) -> Vec<Mount> {
        let dir = self.snapshot_dir(s.id);
        overlay::mounts(&Layers {
            upper: &dir.join("fs"),
            work: &dir.join("work"),
            lowers,
            writable: s.kind == Kind::Active,
            index_off: self.index_off,
        })
    }

    /// The lower directories of a snapshot on `parent`, nearest first. A lazy image that stopped
    /// serving is mounted again first, so new containers never get a dead mount.
    fn lowers(&self, parent: Option<&str>) -> Result<Vec<PathBuf>> {
        let Some(parent) = parent else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (_, s) in self.state.chain(parent)? {
            match &s.content {
                Content::Dir => out.push(self.snapshot_dir(s.id).join("fs")),
                Content::Placeholder => {}
                Content::Lazy { image, whole } => {
                    let mnt = self.images.mountpoint(image);
                    let mut record = self
                        .state
                        .image(image)?
                        .ok_or_else(|| SnapshotterError::NotFound(format!("lazy image {image}")))?;
                    if super::images::mount_state(&mnt, record.pid) != MountState::Serving {
                        record.pid = self.images.ensure(image, &record)?;
                        self.state.put_image(image, &record)?;
                    }
                    out.push(mnt);
                    if *whole {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Commit: active snapshot `key` becomes committed snapshot `name`.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let s = self.state.get(key)?.ok_or_else(|| not_found(key))?;
        let usage = disk_usage(&self.snapshot_dir(s.id).join("fs"));
        self.state.commit(key, name, labels, usage)?;
        Ok(())
    }

    /// Remove: the snapshot and its directory; a lazy image goes with its last snapshot.
    pub fn remove(&self, key: &str) -> Result<()> {
        let removed = self.state.remove(key)?;
        if removed.snapshot.content == Content::Dir {
            let dir = self.snapshot_dir(removed.snapshot.id);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                // The state no longer has it; Cleanup retries.
                tracing::warn!(path = %dir.display(), error = %e, "could not remove a snapshot directory");
            }
        }
        if let (Some(image), Content::Lazy { image: k, .. }) =
            (removed.released, &removed.snapshot.content)
        {
            self.images.release(k, &image);
        }
        Ok(())
    }

    /// Stat.
    pub fn stat(&self, key: &str) -> Result<Snapshot> {
        self.state.get(key)?.ok_or_else(|| not_found(key))
    }

    /// Update: only labels change; `paths` as containerd sends them (`labels`, `labels.<key>`,
    /// none = replace all labels).
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot> {
        let current = self.stat(key)?;
        let mut next = current.labels;
        if paths.is_empty() {
            next = labels;
        } else {
            for p in paths {
                if p == "labels" {
                    next = labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => next.insert(k.to_string(), v.clone()),
                        None => next.remove(k),
                    };
                } else {
                    return Err(SnapshotterError::InvalidArgument(format!(
                        "cannot update field {p:?} of snapshot {key}: only labels change"
                    )));
                }
            }
        }
        self.state.set_labels(key, next)
    }

    /// List (Walk): every snapshot passing `filters`.
    pub fn list(&self, filters: &[String]) -> Result<Vec<(String, Snapshot)>> {
        let f = Filters::parse(filters)
            .map_err(|e| SnapshotterError::InvalidArgument(e.to_string()))?;
        Ok(self
            .state
            .all()?
            .into_iter()
            .filter(|(name, s)| f.matches(name, s))
            .collect())
    }

    /// Usage: what the snapshot itself holds on disk.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let s = self.stat(key)?;
        Ok(match (&s.content, s.kind) {
            (Content::Dir, Kind::Active) => disk_usage(&self.snapshot_dir(s.id).join("fs")),
            (Content::Dir, _) => s.usage,
            (Content::Placeholder, _) => Usage::default(),
            // A lazy image holds its bootstrap and the chunks fetched so far.
            (Content::Lazy { image, .. }, _) => {
                let dir = self.images.image_dir(image);
                let cache = disk_usage(&dir.join("cache"));
                let boot = std::fs::metadata(dir.join("bootstrap")).map_or(0, |m| m.blocks() * 512);
                Usage {
                    size: cache.size + boot,
                    inodes: cache.inodes + 1,
                }
            }
        })
    }

    /// Cleanup: removes snapshot directories the state does not know.
    pub fn cleanup(&self) -> Result<()> {
        let ids = self.state.ids()?;
        let dir = self.root.join("snapshots");
        let entries =
            std::fs::read_dir(&dir).map_err(|e| SnapshotterError::io("listing", &dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let known = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !known {
                tracing::info!(path = %entry.path().display(), "removing a snapshot directory no snapshot uses");
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "could not remove it");
                }
            }
        }
        Ok(())
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn not_found(key: &str) -> SnapshotterError {
    SnapshotterError::NotFound(format!("snapshot {key}"))
}
