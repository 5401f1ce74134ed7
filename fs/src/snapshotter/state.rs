//! The snapshotter's state, in one redb database (`<root>/state.redb`): every snapshot (kind,
//! parent, labels, times, what backs it), the parent -> children index, and the lazy images
//! mounted for containers. Each call is one transaction, so a crash leaves either the state before
//! the call or the state after it; directories on disk are reconciled with it at start
//! ([`super::Snapshotter::open`]) and by Cleanup.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::error::{Result, SnapshotterError};

/// Snapshot name -> [`Snapshot`] (JSON).
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Parent name -> child names.
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
/// Lazy image (bootstrap digest) -> [`LazyImage`] (JSON).
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
/// Lazy image -> names of the snapshots it backs.
const IMAGE_USERS: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("image_users");
/// Counters: `next_id`.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// What containerd calls a snapshot's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A read-only view of a committed snapshot.
    View,
    /// A writable snapshot (a layer being unpacked, or a container's root).
    Active,
    /// A finished, immutable snapshot others can be built on.
    Committed,
}

/// What backs a snapshot's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Its own directory (`snapshots/<id>/fs`), as with containerd's overlayfs snapshotter.
    Dir,
    /// A layer of a Shoal image below the bootstrap: the image's mount holds its files.
    Placeholder,
    /// A lazily mounted image (the `images/<hex>` mount of [`LazyImage`] `image`); `whole` when the
    /// mount is the complete image (a converted Shoal image), so no snapshot below it adds
    /// files; not whole for one layer of a plain image mounted through its Shoal index (the
    /// layers below are stacked under it).
    Lazy {
        /// The lazy image's key (bootstrap digest hex).
        image: String,
        /// The mount is the whole image (a converted Shoal image), not one layer of it.
        whole: bool,
    },
}

/// One snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Directory number under `snapshots/`.
    pub id: u64,
    /// View, active or committed.
    pub kind: Kind,
    /// The committed snapshot it is built on.
    pub parent: Option<String>,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: i64,
    /// Last change, nanoseconds since the epoch.
    pub updated_ns: i64,
    /// What backs its files.
    pub content: Content,
    /// Bytes and inodes of its own files, measured when it was committed.
    pub usage: Usage,
}

/// Disk use of a snapshot's own files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes on disk.
    pub size: u64,
    /// Inodes.
    pub inodes: u64,
}

impl Snapshot {
    /// A new snapshot stamped now, backed by its own directory.
    pub fn new(
        id: u64,
        kind: Kind,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Self {
        let now = now_ns();
        Snapshot {
            id,
            kind,
            parent,
            labels,
            created_ns: now,
            updated_ns: now,
            content: Content::Dir,
            usage: Usage::default(),
        }
    }
}

/// An image mounted lazily for containers: one `shoal fs mount` process and its directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyImage {
    /// `sha256:<hex>` of its bootstrap (the key is the hex).
    pub bootstrap: String,
    /// Where its blobs come from: `docker://HOST/REPO`.
    pub origin: String,
    /// The image reference it was first pulled as (for status and logs).
    pub reference: String,
    /// Process id of the mount process last started (0 when unknown).
    pub pid: u32,
    /// For one layer of a plain image mounted through its Shoal index: the layer's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// What [`State::remove`] took away.
#[derive(Debug)]
pub struct Removed {
    /// The removed snapshot.
    pub snapshot: Snapshot,
    /// The lazy image no snapshot uses any longer (its mount is to be taken down).
    pub released: Option<LazyImage>,
}

/// The open database.
pub struct State {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("path", &self.path).finish()
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

impl State {
    /// Opens (or creates) `path` and makes sure every table exists.
    pub fn open(path: &Path) -> Result<State> {
        let state = State {
            db: Database::create(path).map_err(|e| SnapshotterError::State {
                path: path.to_path_buf(),
                reason: format!("opening: {e}"),
            })?,
            path: path.to_path_buf(),
        };
        state.write(|tx| {
            tx.open_table(SNAPSHOTS)?;
            tx.open_multimap_table(CHILDREN)?;
            tx.open_table(IMAGES)?;
            tx.open_multimap_table(IMAGE_USERS)?;
            tx.open_table(COUNTERS)?;
            Ok(Ok(()))
        })?;
        Ok(state)
    }

