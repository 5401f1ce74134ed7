//! The HTTP Range parser (local API and registry proxy) on arbitrary header values and sizes
//! (`shoal_peer_fuzz::range_header`): it never panics, and every range it grants lies inside
//! the blob and is not empty.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, &[u8])| shoal_peer_fuzz::range_header(input.0, input.1));
