//! `shoal image index`: a Shoal index of an existing OCI image, built without converting it.
//!
//! Each layer blob is read once (`stream`: hashed, decompressed, checkpoints found), its tar
//! entries kept as that layer alone in overlay form (`layer`, `overlay`), and a bootstrap written
//! per layer whose chunks point into the ORIGINAL blob: ranges of a plain tar, spans from a
//! checkpoint of a gzip or zstd layer, or (sparse files, deflate windows) chunks of the layer's
//! side blob (`side`). `artifact` writes the bootstraps and side blobs as an OCI artifact whose
//! subject is the image manifest. A prefetch list (`set_prefetch`) gives each layer bootstrap
//! the listed paths that layer holds. Format: docs/format.md, "Layer index".

pub mod artifact;
mod layer;
mod overlay;
mod side;
mod stream;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

pub use overlay::OPAQUE_XATTR;
pub use stream::Compression;

use self::layer::{read_layer, used_checkpoints, window_of, LayerInput};
use self::side::{SideBlob, SideChunk};
use self::stream::FoundKind;
use crate::build::flatten::{NodeKind, Tree};
use crate::build::meta;
use crate::error::{Error, Result};
use crate::model::{
    Blake3, BlobInfo, Checkpoint, CheckpointKind, ChunkEncoding, ChunkInfo, Sha256,
};
use crate::{bootstrap, merkle, oci};

/// Default compressed distance between deflate checkpoints: 4 MiB.
pub const DEFAULT_SPAN: u64 = 4 << 20;

/// How to index an image.
#[derive(Debug, Clone, Copy)]
pub struct IndexOptions {
    /// Chunk size of the bootstraps: a power of two from 64 KiB to 16 MiB.
    pub chunk_size: u32,
    /// Compressed bytes between deflate checkpoints (gzip layers); at least 64 KiB.
    pub span: u64,
    /// Piece size of a blob of a given size (the swarm's rule, so its piece tables match).
    pub piece_size: fn(u64) -> u32,
}

fn default_piece_size(_: u64) -> u32 {
    crate::build::DEFAULT_PIECE_SIZE
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            chunk_size: crate::build::DEFAULT_CHUNK_SIZE,
            span: DEFAULT_SPAN,
            piece_size: default_piece_size,
        }
    }
}

/// One chunk of some layer, by sequence number over the whole image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkRec {
    pub hash: Blake3,
    pub size: u32,
    pub place: Placement,
}

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Placement {
    /// Bytes `offset..offset+size` of a plain tar layer.
    Range { layer: u32, offset: u64 },
    /// In a compressed layer: from the layer's found checkpoint `checkpoint` up to `end_in`,
    /// `skip` uncompressed bytes in.
    Span {
        layer: u32,
        checkpoint: u32,
        end_in: u64,
        skip: u64,
    },
    /// In the layer's side blob.
    Side { layer: u32, chunk: SideChunk },
}

/// A checkpoint of an indexed layer, its window (if any) stored in the layer's side blob.
#[derive(Debug, Clone, Copy)]
struct StoredCheckpoint {
    in_offset: u64,
    out_offset: u64,
    kind: StoredKind,
}

#[derive(Debug, Clone, Copy)]
enum StoredKind {
    GzipMember,
    Deflate { bits: u8, window: SideChunk },
    ZstdFrame,
}

struct LayerState {
    blob: BlobInfo,
    side: Option<BlobInfo>,
    /// By the layer's found-checkpoint index; `None` for those no chunk uses.
    checkpoints: Vec<Option<StoredCheckpoint>>,
}

