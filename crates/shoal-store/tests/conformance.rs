//! The shared store suite (tests/common/suite.rs) run against the on-disk store.

mod common;
use common::suite as conformance;
use shoal_store::{Store, StoreConfig};

fn open(config: StoreConfig) -> shoal_store::Result<Store> {
    Store::open(config)
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let dir = tempfile::tempdir().expect("temp dir");
            conformance::$name(dir.path(), &open);
        }
    )*};
}

suite!(
    pieces_and_ranges,
    blob_completion,
    import_whole_blob,
    chunks,
    restart_keeps_index,
    quota_eviction,
    pinned_survive,
    ttl_sweep,
    single_flight,
);
