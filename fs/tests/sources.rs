//! The sources behind the read path: reads through a real local peer (the swarm's local API),
//! the origin taking over when the peer dies, and bad bytes from the first source replaced by
//! the origin's.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{
    build_image, compare, flip_byte, fuse_ready, mountpoint, start_peer, Compared, Image,
};
use shoal_format::bootstrap::Bootstrap;
use shoal_format::image::find_bootstrap;
use shoal_format::oci::{self, LayoutRef};
use shoal_fs::fetch::{ChunkSource, OriginSource};
use shoal_fs::read::{Reader, ReaderParts};
use shoal_fs::{mount, FsConfig, Metrics};
use shoal_origin::LocalDirOrigin;
use shoal_store::{Store, StoreConfig};

fn bootstrap(layout: &Path) -> Bootstrap {
    let r = LayoutRef {
        dir: layout.to_path_buf(),
        tag: None,
    };
    let (_, manifest) = oci::resolve(&r).unwrap();
    Bootstrap::load(
        oci::read_blob(
            layout,
            find_bootstrap("test image", &manifest).unwrap().unwrap(),
            1 << 30,
        )
        .unwrap(),
    )
    .unwrap()
}

fn ino_of(boot: &Bootstrap, path: &str) -> u32 {
    path.trim_start_matches('/')
        .split('/')
        .fold(0, |dir, name| {
            boot.lookup(dir, name.as_bytes()).unwrap().unwrap()
        })
}

