//! Loading a bootstrap: header, checksum and section bounds, then the structure (validate.rs).
//!
//! Nothing is copied: [`Bootstrap`] keeps the bytes (a `Vec`, `Bytes` or an mmap) and the section
//! ranges, and every accessor reinterprets the records in place.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::Path;

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, KnownLayout};

use super::encode::checksum;
use super::layout::{
    BlobRecord, CheckpointRecord, ChunkRecord, DirentRecord, Header, InodeRecord, Section,
    SectionRef, SpanRecord, XattrRecord, HEADER_SIZE, HEADER_SIZE_1_1, INCOMPATIBLE_FLAGS,
    KNOWN_INCOMPATIBLE_FLAGS, MAGIC, MAJOR, MAX_CHUNK_SIZE, MINOR, MIN_CHUNK_SIZE, SECTION_COUNT,
    SECTION_COUNT_1_0,
};
use super::validate;
use crate::{Error, Result};

/// A validated bootstrap, read in place (docs/format.md, "Bootstrap").
pub struct Bootstrap {
    data: Box<dyn AsRef<[u8]> + Send + Sync>,
    pub(super) header: Header,
    ranges: [Range<usize>; SECTION_COUNT],
}

impl fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bootstrap")
            .field("len", &self.bytes().len())
            .field("root_hash", &hex::encode(self.header.root_hash))
            .finish_non_exhaustive()
    }
}

/// All sections of a bootstrap as typed slices.
#[derive(Clone, Copy)]
pub(crate) struct Tables<'a> {
    pub inodes: &'a [InodeRecord],
    pub dirents: &'a [DirentRecord],
    pub xattrs: &'a [XattrRecord],
    pub chunks: &'a [ChunkRecord],
    pub file_chunks: &'a [U32],
    pub blobs: &'a [BlobRecord],
    pub pieces: &'a [[u8; 32]],
    pub prefetch: &'a [U32],
    pub strings: &'a [u8],
    pub checkpoints: &'a [CheckpointRecord],
    pub spans: &'a [SpanRecord],
}

impl Bootstrap {
    /// Validate `bytes` as a bootstrap and keep them as its backing store.
    pub fn load<B>(bytes: B) -> Result<Self>
    where
        B: AsRef<[u8]> + Send + Sync + 'static,
    {
        let (header, ranges) = validate_bytes(bytes.as_ref())?;
        Ok(Bootstrap {
            data: Box::new(bytes),
            header,
            ranges,
        })
    }

    /// Map the file at `path` and validate it.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |op, source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(|e| io("opening bootstrap", e))?;
        // SAFETY: bootstraps are content-addressed files that are written once and never modified
        // in place; the map is read-only. A concurrent truncation by another process would fault,
        // the usual trade-off of mapping a file.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("mapping bootstrap", e))?;
        Self::load(map).map_err(|e| match e {
            Error::InvalidBootstrap(msg) => {
                Error::InvalidBootstrap(format!("{}: {msg}", path.display()))
            }
            other => other,
        })
    }

    /// The whole bootstrap as bytes.
    pub fn bytes(&self) -> &[u8] {
        (*self.data).as_ref()
    }

    /// The typed records of one section (empty only if validation was skipped, which it never is).
    pub(super) fn section<T: FromBytes + KnownLayout + Immutable + ?Sized>(&self, s: Section) -> &T
    where
        for<'a> &'a T: Default,
    {
        let range = self.ranges[s as usize].clone();
        self.bytes()
            .get(range)
            .and_then(|b| T::ref_from_bytes(b).ok())
            .unwrap_or_default()
    }

    pub(super) fn tables(&self) -> Tables<'_> {
        Tables {
            inodes: self.section(Section::Inodes),
            dirents: self.section(Section::Dirents),
            xattrs: self.section(Section::Xattrs),
            chunks: self.section(Section::Chunks),
            file_chunks: self.section(Section::FileChunks),
            blobs: self.section(Section::Blobs),
            pieces: self.section(Section::Pieces),
            prefetch: self.section(Section::Prefetch),
            strings: self.section(Section::Strings),
            checkpoints: self.section(Section::Checkpoints),
            spans: self.section(Section::Spans),
        }
    }
}

fn bad(msg: String) -> Error {
    Error::InvalidBootstrap(msg)
}

/// Check everything about `bytes`; return the header and the byte range of each section.
pub(crate) fn validate_bytes(bytes: &[u8]) -> Result<(Header, [Range<usize>; SECTION_COUNT])> {
    let header = header(bytes)?;
    let ranges = sections(&header, bytes)?;
    let tables = tables(bytes, &ranges)?;
    validate::structure(&tables, &header)?;
    Ok((header, ranges))
}

