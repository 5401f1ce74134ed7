//! The body of the Range header fuzz target as a plain function: `cargo +nightly fuzz run` drives
//! it through libFuzzer, `tests/smoke.rs` on the stable toolchain (corpus + mutations).

use shoal_api::{parse_range, RangeAsk};

/// The HTTP Range parser (local API and registry proxy) on a header value and a blob size: it
/// never panics, and every range it grants lies inside the blob and is not empty.
pub fn range_header(size: u64, header: &[u8]) {
    let header = String::from_utf8_lossy(header);
    for h in [Some(header.as_ref()), None] {
        if let RangeAsk::Part(start, end) = parse_range(h, size) {
            assert!(
                start < end && end <= size,
                "{h:?} on {size} bytes gave {start}..{end}"
            );
        }
    }
}

/// [`range_header`] on raw bytes: the first 8 (little-endian, zero-padded) are the size, the
/// rest the header.
pub fn range_header_bytes(data: &[u8]) {
    let mut size = [0u8; 8];
    let n = data.len().min(8);
    size[..n].copy_from_slice(&data[..n]);
    range_header(u64::from_le_bytes(size), &data[n..]);
}
