//! Read accessors over a validated [`Bootstrap`]: what the file system and `unpack` ask for.
//!
//! Every method reads the records in place; none allocates except [`Bootstrap::to_meta`].

use zerocopy::little_endian::U32;

use super::layout::{
    BlobRecord, CheckpointRecord, ChunkRecord, DirentRecord, InodeKind, InodeRecord, Section,
    SpanRecord, XattrRecord, CHECKPOINT_DEFLATE, CHECKPOINT_GZIP_MEMBER, ENCODING_RAW,
    ENCODING_ZSTD,
};
use super::load::{Bootstrap, Tables};
use super::validate::{entries, kind, string};
use crate::model::{
    Blake3, BlobInfo, Checkpoint, CheckpointKind, ChunkEncoding, ChunkInfo, DirEntry, FileData,
    ImageMeta, Inode, InodeIndex, Payload, Sha256,
};
use crate::{Error, Result};

/// One inode's metadata, read in place.
#[derive(Clone, Copy, Debug)]
pub struct InodeView<'a> {
    ino: InodeIndex,
    rec: &'a InodeRecord,
}

impl InodeView<'_> {
    /// The inode number (index; the root is 0).
    pub fn ino(&self) -> InodeIndex {
        self.ino
    }
    /// What kind of object this is.
    pub fn kind(&self) -> InodeKind {
        kind(self.rec)
    }
    /// Full `st_mode`.
    pub fn mode(&self) -> u32 {
        self.rec.mode.get()
    }
    /// Owner user id.
    pub fn uid(&self) -> u32 {
        self.rec.uid.get()
    }
    /// Owner group id.
    pub fn gid(&self) -> u32 {
        self.rec.gid.get()
    }
    /// Modification time, seconds since the epoch.
    pub fn mtime(&self) -> i64 {
        self.rec.mtime.get()
    }
    /// Nanoseconds of the modification time.
    pub fn mtime_nsec(&self) -> u32 {
        self.rec.mtime_nsec.get()
    }
    /// Number of names (2 + subdirectories for a directory).
    pub fn nlink(&self) -> u32 {
        self.rec.nlink.get()
    }
    /// `st_size`: file size, symlink target length, otherwise 0.
    pub fn size(&self) -> u64 {
        match self.kind() {
            InodeKind::File | InodeKind::Symlink => self.rec.size.get(),
            _ => 0,
        }
    }
    /// Device number of a character or block device, otherwise 0.
    pub fn rdev(&self) -> u64 {
        match self.kind() {
            InodeKind::CharDevice | InodeKind::BlockDevice => self.rec.size.get(),
            _ => 0,
        }
    }
    /// Merkle hash of this node.
    pub fn hash(&self) -> Blake3 {
        self.rec.hash
    }
    /// Number of chunks of a regular file, otherwise 0.
    pub fn chunk_count(&self) -> u32 {
        match self.kind() {
            InodeKind::File => self.rec.data_count.get(),
            _ => 0,
        }
    }
}

/// One directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntryView<'a> {
    /// The name (no `/`, no NUL, not `.` or `..`).
    pub name: &'a [u8],
    /// The inode it names.
    pub ino: InodeIndex,
    /// Offset to pass to [`Bootstrap::read_dir`] to resume after this entry.
    pub next_offset: u64,
}

/// The entries of a directory from an offset on, in name order.
pub struct ReadDir<'a> {
    tables: Tables<'a>,
    entries: &'a [DirentRecord],
    pos: usize,
}

impl<'a> Iterator for ReadDir<'a> {
    type Item = DirEntryView<'a>;
    fn next(&mut self) -> Option<Self::Item> {
        let e = self.entries.get(self.pos)?;
        self.pos += 1;
        Some(DirEntryView {
            name: string(
                &self.tables,
                e.name_offset.get(),
                u64::from(e.name_len.get()),
            )
            .unwrap_or_default(),
            ino: e.inode.get(),
            next_offset: self.pos as u64,
        })
    }
}

/// An inode's extended attributes as `(name, value)`, sorted by name.
pub struct Xattrs<'a> {
    tables: Tables<'a>,
    records: std::slice::Iter<'a, XattrRecord>,
}

impl<'a> Iterator for Xattrs<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let x = self.records.next()?;
        Some(xattr_pair(&self.tables, x))
    }
}

fn xattr_pair<'a>(t: &Tables<'a>, x: &XattrRecord) -> (&'a [u8], &'a [u8]) {
    (
        string(t, x.key_offset.get(), u64::from(x.key_len.get())).unwrap_or_default(),
        string(t, x.value_offset.get(), u64::from(x.value_len.get())).unwrap_or_default(),
    )
}

