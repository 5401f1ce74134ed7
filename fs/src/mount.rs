//! Mount and unmount: open the source (image.rs), start one FUSE session per bootstrap
//! (session.rs; an indexed image has one per layer, stacked by overlayfs: layers.rs) and the
//! stats writer; unmount on drop, on SIGINT/SIGTERM, or by `umount`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use shoal_store::{Store, StoreConfig};

use crate::access_log::AccessLog;
use crate::config::FsConfig;
use crate::error::{FsError, Result};
use crate::image::Opened;
use crate::layers::Stack;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::session::{Session, SessionParts};

/// A mounted image; dropping it unmounts.
pub struct MountHandle {
    /// One per bootstrap: the image, or each layer of an indexed image (bottom first).
    sessions: Vec<Session>,
    /// The overlay stacking the layers of an indexed image.
    stack: Option<Stack>,
    mountpoint: PathBuf,
    stop: Arc<AtomicBool>,
    stats: Option<JoinHandle<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

/// Mounts `config.source` at `config.mountpoint` read-only and returns once the kernel has
/// answered the FUSE handshake (for an indexed image: every layer's, and the overlay is up).
/// Call it outside any tokio runtime: it runs its own.
pub fn mount(config: FsConfig) -> Result<MountHandle> {
    config.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Cache writes (fsync) go to the blocking pool: keep it small.
        .max_blocking_threads(8)
        .thread_name("shoal-fs-io")
        .enable_all()
        .build()
        .map_err(|e| FsError::io("starting I/O runtime for", &config.mountpoint, e))?;
    clear_stale_mount(&config.mountpoint);
    let opened = rt.block_on(crate::image::open(&config))?;
    std::fs::create_dir_all(&config.cache_dir)
        .map_err(|e| FsError::io("creating cache directory", &config.cache_dir, e))?;
    // One cache for every layer: a chunk two layers hold is stored once.
    let store = Store::open(StoreConfig::new(&config.cache_dir, config.cache_quota))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handle = MountHandle {
        sessions: Vec::new(),
        stack: None,
        mountpoint: config.mountpoint.clone(),
        stop: Arc::clone(&stop),
        stats: None,
        rt: None,
    };
    let parts = |image, mountpoint, memory_cache_bytes, read_threads, access| SessionParts {
        config: &config,
        image,
        mountpoint,
        store: store.clone(),
        rt: rt.handle().clone(),
        memory_cache_bytes,
        read_threads,
        access,
        stop: Arc::clone(&stop),
    };
    match opened {
        Opened::Image(image) => {
            let access = match &config.record_access {
                Some(p) => Some(Arc::new(AccessLog::create(p, image.boot.inode_count())?)),
                None => None,
            };
            handle.sessions.push(Session::start(parts(
                image,
                &config.mountpoint,
                config.memory_cache_bytes,
                config.read_threads,
                access,
            ))?);
        }
        Opened::Layers(img) => {
            if config.record_access.is_some() {
                tracing::warn!("record_access is not kept for an image mounted through its Shoal index (its inodes are per layer)");
            }
            let n = img.layers.len();
            if n == 0 {
                return Err(FsError::Image {
                    image: config.source.clone(),
                    reason: "the image has no layers".into(),
                });
            }
            // The layers share the memory and the read threads a single image would get.
            let memory = (config.memory_cache_bytes / n as u64).max(8 << 20);
            let threads = (config.read_threads / n).max(4);
            let stack = Stack::new(n, &config.mountpoint)?;
            let dirs: Vec<PathBuf> = (0..n).map(|i| stack.layer(i)).collect();
            handle.stack = Some(stack);
            for (image, dir) in img.layers.into_iter().zip(&dirs) {
                handle
                    .sessions
                    .push(Session::start(parts(image, dir, memory, threads, None))?);
            }
            if let Some(stack) = handle.stack.as_mut() {
                stack.mount(&crate::session::fs_name(&config.source))?;
            }
            tracing::info!(manifest = %img.manifest, index = %img.index, layers = n, "layers stacked");
        }
    }
    tracing::info!(source = %config.source, mountpoint = %config.mountpoint.display(), "image mounted");
    if let Some(path) = &config.stats_file {
        let metrics = handle.all_metrics();
        handle.stats = Some(
            spawn_stats_writer(path.clone(), metrics, Arc::clone(&stop))
                .map_err(|e| FsError::io("starting the stats writer for", path, e))?,
        );
    }
    handle.rt = Some(rt);
    Ok(handle)
}

/// How often a mount's counters are written to its stats file.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Writes the mount's counters to `path` (atomically) every [`STATS_INTERVAL`] and once more
/// when `stop` is set: the snapshotter's metrics and `shoal status` read them from there.
fn spawn_stats_writer(
    path: PathBuf,
    metrics: Vec<Arc<Metrics>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("shoal-fs-stats".into())
        .spawn(move || {
            let tmp = path.with_extension("tmp");
            loop {
                let done = stop.load(Ordering::Relaxed);
                let write = serde_json::to_vec(&MetricsSnapshot::sum(&metrics))
                    .map_err(std::io::Error::other)
                    .and_then(|b| std::fs::write(&tmp, b))
                    .and_then(|()| std::fs::rename(&tmp, &path));
                if let Err(e) = write {
                    tracing::debug!(path = %path.display(), error = %e, "could not write the mount's stats");
                }
                if done {
                    return;
                }
                std::thread::park_timeout(STATS_INTERVAL);
            }
        })
}

/// A FUSE mount left by a process that died answers ENOTCONN: detach it so we can mount again.
fn clear_stale_mount(mountpoint: &Path) {
    if let Err(e) = std::fs::metadata(mountpoint) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            tracing::warn!(mountpoint = %mountpoint.display(), "detaching a stale FUSE mount left by a dead process");
            if let Err(e) = umount(mountpoint) {
                tracing::warn!(error = %e, "could not detach the stale mount");
            }
        }
    }
}

