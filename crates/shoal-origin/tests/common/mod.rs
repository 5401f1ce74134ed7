//! The conformance suite every origin runs (one trait, one suite), and small helpers.
#![allow(dead_code)]

use futures::future::join_all;
use shoal_origin::{collect_stream, parse_digest, ByteRange, Digest, Origin, OriginError};

/// Reads a range into memory (tests move at most a few hundred MiB).
pub async fn read<O: Origin + ?Sized>(
    o: &O,
    d: &Digest,
    r: ByteRange,
) -> Result<Vec<u8>, OriginError> {
    collect_stream(o.read_range(d, r).await?, 1 << 30).await
}

/// A digest no origin holds.
pub fn missing_digest() -> Digest {
    parse_digest(&format!("sha256:{}", "0".repeat(64))).unwrap()
}

/// Checks everything the `Origin` trait promises on a blob the origin holds.
pub async fn conformance<O: Origin + ?Sized>(o: &O, digest: &Digest, data: &[u8]) {
    let len = data.len() as u64;
    assert!(len >= 16, "conformance needs a blob of at least 16 bytes");
    let mid = len / 2;
    let what = o.describe();

    assert_eq!(o.stat(digest).await.unwrap().size, len, "{what}: stat");
    let full = collect_stream(o.read(digest).await.unwrap(), 1 << 30)
        .await
        .unwrap();
    assert!(full == data, "{what}: full read differs");

    for (r, want) in [
        (ByteRange::new(0, 1), &data[..1]),
        (
            ByteRange::new(mid, mid + 1),
            &data[mid as usize..mid as usize + 1],
        ),
        (ByteRange::new(len - 1, len), &data[len as usize - 1..]),
        (ByteRange::new(3, mid + 7), &data[3..mid as usize + 7]),
        (ByteRange::from_offset(mid), &data[mid as usize..]),
        (ByteRange::from_offset(len - 1), &data[len as usize - 1..]),
        (ByteRange::new(0, len), data),
        (ByteRange::from_offset(len), &data[..0]),
    ] {
        let got = read(o, digest, r)
            .await
            .unwrap_or_else(|e| panic!("{what}: range {r}: {e}"));
        assert!(
            got == want,
            "{what}: range {r} returned {} bytes, wanted {}",
            got.len(),
            want.len()
        );
    }

    for r in [
        ByteRange::from_offset(len + 1),
        ByteRange::new(mid, len + 1),
        ByteRange::new(len + 5, len + 10),
    ] {
        match read(o, digest, r).await {
            Err(OriginError::RangeNotSatisfiable { size, .. }) => {
                assert_eq!(size, len, "{what}: range {r}")
            }
            other => panic!("{what}: range {r} past the end gave {other:?}"),
        }
    }

    let missing = missing_digest();
    let e = o.stat(&missing).await.unwrap_err();
    assert!(
        matches!(e, OriginError::BlobNotFound { .. }),
        "{what}: stat of missing blob gave {e:?}"
    );
    assert!(
        e.to_string().contains(&missing.to_string()),
        "error names the blob: {e}"
    );
    let e = read(o, &missing, ByteRange::full()).await.unwrap_err();
    assert!(
        matches!(e, OriginError::BlobNotFound { .. }),
        "{what}: read of missing blob gave {e:?}"
    );

    // Concurrent reads of different ranges all return their exact bytes.
    let ranges: Vec<(u64, u64)> = (0..16u64)
        .map(|i| (i * len / 16, ((i + 1) * len / 16).max(i * len / 16 + 1)))
        .collect();
    let reads = ranges
        .iter()
        .map(|&(a, b)| read(o, digest, ByteRange::new(a, b)));
    for ((a, b), got) in ranges.iter().zip(join_all(reads).await) {
        let got = got.unwrap_or_else(|e| panic!("{what}: concurrent range {a}..{b}: {e}"));
        assert!(
            got == data[*a as usize..*b as usize],
            "{what}: concurrent range {a}..{b}"
        );
    }
}