/// Where one chunk lives and how it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkView {
    /// Index in the chunk table.
    pub index: u32,
    /// BLAKE3 of the uncompressed bytes.
    pub hash: Blake3,
    /// Index of the blob holding it.
    pub blob: u32,
    /// Offset of the stored form in the blob.
    pub offset: u64,
    /// Length of the stored form.
    pub stored_size: u32,
    /// Uncompressed length.
    pub size: u32,
    /// How the stored form is encoded.
    pub encoding: ChunkEncoding,
}

fn chunk_view(index: u32, c: &ChunkRecord, spans: &[SpanRecord]) -> ChunkView {
    ChunkView {
        index,
        hash: c.hash,
        blob: u32::from(c.blob.get()),
        offset: c.offset.get(),
        stored_size: c.stored_size.get(),
        size: c.size.get(),
        encoding: match c.encoding {
            ENCODING_RAW => ChunkEncoding::Raw,
            ENCODING_ZSTD => ChunkEncoding::Zstd,
            // Validation guarantees a span record for every span chunk.
            _ => {
                let s = spans.get(index as usize);
                ChunkEncoding::Span {
                    checkpoint: s.map_or(0, |s| s.checkpoint.get()),
                    skip: s.map_or(0, |s| s.skip.get()),
                }
            }
        },
    }
}

fn checkpoint_of(c: &CheckpointRecord) -> Checkpoint {
    Checkpoint {
        blob: u32::from(c.blob.get()),
        in_offset: c.in_offset.get(),
        out_offset: c.out_offset.get(),
        kind: match c.kind {
            CHECKPOINT_GZIP_MEMBER => CheckpointKind::GzipMember,
            CHECKPOINT_DEFLATE => CheckpointKind::Deflate {
                bits: c.bits,
                window: c.window.get(),
            },
            _ => CheckpointKind::ZstdFrame,
        },
    }
}

/// The chunks of one file, in file order (chunk `k` covers bytes `k * chunk_size ..`).
#[derive(Clone, Copy)]
pub struct FileChunks<'a> {
    chunks: &'a [ChunkRecord],
    spans: &'a [SpanRecord],
    list: &'a [U32],
}

impl<'a> FileChunks<'a> {
    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.list.len()
    }
    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
    /// The `k`th chunk of the file.
    pub fn get(&self, k: usize) -> Option<ChunkView> {
        let index = self.list.get(k)?.get();
        self.chunks
            .get(index as usize)
            .map(|c| chunk_view(index, c, self.spans))
    }
    /// All chunks in file order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = ChunkView> + 'a {
        let (chunks, spans) = (self.chunks, self.spans);
        self.list.iter().map(move |i| {
            let index = i.get();
            chunks
                .get(index as usize)
                .map(|c| chunk_view(index, c, spans))
                .unwrap_or(ChunkView {
                    index,
                    hash: [0; 32],
                    blob: 0,
                    offset: 0,
                    stored_size: 0,
                    size: 0,
                    encoding: ChunkEncoding::Raw,
                })
        })
    }
}

/// One data blob and its piece table.
#[derive(Clone, Copy, Debug)]
pub struct BlobView<'a> {
    /// sha256 of the blob: its OCI digest.
    pub digest: Sha256,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Piece size in bytes; the last piece may be shorter.
    pub piece_size: u32,
    /// BLAKE3 of each piece, in order.
    pub pieces: &'a [Blake3],
}

fn blob_view<'a>(t: &Tables<'a>, b: &BlobRecord) -> BlobView<'a> {
    let start = b.piece_start.get() as usize;
    let end = start.saturating_add(b.piece_count.get() as usize);
    BlobView {
        digest: b.digest,
        size: b.size.get(),
        piece_size: b.piece_size.get(),
        pieces: t.pieces.get(start..end).unwrap_or_default(),
    }
}

