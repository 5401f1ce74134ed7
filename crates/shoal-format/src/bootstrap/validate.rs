//! Structural validation of a bootstrap whose header, checksum and section bounds already passed.
//!
//! One pass per table, O(size of the file). The only heap it takes is a name count per inode and a
//! reachability bitset (about 4.2 bytes per inode), freed on return; the rules are listed in
//! docs/format.md, "Validation".

use super::layout::{
    BlobRecord, Header, InodeKind, InodeRecord, CHECKPOINT_DEFLATE, CHECKPOINT_GZIP_MEMBER,
    CHECKPOINT_ZSTD_FRAME, ENCODING_RAW, ENCODING_SPAN, ENCODING_ZSTD, FLAG_SPANS, MAX_NAME,
    MAX_PIECE_SIZE, MAX_SYMLINK, MAX_WINDOW, MAX_XATTR_NAME, MAX_XATTR_VALUE, MIN_PIECE_SIZE,
    MODE_MASK, NO_WINDOW,
};
use super::load::Tables;
use crate::{Error, Result};

fn bad(msg: String) -> Error {
    Error::InvalidBootstrap(msg)
}

/// `name` quoted for messages (lossy UTF-8).
pub(crate) fn show(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}

/// Check every table and the links between them.
pub(crate) fn structure(t: &Tables<'_>, header: &Header) -> Result<()> {
    let chunk_size = header.chunk_size.get();
    blobs(t)?;
    chunks(t, chunk_size)?;
    checkpoints(t)?;
    spans(t, header.flags.get() & FLAG_SPANS != 0)?;
    inodes(t, chunk_size)?;
    tree(t)?;
    for (i, ino) in t.prefetch.iter().enumerate() {
        if ino.get() as usize >= t.inodes.len() {
            return Err(bad(format!(
                "prefetch entry {i} names inode {ino}, but there are {} inodes",
                t.inodes.len()
            )));
        }
    }
    let root = t.inodes.first().map(|r| r.hash).unwrap_or_default();
    if root != header.root_hash {
        return Err(bad(format!(
            "header root hash {} differs from the root directory's hash {}",
            hex::encode(header.root_hash),
            hex::encode(root)
        )));
    }
    Ok(())
}

/// The bytes `len` long at `offset` of the string heap, if they are inside it.
pub(crate) fn string<'a>(t: &Tables<'a>, offset: u32, len: u64) -> Option<&'a [u8]> {
    let start = offset as usize;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    t.strings.get(start..end)
}

/// The kind of an inode record that passed [`inodes`].
pub(crate) fn kind(rec: &InodeRecord) -> InodeKind {
    InodeKind::from_mode(rec.mode.get()).unwrap_or(InodeKind::Fifo)
}

fn blobs(t: &Tables<'_>) -> Result<()> {
    let mut next = 0u64;
    for (i, b) in t.blobs.iter().enumerate() {
        let name = || format!("blob {i} (sha256:{})", hex::encode(b.digest));
        let ps = b.piece_size.get();
        if !ps.is_power_of_two() || !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&ps) {
            return Err(bad(format!(
                "{}: piece size {ps} is not a power of two from 4 KiB to 1 GiB",
                name()
            )));
        }
        let (start, count) = (
            u64::from(b.piece_start.get()),
            u64::from(b.piece_count.get()),
        );
        if start != next {
            return Err(bad(format!(
                "{}: piece table starts at hash {start}, expected {next} (tables are back to back)",
                name()
            )));
        }
        let want = b.size.get().div_ceil(u64::from(ps));
        if count != want {
            return Err(bad(format!(
                "{}: {count} piece hashes for {} bytes in {ps}-byte pieces (expected {want})",
                name(),
                b.size.get()
            )));
        }
        next = start + count;
        if next > t.pieces.len() as u64 {
            return Err(bad(format!(
                "{}: piece table runs past the {} piece hashes",
                name(),
                t.pieces.len()
            )));
        }
    }
    if next != t.pieces.len() as u64 {
        return Err(bad(format!(
            "{} piece hashes belong to no blob",
            t.pieces.len() as u64 - next
        )));
    }
    Ok(())
}

