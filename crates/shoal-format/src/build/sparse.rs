//! Sparse files in tar layers: GNU sparse entries (type `S`, maps in the header) and PAX sparse
//! files (GNU tar `--format=posix --sparse`, versions 0.0, 0.1 and 1.0), and the reader that
//! expands holes to zeros.

use std::io::{self, Read};

use tar::{GnuExtSparseHeader, Header};

use super::layer::{bad, parse_num, RawData, TarReader, MAX_SPARSE_SEGMENTS};

impl<R: Read> TarReader<R> {
    pub(super) fn read_sparse_map(
        &mut self,
        header: &Header,
    ) -> io::Result<(Vec<(u64, u64)>, u64)> {
        let gnu = header
            .as_gnu()
            .ok_or_else(|| bad("sparse entry without a GNU header"))?;
        let mut map = Vec::new();
        let push = |off: u64, len: u64, map: &mut Vec<(u64, u64)>| -> io::Result<()> {
            if map.len() >= MAX_SPARSE_SEGMENTS {
                return Err(bad("GNU sparse map has too many segments"));
            }
            if let Some((po, pl)) = map.last() {
                if off < po + pl {
                    return Err(bad("GNU sparse map segments overlap or are out of order"));
                }
            }
            map.push((off, len));
            Ok(())
        };
        for s in &gnu.sparse {
            if !s.is_empty() {
                push(s.offset()?, s.length()?, &mut map)?;
            }
        }
        let mut extended = gnu.is_extended();
        while extended {
            let mut block = [0u8; 512];
            if !self.read_block(&mut block)? {
                return Err(bad("tar stream ends inside a GNU sparse map"));
            }
            // SAFETY-free: GnuExtSparseHeader is a plain 512-byte struct of byte arrays.
            let ext: GnuExtSparseHeader = read_ext_sparse(&block);
            for s in &ext.sparse {
                if !s.is_empty() {
                    push(s.offset()?, s.length()?, &mut map)?;
                }
            }
            extended = ext.is_extended();
        }
        let real = gnu.real_size()?;
        if let Some((o, l)) = map.last() {
            if o.checked_add(*l).is_none_or(|end| end > real) {
                return Err(bad("GNU sparse map extends past the file size"));
            }
        }
        Ok((map, real))
    }

    /// Reads the sparse map that starts the data of a PAX 1.0 sparse file (decimal numbers, one
    /// per line: count, then offset/length pairs; padded to a block).
    pub(super) fn read_map_v1(&mut self, ps: &mut PaxSparse) -> io::Result<()> {
        let mut text: Vec<u8> = Vec::new();
        let mut count: Option<u64> = None;
        loop {
            let mut block = [0u8; 512];
            self.data_raw().read_exact(&mut block)?;
            text.extend_from_slice(&block);
            let mut nums = Vec::new();
            let mut rest = &text[..];
            while let Some(i) = rest.iter().position(|b| *b == b'\n') {
                nums.push(parse_num(&rest[..i], "PAX sparse map")?);
                rest = &rest[i + 1..];
            }
            if let Some(&n) = nums.first() {
                if n > MAX_SPARSE_SEGMENTS as u64 {
                    return Err(bad("PAX sparse map has too many segments"));
                }
                count = Some(n);
            }
            if let Some(n) = count {
                if nums.len() as u64 > 2 * n {
                    ps.nums = nums[1..=(2 * n as usize)].to_vec();
                    return Ok(());
                }
            }
            if text.len() > (MAX_SPARSE_SEGMENTS * 2 + 1) * 21 + 512 {
                return Err(bad("PAX sparse map is too long"));
            }
        }
    }
}

/// GNU sparse records from PAX headers.
#[derive(Default)]
pub(super) struct PaxSparse {
    pub major: Option<u64>,
    pub name: Option<Vec<u8>>,
    pub real: Option<u64>,
    /// Offset, length, offset, length, ...
    pub nums: Vec<u64>,
}

impl PaxSparse {
    pub fn push(&mut self, n: u64) -> io::Result<()> {
        if self.nums.len() >= 2 * MAX_SPARSE_SEGMENTS {
            return Err(bad("PAX sparse map has too many segments"));
        }
        self.nums.push(n);
        Ok(())
    }

    pub fn into_map(self, real: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut map: Vec<(u64, u64)> = Vec::with_capacity(self.nums.len() / 2);
        for pair in self.nums.chunks(2) {
            let [off, len] = pair else {
                return Err(bad("PAX sparse map has an odd number of values"));
            };
            let end = off
                .checked_add(*len)
                .ok_or_else(|| bad("PAX sparse segment overflows"))?;
            if end > real || map.last().is_some_and(|(o, l)| *off < o + l) {
                return Err(bad(
                    "PAX sparse map segments overlap, are out of order or past the end",
                ));
            }
            map.push((*off, *len));
        }
        Ok(map)
    }
}

fn read_ext_sparse(block: &[u8; 512]) -> GnuExtSparseHeader {
    let mut ext = GnuExtSparseHeader::new();
    ext.as_mut_bytes().copy_from_slice(block);
    ext
}

/// The content of a file entry, holes expanded to zeros.
pub(crate) struct EntryData<'a, R> {
    pub(super) tar: &'a mut TarReader<R>,
    pub(super) sparse: Option<&'a [(u64, u64)]>,
    pub(super) pos: u64,
    pub(super) size: u64,
    pub(super) seg: usize,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.size - self.pos;
        let cap = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if cap == 0 {
            return Ok(0);
        }
        let Some(map) = self.sparse else {
            let n = RawData { tar: self.tar }.read(&mut buf[..cap])?;
            self.pos += n as u64;
            return Ok(n);
        };
        // Skip segments already passed.
        while let Some((o, l)) = map.get(self.seg) {
            if self.pos >= o + l {
                self.seg += 1;
            } else {
                break;
            }
        }
        let n = match map.get(self.seg) {
            Some((o, _)) if self.pos < *o => {
                let n = cap.min(usize::try_from(o - self.pos).unwrap_or(usize::MAX));
                buf[..n].fill(0);
                n
            }
            Some((o, l)) => {
                let n = cap.min(usize::try_from(o + l - self.pos).unwrap_or(usize::MAX));
                RawData { tar: self.tar }.read(&mut buf[..n])?
            }
            None => {
                buf[..cap].fill(0);
                cap
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}