impl Bootstrap {
    /// Format version `(major, minor)`.
    pub fn version(&self) -> (u16, u16) {
        (self.header.major.get(), self.header.minor.get())
    }
    /// Uncompressed chunk size of the image.
    pub fn chunk_size(&self) -> u32 {
        self.header.chunk_size.get()
    }
    /// Merkle hash of the root directory: the image's name.
    pub fn root_hash(&self) -> Blake3 {
        self.header.root_hash
    }
    /// Number of inodes (valid inode numbers are `0..inode_count()`).
    pub fn inode_count(&self) -> u32 {
        self.section::<[InodeRecord]>(Section::Inodes).len() as u32
    }
    /// Number of directory entries.
    pub fn dirent_count(&self) -> u32 {
        self.section::<[DirentRecord]>(Section::Dirents).len() as u32
    }
    /// Number of unique chunks.
    pub fn chunk_count(&self) -> u32 {
        self.section::<[ChunkRecord]>(Section::Chunks).len() as u32
    }
    /// Number of data blobs.
    pub fn blob_count(&self) -> u32 {
        self.section::<[BlobRecord]>(Section::Blobs).len() as u32
    }
    /// Number of extended attributes over all inodes.
    pub fn xattr_count(&self) -> u32 {
        self.section::<[XattrRecord]>(Section::Xattrs).len() as u32
    }

    fn record(&self, ino: InodeIndex) -> Result<&InodeRecord> {
        let inodes: &[InodeRecord] = self.section(Section::Inodes);
        inodes.get(ino as usize).ok_or(Error::NoSuchInode {
            ino,
            count: inodes.len() as u32,
        })
    }

    fn record_of(&self, ino: InodeIndex, expected: InodeKind) -> Result<&InodeRecord> {
        let rec = self.record(ino)?;
        if kind(rec) != expected {
            return Err(Error::WrongKind {
                ino,
                expected: expected.name(),
                found: kind(rec).name(),
            });
        }
        Ok(rec)
    }