fn chunks(t: &Tables<'_>, chunk_size: u32) -> Result<()> {
    for (i, c) in t.chunks.iter().enumerate() {
        let blob_index = c.blob.get();
        let blob: &BlobRecord = t.blobs.get(usize::from(blob_index)).ok_or_else(|| {
            bad(format!(
                "chunk {i}: blob index {blob_index} out of range ({} blobs)",
                t.blobs.len()
            ))
        })?;
        let (size, stored) = (c.size.get(), c.stored_size.get());
        if size == 0 || size > chunk_size {
            return Err(bad(format!(
                "chunk {i}: size {size} is not in 1..={chunk_size} (the chunk size)"
            )));
        }
        match c.encoding {
            ENCODING_RAW if stored != size => {
                return Err(bad(format!(
                    "chunk {i}: raw chunk stores {stored} bytes for {size}"
                )))
            }
            ENCODING_ZSTD if stored == 0 => {
                return Err(bad(format!("chunk {i}: zstd chunk stores 0 bytes")))
            }
            ENCODING_SPAN if stored == 0 => {
                return Err(bad(format!("chunk {i}: span chunk stores 0 bytes")))
            }
            ENCODING_RAW | ENCODING_ZSTD | ENCODING_SPAN => {}
            other => return Err(bad(format!("chunk {i}: unknown encoding {other}"))),
        }
        let offset = c.offset.get();
        let inside = offset
            .checked_add(u64::from(stored))
            .is_some_and(|end| end <= blob.size.get());
        if !inside {
            return Err(bad(format!(
                "chunk {i}: bytes {offset}..+{stored} lie outside blob {blob_index} ({} bytes)",
                blob.size.get()
            )));
        }
    }
    Ok(())
}

/// Checkpoints: a known kind in a listed blob, inside it, with a window exactly when deflate
/// needs one, sorted by blob and then strictly by uncompressed offset (input offsets not going
/// back).
fn checkpoints(t: &Tables<'_>) -> Result<()> {
    let mut prev: Option<(u16, u64, u64)> = None;
    for (i, cp) in t.checkpoints.iter().enumerate() {
        let blob_index = cp.blob.get();
        let blob = t.blobs.get(usize::from(blob_index)).ok_or_else(|| {
            bad(format!(
                "checkpoint {i}: blob index {blob_index} out of range ({} blobs)",
                t.blobs.len()
            ))
        })?;
        let (input, output) = (cp.in_offset.get(), cp.out_offset.get());
        if input >= blob.size.get() {
            return Err(bad(format!(
                "checkpoint {i}: input offset {input} is outside blob {blob_index} ({} bytes)",
                blob.size.get()
            )));
        }
        let window = cp.window.get();
        match cp.kind {
            CHECKPOINT_DEFLATE => {
                if cp.bits > 7 {
                    return Err(bad(format!("checkpoint {i}: {} leftover bits", cp.bits)));
                }
                let w = t.chunks.get(window as usize).ok_or_else(|| {
                    bad(format!(
                        "checkpoint {i}: window chunk {window} out of range ({} chunks)",
                        t.chunks.len()
                    ))
                })?;
                if w.encoding == ENCODING_SPAN || w.size.get() > MAX_WINDOW {
                    return Err(bad(format!(
                        "checkpoint {i}: window chunk {window} is a span or over {MAX_WINDOW} bytes"
                    )));
                }
            }
            CHECKPOINT_GZIP_MEMBER | CHECKPOINT_ZSTD_FRAME => {
                if cp.bits != 0 || window != NO_WINDOW {
                    return Err(bad(format!(
                        "checkpoint {i}: a stream start has no leftover bits and no window"
                    )));
                }
            }
            other => return Err(bad(format!("checkpoint {i}: unknown kind {other}"))),
        }
        if let Some((pb, pin, pout)) = prev {
            let ordered = match blob_index.cmp(&pb) {
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Equal => output > pout && input >= pin,
                std::cmp::Ordering::Less => false,
            };
            if !ordered {
                return Err(bad(format!(
                    "checkpoint {i}: not after checkpoint {} (sorted by blob, then offset)",
                    i - 1
                )));
            }
        }
        prev = Some((blob_index, input, output));
    }
    Ok(())
}

