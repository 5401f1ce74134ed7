//! Mount and unmount: open the source (image.rs), build the read path, start the FUSE session and
//! the background prefetch; unmount on drop, on SIGINT/SIGTERM, or by `umount`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{MountOption, SessionACL};
use shoal_store::{Store, StoreConfig};

use crate::access_log::AccessLog;
use crate::config::FsConfig;
use crate::error::{FsError, Result};
use crate::fetch::{ChunkSource, OriginSource, PeerSource};
use crate::inode::ImageFs;
use crate::metrics::Metrics;
use crate::prefetch::{self, PrefetchPlan};
use crate::read::{Reader, ReaderParts};

/// A mounted image; dropping it unmounts.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    fuse_dev: Option<u64>,
    reader: Arc<Reader>,
    stop: Arc<AtomicBool>,
    prefetch: Option<JoinHandle<()>>,
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
/// answered the FUSE handshake. Call it outside any tokio runtime: it runs its own.
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
    let image = rt.block_on(crate::image::open(&config))?;
    let boot = image.boot;
    let total_stored = crate::metrics::stored_bytes(&boot);
    let metrics = Arc::new(Metrics::new(
        hex::encode(boot.root_hash()),
        boot.chunk_count() as usize,
        total_stored,
    ));
    std::fs::create_dir_all(&config.cache_dir)
        .map_err(|e| FsError::io("creating cache directory", &config.cache_dir, e))?;
    let store = Store::open(StoreConfig::new(&config.cache_dir, config.cache_quota))?;
    let peer: Option<Arc<dyn ChunkSource>> = config
        .peer_socket
        .as_ref()
        .map(|s| Arc::new(PeerSource::new(s, image.origin_ref.clone())) as Arc<dyn ChunkSource>);
    let reader = Arc::new(Reader::new(ReaderParts {
        boot: Arc::clone(&boot),
        store,
        peer,
        origin: Arc::new(OriginSource::new(image.origin)),
        rt: rt.handle().clone(),
        timeout: config.fetch_timeout(),
        max_request: config.max_request_bytes,
        max_gap: config.max_gap_bytes,
        memory_cache_bytes: config.memory_cache_bytes,
        metrics,
    })?);
    let access = match &config.record_access {
        Some(p) => Some(Arc::new(AccessLog::create(p, boot.inode_count())?)),
        None => None,
    };
    // An image with a prefetch list being fetched has a better guess than the blob's next
    // files: neighbour fetches would only compete with it for the link.
    let listed = config.prefetch && boot.prefetch().len() > 0;
    let ahead = crate::ahead::AheadConfig {
        file_bytes: config.fetch_ahead_bytes,
        blob_bytes: if listed { 0 } else { config.blob_ahead_bytes },
    };
    let fs = ImageFs::new(Arc::clone(&reader), config.read_threads, ahead, access)
        .map_err(|e| FsError::io("starting read threads for", &config.mountpoint, e))?;

    let mut fuse = fuser::Config::default();
    fuse.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(fs_name(&config.source)),
        MountOption::Subtype("shoal".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::Exec,
    ];
    if config.allow_other {
        fuse.acl = SessionACL::All;
    }
    fuse.n_threads = Some(4);
    let session = fuser::Session::new(fs, &config.mountpoint, &fuse)
        .and_then(fuser::Session::spawn)
        .map_err(|e| FsError::Mount {
            op: "mounting",
            path: config.mountpoint.clone(),
            source: e,
        })?;
    let fuse_dev = std::fs::metadata(&config.mountpoint).ok().map(|m| m.dev());
    if let Some(dev) = fuse_dev {
        set_bdi_readahead(dev, crate::inode::MAX_READAHEAD);
    }
    tracing::info!(source = %config.source, mountpoint = %config.mountpoint.display(), "image mounted");

    let stop = Arc::new(AtomicBool::new(false));
    let plan = PrefetchPlan {
        listed: config.prefetch,
        all: config.prefetch_all,
        bytes_per_sec: config.prefetch_bytes_per_sec,
    };
    let prefetch = if plan.listed || plan.all {
        Some(
            prefetch::spawn(Arc::clone(&reader), plan, Arc::clone(&stop))
                .map_err(|e| FsError::io("starting prefetch for", &config.mountpoint, e))?,
        )
    } else {
        None
    };
    let stats = match &config.stats_file {
        Some(path) => Some(
            spawn_stats_writer(path.clone(), Arc::clone(&reader.metrics), Arc::clone(&stop))
                .map_err(|e| FsError::io("starting the stats writer for", path, e))?,
        ),
        None => None,
    };
    Ok(MountHandle {
        session: Some(session),
        mountpoint: config.mountpoint,
        fuse_dev,
        reader,
        stop,
        prefetch,
        stats,
        rt: Some(rt),
    })
}

