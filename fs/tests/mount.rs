//! Real FUSE mounts of an image converted from this machine's own files: from an OCI layout and
//! from a real registry, compared with the source tree; programs run from the mount with chroot;
//! corrupted cache and origin bytes; the registry going away.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{build_image, compare, flip_byte, fuse_ready, mountpoint, Compared};
use shoal_format::bootstrap::Bootstrap;
use shoal_format::image::find_bootstrap;
use shoal_format::oci::{self, LayoutRef};
use shoal_fs::{mount, FsConfig};

fn config(source: String, mnt: &Path, cache: &Path) -> FsConfig {
    FsConfig {
        cache_dir: cache.to_path_buf(),
        fetch_timeout_secs: 3,
        ..FsConfig::new(source, mnt)
    }
}

fn layout_bootstrap(layout: &Path) -> Bootstrap {
    let r = LayoutRef {
        dir: layout.to_path_buf(),
        tag: None,
    };
    let (_, manifest) = oci::resolve(&r).unwrap();
    let bytes = oci::read_blob(
        layout,
        find_bootstrap("test image", &manifest).unwrap().unwrap(),
        1 << 30,
    )
    .unwrap();
    Bootstrap::load(bytes).unwrap()
}

/// Inode index of `/a/b` in a bootstrap.
fn ino_of(boot: &Bootstrap, path: &str) -> u32 {
    path.trim_start_matches('/')
        .split('/')
        .fold(0, |dir, name| {
            boot.lookup(dir, name.as_bytes()).unwrap().unwrap()
        })
}

#[test]
fn oci_layout_mount_matches_source_tree_and_runs_programs() {
    if !fuse_ready() {
        return;
    }
    let img = build_image(true);
    let work = tempfile::tempdir().unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let access = work.path().join("access.txt");
    let mut cfg = config(img.oci_ref(), &mnt, &work.path().join("cache"));
    cfg.record_access = Some(access.clone());
    let mut m = mount(cfg).expect("mount oci layout");

    // The prefetch list (/data/big.bin) arrives in the background, then reads hit the cache.
    m.wait_prefetch();
    let before = m.metrics().snapshot();
    assert!(
        before.fetched_origin > 0 && before.cache_misses > 0,
        "prefetch fetched nothing: {before:?}"
    );
    let big = fs::read(mnt.join("data/big.bin")).unwrap();
    assert_eq!(big, fs::read(img.tree.join("data/big.bin")).unwrap());
    let after = m.metrics().snapshot();
    assert_eq!(
        after.fetched_origin, before.fetched_origin,
        "prefetched file fetched again"
    );
    assert!(
        after.cache_hits >= 13,
        "reads after prefetch did not hit the cache: {after:?}"
    );

    let mut c = Compared::default();
    compare(&img.tree, &mnt, Path::new(""), &mut HashMap::new(), &mut c);
    eprintln!("compared {c:?}");
    assert!(
        c.files > 1000 && c.symlinks >= 3 && c.hardlinks >= 1 && c.xattrs >= 2,
        "{c:?}"
    );

    // Programs from the image run from the mount.
    let out = Command::new("chroot")
        .arg(&mnt)
        .args(["/bin/sh", "-c", "cat /etc/rel; echo $((6*7))"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from shoal\n42\n"
    );
    let script =
        "import json, zlib, os; print(json.dumps([zlib.crc32(b'shoal'), os.path.join('a', 'b')]))";
    let out = Command::new("chroot")
        .arg(&mnt)
        .args(["/usr/bin/python3", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3 in the mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("[{}, \"a/b\"]", crc32(b"shoal"))
    );

    // Read-only, statfs answers, the access log lists first reads.
    assert!(fs::write(mnt.join("etc/new"), b"x").is_err());
    let st = rustix_statfs(&mnt);
    assert!(st > 1000, "statfs files {st}");
    let snap = m.metrics().snapshot();
    // The hardlink's second name (17 bytes) is served from the page cache of the shared inode.
    assert!(
        snap.read_bytes + 17 >= c.bytes && snap.read_errors == 0 && snap.verify_failures == 0,
        "{snap:?}"
    );
    assert!(m
        .metrics()
        .encode()
        .contains("shoal_fs_fetched_bytes_total{source=\"origin\"}"));
    // `shoal fs umount` from outside ends the session; the mounting side then returns.
    shoal_fs::umount(&mnt).unwrap();
    let t = Instant::now();
    m.wait_for_signal().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "session did not end after umount"
    );
    let log = fs::read_to_string(&access).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.contains(&"/data/big.bin") && lines.contains(&"/etc/msg"),
        "{lines:?}"
    );
    let unique: std::collections::HashSet<_> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "a file recorded twice");
    assert!(
        lines.iter().all(|l| img.tree.join(&l[1..]).is_file()),
        "access log names a non-file"
    );
    assert!(!mnt.join("etc").exists(), "still mounted after unmount");
}

