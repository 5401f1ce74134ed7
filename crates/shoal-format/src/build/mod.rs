//! The builder: source layers -> flattened tree -> chunks (hashed and compressed on every core) ->
//! data blob with piece table -> Merkle tree -> bootstrap -> OCI manifest in an OCI layout.
//!
//! Data path by module: `source` (what to read) -> `layer` (tar stream) -> `flatten` (tree) ->
//! `chunker` (BLAKE3 + zstd into a spill file) -> `meta` (inodes, chunk table) -> `blob` (final data
//! blob, prefetched files first) -> `manifest` (layers, OCI image config, manifest). `dict` supplies chunks of earlier images.
//! `scan` runs `layer` -> `flatten` with chunks hashed in memory, writing nothing (a layer check).

mod blob;
mod chunker;
mod dict;
pub(crate) mod flatten;
pub(crate) mod layer;
mod manifest;
pub(crate) mod meta;
mod scan;
mod source;
mod sparse;

pub(crate) use blob::PieceHasher;
pub use scan::{scan_layer, LayerScan};
pub use source::Source;

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{Blake3, ImageMeta, Payload};
use crate::oci::{self, LayoutRef};
use crate::{bootstrap, merkle};

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Default piece size: 256 KiB.
pub const DEFAULT_PIECE_SIZE: u32 = 256 << 10;
/// Default zstd level.
pub const DEFAULT_LEVEL: i32 = 3;

/// How to build an image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Chunk size: a power of two from 64 KiB to 16 MiB.
    pub chunk_size: u32,
    /// zstd level (1..=19).
    pub level: i32,
    /// Piece size of data blobs: a power of two from 64 KiB to 64 MiB.
    pub piece_size: u32,
    /// Paths to fetch first after mount, in order.
    pub prefetch: Vec<Vec<u8>>,
    /// Earlier converted images whose chunks may be reused.
    pub chunk_dicts: Vec<LayoutRef>,
    /// Tag for the output manifest in index.json (default `latest`).
    pub tag: Option<String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: DEFAULT_LEVEL,
            piece_size: DEFAULT_PIECE_SIZE,
            prefetch: Vec::new(),
            chunk_dicts: Vec::new(),
            tag: None,
        }
    }
}

impl BuildOptions {
    fn validate(&self) -> Result<()> {
        let pow2 = |v: u32, lo: u32, hi: u32| v.is_power_of_two() && (lo..=hi).contains(&v);
        if !pow2(self.chunk_size, 64 << 10, 16 << 20) {
            return Err(Error::BadOption(format!(
                "chunk size {} is not a power of two from 64 KiB to 16 MiB",
                self.chunk_size
            )));
        }
        if !pow2(self.piece_size, 64 << 10, 64 << 20) {
            return Err(Error::BadOption(format!(
                "piece size {} is not a power of two from 64 KiB to 64 MiB",
                self.piece_size
            )));
        }
        if !(1..=19).contains(&self.level) {
            return Err(Error::BadOption(format!(
                "zstd level {} is outside 1..=19",
                self.level
            )));
        }
        Ok(())
    }
}

/// What a conversion did (printed by `shoal image convert`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildStats {
    /// Layers applied.
    pub layers: u64,
    /// Uncompressed input bytes (tar streams, or file content of a directory).
    pub bytes_in: u64,
    /// Regular files (inodes).
    pub files: u64,
    /// Bytes of regular file content (each inode once).
    pub file_bytes: u64,
    /// Chunk references across all files.
    pub chunks: u64,
    /// Unique chunks the image references.
    pub unique_chunks: u64,
    /// Of those, chunks stored in the new data blob.
    pub new_chunks: u64,
    /// Of those, chunks reused from chunk dictionaries.
    pub dict_chunks: u64,
    /// `file_bytes` / uncompressed bytes of unique chunks.
    pub dedup_ratio: f64,
    /// Size of the new data blob (0 when every chunk came from a dictionary).
    pub blob_bytes: u64,
    /// Size of the bootstrap.
    pub bootstrap_bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// `bytes_in` per second, in MB (10^6 bytes).
    pub mb_per_s: f64,
    /// Merkle root (hex).
    pub root: String,
    /// Manifest digest.
    pub manifest: String,
}

