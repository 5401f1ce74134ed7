//! Streaming tar reader for one layer: headers, GNU long names, PAX records, GNU sparse maps.
//!
//! We parse the extension headers ourselves (instead of `tar::Archive`) so that every size taken
//! from the stream is bounded before it is allocated, and so that file data streams straight into
//! the chunker without a copy.

use std::io::{self, Read};

use tar::{EntryType, Header};

use super::sparse::{EntryData, PaxSparse};

use super::flatten::{Attr, Entry, EntryKind};

/// Largest GNU long name / long link or PAX extended header we accept.
const MAX_EXTENSION: u64 = 1 << 20;
/// Largest single xattr value (Linux caps it at 64 KiB).
const MAX_XATTR_VALUE: usize = 64 << 10;
/// Largest number of data segments in a GNU sparse map.
pub(super) const MAX_SPARSE_SEGMENTS: usize = 1 << 16;
const BLOCK: u64 = 512;

/// One entry as read from the tar stream, before its data.
pub(crate) struct TarEntry {
    /// Path, link target, type and metadata.
    pub entry: Entry,
    /// Bytes of file content the entry's data yields (sparse holes included).
    pub size: u64,
    /// Sparse map `(offset, length)` for GNU sparse files.
    pub(crate) sparse: Option<Vec<(u64, u64)>>,
}

/// Reads a tar stream entry by entry; file data is read through [`TarReader::data`].
pub(crate) struct TarReader<R> {
    pub(crate) inner: R,
    /// Bytes of the current entry's stored data not yet consumed (padding excluded).
    pub(super) remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// Total bytes consumed from the (uncompressed) stream.
    pub consumed: u64,
}

