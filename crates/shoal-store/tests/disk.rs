//! On-disk behaviour of the store: corruption on disk, torn journals, stray files, locking, ENOSPC.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

mod common;
use common::{test_blob, test_bytes};
use shoal_store::{Blake3Hash, Error, Store, StoreConfig};

/// Opens the store at `root`. Another test of this binary that starts a child process (the
/// ENOSPC test mounts a tmpfs) can hold a copy of a just-closed store's lock file descriptor
/// between its fork and exec, so a reopen retries `Locked` for a moment.
fn open(root: &Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match Store::open(StoreConfig::new(root, 256 << 20)) {
            Err(Error::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r.expect("open store"),
        }
    }
}

fn blob_file(root: &Path, hex: &str, ext: &str) -> std::path::PathBuf {
    root.join("blobs")
        .join(&hex[..2])
        .join(format!("{hex}.{ext}"))
}

#[test]
fn corrupt_piece_on_disk_is_reported_dropped_and_refetchable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (data, d, layout) = test_blob(1, 4 * 8192, 8192);
    {
        let s = open(dir.path());
        s.ensure_blob(&d, &layout).expect("ensure");
        for i in 0..4 {
            let off = layout.piece_offset(i) as usize;
            s.put_piece(&d, i, &data[off..off + 8192]).expect("put");
        }
        s.complete_blob(&d).expect("complete");
        // Flip one byte of piece 2 behind the store's back.
        let f = OpenOptions::new()
            .write(true)
            .open(blob_file(dir.path(), &d.hex(), "data"))
            .expect("open data file");
        f.write_all_at(&[data[2 * 8192 + 77] ^ 0x40], 2 * 8192 + 77)
            .expect("flip");
        let err = s
            .read_range(&d, 2 * 8192, 100)
            .expect_err("corrupt piece must not be served");
        assert!(err.is_corrupt(), "{err}");
        let status = s.blob_status(&d).expect("status");
        assert!(
            !status.held.contains(2) && !status.complete,
            "corrupt piece must be dropped"
        );
        assert_eq!(s.stats().corruptions, 1);
        assert!(s.read_piece(&d, 2).expect_err("gone").is_not_present());
        // Other pieces are still served.
        assert_eq!(
            &s.read_piece(&d, 3).expect("piece 3")[..],
            &data[3 * 8192..]
        );
    }
    // The drop was journaled: after a restart the piece is still missing, and can be refetched.
    let s = open(dir.path());
    assert!(!s.blob_status(&d).expect("status").held.contains(2));
    s.put_piece(&d, 2, &data[2 * 8192..3 * 8192])
        .expect("refetch");
    s.complete_blob(&d).expect("complete again");
    assert_eq!(
        &s.read_range(&d, 0, data.len() as u64).expect("all")[..],
        &data[..]
    );
}

#[test]
fn corrupt_or_truncated_chunk_is_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = open(dir.path());
    let (a, b) = (test_bytes(2, 10_000), test_bytes(3, 10_000));
    let (ha, hb) = (Blake3Hash::of(&a), Blake3Hash::of(&b));
    s.put_chunk(&ha, &a).expect("put");
    s.put_chunk(&hb, &b).expect("put");
    let (pack, at_a, _) = s.chunk_at(&ha).expect("a is stored");
    let (pack_b, at_b, len_b) = s.chunk_at(&hb).expect("b is stored");
    assert_eq!(pack, pack_b, "one pack");
    assert_eq!(at_b, 12288, "b follows a at the next 4 KiB boundary");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .expect("pack");
    f.write_all_at(&[a[5000] ^ 1], at_a + 5000)
        .expect("corrupt");
    f.set_len(at_b + len_b - 1000).expect("truncate");
    assert!(s.get_chunk(&ha).expect_err("corrupt").is_corrupt());
    assert!(s.get_chunk(&hb).expect_err("truncated").is_corrupt());
    assert!(!s.has_chunk(&ha) && !s.has_chunk(&hb));
    assert_eq!(s.stats().corruptions, 2);
    assert_eq!(s.stats().used_bytes, 0);
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.stats().chunks, 0, "the drops were journaled");
    assert!(
        !pack.exists(),
        "a pack with nothing live is deleted on open"
    );
}

