//! Opening after a restart or a crash: rebuild the index from the files, dropping what does not check.
//!
//! Blob journals are replayed (a torn tail is cut off), pieces that lie past the end of their data
//! file are forgotten, and files nobody names are deleted; chunk packs replay their own journals
//! (pack.rs). Piece and chunk bytes are not hashed here: every read verifies them, so opening
//! stays proportional to the metadata.

use std::fs::{self, Metadata};
use std::path::Path;

use crate::error::{Error, Result};
use crate::index::{BlobState, Entry, EntryKey};
use crate::journal::{self, RECORD_LEN};
use crate::key::{Digest, MAX_PIECES};
use crate::ledger::Ledger;
use crate::pack::Found;
use crate::paths::{mtime_ms, now_ms, remove_if_exists, write_atomic};
use std::sync::Arc;

/// A metadata file longer than this is not read (a header for the most pieces plus a long journal).
const MAX_META_LEN: u64 =
    64 + 32 + 32 * MAX_PIECES as u64 + RECORD_LEN as u64 * 4 * MAX_PIECES as u64;

fn list(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    Ok(entries.flatten().collect())
}

fn discard(path: &Path, why: &str) {
    tracing::warn!(path = %path.display(), why, "store recovery: removing file");
    if let Err(e) = remove_if_exists(path) {
        tracing::warn!(path = %path.display(), error = %e, "store recovery: could not remove file");
    }
}

/// A fan-out directory name: two lowercase hex digits.
fn is_fan(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Rebuilds the index: replays blob journals and takes the chunks the packs named (`found`).
pub(crate) fn recover(ledger: &Ledger, found: Vec<Found>) -> Result<()> {
    let mut used = 0u64;
    let (mut blobs, mut chunks) = (0u64, 0u64);
    for fan in list(&ledger.paths.blobs)? {
        let name = fan.file_name().to_string_lossy().into_owned();
        if !is_fan(&name) || !fan.path().is_dir() {
            tracing::warn!(path = %fan.path().display(), "store recovery: ignoring unknown entry");
            continue;
        }
        for file in list(&fan.path())? {
            let path = file.path();
            let fname = file.file_name().to_string_lossy().into_owned();
            let parsed = fname
                .strip_suffix(".meta")
                .map(|h| (h, true))
                .or_else(|| fname.strip_suffix(".data").map(|h| (h, false)))
                .and_then(|(h, is_meta)| {
                    Some((Digest::parse(&format!("sha256:{h}")).ok()?, is_meta))
                })
                .filter(|(d, _)| d.hex().starts_with(&name));
            match parsed {
                Some((digest, true)) => {
                    if let Some(bytes) = recover_blob(ledger, &digest) {
                        used += bytes;
                        blobs += 1;
                    }
                }
                Some((digest, false)) => {
                    if !ledger.paths.meta(&digest).exists() {
                        discard(&path, "data file without metadata");
                    }
                }
                None => discard(&path, "not a store file name"),
            }
        }
    }
    for f in found {
        ledger.index.insert(Entry::chunk(f.hash, f.at, f.mtime_ms));
        used += f.at.span();
        chunks += 1;
    }
    ledger.add_used(used);
    tracing::info!(root = %ledger.paths.root.display(), blobs, chunks, used, "store opened");
    Ok(())
}

/// Replays one blob's journal into the index; returns the bytes it accounts, or `None` if dropped.
fn recover_blob(ledger: &Ledger, digest: &Digest) -> Option<u64> {
    let (meta_path, data_path) = (ledger.paths.meta(digest), ledger.paths.data(digest));
    let drop_blob = |why: &str| {
        discard(&meta_path, why);
        discard(&data_path, why);
        None
    };
    let len = match fs::metadata(&meta_path) {
        Ok(m) => m.len(),
        Err(e) => return drop_blob(&format!("unreadable metadata: {e}")),
    };
    if len > MAX_META_LEN {
        return drop_blob("metadata file too long");
    }
    let bytes = match fs::read(&meta_path) {
        Ok(b) => b,
        Err(e) => return drop_blob(&format!("unreadable metadata: {e}")),
    };
    let mut r = match journal::decode(digest, &bytes) {
        Ok(r) => r,
        Err(why) => return drop_blob(&format!("bad metadata: {why}")),
    };
    let data_meta = fs::metadata(&data_path).ok();
    let data_len = data_meta.as_ref().map_or(0, Metadata::len);
    let mut changed = r.valid_len != bytes.len() as u64;
    // A held piece must at least lie inside the data file; its bytes are verified on read.
    let short: Vec<u32> = r
        .held
        .iter()
        .filter(|i| r.layout.piece_offset(*i) + r.layout.piece_len(*i).unwrap_or(0) > data_len)
        .collect();
    for i in short {
        r.held.remove(i);
        r.complete = false;
        changed = true;
    }
    if r.records > 2 * u64::from(r.layout.piece_count()) + 64 {
        changed = true;
    }
    if data_meta.is_none() {
        if let Err(e) = fs::File::create(&data_path) {
            tracing::warn!(path = %data_path.display(), error = %e, "store recovery: cannot recreate data file");
            return drop_blob("no data file");
        }
    }
    let mut meta_len = bytes.len() as u64;
    if changed {
        // Rewrite compactly: cuts a torn tail and forgets pieces the data file cannot hold.
        let compact = journal::encode_compact(digest, &r.layout, &r.held, r.complete);
        if let Err(e) = write_atomic(&ledger.paths.temp(), &meta_path, &compact) {
            tracing::warn!(path = %meta_path.display(), error = %e, "store recovery: cannot rewrite metadata");
            return drop_blob("cannot rewrite metadata");
        }
        meta_len = compact.len() as u64;
        tracing::info!(blob = %digest, held = r.held.held(), "store recovery: journal compacted");
    }
    let held_bytes: u64 = r.held.iter().filter_map(|i| r.layout.piece_len(i)).sum();
    let last = fs::metadata(&meta_path)
        .map(|m| mtime_ms(&m))
        .unwrap_or_else(|_| now_ms())
        .max(data_meta.as_ref().map_or(0, mtime_ms));
    let key = EntryKey::Blob(*digest);
    let state = BlobState {
        held: r.held,
        complete: r.complete,
        check: r.check,
        generation: 0,
    };
    let accounted = meta_len + held_bytes;
    ledger.index.insert(Entry::new(
        key,
        Some(Arc::new(r.layout)),
        accounted,
        Some(state),
        last,
    ));
    Some(accounted)
}