pub(super) fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: Read> TarReader<R> {
    /// Wraps an uncompressed tar stream.
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            remaining: 0,
            padding: 0,
            consumed: 0,
        }
    }

    pub(super) fn read_block(&mut self, buf: &mut [u8; 512]) -> io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(bad("tar stream ends inside a header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.consumed += BLOCK;
        Ok(true)
    }

    /// Skips whatever is left of the current entry's data and padding.
    fn skip_rest(&mut self) -> io::Result<()> {
        let n = self.remaining + self.padding;
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.consumed += copied;
        if copied != n {
            return Err(bad("tar stream ends inside an entry's data"));
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    fn start_data(&mut self, stored: u64) {
        self.remaining = stored;
        self.padding = (BLOCK - stored % BLOCK) % BLOCK;
    }

    fn read_extension(&mut self, size: u64, what: &str) -> io::Result<Vec<u8>> {
        if size > MAX_EXTENSION {
            return Err(bad(format!(
                "{what} of {size} bytes exceeds the limit of {MAX_EXTENSION}"
            )));
        }
        self.start_data(size);
        let mut v = Vec::with_capacity(size as usize);
        self.data_raw().read_to_end(&mut v)?;
        if v.len() as u64 != size {
            return Err(bad(format!("tar stream ends inside a {what}")));
        }
        self.skip_rest()?;
        Ok(v)
    }

    pub(super) fn data_raw(&mut self) -> RawData<'_, R> {
        RawData { tar: self }
    }

    /// The next entry, or `None` at the end of the archive. Unread data of the previous entry is
    /// skipped.
    pub fn next_entry(&mut self) -> io::Result<Option<TarEntry>> {
        self.skip_rest()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        loop {
            let mut block = [0u8; 512];
            if !self.read_block(&mut block)? || block.iter().all(|b| *b == 0) {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(bad("extension header without a following entry"));
                }
                return Ok(None);
            }
            let header = Header::from_byte_slice(&block);
            check_checksum(header)?;
            let size = header.entry_size()?;
            match header.entry_type() {
                EntryType::GNULongName => {
                    let mut v = self.read_extension(size, "GNU long name")?;
                    trim_nul(&mut v);
                    long_name = Some(v);
                }
                EntryType::GNULongLink => {
                    let mut v = self.read_extension(size, "GNU long link name")?;
                    trim_nul(&mut v);
                    long_link = Some(v);
                }
                EntryType::XHeader => {
                    let v = self.read_extension(size, "PAX header")?;
                    // Two PAX headers for one member: the later one wins per key.
                    pax = Some(match pax.take() {
                        Some(mut old) => {
                            old.extend_from_slice(&v);
                            old
                        }
                        None => v,
                    });
                }
                EntryType::XGlobalHeader => {
                    // Global records (comments, charset) carry nothing we store.
                    self.read_extension(size, "PAX global header")?;
                }
                _ => {
                    return self
                        .finish_entry(header, size, long_name, long_link, pax)
                        .map(Some)
                }
            }
        }
    }

    fn finish_entry(
        &mut self,
        header: &Header,
        header_size: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Option<Vec<u8>>,
    ) -> io::Result<TarEntry> {
        let mut path = long_name.unwrap_or_else(|| header.path_bytes().into_owned());
        let mut link = long_link.or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
        let old = header.as_old();
        let mut attr = Attr {
            mode: lenient(header.mode().map(u64::from), &old.mode)? as u32 & 0o7777,
            uid: u32_field(lenient(header.uid(), &old.uid)?, "uid")?,
            gid: u32_field(lenient(header.gid(), &old.gid)?, "gid")?,
            mtime: i64::try_from(lenient(header.mtime(), &old.mtime)?)
                .map_err(|_| bad("mtime out of range"))?,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        };
        let mut stored = header_size;
        let mut ps = PaxSparse::default();
        if let Some(pax) = &pax {
            for rec in tar::PaxExtensions::new(pax) {
                let rec = rec.map_err(|e| bad(format!("malformed PAX record: {e}")))?;
                let key = rec.key_bytes();
                let value = rec.value_bytes();
                match key {
                    b"path" => path = value.to_vec(),
                    b"linkpath" => link = Some(value.to_vec()),
                    b"size" => stored = parse_num(value, "PAX size")?,
                    b"uid" => attr.uid = u32_field(parse_num(value, "PAX uid")?, "uid")?,
                    b"gid" => attr.gid = u32_field(parse_num(value, "PAX gid")?, "gid")?,
                    b"mtime" => (attr.mtime, attr.mtime_nsec) = parse_time(value)?,
                    b"GNU.sparse.major" => ps.major = Some(parse_num(value, "GNU.sparse.major")?),
                    b"GNU.sparse.name" => ps.name = Some(value.to_vec()),
                    b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                        ps.real = Some(parse_num(value, "GNU.sparse.realsize")?)
                    }
                    b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                        ps.push(parse_num(value, "GNU.sparse offset")?)?
                    }
                    b"GNU.sparse.map" => {
                        for n in value.split(|b| *b == b',') {
                            ps.push(parse_num(n, "GNU.sparse.map")?)?;
                        }
                    }
                    _ => {
                        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                            if name.is_empty() || name.len() > 255 {
                                return Err(bad("xattr name empty or longer than 255 bytes"));
                            }
                            if value.len() > MAX_XATTR_VALUE {
                                return Err(bad(format!(
                                    "xattr value of {} bytes exceeds {MAX_XATTR_VALUE}",
                                    value.len()
                                )));
                            }
                            attr.xattrs.retain(|(n, _)| n != name);
                            attr.xattrs.push((name.to_vec(), value.to_vec()));
                        }
                    }
                }
            }
        }
        attr.xattrs.sort();
        let ty = header.entry_type();
        let dev = || -> io::Result<u64> {
            let major = header.device_major()?.unwrap_or(0);
            let minor = header.device_minor()?.unwrap_or(0);
            Ok(libc::makedev(major, minor))
        };
        let mut size = 0;
        let mut sparse = None;
        let kind = match ty {
            EntryType::Regular | EntryType::Continuous if ps.real.is_some() => {
                // PAX sparse file (GNU tar --format=posix --sparse), versions 0.0, 0.1 and 1.0.
                size = ps.real.unwrap_or(0);
                if let Some(name) = ps.name.take() {
                    path = name;
                }
                EntryKind::File
            }
            EntryType::Regular | EntryType::Continuous => {
                size = stored;
                EntryKind::File
            }
            EntryType::GNUSparse => {
                let (map, real) = self.read_sparse_map(header)?;
                size = real;
                sparse = Some(map);
                EntryKind::File
            }
            EntryType::Directory => EntryKind::Dir,
            EntryType::Symlink => EntryKind::Symlink(link.unwrap_or_default()),
            EntryType::Link => EntryKind::Hardlink(link.unwrap_or_default()),
            EntryType::Char => EntryKind::Char(dev()?),
            EntryType::Block => EntryKind::Block(dev()?),
            EntryType::Fifo => EntryKind::Fifo,
            other => {
                return Err(bad(format!(
                    "unsupported tar entry type {:?} for {}",
                    other.as_byte() as char,
                    String::from_utf8_lossy(&path)
                )))
            }
        };
        // Only file data is streamed; anything else carries none worth reading.
        self.start_data(stored);
        if ps.real.is_some() && kind == EntryKind::File {
            if ps.major == Some(1) {
                self.read_map_v1(&mut ps)?;
            }
            sparse = Some(ps.into_map(size)?);
        }
        if let Some(map) = &sparse {
            let data: u64 = map.iter().map(|(_, l)| l).sum();
            if data != self.remaining {
                return Err(bad("GNU sparse map does not match the stored data size"));
            }
        }
        Ok(TarEntry {
            entry: Entry { path, kind, attr },
            size,
            sparse,
        })
    }

    /// A reader over the current entry's content (sparse holes read as zeros), `entry.size` long.
    pub fn data<'a>(&'a mut self, entry: &'a TarEntry) -> EntryData<'a, R> {
        EntryData {
            tar: self,
            sparse: entry.sparse.as_deref(),
            pos: 0,
            size: entry.size,
            seg: 0,
        }
    }
}