#[test]
fn chunks_survive_a_restart_and_the_old_layout_is_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = open(dir.path());
    let chunks: Vec<Vec<u8>> = (0..5)
        .map(|i| test_bytes(40 + i, 3000 + i as usize))
        .collect();
    for c in &chunks {
        s.put_chunk(&Blake3Hash::of(c), c).expect("put");
    }
    s.remove_chunk(&Blake3Hash::of(&chunks[1])).expect("remove");
    drop(s);
    // A chunk file of the one-file-per-chunk layout, and a torn journal record.
    let old = dir.path().join("chunks").join("ab");
    fs::create_dir_all(&old).expect("old fan-out dir");
    fs::write(old.join("ab".repeat(32)), b"old").expect("old chunk file");
    let idx = fs::read_dir(dir.path().join("chunks"))
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "idx"))
        .expect("journal");
    fs::OpenOptions::new()
        .append(true)
        .open(&idx)
        .and_then(|mut f| f.write_all(&[1, 0, 0]))
        .expect("torn record");
    let s = open(dir.path());
    assert!(!old.exists(), "old-layout chunk files are dropped");
    for (i, c) in chunks.iter().enumerate() {
        let h = Blake3Hash::of(c);
        match i {
            1 => assert!(!s.has_chunk(&h), "a removed chunk stays removed"),
            _ => assert_eq!(&s.get_chunk(&h).expect("kept")[..], &c[..]),
        }
    }
    let c = test_bytes(99, 5000);
    s.put_chunk(&Blake3Hash::of(&c), &c)
        .expect("put after reopen");
    assert_eq!(&s.get_chunk(&Blake3Hash::of(&c)).expect("get")[..], &c[..]);
}

#[test]
fn torn_journal_tail_is_cut_and_stray_files_are_removed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (data, d, layout) = test_blob(4, 4 * 4096, 4096);
    let meta = blob_file(dir.path(), &d.hex(), "meta");
    let good_len;
    {
        let s = open(dir.path());
        s.ensure_blob(&d, &layout).expect("ensure");
        s.put_piece(&d, 0, &data[..4096]).expect("put");
        s.put_piece(&d, 1, &data[4096..8192]).expect("put");
        good_len = fs::metadata(&meta).expect("meta").len();
    }
    // A torn append (half a record) plus garbage, a stray temp file, an orphan data file, a bad name.
    let mut f = OpenOptions::new().append(true).open(&meta).expect("meta");
    f.write_all(&[1, 0, 0, 0, 2, 0, 0]).expect("torn");
    drop(f);
    let (_, orphan, _) = test_blob(5, 100, 4096);
    let orphan_data = blob_file(dir.path(), &orphan.hex(), "data");
    fs::create_dir_all(orphan_data.parent().expect("parent")).expect("dir");
    fs::write(&orphan_data, b"orphan").expect("orphan");
    fs::write(dir.path().join("tmp").join("1-1.tmp"), b"half written").expect("tmp");
    let junk = blob_file(dir.path(), &d.hex(), "junk");
    fs::write(&junk, b"?").expect("junk");
    let s = open(dir.path());
    let status = s.blob_status(&d).expect("status");
    assert_eq!(status.held.iter().collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(
        fs::metadata(&meta).expect("meta").len(),
        good_len,
        "torn tail must be cut"
    );
    assert!(!orphan_data.exists() && !junk.exists());
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
        0
    );
    assert_eq!(&s.read_piece(&d, 1).expect("piece")[..], &data[4096..8192]);
    // A damaged header drops the blob rather than trusting its table.
    drop(s);
    let mut bytes = fs::read(&meta).expect("meta");
    bytes[80] ^= 0xff;
    fs::write(&meta, &bytes).expect("damage");
    let s = open(dir.path());
    assert!(s.blob_status(&d).is_none());
    assert!(!blob_file(dir.path(), &d.hex(), "data").exists());
}

#[test]
fn held_piece_past_end_of_data_file_is_forgotten() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (data, d, layout) = test_blob(6, 3 * 4096, 4096);
    {
        let s = open(dir.path());
        s.ensure_blob(&d, &layout).expect("ensure");
        for i in 0..3 {
            s.put_piece(&d, i, &data[i as usize * 4096..(i as usize + 1) * 4096])
                .expect("put");
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .open(blob_file(dir.path(), &d.hex(), "data"))
        .expect("data");
    f.set_len(2 * 4096 + 10).expect("truncate");
    let s = open(dir.path());
    assert_eq!(
        s.blob_status(&d)
            .expect("status")
            .held
            .iter()
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
}

#[test]
fn second_process_on_the_same_root_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _s = open(dir.path());
    let err = Store::open(StoreConfig::new(dir.path(), 1 << 20)).expect_err("locked");
    assert!(matches!(err, Error::Locked { .. }), "{err}");
}

#[test]
fn bad_config_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = StoreConfig::new(dir.path(), 1 << 20);
    cfg.low_watermark = 2 << 20;
    assert!(matches!(Store::open(cfg), Err(Error::Config(_))));
}