/// Magic, version, sizes, flags, checksum and chunk size.
fn header(bytes: &[u8]) -> Result<Header> {
    let (header, _) = Header::read_from_prefix(bytes).map_err(|_| {
        bad(format!(
            "file is {} bytes, shorter than the {HEADER_SIZE}-byte header",
            bytes.len()
        ))
    })?;
    if header.magic != MAGIC {
        return Err(bad(format!(
            "bad magic {:02x?}: not a Shoal bootstrap",
            header.magic
        )));
    }
    if header.major.get() != MAJOR {
        return Err(Error::UnsupportedVersion {
            major: header.major.get(),
            minor: header.minor.get(),
            supported: MAJOR,
        });
    }
    let header_size = header.header_size.get() as usize;
    if header_size < HEADER_SIZE || header_size > bytes.len() {
        return Err(bad(format!(
            "header size {header_size} is below {HEADER_SIZE} or beyond the file's {} bytes",
            bytes.len()
        )));
    }
    if header.total_size.get() != bytes.len() as u64 {
        return Err(bad(format!(
            "header says the file is {} bytes but it is {} (truncated or padded copy)",
            header.total_size.get(),
            bytes.len()
        )));
    }
    let unknown = header.flags.get() & INCOMPATIBLE_FLAGS & !KNOWN_INCOMPATIBLE_FLAGS;
    if unknown != 0 {
        return Err(bad(format!(
            "unknown incompatible flags {unknown:#x}: written by a newer shoal"
        )));
    }
    let sum = checksum(bytes);
    if sum != header.checksum {
        return Err(Error::ChecksumMismatch {
            stored: hex::encode(header.checksum),
            computed: hex::encode(sum),
        });
    }
    let cs = header.chunk_size.get();
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(bad(format!(
            "chunk size {cs} is not a power of two from 64 KiB to 16 MiB"
        )));
    }
    Ok(header)
}

/// The section references: the nine of 1.0 in the header, the two of 1.1 right after it. A 1.0
/// file has no 1.1 sections: they are empty, at the end of the last 1.0 section.
fn section_refs(header: &Header, bytes: &[u8]) -> Result<[Option<SectionRef>; SECTION_COUNT]> {
    let mut refs: [Option<SectionRef>; SECTION_COUNT] = [None; SECTION_COUNT];
    for (r, s) in refs.iter_mut().zip(header.sections) {
        *r = Some(s);
    }
    if header.minor.get() >= 1 {
        let header_size = header.header_size.get() as usize;
        if header_size < HEADER_SIZE_1_1 {
            return Err(bad(format!(
                "header size {header_size} of a 1.{} bootstrap is below {HEADER_SIZE_1_1}",
                header.minor.get()
            )));
        }
        let (ext, _) = <[SectionRef; SECTION_COUNT - SECTION_COUNT_1_0]>::read_from_prefix(
            bytes.get(HEADER_SIZE..).unwrap_or_default(),
        )
        .map_err(|_| bad("the 1.1 section references are cut off".into()))?;
        for (r, s) in refs[SECTION_COUNT_1_0..].iter_mut().zip(ext) {
            *r = Some(s);
        }
    }
    Ok(refs)
}

/// Sections lie back to back in [`Section::ALL`] order from the end of the header, inside the file.
fn sections(header: &Header, bytes: &[u8]) -> Result<[Range<usize>; SECTION_COUNT]> {
    let len = bytes.len();
    let refs = section_refs(header, bytes)?;
    let mut ranges: [Range<usize>; SECTION_COUNT] = Default::default();
    let mut cursor = u64::from(header.header_size.get());
    for s in Section::ALL {
        let Some(r) = refs[s as usize] else {
            ranges[s as usize] = cursor as usize..cursor as usize;
            continue;
        };
        let (offset, count) = (r.offset.get(), r.count.get());
        if offset != cursor {
            return Err(bad(format!(
                "section {} starts at byte {offset}, expected {cursor} (sections are back to back in order)",
                s.name()
            )));
        }
        if count > u64::from(u32::MAX) {
            return Err(bad(format!(
                "section {} has {count} records, over the 2^32 limit",
                s.name()
            )));
        }
        let end = count
            .checked_mul(s.record_size() as u64)
            .and_then(|n| n.checked_add(offset))
            .filter(|&end| end <= len as u64)
            .ok_or_else(|| {
                bad(format!(
                    "section {} ({count} records at byte {offset}) runs past the end of the {len}-byte file",
                    s.name()
                ))
            })?;
        ranges[s as usize] = offset as usize..end as usize;
        cursor = end;
    }
    // A later minor version may append sections this build does not know; this one may not.
    let newer_minor = header.minor.get() > MINOR;
    if !newer_minor && cursor != len as u64 {
        return Err(bad(format!(
            "{} unaccounted bytes after the last section",
            len as u64 - cursor
        )));
    }
    Ok(ranges)
}

fn tables<'a>(bytes: &'a [u8], ranges: &[Range<usize>; SECTION_COUNT]) -> Result<Tables<'a>> {
    fn get<'a, T: FromBytes + KnownLayout + Immutable + ?Sized>(
        bytes: &'a [u8],
        ranges: &[Range<usize>; SECTION_COUNT],
        s: Section,
    ) -> Result<&'a T> {
        bytes
            .get(ranges[s as usize].clone())
            .and_then(|b| T::ref_from_bytes(b).ok())
            .ok_or_else(|| bad(format!("section {} is misaligned", s.name())))
    }
    Ok(Tables {
        inodes: get(bytes, ranges, Section::Inodes)?,
        dirents: get(bytes, ranges, Section::Dirents)?,
        xattrs: get(bytes, ranges, Section::Xattrs)?,
        chunks: get(bytes, ranges, Section::Chunks)?,
        file_chunks: get(bytes, ranges, Section::FileChunks)?,
        blobs: get(bytes, ranges, Section::Blobs)?,
        pieces: get(bytes, ranges, Section::Pieces)?,
        prefetch: get(bytes, ranges, Section::Prefetch)?,
        strings: get(bytes, ranges, Section::Strings)?,
        checkpoints: get(bytes, ranges, Section::Checkpoints)?,
        spans: get(bytes, ranges, Section::Spans)?,
    })
}