/// How often a mount's counters are written to its stats file.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Writes the mount's counters to `path` (atomically) every [`STATS_INTERVAL`] and once more
/// when `stop` is set: the snapshotter's metrics and `shoal status` read them from there.
fn spawn_stats_writer(
    path: PathBuf,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("shoal-fs-stats".into())
        .spawn(move || {
            let tmp = path.with_extension("tmp");
            loop {
                let done = stop.load(Ordering::Relaxed);
                let write = serde_json::to_vec(&metrics.snapshot())
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

/// The kernel keeps a FUSE mount's readahead at its 128 KiB default whatever `max_readahead`
/// the init reply asked for; sequential reads of cached files ran at a third of native speed
/// with it (docs/benchmarks.md, issue 7). Raised through sysfs; root only, best effort.
fn set_bdi_readahead(dev: u64, bytes: u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, (bytes >> 10).to_string()) {
        tracing::debug!(%path, error = %e, "could not raise the mount's readahead; it stays at the kernel default");
    }
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

/// `shoal:<source>` without characters that would break the mount table.
fn fs_name(source: &str) -> String {
    let clean: String = source
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ',' && *c != '\\')
        .take(200)
        .collect();
    format!("shoal:{clean}")
}

impl MountHandle {
    /// Where the image is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The mount's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.reader.metrics
    }

    /// Waits until the background prefetch has finished.
    pub fn wait_prefetch(&mut self) {
        if let Some(t) = self.prefetch.take() {
            let _ = t.join();
        }
    }

    /// Serves until SIGINT or SIGTERM (then unmounts) or until someone unmounts the mountpoint.
    pub fn wait_for_signal(mut self) -> Result<()> {
        let Some(rt) = self.rt.take() else {
            return Ok(());
        };
        let finished = || self.session.as_ref().is_none_or(|s| s.guard.is_finished());
        let r = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => if finished() { break },
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
        let mut result = Ok(());
        if let Some(session) = self.session.take() {
            // Unmount (lazily: a process with an open file must not block it), then wait for the
            // session to end; a connection still held after a while is aborted, so nothing hangs.
            let guard_done = {
                let mut s = Some(session);
                let t = std::thread::spawn(move || {
                    s.take().map(|s| {
                        if s.guard.is_finished() {
                            // Unmounted from outside (`shoal fs umount`): only collect the thread.
                            s.join()
                        } else {
                            s.umount_and_join()
                        }
                    })
                });
                let deadline = Instant::now() + Duration::from_secs(5);
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if !t.is_finished() {
                    self.abort_connection();
                }
                t.join()
            };
            match guard_done {
                // EINVAL: no longer mounted (someone unmounted it meanwhile).
                Ok(Some(Err(e))) if e.raw_os_error() != Some(libc::EINVAL) => {
                    result = Err(FsError::Mount {
                        op: "unmounting",
                        path: self.mountpoint.clone(),
                        source: e,
                    })
                }
                Ok(_) => {}
                Err(_) => tracing::warn!("FUSE session thread panicked"),
            }
        }
        if let Some(t) = self.prefetch.take() {
            let _ = t.join();
        }
        if let Some(t) = self.stats.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        // Fetch-ahead work still running uses the runtime: let it end first.
        self.reader.close(Duration::from_secs(5));
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        result
    }

    /// Aborts the FUSE connection through /sys/fs/fuse/connections (the kernel's way to end a
    /// stuck FUSE filesystem).
    fn abort_connection(&self) {
        let Some(dev) = self.fuse_dev else { return };
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let path = format!("/sys/fs/fuse/connections/{minor}/abort");
        match std::fs::write(&path, b"1") {
            Ok(()) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE connection did not end after unmount; aborted it")
            }
            Err(e) => tracing::warn!(%path, error = %e, "could not abort the FUSE connection"),
        }
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
    let metrics = Arc::clone(handle.metrics());
    let result = handle.wait_for_signal();
    let s = metrics.snapshot();
    tracing::info!(
        read_bytes = s.read_bytes,
        fetched_peer_bytes = s.fetched_peer,
        fetched_origin_bytes = s.fetched_origin,
        image_stored_bytes = metrics.image_stored_bytes(),
        image_fetched_percent = %format_args!("{:.2}", 100.0 * s.image_fetched_ratio),
        cache_hits = s.cache_hits,
        cache_misses = s.cache_misses,
        verify_failures = s.verify_failures,
        "unmounted"
    );
    result
}