/// zlib's CRC-32, to check python's answer independently.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn rustix_statfs(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a zeroed statvfs is valid output space; c is a valid path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_files
}

#[test]
fn corrupted_cache_is_refetched_and_corrupted_origin_is_eio() {
    if !fuse_ready() {
        return;
    }
    let img = build_image(false);
    let work = tempfile::tempdir().unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let cache = work.path().join("cache");
    let want = fs::read(img.tree.join("data/other.bin")).unwrap();
    let mut cfg = config(img.oci_ref(), &mnt, &cache);
    cfg.prefetch = false;
    // Only other.bin's chunks in the cache (no neighbouring files fetched ahead).
    cfg.blob_ahead_bytes = 0;

    let m = mount(cfg.clone()).unwrap();
    assert_eq!(fs::read(mnt.join("data/other.bin")).unwrap(), want);
    m.unmount().unwrap();
    // Wait for the background cache writes, then flip a byte in every cached chunk.
    std::thread::sleep(Duration::from_millis(300));
    let mut flipped = 0;
    {
        let store = shoal_store::Store::open(shoal_store::StoreConfig::new(&cache, 1 << 30))
            .expect("the mount's cache, after unmount");
        for chunk in want.chunks(256 << 10) {
            let hash = shoal_store::Blake3Hash::of(chunk);
            let (pack, offset, _) = store.chunk_at(&hash).expect("chunk cached");
            flip_byte(&pack, offset + 100);
            flipped += 1;
        }
        assert_eq!(
            store.stats().chunks,
            3,
            "only other.bin's chunks are cached"
        );
    }
    assert_eq!(flipped, 3, "other.bin is 3 chunks of 256 KiB");

    let m = mount(cfg.clone()).unwrap();
    assert_eq!(
        fs::read(mnt.join("data/other.bin")).unwrap(),
        want,
        "wrong bytes after cache corruption"
    );
    let s = m.metrics().snapshot();
    assert_eq!(s.verify_failures, 3, "{s:?}");
    assert_eq!(s.read_errors, 0);
    m.unmount().unwrap();

    // Now the origin itself serves a flipped byte inside /etc/msg's chunk: EIO, never wrong bytes.
    let boot = layout_bootstrap(&img.layout);
    let c = boot
        .file_chunks(ino_of(&boot, "/etc/msg"))
        .unwrap()
        .get(0)
        .unwrap();
    let blob = boot.blob(c.blob).unwrap();
    flip_byte(
        &oci::blob_path(&img.layout, &blob.digest),
        c.offset + u64::from(c.stored_size) / 2,
    );
    let m = mount(cfg).unwrap();
    let err = fs::read(mnt.join("etc/msg")).expect_err("corrupted origin must not be readable");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Other files in the same blob still read.
    assert_eq!(
        fs::read(mnt.join("data/big.bin")).unwrap(),
        fs::read(img.tree.join("data/big.bin")).unwrap()
    );
    let s = m.metrics().snapshot();
    assert!(s.verify_failures >= 2 && s.read_errors >= 1, "{s:?}");
    m.unmount().unwrap();
}

