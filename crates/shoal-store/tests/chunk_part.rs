//! Part reads of chunks: only the 16 KiB groups a read covers are read and checked, against
//! group hashes that were checked against the chunk's name. A flipped byte in the chunk or in
//! its group hashes is still caught: the chunk is dropped and the read says `Corrupt`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use shoal_store::{Blake3Hash, Error, Store, StoreConfig};

const GROUP: u64 = 16 << 10;

fn open(root: &Path) -> Store {
    Store::open(StoreConfig::new(root, 256 << 20)).expect("open store")
}

fn chunk(seed: u64, len: usize) -> (Vec<u8>, Blake3Hash) {
    let mut rng = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    let hash = Blake3Hash::of(&data);
    (data, hash)
}

/// Reads `range` of `hash` as a caller would, returning the requested bytes.
fn part(s: &Store, hash: &Blake3Hash, range: std::ops::Range<u64>) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    let at = s.read_chunk_part(hash, range, &mut buf)?;
    Ok(buf[at].to_vec())
}

fn flip(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open pack");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read byte");
    f.write_all_at(&[b[0] ^ 0x20], offset).expect("write byte");
}

#[test]
fn part_reads_return_the_chunks_bytes_and_count_group_hashes_in_the_quota() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = open(dir.path());
    // 1 MiB and a bit: 65 groups, the last one short.
    let (data, h) = chunk(1, (1 << 20) + 1000);
    s.put_chunk(&h, &data).expect("put");
    // The group hashes are stored (and counted) beside the chunk: 32 bytes per group.
    assert_eq!(s.used_bytes(), data.len() as u64 + 65 * 32);
    for range in [
        0..4096,
        4096..8192,
        GROUP - 10..GROUP + 10,
        5 * GROUP..6 * GROUP,
        (1 << 20) - 3..(1 << 20) + 1000,
        0..data.len() as u64,
        777..777,
    ] {
        let got = part(&s, &h, range.clone()).expect("part read");
        assert_eq!(
            got,
            &data[range.start as usize..range.end as usize],
            "{range:?}"
        );
    }
    // Only the covering groups are read: a 4 KiB read fills one group.
    let mut buf = Vec::new();
    let at = s
        .read_chunk_part(&h, 3 * GROUP + 100..3 * GROUP + 4196, &mut buf)
        .expect("part read");
    assert_eq!(buf.len() as u64, GROUP);
    assert_eq!(at, 100..4196);
    // Past the end is refused, and nothing is dropped for it.
    let err = part(&s, &h, 0..data.len() as u64 + 1).expect_err("past the end");
    assert!(matches!(err, Error::OutOfRange { .. }), "{err:?}");
    assert!(s.has_chunk(&h));
    // A chunk of one group is read whole (its name is its only hash) and has no group hashes.
    let (small, hs) = chunk(2, 9000);
    s.put_chunk(&hs, &small).expect("put small");
    assert_eq!(s.used_bytes(), data.len() as u64 + 65 * 32 + 9000);
    assert_eq!(
        part(&s, &hs, 100..200).expect("small part"),
        &small[100..200]
    );
    // After a restart the group hashes come back from the pack, checked, and so does the quota.
    let used = s.used_bytes();
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.used_bytes(), used);
    assert_eq!(
        part(&s, &h, 9 * GROUP + 5..9 * GROUP + 4101).expect("after restart"),
        &data[(9 * GROUP + 5) as usize..(9 * GROUP + 4101) as usize]
    );
    assert_eq!(s.stats().corruptions, 0);
    // Removing the chunk gives back its bytes and its group hashes.
    s.remove_chunk(&h).expect("remove");
    assert_eq!(s.used_bytes(), 9000);
}

#[test]
fn a_flipped_byte_in_a_chunk_fails_the_reads_that_cover_it_and_drops_the_chunk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = open(dir.path());
    let (data, h) = chunk(3, 1 << 20);
    s.put_chunk(&h, &data).expect("put");
    let (pack, offset, len) = s.chunk_at(&h).expect("held");
    assert_eq!(len, 1 << 20);
    flip(&pack, offset + 5 * GROUP + 7);
    // Groups the flip is not in still read (their bytes are the chunk's).
    assert_eq!(
        part(&s, &h, 2 * GROUP..2 * GROUP + 4096).expect("untouched group"),
        &data[(2 * GROUP) as usize..(2 * GROUP + 4096) as usize]
    );
    // The group with the flip is caught, and the chunk is dropped: the caller fetches it again.
    let err = part(&s, &h, 5 * GROUP..5 * GROUP + 4096).expect_err("flipped group");
    assert!(err.is_corrupt(), "{err:?}");
    assert!(!s.has_chunk(&h));
    assert_eq!(s.stats().corruptions, 1);
    assert_eq!(s.used_bytes(), 0);
    let err = part(&s, &h, 0..10).expect_err("dropped");
    assert!(err.is_not_present(), "{err:?}");
    // Stored again (the refetch), it reads whole and in part.
    s.put_chunk(&h, &data).expect("put again");
    assert_eq!(
        part(&s, &h, 5 * GROUP..5 * GROUP + 4096).expect("refetched"),
        &data[(5 * GROUP) as usize..(5 * GROUP + 4096) as usize]
    );
}

#[test]
fn a_flipped_byte_in_the_group_hashes_is_caught_when_they_are_loaded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (data, h) = chunk(4, (2 << 20) + 5);
    let (pack, offset, len) = {
        let s = open(dir.path());
        s.put_chunk(&h, &data).expect("put");
        s.chunk_at(&h).expect("held")
    };
    // The group hashes follow the chunk's bytes: flip one in the middle of the list.
    flip(&pack, offset + len + 40 * 32 + 3);
    // A fresh store has no group hashes in memory: it reads them from the pack and checks them.
    let s = open(dir.path());
    let err = part(&s, &h, 0..4096).expect_err("bad group hashes");
    assert!(err.is_corrupt(), "{err:?}");
    assert!(!s.has_chunk(&h));
    assert_eq!(s.stats().corruptions, 1);
    s.put_chunk(&h, &data).expect("refetched");
    assert_eq!(part(&s, &h, 0..4096).expect("good again"), &data[..4096]);
    drop(s);
    // Cut short (a torn write the journal still names): caught the same way.
    let (pack, offset, len) = {
        let s = open(dir.path());
        s.chunk_at(&h).expect("held")
    };
    OpenOptions::new()
        .write(true)
        .open(&pack)
        .expect("open pack")
        .set_len(offset + len + 100)
        .expect("truncate");
    let s = open(dir.path());
    // Recovery forgets a chunk whose group hashes lie past the end of its pack.
    assert!(!s.has_chunk(&h));
}
