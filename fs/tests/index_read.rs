//! The read path over indexed layers (`shoal image index`): chunks that are spans of the ORIGINAL
//! gzip or zstd layer blob, inflated from their checkpoint (a deflate window first, itself a
//! chunk of the side blob) and checked against their BLAKE3; a span run decoded once for a
//! sequential read; a whole single-frame layer read as a stream of requests; and bad bytes from
//! the first source or from both: right bytes or an error, never wrong bytes.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{noise, start_peer};
use shoal_format::bootstrap::{Bootstrap, InodeKind};
use shoal_format::index::{IndexOptions, Indexer};
use shoal_format::oci;
use shoal_fs::fetch::{ChunkSource, OriginSource, PeerSource};
use shoal_fs::read::{ReadError, Reader, ReaderParts};
use shoal_fs::Metrics;
use shoal_origin::LocalDirOrigin;
use shoal_store::{Store, StoreConfig};

/// Files of the test layer: text that compresses, noise that does not, sizes across chunks.
fn files() -> BTreeMap<String, Vec<u8>> {
    let mut f = BTreeMap::new();
    let text: Vec<u8> = (0..60_000u32)
        .flat_map(|i| format!("line {i} of a text file that gzip likes\n").into_bytes())
        .collect();
    f.insert("etc/text.txt".into(), text);
    f.insert("bin/noise".into(), noise(700_000, 1));
    for i in 0..40 {
        f.insert(
            format!("lib/small{i:02}.py"),
            noise(3_000 + i * 97, 10 + i as u64),
        );
    }
    f.insert("opt/big.bin".into(), noise(3 << 20, 7));
    f.insert("opt/empty".into(), Vec::new());
    f
}

