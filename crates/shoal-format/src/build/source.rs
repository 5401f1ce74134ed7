//! Build sources: an OCI image layout (`oci:DIR[:TAG]`), a directory tree, or one tar layer
//! (plain, gzip or zstd, told apart by their magic bytes), each fed into the flattened tree.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256 as Sha};

use super::chunker::{ChunkSink, Chunker};
use super::flatten::{Attr, Entry, EntryKind, FileChunks, Tree};
use super::layer::TarReader;
use crate::error::{Error, Result};
use crate::oci::{self, LayoutRef};

/// Where an image is built from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An OCI image layout: its manifest's layers are applied in order.
    Layout(LayoutRef),
    /// A directory tree, taken as one layer without whiteout handling.
    Dir(PathBuf),
    /// One tar layer file: plain, gzip or zstd.
    Tar(PathBuf),
}

impl Source {
    /// Parses `oci:DIR[:TAG]`, a directory, or a tar file.
    pub fn parse(s: &str) -> Result<Source> {
        if let Some(r) = LayoutRef::parse(s) {
            return Ok(Source::Layout(r));
        }
        let path = PathBuf::from(s);
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => Ok(Source::Dir(path)),
            Ok(m) if m.is_file() => Ok(Source::Tar(path)),
            Ok(_) => Err(bad_source(s, "neither a directory nor a tar file")),
            Err(e) => Err(bad_source(
                s,
                format!("{e} (expected oci:DIR[:TAG], a directory or a tar layer)"),
            )),
        }
    }
}

fn bad_source(s: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::BadSource {
        source_name: s.into(),
        reason: reason.into(),
    }
}

/// What applying a source counted.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Applied {
    pub layers: u64,
    /// Uncompressed bytes read (tar streams, or file content of a directory).
    pub bytes_in: u64,
}

/// Applies every layer of `src` to `tree`, chunking file content on the way.
pub(crate) fn apply(src: &Source, tree: &mut Tree, chunker: &mut Chunker) -> Result<Applied> {
    let mut applied = Applied::default();
    match src {
        Source::Tar(path) => {
            let f = File::open(path).map_err(|e| Error::Io {
                op: "opening layer",
                path: path.clone(),
                source: e,
            })?;
            applied.bytes_in += apply_tar(f, &path.display().to_string(), 0, tree, chunker)?;
            applied.layers = 1;
        }
        Source::Dir(path) => {
            applied.bytes_in = apply_dir(path, tree, chunker)?;
            applied.layers = 1;
        }
        Source::Layout(r) => {
            let (desc, manifest) = oci::resolve(r)?;
            if crate::image::find_bootstrap(desc.digest().as_ref(), &manifest)?.is_some() {
                return Err(bad_source(
                    format!("oci:{}", r.dir.display()),
                    "already a Shoal image; inspect, verify or unpack it instead of converting it",
                ));
            }
            for (i, layer) in manifest.layers().iter().enumerate() {
                let digest = oci::parse_digest(layer.digest()).ok_or_else(|| {
                    bad_source(
                        format!("oci:{}", r.dir.display()),
                        format!("unsupported digest {}", layer.digest()),
                    )
                })?;
                let path = oci::blob_path(&r.dir, &digest);
                let name = layer.digest().to_string();
                let f = File::open(&path).map_err(|e| Error::Io {
                    op: "opening layer",
                    path: path.clone(),
                    source: e,
                })?;
                let mut checked = DigestReader {
                    inner: f,
                    sha: Sha::new(),
                    count: 0,
                };
                applied.bytes_in += apply_tar(&mut checked, &name, i as u32, tree, chunker)?;
                checked.check(&digest, layer.size(), &path)?;
                applied.layers += 1;
            }
        }
    }
    Ok(applied)
}

/// Hashes what passes through so a layer's digest is checked once it has been read.
struct DigestReader<R> {
    inner: R,
    sha: Sha,
    count: u64,
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: Read> DigestReader<R> {
    fn check(mut self, digest: &[u8; 32], size: u64, path: &Path) -> Result<()> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| Error::Io {
            op: "reading layer",
            path: path.into(),
            source: e,
        })?;
        let got: [u8; 32] = self.sha.finalize().into();
        if &got != digest || self.count != size {
            return Err(Error::Oci {
                path: path.into(),
                reason: format!(
                    "layer {} does not match its digest or size",
                    oci::digest_string(digest)
                ),
            });
        }
        Ok(())
    }
}

