//! Small OCI images built by tests: tar layers ([`LayerBuilder`], with [`LayerBuilder::busybox`]
//! for a static busybox), written as an OCI image layout ([`write_layout`]) and pushed to a
//! [`Registry`] ([`OciLayout::push`], which also pushes layouts made by other tools, whatever
//! their layer media types). [`sandbox_image`] is the CRI's pause image: busybox whose PID 1
//! exits at once on SIGTERM.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::{sha256_digest, Registry, TestkitError};

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";
/// OCI media type of an image manifest.
pub const MANIFEST_V1: &str = "application/vnd.oci.image.manifest.v1+json";

fn err(what: &str) -> impl FnOnce(std::io::Error) -> TestkitError + '_ {
    move |e| TestkitError::Setup(format!("{what}: {e}"))
}

/// Builds one uncompressed tar layer; parent directories are added as needed.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> LayerBuilder {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }

    /// A layer with the machine's static busybox as `/bin/busybox`, `/bin/sh` linking to it,
    /// and `/tmp`, `/etc`, `/proc`, `/sys`, `/dev`. `Missing` without busybox-static.
    pub fn busybox() -> Result<LayerBuilder, TestkitError> {
        let data = std::fs::read(BUSYBOX).map_err(|e| {
            TestkitError::Missing(format!("{BUSYBOX} (Debian's busybox-static): {e}"))
        })?;
        let mut b = LayerBuilder::new();
        b.file("bin/busybox", &data, 0o755)?;
        b.symlink("bin/sh", "busybox")?;
        for d in ["etc", "proc", "sys", "dev"] {
            b.dir(d, 0o755)?;
        }
        b.dir("tmp", 0o1777)?;
        Ok(b)
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        // A fixed time: the same files always make the same layer digest.
        h.set_mtime(1_700_000_000);
        h
    }

    fn parents(&mut self, path: &str) -> Result<(), TestkitError> {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for p in parts.iter().take(parts.len().saturating_sub(1)) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if !self.dirs.contains(&acc) {
                let a = acc.clone();
                self.dir(&a, 0o755)?;
            }
        }
        Ok(())
    }

    /// Adds a directory (relative path, no leading `/`).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, TestkitError> {
        let path = path.trim_matches('/');
        if self.dirs.contains(path) {
            return Ok(self);
        }
        self.parents(path)?;
        self.dirs.insert(path.to_string());
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .map_err(err("tar directory"))?;
        Ok(self)
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<&mut Self, TestkitError> {
        let path = path.trim_start_matches('/');
        self.parents(path)?;
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut h, path, data)
            .map_err(err("tar file"))?;
        Ok(self)
    }

    /// Adds a symlink `path -> target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, TestkitError> {
        let path = path.trim_start_matches('/');
        self.parents(path)?;
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, path, target)
            .map_err(err("tar symlink"))?;
        Ok(self)
    }

    /// The finished tar.
    pub fn finish(self) -> Result<Vec<u8>, TestkitError> {
        self.tar.into_inner().map_err(err("tar finish"))
    }
}

/// The runtime part of an image config.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` as `KEY=VALUE`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
}

/// One layer of a layout.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    /// Media type.
    pub media_type: String,
    /// Digest of the blob as stored.
    pub digest: String,
    /// Size of the blob as stored.
    pub size: u64,
}