#[test]
fn registry_mount_reads_lazily_and_fails_in_time_when_offline() {
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
    let r = LayoutRef {
        dir: img.layout.clone(),
        tag: None,
    };
    let (desc, manifest) = oci::resolve(&r).unwrap();
    for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let bytes = fs::read(oci::blob_path(
            &img.layout,
            &oci::parse_digest(d.digest()).unwrap(),
        ))
        .unwrap();
        rt.block_on(reg.push_blob("shoal/fs-test", &bytes)).unwrap();
    }
    let manifest_bytes = oci::read_blob(&img.layout, &desc, 1 << 20).unwrap();
    rt.block_on(reg.push_manifest(
        "shoal/fs-test",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &manifest_bytes,
    ))
    .unwrap();

    let work = tempfile::tempdir().unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let mut cfg = config(
        reg.reference("shoal/fs-test", "v1"),
        &mnt,
        &work.path().join("cache"),
    );
    cfg.prefetch = false;
    let m = mount(cfg).expect("mount from registry");
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
    // The data blob: the first layer (data blobs come before the bootstrap).
    let blob_size: u64 = manifest.layers()[0].size();
    assert!(
        s.fetched_origin > 3 << 20 && s.fetched_origin < blob_size,
        "lazy: fetched {} of {blob_size}",
        s.fetched_origin
    );
    let served = rt.block_on(reg.blob_bytes_served(manifest.layers()[0].digest().as_ref()));
    assert!(
        served < blob_size,
        "registry served {served} of {blob_size}: not lazy"
    );

    // Registry gone: cached files still read, uncached ones fail with EIO within the bound.
    drop(reg);
    assert_eq!(
        fs::read_to_string(mnt.join("etc/msg")).unwrap(),
        "hello from shoal\n"
    );
    let t = Instant::now();
    let err =
        fs::read(mnt.join("data/other.bin")).expect_err("uncached read with the registry down");
    let took = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        took < Duration::from_secs(10),
        "offline read took {took:?}, bound is 3 s"
    );
    eprintln!("registry mount: fetched {} of a {blob_size}-byte blob (registry served {served}); offline EIO after {took:?}", s.fetched_origin);
    let t = Instant::now();
    m.unmount().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "unmount took {:?}",
        t.elapsed()
    );
}

#[test]
fn whole_image_prefetch_completes_under_the_bandwidth_limit() {
    if !fuse_ready() {
        return;
    }
    let img = build_image(false);
    let work = tempfile::tempdir().unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let boot = layout_bootstrap(&img.layout);
    let stored: u64 = (0..boot.chunk_count())
        .map(|i| u64::from(boot.chunk(i).unwrap().stored_size))
        .sum();
    let limit = 2 << 20;
    let mut cfg = config(img.oci_ref(), &mnt, &work.path().join("cache"));
    cfg.prefetch_all = true;
    cfg.prefetch_bytes_per_sec = limit;
    let t = Instant::now();
    let mut m = mount(cfg).unwrap();
    m.wait_prefetch();
    let took = t.elapsed().as_secs_f64();
    let s = m.metrics().snapshot();
    assert!((s.image_fetched_ratio - 1.0).abs() < 1e-9, "{s:?}");
    let floor = (stored - stored.min(16 * (256 << 10))) as f64 / limit as f64;
    assert!(
        took >= floor * 0.9,
        "{stored} bytes at {limit} B/s took only {took:.2} s"
    );
    // Everything is local now: a full read fetches nothing more.
    let fetched = s.fetched_origin;
    let mut c = Compared::default();
    compare(&img.tree, &mnt, Path::new(""), &mut HashMap::new(), &mut c);
    assert_eq!(m.metrics().snapshot().fetched_origin, fetched);
    m.unmount().unwrap();
}

#[test]
fn sequential_reads_fetch_ahead_and_random_reads_do_not() {
    use std::os::unix::fs::FileExt;
    if !fuse_ready() {
        return;
    }
    let img = build_image(false);
    // 3 MiB of noise: thirteen 256 KiB chunks stored raw.
    let want = fs::read(img.tree.join("data/big.bin")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    // Chunks fetched after one 4 KiB read at `offset`, each time with a fresh cache.
    let fetched_after = |fetch_ahead: u64, offset: u64, cache: &str| {
        let mut cfg = config(img.oci_ref(), &mnt, &work.path().join(cache));
        cfg.prefetch = false;
        cfg.blob_ahead_bytes = 0;
        cfg.fetch_ahead_bytes = fetch_ahead;
        let m = mount(cfg).unwrap();
        let f = fs::File::open(mnt.join("data/big.bin")).unwrap();
        let mut buf = [0u8; 4096];
        f.read_exact_at(&mut buf, offset).unwrap();
        let at = offset as usize;
        assert!(buf[..] == want[at..at + 4096], "wrong bytes at {offset}");
        // Fetch-ahead runs in the background: wait until the count stays put for a while.
        let t = Instant::now();
        let mut misses = m.metrics().snapshot().cache_misses;
        let mut still_since = Instant::now();
        while still_since.elapsed() < Duration::from_millis(700)
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
            let now = m.metrics().snapshot().cache_misses;
            if now != misses {
                misses = now;
                still_since = Instant::now();
            }
        }
        drop(f);
        m.unmount().unwrap();
        misses
    };
    let without = fetched_after(0, 0, "c0");
    let sequential = fetched_after(1 << 20, 0, "c1");
    let random = fetched_after(1 << 20, 1_500_000, "c2");
    assert!(without >= 1, "the read itself fetched nothing");
    // From the start of the file: the next 1 MiB (four chunks) arrives too.
    assert!(
        sequential >= without + 4,
        "with fetch-ahead {sequential} chunks, without {without}"
    );
    // A read in the middle that continues nothing: no fetch-ahead.
    assert!(
        random <= without,
        "a random read fetched {random} chunks, a read without fetch-ahead {without}"
    );
}