/// What indexing one layer produced (`shoal image index`, `inspect`).
#[derive(Debug, Clone, Serialize)]
pub struct LayerIndex {
    /// The layer's digest.
    pub layer: String,
    /// The layer blob's size.
    pub size: u64,
    /// How the layer is compressed.
    pub compression: Compression,
    /// Checkpoints the layer's chunks start from (0 for a plain tar).
    pub checkpoints: u64,
    /// False for a single-frame zstd layer: every read decompresses from the start of the layer
    /// ("whole layer": fetched in one piece when first read).
    pub lazy: bool,
    /// Uncompressed tar bytes.
    pub tar_bytes: u64,
    /// Regular files in the layer.
    pub files: u64,
    /// Bytes of their content.
    pub file_bytes: u64,
    /// Whiteouts (character devices 0/0 in the bootstrap).
    pub whiteouts: u64,
    /// Opaque directories.
    pub opaque_dirs: u64,
    /// Chunks stored in the side blob (sparse files).
    pub side_chunks: u64,
    /// Entries of the layer's prefetch table: listed paths this layer provides.
    pub prefetch: u64,
    /// The layer bootstrap's digest and size.
    pub bootstrap: (String, u64),
    /// The side blob's digest and size, if the layer has one.
    pub side_blob: Option<(String, u64)>,
    /// Merkle root of the layer's tree (overlay form).
    pub root: String,
}

/// Indexes an image's layers in order into an OCI layout (bootstraps and side blobs as blobs).
pub struct Indexer {
    opts: IndexOptions,
    dir: PathBuf,
    chunks: Vec<ChunkRec>,
    merged: Tree,
    layers: Vec<LayerState>,
    /// What each layer produced, in order.
    pub reports: Vec<LayerIndex>,
    /// Seconds spent reading and indexing layers.
    pub seconds: f64,
    /// Paths to fetch first after mount, in order (`--prefetch`).
    prefetch: Vec<Vec<u8>>,
    /// Per listed path: whether some layer provided it (else, why the last layer looked at did
    /// not, when it was a bad path there rather than an absent one).
    prefetch_seen: Vec<Result<bool, String>>,
}

impl Indexer {
    /// An indexer writing into the OCI layout `dir` (created if missing).
    pub fn new(dir: &Path, opts: IndexOptions) -> Result<Indexer> {
        let pow2 =
            opts.chunk_size.is_power_of_two() && (64 << 10..=16 << 20).contains(&opts.chunk_size);
        if !pow2 {
            return Err(Error::BadOption(format!(
                "chunk size {} is not a power of two from 64 KiB to 16 MiB",
                opts.chunk_size
            )));
        }
        if opts.span < 64 << 10 {
            return Err(Error::BadOption(format!(
                "span {} is below 64 KiB",
                opts.span
            )));
        }
        oci::init_layout(dir)?;
        Ok(Indexer {
            opts,
            dir: dir.to_path_buf(),
            chunks: Vec::new(),
            merged: Tree::new(),
            layers: Vec::new(),
            reports: Vec::new(),
            seconds: 0.0,
            prefetch: Vec::new(),
            prefetch_seen: Vec::new(),
        })
    }

    /// Paths to fetch first after mount, in order (relative to the image root; one line of a
    /// `--prefetch` file each). Each layer's bootstrap lists those this layer provides; set it
    /// before the first layer is added.
    pub fn set_prefetch(&mut self, paths: Vec<Vec<u8>>) {
        self.prefetch_seen = vec![Ok(false); paths.len()];
        self.prefetch = paths;
    }

