//! The tokio wrapper: single flight across tasks, concurrent readers, stream-through when full.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
mod common;
use common::{test_blob, test_bytes};
use shoal_store::{AsyncStore, Blake3Hash, Error, Item, StoreConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_callers_cause_one_fetch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = AsyncStore::open(StoreConfig::new(dir.path(), 64 << 20))
        .await
        .expect("open");
    let (data, d, layout) = test_blob(1, 8 * 16384, 16384);
    store
        .ensure_blob(d, Arc::new(layout.clone()))
        .await
        .expect("ensure");
    let fetches = Arc::new(AtomicUsize::new(0));
    let piece = Bytes::copy_from_slice(&data[3 * 16384..4 * 16384]);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (store, fetches, piece) = (store.clone(), fetches.clone(), piece.clone());
        tasks.push(tokio::spawn(async move {
            store
                .get_or_fetch(Item::Piece(d, 3), async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, std::io::Error>(piece)
                })
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("fetched"), piece);
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    assert_eq!(store.stats().fetches, 1);
    assert_eq!(store.read_piece(d, 3).await.expect("stored"), piece);

    // A failing fetch: every waiter gets the error, and one fetch ran.
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (store, failures) = (store.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            store
                .get_or_fetch(Item::Piece(d, 4), async move {
                    failures.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err::<Bytes, _>(std::io::Error::other("origin said 503"))
                })
                .await
        }));
    }
    for t in tasks {
        let err = t.await.expect("task").expect_err("fetch failed");
        assert!(matches!(err.root(), Error::Fetch { .. }), "{err}");
        assert!(err.to_string().contains("503"), "{err}");
    }
    assert_eq!(failures.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_and_stream_through_when_full() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = StoreConfig::new(dir.path(), 256 << 10);
    cfg.low_watermark = 128 << 10;
    let store = AsyncStore::open(cfg).await.expect("open");
    let (data, d, _) = test_blob(2, 200 << 10, 16384);
    let layout = store
        .import_blob(d, 16384, std::io::Cursor::new(data.clone()))
        .await
        .expect("import");
    let _pin = store.pin_blob(&d).expect("pin");
    let data = Arc::new(data);
    let mut readers = Vec::new();
    for r in 0..16u64 {
        let (store, data) = (store.clone(), data.clone());
        readers.push(tokio::spawn(async move {
            for k in 0..20u64 {
                let off = (r * 7919 + k * 104_729) % (data.len() as u64 - 5000);
                let got = store.read_range(d, off, 5000).await.expect("range");
                assert_eq!(&got[..], &data[off as usize..off as usize + 5000]);
            }
        }));
    }
    for r in readers {
        r.await.expect("reader");
    }
    assert_eq!(layout.size(), data.len() as u64);
    // The pinned blob fills the quota: a fetched chunk is still served, verified, uncached.
    let chunk = Bytes::from(test_bytes(3, 100 << 10));
    let h = Blake3Hash::of(&chunk);
    let c = chunk.clone();
    let got = store
        .get_or_fetch(Item::Chunk(h), async move { Ok::<_, std::io::Error>(c) })
        .await
        .expect("streamed through");
    assert_eq!(got, chunk);
    assert_eq!(store.stats().uncached, 1);
    assert!(store
        .get_chunk(h)
        .await
        .expect_err("not cached")
        .is_not_present());
}