/// Spans: none (then no span chunks, no checkpoints and no flag), or one per chunk; a span chunk
/// starts at its checkpoint's input offset in the checkpoint's blob, every other chunk's span is
/// zero. [`FLAG_SPANS`] is set exactly when there are span chunks or checkpoints.
fn spans(t: &Tables<'_>, flag: bool) -> Result<()> {
    let has = !t.spans.is_empty() || !t.checkpoints.is_empty();
    if flag != has {
        return Err(bad(format!(
            "the spans flag is {} but the bootstrap has {} checkpoints and {} span records",
            if flag { "set" } else { "clear" },
            t.checkpoints.len(),
            t.spans.len()
        )));
    }
    if t.spans.is_empty() {
        if let Some(i) = t.chunks.iter().position(|c| c.encoding == ENCODING_SPAN) {
            return Err(bad(format!("chunk {i}: a span chunk without span records")));
        }
        return Ok(());
    }
    if t.spans.len() != t.chunks.len() {
        return Err(bad(format!(
            "{} span records for {} chunks (one per chunk)",
            t.spans.len(),
            t.chunks.len()
        )));
    }
    for (i, (c, s)) in t.chunks.iter().zip(t.spans).enumerate() {
        let (cp_index, skip) = (s.checkpoint.get(), s.skip.get());
        if c.encoding != ENCODING_SPAN {
            if cp_index != 0 || skip != 0 {
                return Err(bad(format!(
                    "chunk {i}: not a span, but its span record is not 0"
                )));
            }
            continue;
        }
        let cp = t.checkpoints.get(cp_index as usize).ok_or_else(|| {
            bad(format!(
                "chunk {i}: checkpoint {cp_index} out of range ({} checkpoints)",
                t.checkpoints.len()
            ))
        })?;
        if cp.blob.get() != c.blob.get() || cp.in_offset.get() != c.offset.get() {
            return Err(bad(format!(
                "chunk {i}: does not start at checkpoint {cp_index} (blob {} offset {}, checkpoint blob {} offset {})",
                c.blob.get(),
                c.offset.get(),
                cp.blob.get(),
                cp.in_offset.get()
            )));
        }
        if skip.checked_add(u64::from(c.size.get())).is_none() {
            return Err(bad(format!("chunk {i}: skip {skip} overflows")));
        }
    }
    Ok(())
}

/// Kinds, modes, and each inode's runs of xattrs, dirents and file chunks (back to back, in order).
fn inodes(t: &Tables<'_>, chunk_size: u32) -> Result<()> {
    if t.inodes.is_empty() {
        return Err(bad("no inodes: inode 0 must be the root directory".into()));
    }
    let (mut next_dirent, mut next_chunk, mut next_xattr) = (0u64, 0u64, 0u64);
    for (ino, rec) in t.inodes.iter().enumerate() {
        let mode = rec.mode.get();
        let kind = InodeKind::from_mode(mode)
            .filter(|_| mode & !MODE_MASK == 0)
            .ok_or_else(|| {
                bad(format!(
                    "inode {ino}: mode {mode:#o} is not a valid file mode"
                ))
            })?;
        if rec.mtime_nsec.get() >= 1_000_000_000 {
            return Err(bad(format!(
                "inode {ino}: mtime nanoseconds {} is over 999999999",
                rec.mtime_nsec
            )));
        }
        let xs = u64::from(rec.xattr_start.get());
        let xe = t
            .inodes
            .get(ino + 1)
            .map_or(t.xattrs.len() as u64, |r| u64::from(r.xattr_start.get()));
        if xs != next_xattr || xe < xs || xe > t.xattrs.len() as u64 {
            return Err(bad(format!(
                "inode {ino}: xattr run {xs}..{xe} is not right after the previous run (at {next_xattr}) inside the {} xattrs",
                t.xattrs.len()
            )));
        }
        xattrs(t, ino, xs as usize..xe as usize)?;
        next_xattr = xe;
        let (start, count, size) = (
            u64::from(rec.data_start.get()),
            u64::from(rec.data_count.get()),
            rec.size.get(),
        );
        match kind {
            InodeKind::Directory => {
                if start != next_dirent || start + count > t.dirents.len() as u64 {
                    return Err(bad(format!(
                        "directory inode {ino}: entries {start}..+{count} are not right after the previous directory's (at {next_dirent}) inside the {} dirents",
                        t.dirents.len()
                    )));
                }
                if size != 0 {
                    return Err(bad(format!(
                        "directory inode {ino}: size field is {size}, not 0"
                    )));
                }
                next_dirent = start + count;
            }
            InodeKind::File => {
                if start != next_chunk || start + count > t.file_chunks.len() as u64 {
                    return Err(bad(format!(
                        "file inode {ino}: chunk list {start}..+{count} is not right after the previous file's (at {next_chunk}) inside the {} file-chunk entries",
                        t.file_chunks.len()
                    )));
                }
                let want = size.div_ceil(u64::from(chunk_size));
                if count != want {
                    return Err(bad(format!(
                        "file inode {ino}: {count} chunks for {size} bytes (expected {want} of {chunk_size} bytes)"
                    )));
                }
                file_chunks(t, ino, start as usize, count as usize, size, chunk_size)?;
                next_chunk = start + count;
            }
            InodeKind::Symlink => {
                let target = string(t, rec.data_start.get(), size)
                    .filter(|_| count == 0)
                    .ok_or_else(|| {
                        bad(format!(
                            "symlink inode {ino}: target {start}..+{size} is outside the {}-byte string heap",
                            t.strings.len()
                        ))
                    })?;
                if target.is_empty() || target.len() > MAX_SYMLINK || target.contains(&0) {
                    return Err(bad(format!(
                        "symlink inode {ino}: target {} is empty, over {MAX_SYMLINK} bytes or holds NUL",
                        show(target)
                    )));
                }
            }
            InodeKind::CharDevice | InodeKind::BlockDevice => {
                if start != 0 || count != 0 {
                    return Err(bad(format!("device inode {ino}: data fields are not 0")));
                }
            }
            InodeKind::Fifo | InodeKind::Socket => {
                if start != 0 || count != 0 || size != 0 {
                    return Err(bad(format!(
                        "{} inode {ino}: data and size fields are not 0",
                        kind.name()
                    )));
                }
            }
        }
    }
    if next_dirent != t.dirents.len() as u64 {
        return Err(bad(format!(
            "{} dirents belong to no directory",
            t.dirents.len() as u64 - next_dirent
        )));
    }
    if next_chunk != t.file_chunks.len() as u64 {
        return Err(bad(format!(
            "{} file-chunk entries belong to no file",
            t.file_chunks.len() as u64 - next_chunk
        )));
    }
    Ok(())
}