    /// Fails if a path of the prefetch list was in no layer: call it once every layer is added.
    pub fn check_prefetch(&self) -> Result<()> {
        for (p, seen) in self.prefetch.iter().zip(&self.prefetch_seen) {
            let path = String::from_utf8_lossy(p);
            match seen {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Error::BadOption(format!(
                        "prefetch path {path} is in no layer of the image"
                    )))
                }
                Err(r) => return Err(Error::BadOption(format!("prefetch path {path}: {r}"))),
            }
        }
        Ok(())
    }

    /// The nodes of layer tree `tree` the prefetch list names, in list order: paths this layer
    /// provides (not its whiteouts; a path the layer lacks is simply not listed).
    fn layer_prefetch(&mut self, tree: &mut Tree) -> Vec<usize> {
        let mut nodes = Vec::new();
        for (p, seen) in self.prefetch.iter().zip(self.prefetch_seen.iter_mut()) {
            match tree.lookup(p) {
                Ok(Some(n)) if !matches!(tree.nodes[n].kind, NodeKind::Char(0)) => {
                    // Hardlinks of one file are one node: listed once.
                    if !nodes.contains(&n) {
                        nodes.push(n);
                    }
                    *seen = Ok(true);
                }
                Ok(_) => {}
                // A symlink or file where this layer has no directory: not in this layer.
                Err(r) => {
                    if *seen != Ok(true) {
                        *seen = Err(r);
                    }
                }
            }
        }
        nodes
    }

    /// Reads the next layer (blob `digest`, `size` bytes) from `src` and writes its bootstrap.
    pub fn add_layer(&mut self, digest: &Sha256, size: u64, src: impl Read) -> Result<&LayerIndex> {
        let start = Instant::now();
        let id = self.layers.len() as u32;
        let name = oci::digest_string(digest);
        let first_seq = self.chunks.len();
        let mut side = SideBlob::new(&self.dir, id);
        let mut read = read_layer(
            src,
            LayerInput {
                layer: id,
                name: &name,
                chunk_size: self.opts.chunk_size,
                span: self.opts.span,
                piece_size: (self.opts.piece_size)(size),
                chunks: &mut self.chunks,
                merged: &mut self.merged,
                side: &mut side,
            },
        )?;
        if read.blob.digest != *digest || read.blob.size != size {
            return Err(Error::Verify {
                object: format!("layer {name}"),
                reason: format!(
                    "the blob read is {} bytes with sha256:{}, the manifest says {size} bytes",
                    read.blob.size,
                    hex::encode(read.blob.digest)
                ),
            });
        }
        settle_span_ends(
            &mut self.chunks[first_seq..],
            id,
            read.compression,
            &read.found,
            read.blob.size,
        );
        let used = used_checkpoints(&self.chunks[first_seq..], id, read.found.len());
        let mut checkpoints = Vec::with_capacity(read.found.len());
        for (f, used) in read.found.iter().zip(used) {
            if !used {
                checkpoints.push(None);
                continue;
            }
            let kind = match &f.kind {
                FoundKind::GzipMember => StoredKind::GzipMember,
                FoundKind::ZstdFrame => StoredKind::ZstdFrame,
                FoundKind::Deflate { bits, .. } => {
                    let w = window_of(f).unwrap_or_default();
                    let hash = *blake3::hash(w).as_bytes();
                    StoredKind::Deflate {
                        bits: *bits,
                        window: side.chunk(&hash, w)?,
                    }
                }
            };
            checkpoints.push(Some(StoredCheckpoint {
                in_offset: f.in_offset,
                out_offset: f.out_offset,
                kind,
            }));
        }
        let side = side.finish(self.opts.piece_size)?;
        let used_count = checkpoints.iter().flatten().count() as u64;
        let zstd_frames = read
            .found
            .iter()
            .filter(|f| matches!(f.kind, FoundKind::ZstdFrame))
            .count();
        self.layers.push(LayerState {
            blob: read.blob.clone(),
            side: side.clone(),
            checkpoints,
        });
        let prefetch = self.layer_prefetch(&mut read.tree);
        let (boot, root) = self.bootstrap(id, &read.tree, &prefetch, &name)?;
        let boot_desc = oci::write_blob(&self.dir, artifact::MEDIA_LAYER_BOOTSTRAP, &boot)?;
        let chunk_count = self.chunks.len() - first_seq;
        tracing::info!(layer = %name, compression = ?read.compression, chunks = chunk_count, checkpoints = used_count, "layer indexed");
        self.reports.push(LayerIndex {
            layer: name,
            size,
            compression: read.compression,
            checkpoints: used_count,
            lazy: !(read.compression == Compression::Zstd && zstd_frames <= 1),
            tar_bytes: read.tar_bytes,
            files: read.files,
            file_bytes: read.file_bytes,
            whiteouts: read.whiteouts,
            opaque_dirs: read.opaque_dirs,
            side_chunks: read.side_chunks,
            prefetch: prefetch.len() as u64,
            bootstrap: (boot_desc.digest().to_string(), boot_desc.size()),
            side_blob: side.map(|s| (oci::digest_string(&s.digest), s.size)),
            root: hex::encode(root),
        });
        self.seconds += start.elapsed().as_secs_f64();
        self.reports
            .last()
            .ok_or_else(|| Error::BadOption("no layer report".into()))
    }

    /// The bootstrap of layer `id`: its overlay-form tree, chunks placed in the blobs they are
    /// in (its own layer blob first, then its side blob, then any other layer's a copied-up
    /// hardlink needs), and the tree nodes `prefetch` as its prefetch table.
    fn bootstrap(
        &self,
        id: u32,
        tree: &Tree,
        prefetch: &[usize],
        name: &str,
    ) -> Result<(Vec<u8>, Blake3)> {
        let chunk_of = |seq: u64| {
            self.chunks
                .get(usize::try_from(seq).ok()?)
                .map(|c| (c.hash, c.size))
        };
        let draft = meta::draft_with(tree, chunk_of, self.opts.chunk_size)?;
        let mut meta = draft.meta;
        // Hardlinks of one layer share an inode: list it once.
        for n in prefetch {
            if let Some(&i) = draft.inode_of.get(n) {
                if !meta.prefetch.contains(&i) {
                    meta.prefetch.push(i);
                }
            }
        }
        let mut seq_of: HashMap<Blake3, u64> = HashMap::new();
        for n in &tree.nodes {
            if let NodeKind::File(f) = &n.kind {
                for &seq in &f.seqs {
                    if let Some(c) = self.chunks.get(seq as usize) {
                        seq_of.entry(c.hash).or_insert(seq);
                    }
                }
            }
        }
        let mut b = Blobs::default();
        b.index(&self.layers, id, false)?;
        if self.layers[id as usize].side.is_some() {
            b.index(&self.layers, id, true)?;
        }
        let place = |c: &ChunkInfo| -> Result<Placement> {
            seq_of
                .get(&c.hash)
                .and_then(|s| self.chunks.get(*s as usize))
                .map(|r| r.place)
                .ok_or_else(|| Error::InvalidMeta(format!("{name}: a chunk has no place")))
        };
        // Checkpoints used, sorted by (blob, offset) as the format wants.
        let mut used: Vec<(u32, u64, u32, u32)> = Vec::new();
        for c in &meta.chunks {
            if let Placement::Span {
                layer, checkpoint, ..
            } = place(c)?
            {
                let cp = self.stored_checkpoint(layer, checkpoint, name)?;
                let blob = b.index(&self.layers, layer, false)?;
                used.push((blob, cp.out_offset, layer, checkpoint));
            }
        }
        used.sort_unstable();
        used.dedup();
        let cp_index: HashMap<(u32, u32), u32> = used
            .iter()
            .enumerate()
            .map(|(i, u)| ((u.2, u.3), i as u32))
            .collect();
        for i in 0..meta.chunks.len() {
            let c = meta.chunks[i];
            let (blob, offset, stored_size, encoding) = match place(&c)? {
                Placement::Range { layer, offset } => (
                    b.index(&self.layers, layer, false)?,
                    offset,
                    c.size,
                    ChunkEncoding::Raw,
                ),
                Placement::Side { layer, chunk } => (
                    b.index(&self.layers, layer, true)?,
                    chunk.offset,
                    chunk.stored_size,
                    chunk.encoding,
                ),
                Placement::Span {
                    layer,
                    checkpoint,
                    end_in,
                    skip,
                } => {
                    let cp = self.stored_checkpoint(layer, checkpoint, name)?;
                    let stored = u32::try_from(end_in - cp.in_offset).map_err(|_| {
                        Error::BadSource {
                            source_name: name.to_string(),
                            reason: "a chunk lies more than 4 GiB of compressed data after its checkpoint (a zstd frame that long); this layer cannot be indexed".into(),
                        }
                    })?;
                    (
                        b.index(&self.layers, layer, false)?,
                        cp.in_offset,
                        stored,
                        ChunkEncoding::Span {
                            checkpoint: cp_index[&(layer, checkpoint)],
                            skip,
                        },
                    )
                }
            };
            let ci = &mut meta.chunks[i];
            (ci.blob, ci.offset, ci.stored_size, ci.encoding) =
                (blob, offset, stored_size, encoding);
        }
        for &(blob, _, layer, checkpoint) in &used {
            let cp = self.stored_checkpoint(layer, checkpoint, name)?;
            let kind = match cp.kind {
                StoredKind::GzipMember => CheckpointKind::GzipMember,
                StoredKind::ZstdFrame => CheckpointKind::ZstdFrame,
                StoredKind::Deflate { bits, window } => {
                    meta.chunks.push(ChunkInfo {
                        hash: window.hash,
                        blob: b.index(&self.layers, layer, true)?,
                        offset: window.offset,
                        stored_size: window.stored_size,
                        size: window.size,
                        encoding: window.encoding,
                    });
                    CheckpointKind::Deflate {
                        bits,
                        window: (meta.chunks.len() - 1) as u32,
                    }
                }
            };
            meta.checkpoints.push(Checkpoint {
                blob,
                in_offset: cp.in_offset,
                out_offset: cp.out_offset,
                kind,
            });
        }
        meta.blobs = b.infos;
        let root = merkle::compute(&mut meta)?;
        Ok((bootstrap::encode(&meta)?, root))
    }

    fn stored_checkpoint(&self, layer: u32, cp: u32, name: &str) -> Result<StoredCheckpoint> {
        self.layers
            .get(layer as usize)
            .and_then(|l| l.checkpoints.get(cp as usize).copied().flatten())
            .ok_or_else(|| Error::InvalidMeta(format!("{name}: a chunk's checkpoint is missing")))
    }

    /// The layout the index is written into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options in use.
    pub fn options(&self) -> &IndexOptions {
        &self.opts
    }
}