/// A real full disk: a 4 MiB tmpfs with a store whose quota is far larger. Needs root (mount).
#[test]
fn disk_full_evicts_and_retries_then_reports_cleanly() {
    // A small tmpfs to fill: mounting it needs root.
    if shoal_testkit::require(shoal_testkit::Needs::root(&["mount", "umount"])).is_err() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mnt");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "shoal-store-test"])
        .arg(&mnt)
        .status();
    assert!(
        mounted.as_ref().is_ok_and(|s| s.success()),
        "mounting a tmpfs as root failed: {mounted:?}"
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let root = mnt.join("store");
    let s = Store::open(StoreConfig::new(&root, 1 << 30)).expect("open");
    // Unpinned chunks: the disk fills, the store evicts old ones and keeps going.
    for i in 0..40u64 {
        let bytes = test_bytes(1000 + i, 256 << 10);
        let h = Blake3Hash::of(&bytes);
        s.put_chunk(&h, &bytes)
            .expect("evicts and retries on ENOSPC");
        assert_eq!(&s.get_chunk(&h).expect("just written")[..], &bytes[..]);
    }
    assert!(s.stats().evictions > 0, "ENOSPC must have evicted");
    // Everything pinned: a clear error the caller can stream through on, and no crash.
    let pins: Vec<_> = (0..40u64)
        .filter_map(|i| {
            s.pin_chunk(&Blake3Hash::of(&test_bytes(1000 + i, 256 << 10)))
                .ok()
        })
        .collect();
    let mut saw_full = false;
    let mut pins = pins;
    for i in 0..40u64 {
        let bytes = test_bytes(2000 + i, 256 << 10);
        let h = Blake3Hash::of(&bytes);
        match s.put_chunk(&h, &bytes) {
            Ok(_) => pins.push(s.pin_chunk(&h).expect("pin new")),
            Err(e) => {
                assert!(e.is_out_of_space(), "{e}");
                saw_full = true;
                break;
            }
        }
    }
    assert!(saw_full, "a 4 MiB disk with everything pinned must fill up");
    assert_eq!(
        fs::read_dir(root.join("tmp")).expect("tmp").count(),
        0,
        "no temp files left"
    );
    drop(pins);
    drop(s);
}

#[test]
fn the_sha256_hashed_ahead_is_the_blobs_and_still_catches_a_wrong_digest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = open(dir.path());
    let (data, d, layout) = test_blob(7, 6 * 4096 + 10, 4096);
    // A table whose pieces match the bytes but whose digest is another blob's.
    let wrong = shoal_types::Digest::of(b"another blob");
    let lying = shoal_store::PieceLayout::new(
        &wrong,
        layout.size(),
        layout.piece_size(),
        layout.pieces().to_vec(),
    )
    .expect("layout");
    for (digest, table) in [(d, &layout), (wrong, &lying)] {
        s.ensure_blob(&digest, table).expect("ensure");
        // Out of order, hashing ahead after each: the prefix advances over gaps once filled.
        for i in [1, 0, 3, 2, 6, 5] {
            let off = layout.piece_offset(i) as usize;
            let len = layout.piece_len(i).expect("len") as usize;
            s.put_piece(&digest, i, &data[off..off + len]).expect("put");
            s.digest_ahead(&digest).expect("hash ahead");
        }
        assert!(matches!(
            s.complete_blob(&digest),
            Err(Error::Incomplete { missing: 1, .. })
        ));
        s.put_piece(&digest, 4, &data[4 * 4096..5 * 4096])
            .expect("put");
    }
    s.complete_blob(&d).expect("the right digest completes");
    assert!(s.blob_status(&d).expect("status").complete);
    assert!(matches!(
        s.complete_blob(&wrong),
        Err(Error::BlobDigestMismatch { .. })
    ));
    assert!(
        s.blob_status(&wrong).is_none(),
        "a blob failing its sha256 is dropped"
    );
}

#[test]
fn dropping_a_chunk_leaves_its_neighbours_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = open(dir.path());
    let (empty, a, b) = (Vec::new(), test_bytes(61, 4096), test_bytes(62, 5000));
    for c in [&empty, &a, &b] {
        s.put_chunk(&Blake3Hash::of(c), c).expect("put");
    }
    s.remove_chunk(&Blake3Hash::of(&empty))
        .expect("remove empty");
    assert_eq!(&s.get_chunk(&Blake3Hash::of(&a)).expect("a")[..], &a[..]);
    s.remove_chunk(&Blake3Hash::of(&a)).expect("remove a");
    assert_eq!(&s.get_chunk(&Blake3Hash::of(&b)).expect("b")[..], &b[..]);
    assert_eq!(s.stats().corruptions, 0);
}