#[test]
fn random_reads_check_only_their_groups_and_catch_flipped_bytes_in_chunk_and_group_hashes() {
    use std::os::unix::fs::FileExt;
    if !fuse_ready() {
        return;
    }
    let img = build_image(false);
    // 3 MiB of noise in 256 KiB chunks (stored raw): 16 groups of 16 KiB per chunk.
    let want = fs::read(img.tree.join("data/big.bin")).unwrap();
    let (chunk, group) = (256u64 << 10, 16u64 << 10);
    let work = tempfile::tempdir().unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let cache = work.path().join("cache");
    let mut cfg = config(img.oci_ref(), &mnt, &cache);
    cfg.prefetch = false;
    let m = mount(cfg.clone()).unwrap();
    assert_eq!(fs::read(mnt.join("data/big.bin")).unwrap(), want);
    m.unmount().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Chunk 2: a byte flipped in its group 3. Chunk 5: a byte flipped in its group hashes.
    let hash_of =
        |k: u64| shoal_store::Blake3Hash::of(&want[(k * chunk) as usize..][..chunk as usize]);
    {
        let store = shoal_store::Store::open(shoal_store::StoreConfig::new(&cache, 1 << 30))
            .expect("the mount's cache, after unmount");
        let (pack, offset, len) = store.chunk_at(&hash_of(2)).expect("chunk 2 cached");
        assert_eq!(len, chunk);
        flip_byte(&pack, offset + 3 * group + 5);
        let (pack, offset, len) = store.chunk_at(&hash_of(5)).expect("chunk 5 cached");
        flip_byte(&pack, offset + len + 4 * 32 + 1);
    }
    let m = mount(cfg).unwrap();
    let f = fs::File::open(mnt.join("data/big.bin")).unwrap();
    let read4k = |at: u64| {
        let mut buf = [0u8; 4096];
        f.read_exact_at(&mut buf, at).unwrap();
        assert!(
            buf[..] == want[at as usize..at as usize + 4096],
            "wrong bytes at {at}"
        );
    };
    // (Reads far apart: fetch-ahead takes reads within two chunks of the last for sequential
    // ones and loads the next chunks whole, which checks their bytes but not group hashes.)
    // Chunk 5's group hashes do not reproduce its name: caught, dropped, refetched, and the
    // reader gets the right bytes.
    read4k(5 * chunk + 10 * group + 8192);
    let s = m.metrics().snapshot();
    assert_eq!((s.verify_failures, s.cache_misses), (1, 1), "{s:?}");
    // A group of chunk 2 that the flip is not in: read and checked alone, nothing fails.
    read4k(2 * chunk + 8 * group + 4096);
    let s = m.metrics().snapshot();
    assert_eq!((s.verify_failures, s.cache_misses), (1, 1), "{s:?}");
    // The group with the flip: caught and refetched the same way.
    read4k(2 * chunk + 3 * group);
    let s = m.metrics().snapshot();
    assert_eq!(s.verify_failures, 2, "{s:?}");
    assert_eq!(s.read_errors, 0, "{s:?}");
    assert!(s.cache_misses >= 2, "both chunks refetched: {s:?}");
    // Refetched and stored again: the whole file reads right.
    drop(f);
    m.unmount().unwrap();
    let m = mount(config(img.oci_ref(), &mnt, &cache)).unwrap();
    assert_eq!(fs::read(mnt.join("data/big.bin")).unwrap(), want);
    assert_eq!(m.metrics().snapshot().verify_failures, 0);
    m.unmount().unwrap();
}
