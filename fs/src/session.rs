//! One FUSE filesystem over one bootstrap: its read path (reader, sources, cache), the FUSE
//! session serving it at a mountpoint, and its background prefetch. A mount has one (a Shoal
//! image, a layer bootstrap file) or one per layer of an indexed image (layers.rs stacks them).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{MountOption, SessionACL};
use shoal_store::Store;

use crate::access_log::AccessLog;
use crate::config::FsConfig;
use crate::error::{FsError, Result};
use crate::fetch::{ChunkSource, OriginSource, PeerSource};
use crate::image::OpenedImage;
use crate::inode::ImageFs;
use crate::metrics::Metrics;
use crate::prefetch::{self, PrefetchPlan};
use crate::read::{Reader, ReaderParts};

/// What a session is made of beyond the config.
pub(crate) struct SessionParts<'a> {
    pub config: &'a FsConfig,
    pub image: OpenedImage,
    pub mountpoint: &'a Path,
    pub store: Store,
    pub rt: tokio::runtime::Handle,
    pub memory_cache_bytes: u64,
    pub read_threads: usize,
    pub access: Option<Arc<AccessLog>>,
    pub stop: Arc<AtomicBool>,
}

/// A FUSE filesystem being served.
pub(crate) struct Session {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: PathBuf,
    fuse_dev: Option<u64>,
    pub reader: Arc<Reader>,
    prefetch: Option<JoinHandle<()>>,
}

impl Session {
    /// Builds the read path over `parts.image` and mounts it at `parts.mountpoint`; returns
    /// once the kernel has answered the FUSE handshake.
    pub(crate) fn start(parts: SessionParts<'_>) -> Result<Session> {
        let SessionParts {
            config,
            image,
            mountpoint,
            store,
            rt,
            memory_cache_bytes,
            read_threads,
            access,
            stop,
        } = parts;
        let boot = image.boot;
        let metrics = Arc::new(Metrics::new(
            hex::encode(boot.root_hash()),
            boot.chunk_count() as usize,
            crate::metrics::stored_bytes(&boot),
        ));
        let peer: Option<Arc<dyn ChunkSource>> = config.peer_socket.as_ref().map(|s| {
            let bootstrap = image.bootstrap;
            Arc::new(PeerSource::new(s, image.origin_ref.clone(), bootstrap))
                as Arc<dyn ChunkSource>
        });
        let reader = Arc::new(Reader::new(ReaderParts {
            boot: Arc::clone(&boot),
            store,
            peer,
            origin: Arc::new(OriginSource::new(image.origin)),
            rt,
            timeout: config.fetch_timeout(),
            max_request: config.max_request_bytes,
            max_gap: config.max_gap_bytes,
            memory_cache_bytes,
            metrics,
        })?);
        // An image with a prefetch list being fetched has a better guess than the blob's next
        // files: neighbour fetches would only compete with it for the link.
        let listed = config.prefetch && boot.prefetch().len() > 0;
        let ahead = crate::ahead::AheadConfig {
            file_bytes: config.fetch_ahead_bytes,
            blob_bytes: if listed { 0 } else { config.blob_ahead_bytes },
        };
        let fs = ImageFs::new(Arc::clone(&reader), read_threads, ahead, access)
            .map_err(|e| FsError::io("starting read threads for", mountpoint, e))?;
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
        let session = fuser::Session::new(fs, mountpoint, &fuse)
            .and_then(fuser::Session::spawn)
            .map_err(|e| FsError::Mount {
                op: "mounting",
                path: mountpoint.to_path_buf(),
                source: e,
            })?;
        let fuse_dev = std::fs::metadata(mountpoint).ok().map(|m| m.dev());
        if let Some(dev) = fuse_dev {
            set_bdi_readahead(dev, crate::inode::MAX_READAHEAD);
        }
        let plan = PrefetchPlan {
            listed: config.prefetch,
            all: config.prefetch_all,
            bytes_per_sec: config.prefetch_bytes_per_sec,
        };
        let mut s = Session {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            fuse_dev,
            reader: Arc::clone(&reader),
            prefetch: None,
        };
        if plan.listed || plan.all {
            s.prefetch = Some(
                prefetch::spawn(reader, plan, stop)
                    .map_err(|e| FsError::io("starting prefetch for", mountpoint, e))?,
            );
        }
        Ok(s)
    }

    /// True once the FUSE session ended (someone unmounted it).
    pub(crate) fn finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Waits until the background prefetch has finished.
    pub(crate) fn wait_prefetch(&mut self) {
        if let Some(t) = self.prefetch.take() {
            let _ = t.join();
        }
    }

    /// Unmounts (lazily: a process with an open file must not block it), waits for the session
    /// to end (a connection still held after 5 s is aborted, so nothing hangs), then stops the
    /// background work. The mount's `stop` flag must be set first.
    pub(crate) fn stop(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(session) = self.session.take() {
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
        // Fetch-ahead work still running uses the runtime: let it end first.
        self.reader.close(Duration::from_secs(5));
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

/// `shoal:<source>` without characters that would break the mount table.
pub(crate) fn fs_name(source: &str) -> String {
    let clean: String = source
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ',' && *c != '\\')
        .take(200)
        .collect();
    format!("shoal:{clean}")
}