#[test]
fn bad_bytes_from_the_first_source_are_refetched_from_the_origin() {
    let img = build_image(false);
    let work = tempfile::tempdir().unwrap();
    // A second copy of the blobs with one byte flipped in every chunk of /data/other.bin serves
    // as the first source; the layout itself is the origin.
    let bad = work.path().join("bad");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(img.layout.join("blobs"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(out.status.success());
    let boot = Arc::new(bootstrap(&img.layout));
    let ino = ino_of(&boot, "/data/other.bin");
    let chunks: Vec<_> = boot.file_chunks(ino).unwrap().iter().collect();
    for c in &chunks {
        let digest = boot.blob(c.blob).unwrap().digest;
        flip_byte(&bad.join("sha256").join(hex::encode(digest)), c.offset + 7);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = Arc::new(Metrics::new("test".into(), boot.chunk_count() as usize, 1));
    let reader = Reader::new(ReaderParts {
        boot: Arc::clone(&boot),
        store: Store::open(StoreConfig::new(work.path().join("cache"), 1 << 30)).unwrap(),
        peer: Some(
            Arc::new(OriginSource::new(Arc::new(LocalDirOrigin::new(&bad))))
                as Arc<dyn ChunkSource>,
        ),
        origin: Arc::new(OriginSource::new(Arc::new(LocalDirOrigin::new(
            img.layout.join("blobs"),
        )))),
        rt: rt.handle().clone(),
        timeout: Duration::from_secs(5),
        max_request: 8 << 20,
        max_gap: 64 << 10,
        memory_cache_bytes: 16 << 20,
        metrics: Arc::clone(&metrics),
    })
    .unwrap();
    let want = fs::read(img.tree.join("data/other.bin")).unwrap();
    // Offsets that cross chunk boundaries, and the whole file.
    assert_eq!(reader.read(ino, 0, want.len() as u32 + 10).unwrap(), want);
    let s = metrics.snapshot();
    assert_eq!(s.verify_failures, chunks.len() as u64, "{s:?}");
    let got = reader.read(ino, 250_000, 100_000).unwrap();
    assert_eq!(got, want[250_000..350_000]);
    assert!(reader.read(ino, want.len() as u64, 10).unwrap().is_empty());
    // A file the bad copy serves correctly is read from it, and no refetch happens.
    let big = ino_of(&boot, "/data/big.bin");
    let before = metrics.snapshot().verify_failures;
    assert_eq!(
        reader.read(big, 1 << 20, 4096).unwrap(),
        fs::read(img.tree.join("data/big.bin")).unwrap()[1 << 20..(1 << 20) + 4096]
    );
    assert_eq!(metrics.snapshot().verify_failures, before);
}

/// Pushes the converted test image to `reg` as `repo:v1`.
fn push_image(
    rt: &tokio::runtime::Runtime,
    reg: &shoal_testkit::Registry,
    img: &Image,
    repo: &str,
) {
    let (desc, manifest) = oci::resolve(&LayoutRef {
        dir: img.layout.clone(),
        tag: None,
    })
    .unwrap();
    for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let bytes = fs::read(oci::blob_path(
            &img.layout,
            &oci::parse_digest(d.digest()).unwrap(),
        ))
        .unwrap();
        rt.block_on(reg.push_blob(repo, &bytes)).unwrap();
    }
    let mbytes = oci::read_blob(&img.layout, &desc, 1 << 20).unwrap();
    rt.block_on(reg.push_manifest(
        repo,
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &mbytes,
    ))
    .unwrap();
}

/// A mount of `repo:v1` through the peer at `work/peer.sock`, fetching only what is read.
fn peer_mount_config(reg: &shoal_testkit::Registry, work: &Path, repo: &str) -> FsConfig {
    let mnt = mountpoint(work, "mnt");
    FsConfig {
        cache_dir: work.join("cache"),
        fetch_timeout_secs: 10,
        prefetch: false,
        // Only the reads below fetch: background fetch-ahead could still be taking chunks
        // through the peer when the counters are compared.
        fetch_ahead_bytes: 0,
        blob_ahead_bytes: 0,
        peer_socket: Some(work.join("peer.sock")),
        ..FsConfig::new(reg.reference(repo, "v1"), &mnt)
    }
}

#[test]
fn reads_go_through_the_local_peer_and_fall_back_to_the_origin() {
    if !fuse_ready() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(reg) =
        shoal_testkit::or_skip(rt.block_on(shoal_testkit::Registry::start(Default::default())))
    else {
        return;
    };
    let img = build_image(false);
    push_image(&rt, &reg, &img, "shoal/peer-test");
    let work = tempfile::tempdir().unwrap();
    let peer = start_peer(&rt, work.path(), vec![reg.host()]);
    let mnt = mountpoint(work.path(), "mnt");
    let m = mount(peer_mount_config(&reg, work.path(), "shoal/peer-test"))
        .expect("mount through the peer");
    let mut c = Compared::default();
    compare(
        &img.tree,
        &mnt,
        Path::new("etc"),
        &mut HashMap::new(),
        &mut c,
    );
    assert_eq!(
        fs::read(mnt.join("data/big.bin")).unwrap(),
        fs::read(img.tree.join("data/big.bin")).unwrap()
    );
    let s = m.metrics().snapshot();
    assert!(
        s.fetched_peer > 3 << 20 && s.fetched_origin == 0,
        "through the peer: {s:?}"
    );

    // The peer dies: uncached reads go straight to the origin.
    peer.kill();
    assert_eq!(
        fs::read(mnt.join("data/other.bin")).unwrap(),
        fs::read(img.tree.join("data/other.bin")).unwrap()
    );
    let s2 = m.metrics().snapshot();
    assert!(
        s2.fetched_origin > 600_000 && s2.fetched_peer == s.fetched_peer,
        "after the peer died: {s2:?}"
    );
    m.unmount().unwrap();
}

#[test]
fn an_origin_the_peer_refuses_is_not_read_around_it() {
    if !fuse_ready() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(reg) =
        shoal_testkit::or_skip(rt.block_on(shoal_testkit::Registry::start(Default::default())))
    else {
        return;
    };
    let img = build_image(false);
    push_image(&rt, &reg, &img, "shoal/refused");
    let work = tempfile::tempdir().unwrap();
    // The peer allows another registry only: its answer for this one is 403.
    let _peer = start_peer(&rt, work.path(), vec!["registry.example:5000".into()]);
    let mnt = mountpoint(work.path(), "mnt");
    let m = mount(peer_mount_config(&reg, work.path(), "shoal/refused")).expect("mount");
    let before = rt.block_on(reg.access_log()).len();
    let err = fs::read(mnt.join("data/big.bin")).expect_err("a refused origin reads nothing");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let s = m.metrics().snapshot();
    assert_eq!((s.fetched_peer, s.fetched_origin), (0, 0), "{s:?}");
    let blob_gets: Vec<_> = rt
        .block_on(reg.access_log())
        .into_iter()
        .skip(before)
        .filter(|e| e.path.contains("/blobs/"))
        .collect();
    assert!(
        blob_gets.is_empty(),
        "the mount went around the peer: {blob_gets:?}"
    );
    m.unmount().unwrap();
}

/// The real local-dir origin, hung (never answering) while `hung` is set.
struct Hangable {
    inner: OriginSource,
    hung: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl ChunkSource for Hangable {
    fn kind(&self) -> shoal_fs::fetch::SourceKind {
        self.inner.kind()
    }
    fn describe(&self) -> String {
        format!("hangable {}", self.inner.describe())
    }
    async fn read_range(
        &self,
        blob: &shoal_types::Digest,
        start: u64,
        end: u64,
    ) -> Result<bytes::Bytes, shoal_fs::fetch::FetchError> {
        use std::sync::atomic::Ordering;
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.read_range(blob, start, end).await
    }
}

#[test]
fn a_retry_right_after_a_timed_out_read_fails_at_once_not_after_another_timeout() {
    use std::sync::atomic::Ordering;
    use std::time::Instant;
    let img = build_image(false);
    let work = tempfile::tempdir().unwrap();
    let boot = Arc::new(bootstrap(&img.layout));
    let ino = ino_of(&boot, "/data/other.bin");
    let origin = Arc::new(Hangable {
        inner: OriginSource::new(Arc::new(LocalDirOrigin::new(img.layout.join("blobs")))),
        hung: true.into(),
        calls: 0.into(),
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = Arc::new(Metrics::new("test".into(), boot.chunk_count() as usize, 1));
    let timeout = Duration::from_secs(1);
    let reader = Reader::new(ReaderParts {
        boot: Arc::clone(&boot),
        store: Store::open(StoreConfig::new(work.path().join("cache"), 1 << 30)).unwrap(),
        peer: None,
        origin: Arc::clone(&origin) as Arc<dyn ChunkSource>,
        rt: rt.handle().clone(),
        timeout,
        max_request: 8 << 20,
        max_gap: 64 << 10,
        memory_cache_bytes: 16 << 20,
        metrics,
    })
    .unwrap();
    // The kernel's pattern: a large readahead read times out, then a 4 KiB read of its first page.
    let t = Instant::now();
    let e = reader.read(ino, 0, 1 << 20).unwrap_err();
    let first = t.elapsed();
    assert!(e.to_string().contains("did not arrive within 1 s"), "{e}");
    assert!(first >= timeout && first < timeout * 3, "{first:?}");
    let calls = origin.calls.load(Ordering::SeqCst);
    let t = Instant::now();
    let e = reader.read(ino, 0, 4096).unwrap_err();
    let retry = t.elapsed();
    assert!(e.to_string().contains("did not arrive"), "{e}");
    assert!(retry < Duration::from_millis(300), "retry waited {retry:?}");
    assert_eq!(origin.calls.load(Ordering::SeqCst), calls, "no new request");
    // The memory is short: once it has passed, a read asks the origin again, and with the
    // origin back it returns the right bytes.
    origin.hung.store(false, Ordering::SeqCst);
    std::thread::sleep(timeout + Duration::from_millis(200));
    let want = fs::read(img.tree.join("data/other.bin")).unwrap();
    assert_eq!(reader.read(ino, 0, 4096).unwrap(), want[..4096]);
    assert!(origin.calls.load(Ordering::SeqCst) > calls);
}

/// The snapshotter's bootstrap fetch goes through the local peer's API: delivered and
/// sha256-checked when the peer allows the registry; when the peer refuses the registry (403),
/// the fetch fails and the registry is not asked around the peer.
#[test]
fn the_snapshotters_bootstrap_comes_through_the_peer_and_a_refusal_is_final() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(reg) =
        shoal_testkit::or_skip(rt.block_on(shoal_testkit::Registry::start(Default::default())))
    else {
        return;
    };
    let img = build_image(false);
    push_image(&rt, &reg, &img, "shoal/boot");
    let (_, manifest) = oci::resolve(&LayoutRef {
        dir: img.layout.clone(),
        tag: None,
    })
    .unwrap();
    let digest = find_bootstrap("test image", &manifest)
        .unwrap()
        .unwrap()
        .digest()
        .to_string();
    let reference = shoal_origin::Reference::parse(&reg.reference("shoal/boot", "v1")).unwrap();
    let fetch = |work: &Path, dest: &Path| {
        let src = shoal_fs::snapshotter::bootstrap::BootstrapSource {
            peer: Some(shoal_api::Client::new(work.join("peer.sock"))),
            plain_http: vec![reg.host()],
            docker_config: None,
        };
        rt.block_on(shoal_fs::snapshotter::bootstrap::fetch(
            &src, &reference, &digest, dest,
        ))
    };

    let refused = tempfile::tempdir().unwrap();
    let peer = start_peer(&rt, refused.path(), vec!["registry.example:5000".into()]);
    let before = rt.block_on(reg.access_log()).len();
    let dest = refused.path().join("bootstrap");
    let err = fetch(refused.path(), &dest).expect_err("a refused origin is not fetched");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(!dest.exists());
    let blob_gets: Vec<_> = rt
        .block_on(reg.access_log())
        .into_iter()
        .skip(before)
        .filter(|e| e.path.contains("/blobs/"))
        .collect();
    assert!(
        blob_gets.is_empty(),
        "the bootstrap was fetched around the peer: {blob_gets:?}"
    );
    drop(peer);

    let allowed = tempfile::tempdir().unwrap();
    let _peer = start_peer(&rt, allowed.path(), vec![reg.host()]);
    let dest = allowed.path().join("bootstrap");
    fetch(allowed.path(), &dest).expect("the peer delivers the bootstrap");
    let bytes = fs::read(&dest).unwrap();
    assert_eq!(shoal_types::Digest::of(&bytes).to_string(), digest);
}
