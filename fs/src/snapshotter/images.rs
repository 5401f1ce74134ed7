//! Lazily mounted images: one `shoal fs mount` process per image (its bootstrap digest), in its
//! own process group so that it outlives the snapshotter; containers of that image share it.
//!
//! `images/<hex>/` holds `bootstrap` (verified), `mnt/` (the FUSE mount), `cache/` (its
//! verified-chunk cache), `fs.toml` (the mount's config), `mount.log`, `image.json` (what
//! `shoal status` shows) and `stats.json` (the mount's counters, written by the mount process).
//! At start the snapshotter adopts every mount that still serves and mounts again those that
//! died ([`LazyImages::reconcile`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_origin::Reference;

use super::bootstrap::{self, BootstrapSource};
use super::error::{Result, SnapshotterError};
use super::state::LazyImage;
use crate::config::FsConfig;

/// How lazy mounts are made.
#[derive(Debug, Clone)]
pub struct MountSettings {
    /// The `shoal` binary that serves a mount.
    pub shoal_binary: PathBuf,
    /// Where bootstraps come from.
    pub source: BootstrapSource,
    /// Longest wait for a mount to come up.
    pub mount_timeout: Duration,
    /// Cache quota of each mount.
    pub cache_quota: u64,
    /// Read deadline inside a mount, seconds.
    pub fetch_timeout_secs: u64,
    /// Fetch the prefetch list after mounting.
    pub prefetch: bool,
    /// `SHOAL_LOG` of the mount processes.
    pub log: String,
}

/// What `image.json` records for `shoal status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The reference it was pulled as.
    pub reference: String,
    /// `sha256:<hex>` of its bootstrap.
    pub bootstrap: String,
    /// For one layer of a plain image mounted through its Shoal index: the layer's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
}

/// The state of a mountpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    /// A filesystem other than its parent's is mounted there and answers.
    Serving,
    /// A FUSE mount whose process is gone (ENOTCONN), or the directory is unreadable.
    Dead,
    /// Nothing is mounted there.
    Absent,
}

/// The state of `mnt`, served by process `pid` (0: not known).
pub fn mount_state(mnt: &Path, pid: u32) -> MountState {
    let parent_dev = mnt
        .parent()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev());
    match std::fs::metadata(mnt) {
        // A FUSE mount whose process died still answers stat from the kernel's attribute cache
        // (the image never changes, so attributes are cached long): ask after the process.
        Ok(m) if Some(m.dev()) != parent_dev => {
            if pid == 0 || serves(pid, mnt) {
                MountState::Serving
            } else {
                MountState::Dead
            }
        }
        Ok(_) => MountState::Absent,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => MountState::Absent,
        Err(_) => MountState::Dead,
    }
}