/// An OCI image layout on disk with one image.
#[derive(Debug, Clone)]
pub struct OciLayout {
    /// The layout directory (`oci-layout`, `index.json`, `blobs/`).
    pub dir: PathBuf,
    /// The manifest's media type.
    pub manifest_media_type: String,
    /// The manifest's digest.
    pub manifest_digest: String,
    /// The config's digest.
    pub config_digest: String,
    /// The layers, base first.
    pub layers: Vec<LayerDesc>,
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Result<String, TestkitError> {
    let digest = sha256_digest(bytes);
    let hex = digest.trim_start_matches("sha256:");
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(err("creating blobs/sha256"))?;
    std::fs::write(blobs.join(hex), bytes).map_err(err("writing a blob"))?;
    Ok(digest)
}

/// The OCI name of this machine's architecture.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes an image of `layers` (uncompressed tars, base first; gzip-compressed when `gzip`) and
/// `config` as an OCI layout in `dir`, tagged `tag`.
pub fn write_layout(
    dir: &Path,
    layers: &[Vec<u8>],
    config: &ImageConfig,
    gzip: bool,
    tag: &str,
) -> Result<OciLayout, TestkitError> {
    std::fs::create_dir_all(dir).map_err(err("creating the layout dir"))?;
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(sha256_digest(tar));
        let (bytes, media_type) = if gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).map_err(err("gzip"))?;
            (
                gz.finish().map_err(err("gzip"))?,
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        } else {
            (tar.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        descs.push(LayerDesc {
            media_type: media_type.into(),
            digest: write_blob(dir, &bytes)?,
            size: bytes.len() as u64,
        });
    }
    let mut cfg = json!({});
    if !config.entrypoint.is_empty() {
        cfg["Entrypoint"] = json!(config.entrypoint);
    }
    if !config.cmd.is_empty() {
        cfg["Cmd"] = json!(config.cmd);
    }
    if !config.env.is_empty() {
        cfg["Env"] = json!(config.env);
    }
    if !config.working_dir.is_empty() {
        cfg["WorkingDir"] = json!(config.working_dir);
    }
    let config_bytes = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes();
    let config_digest = write_blob(dir, &config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_V1,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": descs.iter().map(|d| json!({"mediaType": d.media_type, "digest": d.digest, "size": d.size})).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes();
    let manifest_digest = write_blob(dir, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST_V1, "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).map_err(err("index.json"))?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(err("oci-layout"))?;
    Ok(OciLayout {
        dir: dir.to_path_buf(),
        manifest_media_type: MANIFEST_V1.into(),
        manifest_digest,
        config_digest,
        layers: descs,
    })
}

impl OciLayout {
    /// Opens a layout written by anyone (e.g. `shoal image convert`): the first manifest of its
    /// `index.json`.
    pub fn open(dir: &Path) -> Result<OciLayout, TestkitError> {
        let bad = |m: String| TestkitError::Setup(format!("OCI layout {}: {m}", dir.display()));
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("index.json")).map_err(|e| bad(format!("index.json: {e}")))?,
        )
        .map_err(|e| bad(format!("index.json: {e}")))?;
        let m = &index["manifests"][0];
        let manifest_digest = m["digest"]
            .as_str()
            .ok_or_else(|| bad("index.json has no manifest".into()))?
            .to_string();
        let manifest: serde_json::Value =
            serde_json::from_slice(&read_blob(dir, &manifest_digest)?)
                .map_err(|e| bad(format!("manifest: {e}")))?;
        let desc = |v: &serde_json::Value| -> Result<LayerDesc, TestkitError> {
            Ok(LayerDesc {
                media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
                digest: v["digest"]
                    .as_str()
                    .ok_or_else(|| bad("a descriptor without digest".into()))?
                    .to_string(),
                size: v["size"].as_u64().unwrap_or(0),
            })
        };
        let layers = manifest["layers"]
            .as_array()
            .ok_or_else(|| bad("manifest without layers".into()))?
            .iter()
            .map(desc)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OciLayout {
            dir: dir.to_path_buf(),
            manifest_media_type: m["mediaType"]
                .as_str()
                .or(manifest["mediaType"].as_str())
                .unwrap_or(MANIFEST_V1)
                .to_string(),
            manifest_digest,
            config_digest: desc(&manifest["config"])?.digest,
            layers,
        })
    }

    /// Pushes config, layers and manifest to `repo:tag`; returns the reference a CRI pull
    /// takes (`host:port/repo:tag`).
    pub async fn push(
        &self,
        reg: &Registry,
        repo: &str,
        tag: &str,
    ) -> Result<String, TestkitError> {
        for d in std::iter::once(&self.config_digest).chain(self.layers.iter().map(|l| &l.digest)) {
            reg.push_blob(repo, &read_blob(&self.dir, d)?).await?;
        }
        let manifest = read_blob(&self.dir, &self.manifest_digest)?;
        reg.push_manifest(repo, tag, &self.manifest_media_type, &manifest)
            .await?;
        Ok(format!("{}/{repo}:{tag}", reg.host()))
    }
}

/// Reads blob `digest` of layout `dir`.
pub fn read_blob(dir: &Path, digest: &str) -> Result<Vec<u8>, TestkitError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| TestkitError::Setup(format!("not a sha256 digest: {digest}")))?;
    std::fs::read(dir.join("blobs/sha256").join(hex))
        .map_err(|e| TestkitError::Setup(format!("blob {digest} in {}: {e}", dir.display())))
}

/// The CRI's sandbox ("pause") image: busybox whose PID 1 sleeps and exits 0 on SIGTERM, so
/// StopPodSandbox is quick. Written as a layout in `dir`.
pub fn sandbox_image(dir: &Path) -> Result<OciLayout, TestkitError> {
    let layer = LayerBuilder::busybox()?.finish()?;
    let config = ImageConfig {
        // `wait` returns as soon as the trapped signal arrives (a foreground sleep would not).
        entrypoint: vec![
            "/bin/sh".into(),
            "-c".into(),
            "trap 'exit 0' TERM INT; sleep 2147483647 & wait".into(),
        ],
        ..ImageConfig::default()
    };
    write_layout(dir, &[layer], &config, true, "pause")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips_and_layers_are_reproducible() {
        let d = tempfile::tempdir().unwrap();
        let mk = || {
            let mut b = LayerBuilder::new();
            b.file("a/b/c.txt", b"hello", 0o644).unwrap();
            b.symlink("a/link", "b/c.txt").unwrap();
            b.finish().unwrap()
        };
        assert_eq!(mk(), mk());
        let cfg = ImageConfig {
            cmd: vec!["/bin/true".into()],
            ..ImageConfig::default()
        };
        let w = write_layout(d.path(), &[mk()], &cfg, true, "v1").unwrap();
        let r = OciLayout::open(d.path()).unwrap();
        assert_eq!(r.manifest_digest, w.manifest_digest);
        assert_eq!(r.config_digest, w.config_digest);
        assert_eq!(r.layers.len(), 1);
        assert_eq!(
            r.layers[0].media_type,
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let config: serde_json::Value =
            serde_json::from_slice(&read_blob(d.path(), &r.config_digest).unwrap()).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            sha256_digest(&mk()).as_str()
        );
        assert_eq!(config["config"]["Cmd"][0], "/bin/true");
        let entries: Vec<String> = tar::Archive::new(mk().as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, ["a/", "a/b/", "a/b/c.txt", "a/link"]);
    }

    #[test]
    fn read_blob_refuses_paths() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_blob(d.path(), "sha256:../../etc/passwd").is_err());
    }
}