    fn db_err(&self, e: impl std::fmt::Display) -> SnapshotterError {
        SnapshotterError::State {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn corrupt(&self, what: &str, e: impl std::fmt::Display) -> SnapshotterError {
        self.db_err(format!("record {what} does not parse: {e}"))
    }

    /// Runs `f` in one write transaction; commits only when `f` returns `Ok(Ok(_))`.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> std::result::Result<Result<T>, redb::Error>,
    ) -> Result<T> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        match f(&tx).map_err(|e| self.db_err(e))? {
            Ok(v) => {
                tx.commit().map_err(|e| self.db_err(e))?;
                Ok(v)
            }
            Err(e) => {
                // Dropping the transaction aborts it; an abort error adds nothing for the caller.
                let _ = tx.abort();
                Err(e)
            }
        }
    }

    fn decode_snapshot(&self, name: &str, bytes: &[u8]) -> Result<Snapshot> {
        serde_json::from_slice(bytes).map_err(|e| self.corrupt(name, e))
    }

    /// The snapshot named `key`.
    pub fn get(&self, key: &str) -> Result<Option<Snapshot>> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(SNAPSHOTS).map_err(|e| self.db_err(e))?;
        let got = table.get(key).map_err(|e| self.db_err(e))?;
        got.map(|v| self.decode_snapshot(key, v.value()))
            .transpose()
    }

    /// `key` and its ancestors, nearest first (`key` itself first).
    pub fn chain(&self, key: &str) -> Result<Vec<(String, Snapshot)>> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(SNAPSHOTS).map_err(|e| self.db_err(e))?;
        let mut out: Vec<(String, Snapshot)> = Vec::new();
        let mut next = Some(key.to_string());
        while let Some(name) = next {
            let Some(v) = table.get(name.as_str()).map_err(|e| self.db_err(e))? else {
                return Err(SnapshotterError::NotFound(format!("snapshot {name}")));
            };
            let s = self.decode_snapshot(&name, v.value())?;
            next = s.parent.clone();
            out.push((name, s));
            if out.len() > 4096 {
                return Err(self.db_err(format!("parent chain of {key} loops")));
            }
        }
        Ok(out)
    }

    /// Stores a new snapshot `key`, taking the next id. Fails when `key` exists or its parent is
    /// missing or not committed; `image` registers it as a user of a lazy image.
    pub fn create(&self, key: &str, mut snapshot: Snapshot) -> Result<Snapshot> {
        self.write(|tx| {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            if snaps.get(key)?.is_some() {
                return Ok(Err(SnapshotterError::AlreadyExists(format!(
                    "snapshot {key}"
                ))));
            }
            if let Some(parent) = &snapshot.parent {
                let Some(p) = snaps.get(parent.as_str())? else {
                    return Ok(Err(SnapshotterError::NotFound(format!(
                        "parent snapshot {parent}"
                    ))));
                };
                match self.decode_snapshot(parent, p.value()) {
                    Ok(p) if p.kind == Kind::Committed => {}
                    Ok(_) => {
                        return Ok(Err(SnapshotterError::InvalidArgument(format!(
                            "parent {parent} is not a committed snapshot"
                        ))))
                    }
                    Err(e) => return Ok(Err(e)),
                }
            }
            let mut counters = tx.open_table(COUNTERS)?;
            let id = counters.get("next_id")?.map_or(1, |v| v.value());
            counters.insert("next_id", id + 1)?;
            snapshot.id = id;
            snaps.insert(key, json(&snapshot).as_slice())?;
            if let Some(parent) = &snapshot.parent {
                tx.open_multimap_table(CHILDREN)?
                    .insert(parent.as_str(), key)?;
            }
            if let Content::Lazy { image, .. } = &snapshot.content {
                tx.open_multimap_table(IMAGE_USERS)?
                    .insert(image.as_str(), key)?;
            }
            Ok(Ok(snapshot.clone()))
        })
    }