fn check_checksum(header: &Header) -> io::Result<()> {
    let bytes = header.as_bytes();
    let sum: u32 = bytes[..148]
        .iter()
        .chain(&bytes[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * 32;
    if header.cksum()? != sum {
        return Err(bad("tar header checksum mismatch"));
    }
    Ok(())
}

/// A numeric header field; blank (all NUL or space) reads as 0, as GNU tar and Go read it.
fn lenient(parsed: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    match parsed {
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        other => other,
    }
}

fn trim_nul(v: &mut Vec<u8>) {
    while v.last() == Some(&0) {
        v.pop();
    }
}

fn u32_field(v: u64, what: &str) -> io::Result<u32> {
    u32::try_from(v).map_err(|_| bad(format!("{what} {v} does not fit 32 bits")))
}

pub(super) fn parse_num(v: &[u8], what: &str) -> io::Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| bad(format!("{what} is not a number")))
}

/// Parses a PAX time `SECONDS[.FRACTION]` into seconds and nanoseconds.
fn parse_time(v: &[u8]) -> io::Result<(i64, u32)> {
    let s = std::str::from_utf8(v)
        .map_err(|_| bad("PAX mtime is not text"))?
        .trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().map_err(|_| bad("PAX mtime is not a number"))?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad("PAX mtime fraction is not a number"));
    }
    let nsec = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}")
            .parse()
            .map_err(|_| bad("PAX mtime fraction is not a number"))?
    };
    // A negative time with a fraction counts the fraction towards the past.
    if s.starts_with('-') && nsec > 0 {
        return Ok((secs - 1, 1_000_000_000 - nsec));
    }
    Ok((secs, nsec))
}

/// Reads the stored data bytes of the current entry (no sparse expansion).
pub(super) struct RawData<'a, R> {
    pub(super) tar: &'a mut TarReader<R>,
}

impl<R: Read> Read for RawData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.tar.remaining).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.tar.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(bad("tar stream ends inside an entry's data"));
        }
        self.tar.remaining -= n as u64;
        self.tar.consumed += n as u64;
        Ok(n)
    }
}
