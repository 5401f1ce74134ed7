//! Fuzz the bootstrap loader (`shoal_format_fuzz::bootstrap_load`): load arbitrary bytes, and
//! walk whatever loads through every accessor. Seed the corpus with a real bootstrap: byte 0x01
//! followed by a bootstrap written by `shoal image convert`, in `corpus/bootstrap_load/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_format_fuzz::bootstrap_load(data));
