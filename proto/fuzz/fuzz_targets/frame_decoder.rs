//! Feeds arbitrary bytes to the frame decoder for every message type, synchronously and
//! through the async reader (`shoal_proto_fuzz::frame_decoder`). Any panic, hang or huge
//! allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_proto_fuzz::frame_decoder(data));
