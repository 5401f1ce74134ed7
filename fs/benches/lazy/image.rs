//! The benchmark image: a deterministic tree of this machine's files (the Python stdlib,
//! `/usr/bin`, then `/usr/lib/<multiarch>` in sorted order up to a size budget, plus every file
//! of the startup list), packed once as one tar layer. The same layer becomes a plain OCI image
//! (gzip, for `skopeo copy` + `umoci unpack`) and a Shoal image (`convert`), both pushed to the
//! registry.
//!
//! Shared with the CRI cold-start bench (`crates/shoal-cli/benches/cri_cold`, through `#[path]`):
//! it provides `Res` and `check` at its crate root too.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use shoal_format::build::{convert, BuildOptions, Source};
use shoal_format::oci::{self, LayoutRef};
use shoal_testkit::Registry;

use crate::{check, Res};

/// Files above this size are left out (one huge file would dominate the image).
const MAX_FILE: u64 = 64 << 20;

/// The startup workload: paths relative to `/`, in the order Python opened them.
pub fn startup_list() -> Vec<String> {
    include_str!("python-startup.list")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// A tar layer built from the machine's files.
pub struct Layer {
    /// The uncompressed tar.
    pub tar: PathBuf,
    /// Bytes of regular files in it.
    pub file_bytes: u64,
    /// Entries in it.
    pub entries: usize,
}

/// Walks `rel` (relative to `/`) in sorted order, adding dirs, symlinks and files while the
/// budget lasts (the whole subtree when `budget` is `None`).
fn walk(rel: &Path, out: &mut BTreeSet<PathBuf>, bytes: &mut u64, budget: Option<u64>) {
    let abs = Path::new("/").join(rel);
    let Ok(meta) = fs::symlink_metadata(&abs) else {
        return;
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        out.insert(rel.to_path_buf());
        let Ok(rd) = fs::read_dir(&abs) else { return };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            if budget.is_some_and(|b| *bytes >= b) {
                return;
            }
            walk(&rel.join(n), out, bytes, budget);
        }
    } else if ft.is_symlink() {
        out.insert(rel.to_path_buf());
    } else if ft.is_file() && meta.len() <= MAX_FILE {
        out.insert(rel.to_path_buf());
        *bytes += meta.len();
    }
}

/// Builds the layer tar in `dir`: at least `min_bytes` of file content.
pub fn build_layer(dir: &Path, min_bytes: u64) -> Res<Layer> {
    let python = fs::canonicalize("/usr/bin/python3")?;
    let stdlib = Path::new("usr/lib").join(python.file_name().ok_or("python3 has no file name")?);
    let multiarch = fs::canonicalize("/lib64/ld-linux-x86-64.so.2")
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    let multiarch = multiarch.strip_prefix("/")?.to_path_buf();
    let mut set = BTreeSet::new();
    let mut bytes = 0;
    walk(&stdlib, &mut set, &mut bytes, None);
    walk(Path::new("usr/bin"), &mut set, &mut bytes, None);
    walk(&multiarch, &mut set, &mut bytes, Some(min_bytes));
    // The workload's files, and the merged-/usr links that let `chroot` find the loader.
    let mut extra: Vec<String> = startup_list();
    extra.extend(
        [
            "bin",
            "lib",
            "lib64",
            "usr/lib64",
            "usr/lib64/ld-linux-x86-64.so.2",
        ]
        .map(String::from),
    );
    for p in extra {
        let rel = PathBuf::from(&p);
        if let Ok(m) = fs::symlink_metadata(Path::new("/").join(&rel)) {
            if set.insert(rel) && m.is_file() {
                bytes += m.len();
            }
        }
    }
    // Every entry's parent directories, so the tar extracts anywhere.
    let parents: Vec<PathBuf> = set
        .iter()
        .flat_map(|p| p.ancestors().skip(1).map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    set.extend(parents);
    if bytes < min_bytes {
        return Err(
            format!("only {bytes} bytes of files found, the image needs {min_bytes}").into(),
        );
    }
    let list = dir.join("layer.list");
    let mut f = fs::File::create(&list)?;
    for p in &set {
        f.write_all(p.as_os_str().as_encoded_bytes())?;
        f.write_all(b"\0")?;
    }
    drop(f);
    let tar = dir.join("layer.tar");
    check(
        Command::new("tar")
            .args(["--create", "--file"])
            .arg(&tar)
            .args(["--null", "--no-recursion", "--numeric-owner", "-C", "/"])
            .arg("--files-from")
            .arg(&list),
    )?;
    Ok(Layer {
        tar,
        file_bytes: bytes,
        entries: set.len(),
    })
}

/// Pushes the layer as a plain OCI image (one gzip layer) to `repo:tag`; returns the gzip size.
pub async fn push_plain(reg: &Registry, layer: &Layer, repo: &str, tag: &str) -> Res<u64> {
    let mut input = BufReader::with_capacity(1 << 20, fs::File::open(&layer.tar)?);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut diff = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).ok_or("short read")?;
        diff.update(chunk);
        gz.write_all(chunk)?;
    }
    let gz = gz.finish()?;
    let diff_id = format!("sha256:{}", hex::encode(diff.finalize()));
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let layer_digest = reg.push_blob(repo, &gz).await?;
    let config_digest = reg.push_blob(repo, config.as_bytes()).await?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
        config.len(),
        gz.len()
    );
    reg.push_manifest(
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.as_bytes(),
    )
    .await?;
    Ok(gz.len() as u64)
}

/// Converts `src` into a Shoal image in `out` (1 MiB chunks), with `prefetch` as its prefetch
/// list; returns the stored size of its blobs (bootstrap included).
pub fn convert_shoal(src: Source, out: &Path, prefetch: &[String]) -> Res<u64> {
    let opts = BuildOptions {
        prefetch: prefetch.iter().map(|p| p.as_bytes().to_vec()).collect(),
        ..BuildOptions::default()
    };
    let r = LayoutRef {
        dir: out.to_path_buf(),
        tag: None,
    };
    convert(&src, &r, &opts)?;
    let (_, manifest) = oci::resolve(&r)?;
    Ok(manifest.layers().iter().map(|d| d.size()).sum())
}

/// Pushes a converted layout's config, layers and manifest to `repo:tag`.
pub async fn push_layout(reg: &Registry, layout: &Path, repo: &str, tag: &str) -> Res<()> {
    let (desc, manifest) = oci::resolve(&LayoutRef {
        dir: layout.to_path_buf(),
        tag: None,
    })?;
    for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let digest = oci::parse_digest(d.digest()).ok_or("bad digest in layout")?;
        let bytes = fs::read(oci::blob_path(layout, &digest))?;
        reg.push_blob(repo, &bytes).await?;
    }
    let mbytes = oci::read_blob(layout, &desc, 1 << 20)?;
    reg.push_manifest(
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &mbytes,
    )
    .await?;
    Ok(())
}