fn xattrs(t: &Tables<'_>, ino: usize, run: std::ops::Range<usize>) -> Result<()> {
    let mut prev: Option<&[u8]> = None;
    for (i, x) in t.xattrs.get(run).unwrap_or_default().iter().enumerate() {
        let key = string(t, x.key_offset.get(), u64::from(x.key_len.get()));
        let value = string(t, x.value_offset.get(), u64::from(x.value_len.get()));
        let (Some(key), Some(value)) = (key, value) else {
            return Err(bad(format!(
                "inode {ino}: xattr {i} lies outside the {}-byte string heap",
                t.strings.len()
            )));
        };
        if key.is_empty() || key.len() > MAX_XATTR_NAME || key.contains(&0) {
            return Err(bad(format!(
                "inode {ino}: xattr name {} is empty, over {MAX_XATTR_NAME} bytes or holds NUL",
                show(key)
            )));
        }
        if value.len() > MAX_XATTR_VALUE {
            return Err(bad(format!(
                "inode {ino}: xattr {} value is {} bytes, over {MAX_XATTR_VALUE}",
                show(key),
                value.len()
            )));
        }
        if let Some(p) = prev.filter(|p| key <= *p) {
            let what = if key == p { "duplicate" } else { "unsorted" };
            return Err(bad(format!(
                "inode {ino}: {what} xattr name {} after {}",
                show(key),
                show(p)
            )));
        }
        prev = Some(key);
    }
    Ok(())
}

/// Every chunk of a file exists and all but the last are `chunk_size` long.
fn file_chunks(
    t: &Tables<'_>,
    ino: usize,
    start: usize,
    count: usize,
    size: u64,
    chunk_size: u32,
) -> Result<()> {
    let list = t.file_chunks.get(start..start + count).unwrap_or_default();
    let last_size = size - (count as u64).saturating_sub(1) * u64::from(chunk_size);
    for (k, index) in list.iter().enumerate() {
        let c = t.chunks.get(index.get() as usize).ok_or_else(|| {
            bad(format!(
                "file inode {ino}: chunk {k} is chunk record {index}, but there are {} chunks",
                t.chunks.len()
            ))
        })?;
        let want = if k + 1 < count {
            u64::from(chunk_size)
        } else {
            last_size
        };
        if u64::from(c.size.get()) != want {
            return Err(bad(format!(
                "file inode {ino}: chunk {k} (record {index}) holds {} bytes, expected {want}",
                c.size
            )));
        }
    }
    Ok(())
}

