//! Staged files: pieces written before the piece table is known become the blob's data file.

mod common;
use common::test_blob;
use shoal_store::{Store, StoreConfig};

#[test]
fn an_adopted_staged_file_holds_the_pieces_checked_against_the_layout_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Store::open(StoreConfig::new(dir.path(), 64 << 20)).unwrap();
    let store = open();
    let (data, digest, layout) = test_blob(7, 5 * 65536 + 123, 65536);
    let piece = |i: u32| {
        let at = layout.piece_offset(i) as usize;
        &data[at..at + layout.piece_len(i).unwrap() as usize]
    };
    let staged = store.staged_file().unwrap();
    for i in [0, 2, 5] {
        staged.write_at(piece(i), layout.piece_offset(i)).unwrap();
    }
    // Piece 3's bytes are wrong (and were checked against another hash).
    staged
        .write_at(&vec![0u8; 65536], layout.piece_offset(3))
        .unwrap();
    // (index, the hash the caller checked the bytes against): piece 3 was checked against
    // another hash than the layout's, and the blob has no piece 99.
    let hash = |i: u32| *layout.piece_hash(i).unwrap();
    let other = shoal_store::Blake3Hash::of(&[0u8; 65536]);
    let claims = [
        (0, hash(0)),
        (2, hash(2)),
        (3, other),
        (5, hash(5)),
        (99, other),
    ];
    assert!(store
        .adopt_blob(&digest, layout.clone(), &staged, &claims)
        .unwrap());
    let held: Vec<u32> = store.blob_status(&digest).unwrap().held.iter().collect();
    assert_eq!(held, vec![0, 2, 5]);
    assert_eq!(&store.read_piece(&digest, 5).unwrap()[..], piece(5));
    // The rest goes in as usual, into the same data file; then the blob completes.
    for i in [1, 3, 4] {
        store.put_piece(&digest, i, piece(i)).unwrap();
    }
    store.complete_blob(&digest).unwrap();
    // The staged file is the data file now: dropping it deletes nothing.
    drop(staged);
    drop(store);
    let store = open();
    let status = store.blob_status(&digest).unwrap();
    assert!(status.complete);
    assert_eq!(&store.read_piece(&digest, 2).unwrap()[..], piece(2));
    // A blob the store knows already is not adopted; an unadopted file is deleted when dropped.
    let again = store.staged_file().unwrap();
    assert!(!store.adopt_blob(&digest, layout, &again, &[]).unwrap());
    drop(again);
    let temp = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
    assert_eq!(temp, 0);
}