/// Applies one (possibly compressed) tar layer; returns the uncompressed bytes read.
pub(super) fn apply_tar<R: Read>(
    r: R,
    name: &str,
    layer: u32,
    tree: &mut Tree,
    chunker: &mut dyn ChunkSink,
) -> Result<u64> {
    let io_err = |e: io::Error| Error::BadEntry {
        layer: name.to_string(),
        entry: String::new(),
        reason: e.to_string(),
    };
    let mut br = BufReader::with_capacity(1 << 20, r);
    let magic = br.fill_buf().map_err(io_err)?;
    let stream: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(br))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(br).map_err(io_err)?)
    } else {
        Box::new(br)
    };
    let mut tar = TarReader::new(stream);
    while let Some(te) = tar.next_entry().map_err(|e| Error::BadEntry {
        layer: name.to_string(),
        entry: "(after the last good entry)".into(),
        reason: e.to_string(),
    })? {
        let entry_name = String::from_utf8_lossy(&te.entry.path).into_owned();
        let bad = |reason: String| Error::BadEntry {
            layer: name.to_string(),
            entry: entry_name.clone(),
            reason,
        };
        // Refuse a bad path before spending work on its content.
        super::flatten::split_path(&te.entry.path).map_err(bad)?;
        let file = if te.entry.kind == EntryKind::File {
            let size = te.size;
            let mut data = tar.data(&te);
            Some(chunker.add_file(&mut data, size, &entry_name)?)
        } else {
            None
        };
        tree.apply(te.entry, file, layer, true).map_err(bad)?;
    }
    Ok(tar.consumed)
}

/// Walks a directory tree (sorted, not following symlinks) into the tree as one layer.
fn apply_dir(root: &Path, tree: &mut Tree, chunker: &mut Chunker) -> Result<u64> {
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut bytes = 0u64;
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), Vec::new())];
    while let Some((path, rel)) = stack.pop() {
        let io = |op, e| Error::Io {
            op,
            path: path.clone(),
            source: e,
        };
        let md = fs::symlink_metadata(&path).map_err(|e| io("reading metadata of", e))?;
        let ft = md.file_type();
        let attr = Attr {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: u32::try_from(md.mtime_nsec()).unwrap_or(0),
            xattrs: read_xattrs(&path)?,
        };
        let mut file = None;
        let kind = if ft.is_dir() {
            let mut children: Vec<_> = fs::read_dir(&path)
                .map_err(|e| io("listing", e))?
                .map(|d| d.map(|d| d.file_name()))
                .collect::<io::Result<_>>()
                .map_err(|e| io("listing", e))?;
            children.sort();
            for c in children.into_iter().rev() {
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(c.as_bytes());
                stack.push((path.join(&c), r));
            }
            EntryKind::Dir
        } else if md.nlink() > 1 && !ft.is_symlink() && links.contains_key(&(md.dev(), md.ino())) {
            EntryKind::Hardlink(links[&(md.dev(), md.ino())].clone())
        } else if ft.is_file() {
            if md.nlink() > 1 {
                links.insert((md.dev(), md.ino()), rel.clone());
            }
            let mut f = File::open(&path).map_err(|e| io("opening", e))?;
            file = Some(chunker.add_file(&mut f, md.len(), &path.display().to_string())?);
            bytes += md.len();
            EntryKind::File
        } else if ft.is_symlink() {
            EntryKind::Symlink(
                fs::read_link(&path)
                    .map_err(|e| io("reading symlink", e))?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_char_device() {
            EntryKind::Char(md.rdev())
        } else if ft.is_block_device() {
            EntryKind::Block(md.rdev())
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else {
            tracing::warn!(path = %path.display(), "skipping a socket: images cannot carry sockets");
            continue;
        };
        let file: Option<FileChunks> = file;
        let name = String::from_utf8_lossy(&rel).into_owned();
        tree.apply(
            Entry {
                path: rel,
                kind,
                attr,
            },
            file,
            0,
            false,
        )
        .map_err(|reason| Error::BadEntry {
            layer: root.display().to_string(),
            entry: name,
            reason,
        })?;
    }
    Ok(bytes)
}

fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let io = |e| Error::Io {
        op: "reading xattrs of",
        path: path.to_path_buf(),
        source: e,
    };
    let mut out = Vec::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    for name in names {
        if let Some(v) = xattr::get(path, &name).map_err(io)? {
            out.push((name.as_bytes().to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}