/// What is wrong with a directory entry name, if anything.
pub(crate) fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name.len() > MAX_NAME {
        Some("name over 255 bytes")
    } else if name == b"." || name == b".." {
        Some("name is . or ..")
    } else if name.contains(&b'/') {
        Some("name contains '/'")
    } else if name.contains(&0) {
        Some("name contains NUL")
    } else {
        None
    }
}

/// Names, sort order, targets, link counts, and that every inode hangs off the root exactly once
/// per name with each directory named once (so the graph is a tree plus hardlinked leaves).
fn tree(t: &Tables<'_>) -> Result<()> {
    let n = t.inodes.len();
    if t.inodes.first().map(kind) != Some(InodeKind::Directory) {
        return Err(bad("inode 0 (the root) is not a directory".into()));
    }
    let mut names = vec![0u32; n];
    for (dir, rec) in t.inodes.iter().enumerate() {
        if kind(rec) != InodeKind::Directory {
            continue;
        }
        let mut prev: Option<&[u8]> = None;
        let mut subdirs = 0u64;
        for (i, e) in entries(t, rec).iter().enumerate() {
            let name =
                string(t, e.name_offset.get(), u64::from(e.name_len.get())).ok_or_else(|| {
                    bad(format!(
                        "directory inode {dir}: entry {i} lies outside the {}-byte string heap",
                        t.strings.len()
                    ))
                })?;
            let at = || format!("directory inode {dir}: entry {i} {}", show(name));
            if let Some(problem) = name_problem(name) {
                return Err(bad(format!("{}: {problem}", at())));
            }
            if let Some(p) = prev.filter(|p| name <= *p) {
                let what = if name == p {
                    "duplicate name".to_string()
                } else {
                    format!("not sorted: comes after {}", show(p))
                };
                return Err(bad(format!("{}: {what}", at())));
            }
            prev = Some(name);
            let target = e.inode.get() as usize;
            let target_rec = t.inodes.get(target).ok_or_else(|| {
                bad(format!(
                    "{}: names inode {target}, but there are {n} inodes",
                    at()
                ))
            })?;
            if target == 0 {
                return Err(bad(format!("{}: names the root directory", at())));
            }
            names[target] = names[target].saturating_add(1);
            if kind(target_rec) == InodeKind::Directory {
                subdirs += 1;
                if names[target] > 1 {
                    return Err(bad(format!(
                        "{}: directory inode {target} is reachable twice (a directory has one name)",
                        at()
                    )));
                }
            }
        }
        if u64::from(rec.nlink.get()) != 2 + subdirs {
            return Err(bad(format!(
                "directory inode {dir}: nlink is {}, expected {} (2 + {subdirs} subdirectories)",
                rec.nlink,
                2 + subdirs
            )));
        }
    }
    // Each directory has at most one name, so a walk from the root visits each directory once;
    // whatever it misses is an orphan or sits on a cycle.
    let mut seen = vec![0u64; n.div_ceil(64)];
    let mark = |seen: &mut [u64], i: usize| -> bool {
        let bit = 1u64 << (i % 64);
        seen.get_mut(i / 64).is_some_and(|word| {
            let fresh = *word & bit == 0;
            *word |= bit;
            fresh
        })
    };
    mark(&mut seen, 0);
    let mut stack = vec![0usize];
    while let Some(dir) = stack.pop().and_then(|d| t.inodes.get(d)) {
        for e in entries(t, dir) {
            let target = e.inode.get() as usize;
            let is_dir = t.inodes.get(target).map(kind) == Some(InodeKind::Directory);
            if mark(&mut seen, target) && is_dir {
                stack.push(target);
            }
        }
    }
    for (ino, rec) in t.inodes.iter().enumerate() {
        if seen
            .get(ino / 64)
            .is_none_or(|w| w & (1 << (ino % 64)) == 0)
        {
            return Err(bad(format!(
                "inode {ino} is not reachable from the root (an orphan, or a cycle of directories)"
            )));
        }
        if kind(rec) != InodeKind::Directory && rec.nlink.get() != names[ino] {
            return Err(bad(format!(
                "inode {ino}: nlink is {}, but {} entries name it",
                rec.nlink, names[ino]
            )));
        }
    }
    Ok(())
}

/// The entries of a directory record that passed [`inodes`].
pub(crate) fn entries<'a>(t: &Tables<'a>, rec: &InodeRecord) -> &'a [super::layout::DirentRecord] {
    let start = rec.data_start.get() as usize;
    let end = start.saturating_add(rec.data_count.get() as usize);
    t.dirents.get(start..end).unwrap_or_default()
}