/// Converts `src` into a Shoal image in the OCI layout `out`.
pub fn convert(
    src: &Source,
    out: &LayoutRef,
    opts: &BuildOptions,
) -> Result<(ImageMeta, BuildStats)> {
    opts.validate()?;
    let start = Instant::now();
    oci::init_layout(&out.dir)?;
    let dict = dict::ChunkDict::load(&opts.chunk_dicts)?;
    let known: HashSet<Blake3> = dict.chunks.keys().copied().collect();
    let mut chunker = chunker::Chunker::start(
        opts.chunk_size,
        opts.level,
        known,
        &oci::blobs_dir(&out.dir),
    )?;
    let mut tree = flatten::Tree::new();
    let applied = source::apply(src, &mut tree, &mut chunker)?;
    let spill = chunker.finish()?;
    let meta::Draft { mut meta, inode_of } = meta::draft(&tree, &spill, opts.chunk_size)?;

    for p in &opts.prefetch {
        let node = tree
            .lookup(p)
            .map_err(|r| {
                Error::BadOption(format!("prefetch path {}: {r}", String::from_utf8_lossy(p)))
            })?
            .ok_or_else(|| {
                Error::BadOption(format!(
                    "prefetch path {} is not in the image",
                    String::from_utf8_lossy(p)
                ))
            })?;
        if let Some(&i) = inode_of.get(&node) {
            meta.prefetch.push(i);
        }
    }

    // Blob order: chunks of prefetched files first, then first use in tree order.
    let mut order: Vec<u32> = Vec::with_capacity(meta.chunks.len());
    let mut placed = vec![false; meta.chunks.len()];
    let prefetch_chunks = meta.prefetch.iter().filter_map(|&i| {
        match meta.inodes.get(i as usize).map(|n| &n.payload) {
            Some(Payload::File(f)) => Some(f.chunks.clone()),
            _ => None,
        }
    });
    for c in prefetch_chunks.flatten().chain(0..meta.chunks.len() as u32) {
        if let Some(p) = placed.get_mut(c as usize).filter(|p| !**p) {
            *p = true;
            order.push(c);
        }
    }
    let (new, reused): (Vec<u32>, Vec<u32>) = order
        .into_iter()
        .partition(|c| spill.chunks.contains_key(&meta.chunks[*c as usize].hash));

    let mut blob_bytes = 0;
    if !new.is_empty() {
        let stored: Vec<_> = new
            .iter()
            .map(|c| spill.chunks[&meta.chunks[*c as usize].hash])
            .collect();
        let (info, offsets) =
            blob::write_data_blob(&out.dir, &spill.file, &stored, opts.piece_size)?;
        for ((c, s), off) in new.iter().zip(&stored).zip(offsets) {
            let ci = &mut meta.chunks[*c as usize];
            (ci.blob, ci.offset, ci.stored_size, ci.encoding) = (0, off, s.stored_size, s.encoding);
        }
        blob_bytes = info.size;
        meta.blobs.push(info);
    }
    let mut dict_blob_index: HashMap<usize, u32> = HashMap::new();
    for c in &reused {
        let ci = &mut meta.chunks[*c as usize];
        let (db, info) = dict.chunks.get(&ci.hash).ok_or_else(|| {
            Error::BadOption(format!(
                "chunk {} is neither new nor in a chunk dictionary",
                hex::encode(ci.hash)
            ))
        })?;
        let blob = *dict_blob_index.entry(*db).or_insert_with(|| {
            meta.blobs.push(dict.blobs[*db].0.clone());
            (meta.blobs.len() - 1) as u32
        });
        (ci.blob, ci.offset, ci.stored_size, ci.encoding) =
            (blob, info.offset, info.stored_size, info.encoding);
    }
    let mut used_dict: Vec<_> = dict_blob_index.into_iter().collect();
    used_dict.sort_by_key(|(_, i)| *i);
    for (db, _) in &used_dict {
        let (info, path) = &dict.blobs[*db];
        dict::link_blob(path, &out.dir, info)?;
    }

    let root = merkle::compute(&mut meta)?;
    let boot = bootstrap::encode(&meta)?;
    let root_hex = hex::encode(root);
    let tag = out
        .tag
        .clone()
        .or_else(|| opts.tag.clone())
        .unwrap_or_else(|| "latest".into());
    let mdesc = manifest::write_image(src, out, &tag, &meta, &boot, &root_hex)?;

    let summary = crate::image::summarize(&meta);
    let seconds = start.elapsed().as_secs_f64();
    let stats = BuildStats {
        layers: applied.layers,
        bytes_in: applied.bytes_in,
        files: summary.files,
        file_bytes: summary.file_bytes,
        chunks: summary.chunk_refs,
        unique_chunks: summary.unique_chunks,
        new_chunks: new.len() as u64,
        dict_chunks: reused.len() as u64,
        dedup_ratio: summary.dedup_ratio,
        blob_bytes,
        bootstrap_bytes: boot.len() as u64,
        seconds,
        mb_per_s: applied.bytes_in as f64 / 1e6 / seconds.max(1e-9),
        root: root_hex,
        manifest: mdesc.digest().to_string(),
    };
    tracing::info!(?stats, "converted");
    Ok((meta, stats))
}