impl MountHandle {
    /// Where the image is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The mount's counters (of the bottom layer for an indexed image: [`MountHandle::snapshot`]
    /// sums every layer's).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.sessions[0].reader.metrics
    }

    /// The counters of every filesystem of the mount (one per layer of an indexed image).
    pub fn all_metrics(&self) -> Vec<Arc<Metrics>> {
        self.sessions
            .iter()
            .map(|s| Arc::clone(&s.reader.metrics))
            .collect()
    }

    /// The main figures, summed over the mount's filesystems.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot::sum(&self.all_metrics())
    }

    /// Waits until the background prefetch has finished.
    pub fn wait_prefetch(&mut self) {
        for s in &mut self.sessions {
            s.wait_prefetch();
        }
    }

    /// True once someone unmounted the image (the overlay, or a FUSE session).
    fn unmounted(&self) -> bool {
        self.sessions.iter().any(Session::finished)
            || self.stack.as_ref().is_some_and(|s| !s.still_mounted())
    }

    /// Serves until SIGINT or SIGTERM (then unmounts) or until someone unmounts the mountpoint.
    pub fn wait_for_signal(mut self) -> Result<()> {
        let Some(rt) = self.rt.take() else {
            return Ok(());
        };
        let r = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => if self.unmounted() { break },
                }
            }
            Ok::<(), std::io::Error>(())
        });
        self.rt = Some(rt);
        r.map_err(|e| FsError::io("waiting for signals at", &self.mountpoint, e))?;
        tracing::info!(mountpoint = %self.mountpoint.display(), "unmounting");
        self.unmount()
    }

    /// Unmounts (lazily if busy) and stops the background work.
    pub fn unmount(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(stack) = self.stack.as_mut() {
            stack.unmount();
        }
        let mut result = Ok(());
        for s in &mut self.sessions {
            if let Err(e) = s.stop() {
                tracing::warn!(mountpoint = %s.mountpoint.display(), error = %e, "unmount failed");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        self.sessions.clear();
        if let Some(stack) = self.stack.take() {
            stack.remove();
        }
        if let Some(t) = self.stats.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        result
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "unmount on drop failed");
        }
    }
}

/// Unmounts a Shoal mount (`shoal fs umount MOUNTPOINT`), from any process: `fusermount3 -u`,
/// else (as root) a lazy `umount2`. The mounting process sees the session end and exits.
pub fn umount(mountpoint: &Path) -> Result<()> {
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("--")
        .arg(mountpoint)
        .output();
    if let Ok(o) = &out {
        if o.status.success() {
            return Ok(());
        }
    }
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| FsError::Config("mountpoint contains a NUL byte".into()))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let os = std::io::Error::last_os_error();
    let detail = match out {
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("fusermount3: {e}"),
    };
    Err(FsError::Mount {
        op: "unmounting",
        path: mountpoint.to_path_buf(),
        source: std::io::Error::new(os.kind(), format!("{os}; {detail}")),
    })
}

/// `shoal fs mount`: mounts and serves until SIGINT/SIGTERM or an external unmount, then logs
/// what the mount read and fetched.
pub fn run(config: FsConfig) -> Result<()> {
    let handle = mount(config)?;
    let metrics = handle.all_metrics();
    let result = handle.wait_for_signal();
    let s = MetricsSnapshot::sum(&metrics);
    tracing::info!(
        read_bytes = s.read_bytes,
        fetched_peer_bytes = s.fetched_peer,
        fetched_origin_bytes = s.fetched_origin,
        image_stored_bytes = s.image_stored_bytes,
        image_fetched_percent = %format_args!("{:.2}", 100.0 * s.image_fetched_ratio),
        cache_hits = s.cache_hits,
        cache_misses = s.cache_misses,
        verify_failures = s.verify_failures,
        "unmounted"
    );
    result
}