    /// Turns active snapshot `key` into committed snapshot `name` with `labels` and its measured
    /// `usage`.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<Snapshot> {
        self.write(|tx| {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            if snaps.get(name)?.is_some() {
                return Ok(Err(SnapshotterError::AlreadyExists(format!(
                    "snapshot {name}"
                ))));
            }
            let Some(v) = snaps.remove(key)? else {
                return Ok(Err(SnapshotterError::NotFound(format!("snapshot {key}"))));
            };
            let mut s = match self.decode_snapshot(key, v.value()) {
                Ok(s) => s,
                Err(e) => return Ok(Err(e)),
            };
            drop(v);
            if s.kind != Kind::Active {
                return Ok(Err(SnapshotterError::FailedPrecondition(format!(
                    "snapshot {key} is not active: only active snapshots can be committed"
                ))));
            }
            s.kind = Kind::Committed;
            s.labels = labels;
            s.usage = usage;
            s.updated_ns = now_ns();
            snaps.insert(name, json(&s).as_slice())?;
            if let Some(parent) = &s.parent {
                let mut children = tx.open_multimap_table(CHILDREN)?;
                children.remove(parent.as_str(), key)?;
                children.insert(parent.as_str(), name)?;
            }
            Ok(Ok(s.clone()))
        })
    }

    /// Removes `key` (which must have no children); releases its lazy image when it was the
    /// image's last user.
    pub fn remove(&self, key: &str) -> Result<Removed> {
        self.write(|tx| {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let mut children = tx.open_multimap_table(CHILDREN)?;
            if children.get(key)?.next().is_some() {
                return Ok(Err(SnapshotterError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: other snapshots are built on it"
                ))));
            }
            let Some(v) = snaps.remove(key)? else {
                return Ok(Err(SnapshotterError::NotFound(format!("snapshot {key}"))));
            };
            let snapshot = match self.decode_snapshot(key, v.value()) {
                Ok(s) => s,
                Err(e) => return Ok(Err(e)),
            };
            drop(v);
            if let Some(parent) = &snapshot.parent {
                children.remove(parent.as_str(), key)?;
            }
            let mut released = None;
            if let Content::Lazy { image, .. } = &snapshot.content {
                let mut users = tx.open_multimap_table(IMAGE_USERS)?;
                users.remove(image.as_str(), key)?;
                if users.get(image.as_str())?.next().is_none() {
                    let mut images = tx.open_table(IMAGES)?;
                    let record = images.remove(image.as_str())?;
                    released = record.and_then(|v| serde_json::from_slice(v.value()).ok());
                }
            }
            Ok(Ok(Removed { snapshot, released }))
        })
    }

    /// Replaces the labels of `key` (containerd's Update: only labels change).
    pub fn set_labels(&self, key: &str, labels: BTreeMap<String, String>) -> Result<Snapshot> {
        self.write(|tx| {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let Some(v) = snaps.get(key)? else {
                return Ok(Err(SnapshotterError::NotFound(format!("snapshot {key}"))));
            };
            let mut s = match self.decode_snapshot(key, v.value()) {
                Ok(s) => s,
                Err(e) => return Ok(Err(e)),
            };
            drop(v);
            s.labels = labels;
            s.updated_ns = now_ns();
            snaps.insert(key, json(&s).as_slice())?;
            Ok(Ok(s.clone()))
        })
    }

    /// Every snapshot, by name.
    pub fn all(&self) -> Result<Vec<(String, Snapshot)>> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(SNAPSHOTS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            out.push((
                k.value().to_string(),
                self.decode_snapshot(k.value(), v.value())?,
            ));
        }
        Ok(out)
    }

    /// Directory ids in use.
    pub fn ids(&self) -> Result<HashSet<u64>> {
        Ok(self.all()?.into_iter().map(|(_, s)| s.id).collect())
    }

    /// Records (or updates) lazy image `key`.
    pub fn put_image(&self, key: &str, image: &LazyImage) -> Result<()> {
        self.write(|tx| {
            tx.open_table(IMAGES)?.insert(key, json(image).as_slice())?;
            Ok(Ok(()))
        })
    }

    /// Lazy image `key`.
    pub fn image(&self, key: &str) -> Result<Option<LazyImage>> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(IMAGES).map_err(|e| self.db_err(e))?;
        let got = table.get(key).map_err(|e| self.db_err(e))?;
        got.map(|v| serde_json::from_slice(v.value()).map_err(|e| self.corrupt(key, e)))
            .transpose()
    }

    /// Every lazy image, by key.
    pub fn images(&self) -> Result<Vec<(String, LazyImage)>> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(IMAGES).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            let image =
                serde_json::from_slice(v.value()).map_err(|e| self.corrupt(k.value(), e))?;
            out.push((k.value().to_string(), image));
        }
        Ok(out)
    }

    /// Removes lazy image `key` when no snapshot uses it; returns it if it was removed.
    pub fn drop_unused_image(&self, key: &str) -> Result<Option<LazyImage>> {
        self.write(|tx| {
            if tx
                .open_multimap_table(IMAGE_USERS)?
                .get(key)?
                .next()
                .is_some()
            {
                return Ok(Ok(None));
            }
            let mut images = tx.open_table(IMAGES)?;
            let removed = images.remove(key)?;
            let image = removed.and_then(|v| serde_json::from_slice(v.value()).ok());
            Ok(Ok(image))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn snapshots_survive_reopen_and_keep_their_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let st = State::open(&path).unwrap();
            let a = st
                .create("a", Snapshot::new(0, Kind::Active, None, BTreeMap::new()))
                .unwrap();
            assert_eq!(a.id, 1);
            st.commit("a", "base", labels(&[("x", "1")]), Usage::default())
                .unwrap();
            let b = Snapshot::new(0, Kind::Active, Some("base".into()), BTreeMap::new());
            assert_eq!(st.create("b", b).unwrap().id, 2);
        }
        let st = State::open(&path).unwrap();
        assert!(st.get("a").unwrap().is_none());
        let base = st.get("base").unwrap().unwrap();
        assert_eq!(
            (base.kind, base.labels["x"].as_str()),
            (Kind::Committed, "1")
        );
        let chain: Vec<_> = st.chain("b").unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(chain, ["b", "base"]);
        assert!(matches!(
            st.remove("base"),
            Err(SnapshotterError::FailedPrecondition(_))
        ));
        st.remove("b").unwrap();
        st.remove("base").unwrap();
        assert!(st.all().unwrap().is_empty());
        assert_eq!(
            st.create("c", Snapshot::new(0, Kind::Active, None, BTreeMap::new()))
                .unwrap()
                .id,
            3,
            "ids are never reused"
        );
    }

    #[test]
    fn refuses_what_containerd_must_not_do() {
        let dir = tempfile::tempdir().unwrap();
        let st = State::open(&dir.path().join("s.redb")).unwrap();
        let active =
            |p: Option<&str>| Snapshot::new(0, Kind::Active, p.map(Into::into), BTreeMap::new());
        st.create("a", active(None)).unwrap();
        assert!(matches!(
            st.create("a", active(None)),
            Err(SnapshotterError::AlreadyExists(_))
        ));
        assert!(matches!(
            st.create("b", active(Some("zz"))),
            Err(SnapshotterError::NotFound(_))
        ));
        assert!(matches!(
            st.create("b", active(Some("a"))),
            Err(SnapshotterError::InvalidArgument(_))
        ));
        st.create("v", Snapshot::new(0, Kind::View, None, BTreeMap::new()))
            .unwrap();
        assert!(matches!(
            st.commit("v", "n", BTreeMap::new(), Usage::default()),
            Err(SnapshotterError::FailedPrecondition(_))
        ));
        assert!(
            st.get("v").unwrap().is_some(),
            "a refused commit changes nothing"
        );
    }

    #[test]
    fn a_lazy_image_is_released_with_its_last_user() {
        let dir = tempfile::tempdir().unwrap();
        let st = State::open(&dir.path().join("s.redb")).unwrap();
        let img = LazyImage {
            bootstrap: "sha256:ab".into(),
            origin: "docker://r/x".into(),
            reference: "r/x:1".into(),
            pid: 0,
            layer: None,
        };
        st.put_image("ab", &img).unwrap();
        for name in ["n1/top", "n2/top"] {
            let mut s = Snapshot::new(0, Kind::Committed, None, BTreeMap::new());
            s.content = Content::Lazy {
                image: "ab".into(),
                whole: true,
            };
            st.create(name, s).unwrap();
        }
        assert!(st.remove("n1/top").unwrap().released.is_none());
        assert_eq!(st.remove("n2/top").unwrap().released, Some(img));
        assert!(st.images().unwrap().is_empty());
    }
}