/// Bytes of compressed input past what inflate had consumed when a chunk's last byte came out,
/// kept in a gzip span (inflate needs no more; a margin costs nothing).
const GZIP_SLACK: u64 = 64;

/// Where each span of layer `id` ends. zstd decodes a block only once the whole block is there
/// (however much of it its decoder reported consumed), so a zstd span runs to the end of the
/// frame holding the chunk's last byte; a gzip span to what inflate consumed, plus a margin.
fn settle_span_ends(
    chunks: &mut [ChunkRec],
    id: u32,
    compression: Compression,
    found: &[stream::Found],
    blob_size: u64,
) {
    for c in chunks {
        let Placement::Span {
            layer,
            checkpoint,
            end_in,
            skip,
        } = &mut c.place
        else {
            continue;
        };
        if *layer != id {
            continue;
        }
        *end_in = match compression {
            Compression::Zstd => {
                let start = found.get(*checkpoint as usize).map_or(0, |f| f.out_offset);
                let end = start + *skip + u64::from(c.size);
                found
                    .iter()
                    .find(|f| f.out_offset >= end)
                    .map_or(blob_size, |f| f.in_offset)
            }
            _ => (*end_in + GZIP_SLACK).min(blob_size),
        };
    }
}

/// A bootstrap's blob table as it is built: (layer, side?) -> index.
#[derive(Default)]
struct Blobs {
    infos: Vec<BlobInfo>,
    index: HashMap<(u32, bool), u32>,
}

impl Blobs {
    fn index(&mut self, layers: &[LayerState], layer: u32, side: bool) -> Result<u32> {
        if let Some(i) = self.index.get(&(layer, side)) {
            return Ok(*i);
        }
        let l = layers
            .get(layer as usize)
            .ok_or_else(|| Error::InvalidMeta(format!("no layer {layer}")))?;
        let info = if side {
            l.side.clone()
        } else {
            Some(l.blob.clone())
        };
        let info =
            info.ok_or_else(|| Error::InvalidMeta(format!("layer {layer} has no side blob")))?;
        self.infos.push(info);
        let i = (self.infos.len() - 1) as u32;
        self.index.insert((layer, side), i);
        Ok(i)
    }
}