/// The lazily mounted images of this snapshotter.
pub struct LazyImages {
    dir: PathBuf,
    settings: MountSettings,
    /// One lock per image: concurrent pulls of one image mount it once.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Mount processes this process started (reaped when they end).
    children: Mutex<HashMap<String, Child>>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for LazyImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyImages")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl LazyImages {
    /// Lazy images under `dir`; bootstrap fetches run on `rt`.
    pub fn new(dir: PathBuf, settings: MountSettings, rt: tokio::runtime::Handle) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| SnapshotterError::io("creating", &dir, e))?;
        Ok(LazyImages {
            dir,
            settings,
            locks: Mutex::new(HashMap::new()),
            children: Mutex::new(HashMap::new()),
            rt,
        })
    }

    /// The directory of image `key`.
    pub fn image_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Where image `key` is mounted.
    pub fn mountpoint(&self, key: &str) -> PathBuf {
        self.image_dir(key).join("mnt")
    }

    fn lock(&self, key: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(key.to_string()).or_default())
    }

    /// Makes sure image `key` is mounted and serving: fetches and verifies its bootstrap if it is
    /// not here yet, starts its mount process if none serves. Returns the pid serving it.
    pub fn ensure(&self, key: &str, image: &LazyImage) -> Result<u32> {
        let lock = self.lock(key);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.image_dir(key);
        let mnt = self.mountpoint(key);
        match mount_state(&mnt, image.pid) {
            MountState::Serving => return Ok(image.pid),
            MountState::Dead => {
                tracing::warn!(image = %image.reference, mountpoint = %mnt.display(), "lazy mount died; mounting it again");
                self.stop_process(key, image.pid, &mnt);
            }
            MountState::Absent => {}
        }
        for sub in ["mnt", "cache"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| SnapshotterError::io("creating", &p, e))?;
        }
        let info = ImageInfo {
            reference: image.reference.clone(),
            bootstrap: image.bootstrap.clone(),
            layer: image.layer.clone(),
        };
        write_json(&dir.join("image.json"), &info)?;
        let boot = dir.join("bootstrap");
        if !boot.is_file() {
            let reference =
                Reference::parse(&image.origin).map_err(|e| SnapshotterError::Image {
                    image: image.reference.clone(),
                    reason: format!("origin {}: {e}", image.origin),
                })?;
            let source = self.settings.source.clone();
            let digest = image.bootstrap.clone();
            let dest = boot.clone();
            let fetch = async move {
                tokio::time::timeout(
                    Duration::from_secs(120),
                    bootstrap::fetch(&source, &reference, &digest, &dest),
                )
                .await
            };
            self.rt
                .block_on(fetch)
                .map_err(|_| SnapshotterError::Image {
                    image: image.reference.clone(),
                    reason: "the bootstrap did not arrive within 120 s".into(),
                })??;
        }
        if let Some(layer) = &image.layer {
            if let Err(e) = check_layer_bootstrap(&boot, layer) {
                // Not kept: the next Prepare fetches it again (or unpacks the layer).
                let _ = std::fs::remove_file(&boot);
                return Err(SnapshotterError::Image {
                    image: image.reference.clone(),
                    reason: e,
                });
            }
        }
        self.start_process(key, image, &dir)
    }

    fn start_process(&self, key: &str, image: &LazyImage, dir: &Path) -> Result<u32> {
        let mnt = self.mountpoint(key);
        let s = &self.settings;
        let fs = FsConfig {
            source: dir.join("bootstrap").display().to_string(),
            mountpoint: mnt.clone(),
            bootstrap_digest: Some(image.bootstrap.clone()),
            origin: Some(image.origin.clone()),
            cache_dir: dir.join("cache"),
            cache_quota: s.cache_quota,
            peer_socket: s.source.peer.as_ref().map(|p| p.socket().to_path_buf()),
            plain_http: s.source.plain_http.clone(),
            fetch_timeout_secs: s.fetch_timeout_secs,
            prefetch: s.prefetch,
            // Containers run as any user; overlayfs reads the lower layer with the mounter's
            // credentials, but allow_other keeps FUSE from refusing anyone else.
            allow_other: true,
            stats_file: Some(dir.join("stats.json")),
            ..FsConfig::default()
        };
        // One layer of an indexed image: one of several mount processes of the image.
        let fs = match image.layer {
            Some(_) => FsConfig {
                read_threads: 8,
                memory_cache_bytes: 32 << 20,
                ..fs
            },
            None => fs,
        };
        let config = dir.join("fs.toml");
        let text = toml::to_string(&fs).map_err(|e| SnapshotterError::Config(e.to_string()))?;
        std::fs::write(&config, text).map_err(|e| SnapshotterError::io("writing", &config, e))?;
        let log_path = dir.join("mount.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| SnapshotterError::io("opening", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| SnapshotterError::io("opening", &log_path, e))?;
        let mut cmd = Command::new(&s.shoal_binary);
        cmd.arg("fs")
            .arg("mount")
            .arg(&fs.source)
            .arg(&mnt)
            .arg("--config")
            .arg(&config);
        if fs.peer_socket.is_none() {
            cmd.arg("--no-peer");
        }
        if let Some(dc) = &s.source.docker_config {
            cmd.env("DOCKER_CONFIG", dc.parent().unwrap_or(Path::new("/")));
        }
        cmd.env("SHOAL_LOG", &s.log)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a signal to the snapshotter's group (Ctrl-C, a service
            // manager stopping it) leaves the mounts of running containers alone.
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| SnapshotterError::Image {
            image: image.reference.clone(),
            reason: format!("starting {}: {e}", s.shoal_binary.display()),
        })?;
        let pid = child.id();
        let deadline = Instant::now() + s.mount_timeout;
        loop {
            if mount_state(&mnt, pid) == MountState::Serving {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SnapshotterError::Image {
                    image: image.reference.clone(),
                    reason: format!(
                        "the mount process exited ({status}) before mounting: {}",
                        log_tail(&log_path)
                    ),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SnapshotterError::Image {
                    image: image.reference.clone(),
                    reason: format!(
                        "not mounted within {:?}: {}",
                        s.mount_timeout,
                        log_tail(&log_path)
                    ),
                });
            }
            wait_mount_change(Duration::from_millis(100));
        }
        tracing::info!(image = %image.reference, mountpoint = %mnt.display(), pid, "lazy image mounted");
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), child);
        Ok(pid)
    }

    /// Unmounts image `key`, ends its process and removes its directory.
    pub fn release(&self, key: &str, image: &LazyImage) {
        let lock = self.lock(key);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mnt = self.mountpoint(key);
        self.stop_process(key, image.pid, &mnt);
        let dir = self.image_dir(key);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove a released image's directory");
            }
        }
        tracing::info!(image = %image.reference, "lazy image unmounted and removed");
    }

    /// Unmounts `mnt` (lazily) and makes sure the mount process `pid` ends.
    fn stop_process(&self, key: &str, pid: u32, mnt: &Path) {
        if mount_state(mnt, pid) != MountState::Absent {
            if let Err(e) = crate::umount(mnt) {
                tracing::warn!(mountpoint = %mnt.display(), error = %e, "could not unmount a lazy image");
            }
        }
        let child = self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        match child {
            Some(mut c) => {
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if matches!(c.try_wait(), Ok(None)) {
                    let _ = c.kill();
                }
                let _ = c.wait();
            }
            // Started by an earlier snapshotter process: end it only if that pid still is our
            // mount process (a pid can be reused).
            None if pid != 0 && serves(pid, mnt) => {
                let deadline = Instant::now() + Duration::from_secs(5);
                while serves(pid, mnt) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if serves(pid, mnt) {
                    // SAFETY: kill(2) with a pid checked to be our mount process a moment ago.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
            None => {}
        }
    }

    /// At start: mounts every known image whose mount is not serving, and removes directories
    /// of images the state no longer knows. Returns the images whose mount could not be made
    /// again (their snapshots stay; a later use retries).
    pub fn reconcile(&self, known: &[(String, LazyImage)]) -> Vec<(String, SnapshotterError)> {
        let mut failed = Vec::new();
        for (key, image) in known {
            match mount_state(&self.mountpoint(key), image.pid) {
                MountState::Serving => {
                    tracing::info!(image = %image.reference, pid = image.pid, "adopted a lazy mount that kept serving")
                }
                _ => {
                    if let Err(e) = self.ensure(key, image) {
                        failed.push((key.clone(), e));
                    }
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return failed;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.iter().any(|(k, _)| *k == name) {
                tracing::info!(dir = %entry.path().display(), "removing a lazy image no snapshot uses");
                let orphan = LazyImage {
                    bootstrap: String::new(),
                    origin: String::new(),
                    reference: name.clone(),
                    pid: 0,
                    layer: None,
                };
                self.release(&name, &orphan);
            }
        }
        failed
    }
}

/// The info and last counters of every lazy image under `images_dir` (used by `shoal status`
/// too, without a running snapshotter).
pub fn read_stats(images_dir: &Path) -> Vec<(ImageInfo, crate::MetricsSnapshot)> {
    let Ok(entries) = std::fs::read_dir(images_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let info = std::fs::read(dir.join("image.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<ImageInfo>(&b).ok());
        let Some(info) = info else { continue };
        let stats = std::fs::read(dir.join("stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        out.push((info, stats));
    }
    out.sort_by(|a, b| a.0.reference.cmp(&b.0.reference));
    out
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let bytes =
        serde_json::to_vec_pretty(v).map_err(|e| SnapshotterError::Config(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| SnapshotterError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SnapshotterError::io("writing", path, e))
}

/// True when process `pid` runs and is the mount process of `mnt` (its command line names it).
fn serves(pid: u32, mnt: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = mnt.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

/// The last lines of a mount log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return format!("(nothing in {})", path.display());
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Waits until the mount table changes or `max` passes (the kernel flags /proc/self/mountinfo
/// with POLLPRI on every mount and unmount).
fn wait_mount_change(max: Duration) {
    let Ok(f) = File::open("/proc/self/mountinfo") else {
        std::thread::sleep(max);
        return;
    };
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLPRI,
        revents: 0,
    };
    let ms = libc::c_int::try_from(max.as_millis()).unwrap_or(100);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// Checks that the layer bootstrap at `path` (its sha256 already checked against the index) reads
/// layer `layer`: an index naming another layer's bootstrap must not stand in for this one.
fn check_layer_bootstrap(path: &Path, layer: &str) -> std::result::Result<(), String> {
    let boot = shoal_format::bootstrap::Bootstrap::open(path)
        .map_err(|e| format!("the index's bootstrap of layer {layer} does not load: {e}"))?;
    let reads = boot
        .blob(0)
        .map(|b| format!("sha256:{}", hex::encode(b.digest)));
    if reads.as_deref() != Some(layer) {
        return Err(format!(
            "the index's bootstrap for layer {layer} reads {}: refusing it (index the image again with `shoal image index`)",
            reads.as_deref().unwrap_or("no blob")
        ));
    }
    Ok(())
}
