//! The HTTP Range parser (local API and registry proxy) on arbitrary header values and sizes:
//! it never panics, and every range it grants lies inside the blob and is not empty.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_peer::api::range::{parse_range, RangeAsk};

fuzz_target!(|input: (u64, &[u8])| {
    let (size, header) = input;
    let header = String::from_utf8_lossy(header);
    for h in [Some(header.as_ref()), None] {
        if let RangeAsk::Part(start, end) = parse_range(h, size) {
            assert!(start < end && end <= size, "{h:?} on {size} bytes gave {start}..{end}");
        }
    }
});
