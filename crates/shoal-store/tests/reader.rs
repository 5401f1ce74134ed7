//! `BlobReader`: verified piece reads into reused buffers, from several threads, and corruption
//! caught on the way (dropped, never handed back).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

mod common;
use common::test_blob;
use shoal_store::{Error, Store, StoreConfig};

const PIECE: u32 = 64 << 10;

fn data_file(root: &std::path::Path, hex: &str) -> std::path::PathBuf {
    root.join("blobs")
        .join(&hex[..2])
        .join(format!("{hex}.data"))
}

#[test]
fn reads_every_piece_verified_into_one_buffer_from_several_threads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Store::open(StoreConfig::new(dir.path(), 64 << 20)).expect("open store");
    // 8.5 pieces: the last one is short.
    let (data, d, layout) = test_blob(7, 8 * PIECE as usize + 1000, PIECE);
    s.ensure_blob(&d, &layout).expect("ensure");
    for i in 0..layout.piece_count() {
        if i != 5 {
            let off = layout.piece_offset(i) as usize;
            let len = layout.piece_len(i).expect("len") as usize;
            s.put_piece(&d, i, &data[off..off + len]).expect("put");
        }
    }
    let reader = Arc::new(s.blob_reader(&d).expect("reader"));
    assert_eq!(reader.layout().piece_count(), 9);
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (reader, data) = (Arc::clone(&reader), data.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; PIECE as usize];
                for i in (t..9).step_by(3) {
                    let len = reader.layout().piece_len(i).expect("len") as usize;
                    let r = reader.read_piece_into(i, &mut buf[..len]);
                    if i == 5 {
                        assert!(matches!(r, Err(Error::NotPresent { .. })), "{r:?}");
                        continue;
                    }
                    r.expect("read");
                    let off = (i * PIECE) as usize;
                    assert_eq!(&buf[..len], &data[off..off + len], "piece {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }
    // A buffer of the wrong length is refused, not partly filled.
    let mut small = vec![0u8; 100];
    let err = reader
        .read_piece_into(0, &mut small)
        .expect_err("short buffer");
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    assert!(reader.read_piece_into(9, &mut small).is_err());
    // The reader pins the blob: it cannot be removed while a stream reads it.
    assert!(matches!(s.remove_blob(&d), Err(Error::Pinned { .. })));
    drop(reader);
    s.remove_blob(&d)
        .expect("removable once the reader is gone");
    assert!(matches!(s.blob_reader(&d), Err(Error::UnknownBlob { .. })));
}

#[test]
fn a_piece_changed_on_disk_is_dropped_and_never_returned() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Store::open(StoreConfig::new(dir.path(), 64 << 20)).expect("open store");
    let (data, d, layout) = test_blob(8, 4 * PIECE as usize, PIECE);
    s.ensure_blob(&d, &layout).expect("ensure");
    for i in 0..4 {
        let off = (i * PIECE) as usize;
        s.put_piece(&d, i, &data[off..off + PIECE as usize])
            .expect("put");
    }
    s.complete_blob(&d).expect("complete");
    let reader = s.blob_reader(&d).expect("reader");
    // Flip one byte in the last verify slice of piece 2, behind the store's back.
    let at = 3 * u64::from(PIECE) - 3;
    OpenOptions::new()
        .write(true)
        .open(data_file(dir.path(), &d.hex()))
        .and_then(|f| f.write_all_at(&[data[at as usize] ^ 1], at))
        .expect("flip a byte");
    let mut buf = vec![0u8; PIECE as usize];
    let err = reader.read_piece_into(2, &mut buf).expect_err("corrupt");
    assert!(err.is_corrupt(), "{err}");
    let status = s.blob_status(&d).expect("status");
    assert!(!status.held.contains(2) && !status.complete);
    assert!(matches!(
        reader.read_piece_into(2, &mut buf),
        Err(Error::NotPresent { .. })
    ));
    reader
        .read_piece_into(3, &mut buf)
        .expect("piece 3 still good");
    assert_eq!(&buf[..], &data[3 * PIECE as usize..]);
    assert_eq!(s.stats().corruptions, 1);
}
