//! Test helpers shared by the store's tests and bench: the conformance suite and test data.
#![allow(dead_code)]

pub mod suite;

#[allow(unused_imports)] // each test uses some of them
pub use suite::{test_blob, test_bytes};