fn tar_of(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, p, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// An indexed layer: its bootstrap and the directory holding the layer blob and side blob.
struct Indexed {
    boot: Arc<Bootstrap>,
    blobs: PathBuf,
    _dir: tempfile::TempDir,
}

fn index(blob: &[u8], span: u64, chunk_size: u32) -> Indexed {
    let dir = tempfile::tempdir().unwrap();
    oci::init_layout(dir.path()).unwrap();
    let desc = oci::write_blob(dir.path(), "application/vnd.oci.image.layer.v1.tar", blob).unwrap();
    let digest = oci::parse_digest(desc.digest()).unwrap();
    let mut ix = Indexer::new(
        dir.path(),
        IndexOptions {
            chunk_size,
            span,
            ..IndexOptions::default()
        },
    )
    .unwrap();
    let report = ix
        .add_layer(&digest, blob.len() as u64, blob)
        .unwrap()
        .clone();
    let bdesc = oci::descriptor(
        "application/octet-stream",
        &oci::parse_digest(&report.bootstrap.0.parse().unwrap()).unwrap(),
        report.bootstrap.1,
    )
    .unwrap();
    let boot = Bootstrap::load(oci::read_blob(dir.path(), &bdesc, 1 << 30).unwrap()).unwrap();
    Indexed {
        boot: Arc::new(boot),
        blobs: dir.path().join("blobs"),
        _dir: dir,
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn source(dir: &Path) -> Arc<dyn ChunkSource> {
    Arc::new(OriginSource::new(Arc::new(LocalDirOrigin::new(dir))))
}

struct Setup {
    reader: Reader,
    metrics: Arc<Metrics>,
    _rt: tokio::runtime::Runtime,
    _cache: tempfile::TempDir,
}

fn reader(ix: &Indexed, peer: Option<&Path>, origin: &Path, max_request: u64) -> Setup {
    reader_with(
        ix,
        peer.map(source),
        source(origin),
        max_request,
        tokio::runtime::Runtime::new().unwrap(),
    )
}

fn reader_with(
    ix: &Indexed,
    peer: Option<Arc<dyn ChunkSource>>,
    origin: Arc<dyn ChunkSource>,
    max_request: u64,
    rt: tokio::runtime::Runtime,
) -> Setup {
    let cache = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new(
        "test".into(),
        ix.boot.chunk_count() as usize,
        shoal_fs::metrics::stored_bytes(&ix.boot),
    ));
    let reader = Reader::new(ReaderParts {
        boot: Arc::clone(&ix.boot),
        store: Store::open(StoreConfig::new(cache.path(), 1 << 30)).unwrap(),
        peer,
        origin,
        rt: rt.handle().clone(),
        timeout: Duration::from_secs(10),
        max_request,
        max_gap: 64 << 10,
        memory_cache_bytes: 64 << 20,
        metrics: Arc::clone(&metrics),
    })
    .unwrap();
    Setup {
        reader,
        metrics,
        _rt: rt,
        _cache: cache,
    }
}

fn ino_of(boot: &Bootstrap, path: &str) -> u32 {
    path.split('/').fold(0, |dir, name| {
        boot.lookup(dir, name.as_bytes()).unwrap().unwrap()
    })
}

/// Reads every file of `want` through `r` in pieces of `step` bytes and compares.
fn read_all(r: &Reader, boot: &Bootstrap, want: &BTreeMap<String, Vec<u8>>, step: u32) {
    for (p, data) in want {
        let ino = ino_of(boot, p);
        assert_eq!(boot.inode(ino).unwrap().kind(), InodeKind::File);
        let mut got = Vec::new();
        loop {
            let b = r.read(ino, got.len() as u64, step).unwrap();
            if b.is_empty() {
                break;
            }
            got.extend_from_slice(&b);
        }
        assert!(got == *data, "content of {p}");
    }
}

/// A copy of `dir` with one byte flipped at `at` of every blob named in `blobs`.
fn corrupted(dir: &Path, blob: &str, at: &[u64], to: &Path) {
    std::fs::create_dir_all(to.join("sha256")).unwrap();
    for e in std::fs::read_dir(dir.join("sha256")).unwrap() {
        let e = e.unwrap();
        let mut bytes = std::fs::read(e.path()).unwrap();
        if e.file_name().to_string_lossy() == blob {
            for a in at {
                bytes[*a as usize] ^= 0x20;
            }
        }
        std::fs::write(to.join("sha256").join(e.file_name()), bytes).unwrap();
    }
}

fn layer_hex(ix: &Indexed) -> String {
    hex::encode(ix.boot.blob(0).unwrap().digest)
}

#[test]
fn gzip_spans_read_right_and_a_sequential_read_inflates_each_span_once() {
    let want = files();
    let blob = gzip(&tar_of(&want));
    // Small spans and chunks: many checkpoints, deflate windows, runs of several chunks.
    let ix = index(&blob, 256 << 10, 64 << 10);
    assert!(
        ix.boot.checkpoint_count() > 4,
        "{}",
        ix.boot.checkpoint_count()
    );
    let s = reader(&ix, None, &ix.blobs, 8 << 20);
    read_all(&s.reader, &ix.boot, &want, 128 << 10);
    let m = s.metrics.snapshot();
    assert_eq!((m.verify_failures, m.read_errors), (0, 0), "{m:?}");
    // Each span was fetched once (with the chunk that crosses into the next span, about a
    // quarter more here, and the windows): never from its checkpoint once per chunk.
    let fetched = m.fetched_peer + m.fetched_origin;
    eprintln!(
        "sequential: read {} bytes, fetched {fetched} of a {}-byte layer",
        m.read_bytes,
        blob.len()
    );
    assert!(
        fetched < blob.len() as u64 * 7 / 5,
        "fetched {fetched} bytes of a {}-byte layer",
        blob.len()
    );
    assert!(
        m.image_fetched_ratio > 0.9 && m.image_fetched_ratio <= 1.0,
        "{m:?}"
    );

    // A fresh reader, random small reads: each pays at most about one span.
    let s = reader(&ix, None, &ix.blobs, 8 << 20);
    let ino = ino_of(&ix.boot, "opt/big.bin");
    let big = &want["opt/big.bin"];
    for off in [2_000_000u64, 17, 1_048_570, 3_000_000] {
        let got = s.reader.read(ino, off, 4096).unwrap();
        let end = (off as usize + 4096).min(big.len());
        assert_eq!(got, big[off as usize..end]);
    }
    let m = s.metrics.snapshot();
    assert!(
        m.fetched_origin < blob.len() as u64 / 2,
        "four small reads fetched {} bytes",
        m.fetched_origin
    );
}

#[test]
fn zstd_frames_and_a_whole_layer_read_right() {
    let want = files();
    let tar = tar_of(&want);
    // Several frames (zstd:chunked, seekable zstd) and one frame (a whole layer).
    let frames: Vec<u8> = tar
        .chunks(tar.len().div_ceil(5))
        .flat_map(|c| zstd::bulk::compress(c, 3).unwrap())
        .collect();
    let one = zstd::bulk::compress(&tar, 3).unwrap();
    for (name, blob) in [("frames", frames), ("one frame", one)] {
        let ix = index(&blob, 64 << 10, 64 << 10);
        // 64 KiB requests: the single frame's run is read as a stream of requests.
        let s = reader(&ix, None, &ix.blobs, 64 << 10);
        read_all(&s.reader, &ix.boot, &want, 1 << 20);
        let m = s.metrics.snapshot();
        assert_eq!(m.verify_failures, 0, "{name}: {m:?}");
        assert!(
            m.fetched_origin < blob.len() as u64 * 2,
            "{name}: fetched {} of {}",
            m.fetched_origin,
            blob.len()
        );
    }
}

#[test]
fn bad_layer_bytes_are_refetched_from_the_origin_and_never_reach_a_reader() {
    let want = files();
    let blob = gzip(&tar_of(&want));
    let ix = index(&blob, 64 << 10, 64 << 10);
    let work = tempfile::tempdir().unwrap();
    let layer = layer_hex(&ix);
    let flips: Vec<u64> = (1..8).map(|i| blob.len() as u64 * i / 8).collect();
    let bad = work.path().join("bad");
    corrupted(&ix.blobs, &layer, &flips, &bad);

    // The first source (a peer) serves flipped bytes: every read still returns the right ones.
    let s = reader(&ix, Some(&bad), &ix.blobs, 8 << 20);
    read_all(&s.reader, &ix.boot, &want, 128 << 10);
    let m = s.metrics.snapshot();
    assert!(m.verify_failures > 0, "{m:?}");

    // The origin serves them too: the files that span the flipped bytes fail with an error,
    // the others read right; no read returns a wrong byte.
    let s = reader(&ix, Some(&bad), &bad, 8 << 20);
    let (mut ok, mut failed) = (0, 0);
    for (p, data) in &want {
        let ino = ino_of(&ix.boot, p);
        match s.reader.read(ino, 0, data.len() as u32 + 1) {
            Ok(b) => {
                assert!(b == *data, "{p}: wrong bytes reached a reader");
                ok += 1;
            }
            Err(ReadError::Corrupt { .. }) => failed += 1,
            Err(e) => panic!("{p}: {e}"),
        }
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
}

#[test]
fn a_flipped_window_byte_is_caught() {
    let want = files();
    let blob = gzip(&tar_of(&want));
    let ix = index(&blob, 64 << 10, 64 << 10);
    // The side blob (the windows): flip a byte in the middle of it at both sources.
    let side = hex::encode(ix.boot.blob(1).expect("a side blob with windows").digest);
    let size = ix.boot.blob(1).unwrap().size;
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("bad");
    corrupted(&ix.blobs, &side, &[size / 2], &bad);
    let s = reader(&ix, Some(&bad), &bad, 8 << 20);
    let mut failed = 0;
    for (p, data) in &want {
        match s.reader.read(ino_of(&ix.boot, p), 0, data.len() as u32 + 1) {
            Ok(b) => assert!(b == *data, "{p}: wrong bytes reached a reader"),
            Err(_) => failed += 1,
        }
    }
    assert!(failed > 0, "no read used the flipped window");
}

/// Flips a byte at each of `offsets` of the peer's stored copy of blob `hex`.
fn flip_stored(peer_dir: &Path, hex: &str, offsets: &[u64]) -> usize {
    use std::os::unix::fs::FileExt;
    let mut flipped = 0;
    let mut stack = vec![peer_dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().and_then(|n| n.to_str()) == Some(&format!("{hex}.data")) {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&p)
                    .unwrap();
                for &o in offsets {
                    let mut b = [0u8; 1];
                    if f.read_at(&mut b, o).unwrap() == 1 && b != [0] {
                        f.write_all_at(&[b[0] ^ 0x10], o).unwrap();
                        flipped += 1;
                    }
                }
            }
        }
    }
    flipped
}

#[test]
fn through_a_real_peer_only_the_pieces_read_are_fetched_and_a_bad_stored_piece_is_never_read() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(reg) =
        shoal_testkit::or_skip(rt.block_on(shoal_testkit::Registry::start(Default::default())))
    else {
        return;
    };
    let mut want = files();
    want.insert("opt/more.bin".into(), noise(12 << 20, 3));
    let blob = gzip(&tar_of(&want));
    let ix = index(&blob, 256 << 10, 64 << 10);
    let repo = "idx/layer";
    for b in ix.boot.blobs() {
        let bytes = std::fs::read(ix.blobs.join("sha256").join(hex::encode(b.digest))).unwrap();
        rt.block_on(reg.push_blob(repo, &bytes)).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let peer = start_peer(&rt, work.path(), vec![reg.host()]);
    let origin_ref = format!("docker://{}/{repo}", reg.host());
    let sources = |rt: &tokio::runtime::Runtime| {
        let reference = shoal_origin::Reference::parse(&origin_ref).unwrap();
        let client = shoal_origin::RegistryClient::new(Default::default()).unwrap();
        let origin = shoal_origin::RegistryOrigin::new(client, reference);
        let _enter = rt.enter();
        (
            Arc::new(PeerSource::new(
                work.path().join("peer.sock"),
                Some(origin_ref.clone()),
                None,
            )) as Arc<dyn ChunkSource>,
            Arc::new(OriginSource::new(Arc::new(origin))) as Arc<dyn ChunkSource>,
        )
    };
    let layer = shoal_proto::Digest::parse(&format!("sha256:{}", layer_hex(&ix))).unwrap();

    // Two small files: the peer fetches the pieces their spans cover, not the layer.
    let rt2 = tokio::runtime::Runtime::new().unwrap();
    let (p, o) = sources(&rt2);
    let s = reader_with(&ix, Some(p), o, 8 << 20, rt2);
    for f in ["lib/small05.py", "lib/small30.py"] {
        let got = s.reader.read(ino_of(&ix.boot, f), 0, 1 << 20).unwrap();
        assert!(got == want[f], "{f}");
    }
    let m = s.metrics.snapshot();
    assert!(m.fetched_peer > 0 && m.fetched_origin == 0, "{m:?}");
    let status = peer.downloader().status(&layer).expect("the peer's task");
    eprintln!("two small files: {status:?} of a {}-byte layer", blob.len());
    assert!(
        !status.complete && status.bytes_from_origin < blob.len() as u64 / 4,
        "the peer fetched more than the spans read: {status:?}"
    );

    // Everything, then a flipped byte in every piece the peer stored: a new mount (empty
    // cache) still reads right bytes.
    read_all(&s.reader, &ix.boot, &want, 1 << 20);
    drop(s);
    let offsets: Vec<u64> = (0..blob.len() as u64).step_by(100_000).collect();
    let flipped = flip_stored(&work.path().join("peer"), &layer_hex(&ix), &offsets);
    assert!(flipped > 10, "only {flipped} stored bytes found to flip");
    let rt3 = tokio::runtime::Runtime::new().unwrap();
    let (p, o) = sources(&rt3);
    let s = reader_with(&ix, Some(p), o, 8 << 20, rt3);
    read_all(&s.reader, &ix.boot, &want, 1 << 20);
    eprintln!(
        "after {flipped} flipped stored bytes: {:?}",
        s.metrics.snapshot()
    );
    drop(s);
    rt.block_on(peer.shutdown());
}