    /// The inode `ino`, or `None` if there is no such inode.
    pub fn inode(&self, ino: InodeIndex) -> Option<InodeView<'_>> {
        self.record(ino).ok().map(|rec| InodeView { ino, rec })
    }

    /// The inode named `name` in directory `dir` (binary search over the sorted entries).
    pub fn lookup(&self, dir: InodeIndex, name: &[u8]) -> Result<Option<InodeIndex>> {
        let t = self.tables();
        let list = entries(&t, self.record_of(dir, InodeKind::Directory)?);
        let found = list.binary_search_by(|e| {
            string(&t, e.name_offset.get(), u64::from(e.name_len.get()))
                .unwrap_or_default()
                .cmp(name)
        });
        Ok(found.ok().and_then(|i| list.get(i)).map(|e| e.inode.get()))
    }

    /// The entries of directory `dir` from `offset` on (0 = the first; then `next_offset`).
    pub fn read_dir(&self, dir: InodeIndex, offset: u64) -> Result<ReadDir<'_>> {
        let t = self.tables();
        let list = entries(&t, self.record_of(dir, InodeKind::Directory)?);
        Ok(ReadDir {
            tables: t,
            entries: list,
            pos: usize::try_from(offset).unwrap_or(usize::MAX),
        })
    }

    /// The target of symlink `ino`.
    pub fn read_link(&self, ino: InodeIndex) -> Result<&[u8]> {
        let rec = self.record_of(ino, InodeKind::Symlink)?;
        Ok(string(&self.tables(), rec.data_start.get(), rec.size.get()).unwrap_or_default())
    }

    /// The extended attributes of `ino`, sorted by name.
    pub fn xattrs(&self, ino: InodeIndex) -> Result<Xattrs<'_>> {
        let t = self.tables();
        let run = self.xattr_run(&t, ino)?;
        Ok(Xattrs {
            records: run.iter(),
            tables: t,
        })
    }

    /// The value of extended attribute `name` of `ino`, if it has one.
    pub fn xattr(&self, ino: InodeIndex, name: &[u8]) -> Result<Option<&[u8]>> {
        let t = self.tables();
        let run = self.xattr_run(&t, ino)?;
        let found = run.binary_search_by(|x| xattr_pair(&t, x).0.cmp(name));
        Ok(found
            .ok()
            .and_then(|i| run.get(i))
            .map(|x| xattr_pair(&t, x).1))
    }

    fn xattr_run<'a>(&'a self, t: &Tables<'a>, ino: InodeIndex) -> Result<&'a [XattrRecord]> {
        let start = self.record(ino)?.xattr_start.get() as usize;
        let end = t
            .inodes
            .get(ino as usize + 1)
            .map_or(t.xattrs.len(), |r| r.xattr_start.get() as usize);
        Ok(t.xattrs.get(start..end).unwrap_or_default())
    }

    /// The chunks of regular file `ino`, in file order.
    pub fn file_chunks(&self, ino: InodeIndex) -> Result<FileChunks<'_>> {
        let rec = self.record_of(ino, InodeKind::File)?;
        let t = self.tables();
        let start = rec.data_start.get() as usize;
        let end = start.saturating_add(rec.data_count.get() as usize);
        Ok(FileChunks {
            chunks: t.chunks,
            spans: t.spans,
            list: t.file_chunks.get(start..end).unwrap_or_default(),
        })
    }

    /// Chunk `index` of the chunk table.
    pub fn chunk(&self, index: u32) -> Option<ChunkView> {
        let t = self.tables();
        t.chunks
            .get(index as usize)
            .map(|c| chunk_view(index, c, t.spans))
    }

    /// Number of checkpoints (1.1; 0 for a converted image).
    pub fn checkpoint_count(&self) -> u32 {
        self.section::<[CheckpointRecord]>(Section::Checkpoints)
            .len() as u32
    }

    /// Checkpoint `index`: where a span chunk's decoding starts.
    pub fn checkpoint(&self, index: u32) -> Option<Checkpoint> {
        let cps: &[CheckpointRecord] = self.section(Section::Checkpoints);
        cps.get(index as usize).map(checkpoint_of)
    }

    /// The data blobs in table order.
    pub fn blobs(&self) -> impl ExactSizeIterator<Item = BlobView<'_>> + '_ {
        let t = self.tables();
        t.blobs.iter().map(move |b| blob_view(&t, b))
    }

    /// Blob `index` of the blob table.
    pub fn blob(&self, index: u32) -> Option<BlobView<'_>> {
        let t = self.tables();
        t.blobs.get(index as usize).map(|b| blob_view(&t, b))
    }

    /// Inodes to fetch first after mount, in order.
    pub fn prefetch(&self) -> impl ExactSizeIterator<Item = InodeIndex> + '_ {
        let list: &[U32] = self.section(Section::Prefetch);
        list.iter().map(|i| i.get())
    }

    /// The owned form: `Bootstrap::load(encode(m)?)?.to_meta() == m`.
    pub fn to_meta(&self) -> ImageMeta {
        let t = self.tables();
        let inodes = t
            .inodes
            .iter()
            .enumerate()
            .map(|(ino, rec)| self.inode_meta(&t, ino as InodeIndex, rec))
            .collect();
        ImageMeta {
            chunk_size: self.chunk_size(),
            blobs: self
                .blobs()
                .map(|b| BlobInfo {
                    digest: b.digest,
                    size: b.size,
                    piece_size: b.piece_size,
                    pieces: b.pieces.to_vec(),
                })
                .collect(),
            chunks: t
                .chunks
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let v = chunk_view(i as u32, c, t.spans);
                    ChunkInfo {
                        hash: v.hash,
                        blob: v.blob,
                        offset: v.offset,
                        stored_size: v.stored_size,
                        size: v.size,
                        encoding: v.encoding,
                    }
                })
                .collect(),
            inodes,
            prefetch: self.prefetch().collect(),
            checkpoints: t.checkpoints.iter().map(checkpoint_of).collect(),
        }
    }

    fn inode_meta(&self, t: &Tables<'_>, ino: InodeIndex, rec: &InodeRecord) -> Inode {
        let payload = match kind(rec) {
            InodeKind::Directory => Payload::Dir(
                entries(t, rec)
                    .iter()
                    .map(|e| DirEntry {
                        name: string(t, e.name_offset.get(), u64::from(e.name_len.get()))
                            .unwrap_or_default()
                            .to_vec(),
                        inode: e.inode.get(),
                    })
                    .collect(),
            ),
            InodeKind::File => Payload::File(FileData {
                size: rec.size.get(),
                chunks: self
                    .file_chunks(ino)
                    .map(|f| f.list.iter().map(|i| i.get()).collect())
                    .unwrap_or_default(),
            }),
            InodeKind::Symlink => {
                Payload::Symlink(self.read_link(ino).unwrap_or_default().to_vec())
            }
            InodeKind::CharDevice | InodeKind::BlockDevice => Payload::Device(rec.size.get()),
            InodeKind::Fifo | InodeKind::Socket => Payload::Special,
        };
        Inode {
            mode: rec.mode.get(),
            uid: rec.uid.get(),
            gid: rec.gid.get(),
            mtime: rec.mtime.get(),
            mtime_nsec: rec.mtime_nsec.get(),
            nlink: rec.nlink.get(),
            xattrs: self
                .xattrs(ino)
                .map(|x| x.map(|(k, v)| (k.to_vec(), v.to_vec())).collect())
                .unwrap_or_default(),
            payload,
            hash: rec.hash,
        }
    }
}
