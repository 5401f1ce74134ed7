//! `shoal image`: convert, index, inspect, verify, unpack.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use shoal_format::build::{self, BuildOptions, Source};
use shoal_format::image::ShoalImage;
use shoal_format::oci::LayoutRef;
use tempfile::TempDir;

use crate::registry::{self, Progress, RegistryArgs};

/// `shoal image` and the registry settings its `docker://` sources and targets use.
#[derive(Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// The `shoal image` subcommands.
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Convert an OCI image, a directory or a tar layer into a Shoal image in an OCI layout.
    Convert(ConvertArgs),
    /// Print files, chunks, dedup ratio, sizes and the root hash of an image.
    Inspect {
        /// `docker://REF`, `oci:DIR[:TAG]`, a directory, or a tar layer (non-Shoal sources are
        /// converted first).
        src: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recompute every hash of an image from its blobs; fail naming the first bad object.
    Verify {
        /// `docker://REF` or `oci:DIR[:TAG]` of a Shoal image (other sources are converted first).
        src: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pull a Shoal image into containerd lazily (no data blob downloaded), for `ctr run
    /// --snapshotter shoal`.
    Pull(crate::image_pull::PullArgs),
    /// Index an existing OCI image without converting it: per layer a bootstrap whose chunks
    /// point into the original layer blob, published as an OCI referrer of the image.
    Index(crate::index::IndexArgs),
    /// Materialise an image's tree under a new directory.
    Unpack {
        /// `docker://REF`, `oci:DIR[:TAG]`, a directory, or a tar layer.
        src: String,
        /// Target directory: must not exist or be empty.
        #[arg(long)]
        to: PathBuf,
    },
}

/// Arguments of `shoal image convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// `docker://REF`, `oci:DIR[:TAG]`, a directory, or a tar / tar.gz / tar.zst layer.
    #[arg(long)]
    source: String,
    /// `oci:DIR[:TAG]` to write the Shoal image into (created if missing).
    #[arg(long, required_unless_present = "target")]
    output: Option<String>,
    /// `docker://REF` to push the converted image to (blobs the registry has are skipped).
    #[arg(long)]
    target: Option<String>,
    /// Chunk size in bytes (power of two, 64 KiB..16 MiB); suffixes K and M allowed.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    chunk_size: u32,
    /// Piece size of data blobs in bytes (power of two); suffixes K and M allowed.
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    piece_size: u32,
    /// zstd compression level (1..=19).
    #[arg(long, default_value_t = build::DEFAULT_LEVEL)]
    compression_level: i32,
    /// File listing paths to prefetch after mount, one per line, in order.
    #[arg(long)]
    prefetch: Option<PathBuf>,
    /// An earlier converted image (`oci:DIR[:TAG]`) whose chunks may be reused; repeatable.
    #[arg(long)]
    chunk_dict: Vec<String>,
    /// Print statistics as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn parse_size(s: &str) -> Result<u32, String> {
    let (num, mult) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with("KIB") || t.ends_with('K') => (
            t.trim_end_matches("KIB").trim_end_matches('K').to_string(),
            1u64 << 10,
        ),
        t if t.ends_with("MIB") || t.ends_with('M') => (
            t.trim_end_matches("MIB").trim_end_matches('M').to_string(),
            1u64 << 20,
        ),
        t => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1M, 256K or 65536"))?;
    u32::try_from(n * mult).map_err(|_| format!("{s} is too large"))
}

pub(crate) fn layout(s: &str) -> anyhow::Result<LayoutRef> {
    LayoutRef::parse(s)
        .with_context(|| format!("{s:?} is not an OCI layout reference (oci:DIR[:TAG])"))
}

/// Runs one `shoal image` subcommand.
pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    let reg = &args.registry;
    match args.command {
        ImageCommand::Convert(a) => convert(a, reg),
        ImageCommand::Pull(a) => crate::image_pull::run(a, reg),
        ImageCommand::Index(a) => crate::index::run(a, reg),
        ImageCommand::Inspect { src, json } => {
            if let Some((desc, layers)) = crate::index::find_index(&src, reg)? {
                if json {
                    let v =
                        serde_json::json!({ "index": desc.digest().to_string(), "layers": layers });
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!(
                        "index         {} (a Shoal index of this unconverted image)",
                        desc.digest()
                    );
                    for (i, l) in layers.iter().enumerate() {
                        println!(
                            "layer {i:<3}     {}  {:<4}  {:>5} checkpoints  {}  bootstrap {} bytes",
                            l.layer,
                            l.compression,
                            l.checkpoints,
                            if l.lazy {
                                "lazy"
                            } else {
                                "whole layer (not lazy)"
                            },
                            l.bootstrap.1
                        );
                    }
                }
                return Ok(());
            }
            let (img, _tmp) = open_any(&src, reg, json)?;
            let s = img.summary();
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("manifest      {}", s.manifest);
                println!("bootstrap     {} ({} bytes)", s.bootstrap, s.bootstrap_size);
                println!("root          {}", s.root);
                println!("files         {} ({} bytes)", s.files, s.file_bytes);
                println!("dirs          {}", s.dirs);
                println!("symlinks      {}", s.symlinks);
                println!("special       {}", s.special);
                println!("chunk size    {}", s.chunk_size);
                println!(
                    "chunks        {} references, {} unique ({} bytes, {} stored)",
                    s.chunk_refs, s.unique_chunks, s.unique_bytes, s.stored_bytes
                );
                println!("dedup ratio   {:.3}", s.dedup_ratio);
                println!("prefetch      {} entries", s.prefetch);
                for (d, size) in &s.blobs {
                    println!("blob          {d} ({size} bytes)");
                }
            }
            Ok(())
        }
        ImageCommand::Verify { src, json } => {
            let (r, _tmp) = shoal_ref(&src, reg, json)?;
            let report = shoal_format::verify::verify(&r)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "ok: root {} ({} inodes, {} blobs / {} bytes / {} pieces, {} chunks)",
                    report.root,
                    report.inodes,
                    report.blobs,
                    report.blob_bytes,
                    report.pieces,
                    report.chunks
                );
            }
            Ok(())
        }
        ImageCommand::Unpack { src, to } => {
            let (img, _tmp) = open_any(&src, reg, false)?;
            let stats = shoal_format::unpack::unpack(&img, &to)?;
            eprintln!(
                "unpacked {} entries, {} bytes into {}",
                stats.entries,
                stats.bytes_written,
                to.display()
            );
            Ok(())
        }
    }
}

fn convert(a: ConvertArgs, reg: &RegistryArgs) -> anyhow::Result<()> {
    let progress = Progress::new(a.json);
    let (src, _pulled) = local_source(&a.source, reg, &progress)?;
    let target = a
        .target
        .as_deref()
        .map(|t| {
            registry::parse_reference(t)
                .with_context(|| format!("--target {t:?}: expected docker://REF"))
        })
        .transpose()?
        .transpose()?;
    let mut _out_tmp = None;
    let out = match &a.output {
        Some(o) => layout(o)?,
        None => {
            let tmp = TempDir::new().context("creating a temporary directory")?;
            let r = LayoutRef {
                dir: tmp.path().to_path_buf(),
                tag: None,
            };
            _out_tmp = Some(tmp);
            r
        }
    };
    let prefetch = match &a.prefetch {
        Some(p) => read_prefetch_list(p)?,
        None => Vec::new(),
    };
    let opts = BuildOptions {
        chunk_size: a.chunk_size,
        level: a.compression_level,
        piece_size: a.piece_size,
        prefetch,
        chunk_dicts: a
            .chunk_dict
            .iter()
            .map(|d| layout(d))
            .collect::<anyhow::Result<_>>()?,
        tag: None,
    };
    let (_, s) = build::convert(&src, &out, &opts)?;
    let pushed = match &target {
        Some(t) => {
            let client = reg.client(t)?;
            Some(registry::block_on(registry::push_layout(
                &client, &out, t, &progress,
            ))??)
        }
        None => None,
    };
    if a.json {
        let mut v = serde_json::to_value(&s)?;
        if let (Some(p), Some(obj)) = (&pushed, v.as_object_mut()) {
            obj.insert("pushed".into(), serde_json::to_value(p)?);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("manifest          {}", s.manifest);
        println!("root              {}", s.root);
        println!("layers            {}", s.layers);
        println!("files             {}", s.files);
        println!("bytes in          {}", s.bytes_in);
        println!("file bytes        {}", s.file_bytes);
        println!("chunks            {}", s.chunks);
        println!(
            "unique chunks     {} ({} new, {} from chunk dictionaries)",
            s.unique_chunks, s.new_chunks, s.dict_chunks
        );
        println!("dedup ratio       {:.3}", s.dedup_ratio);
        println!("data blob bytes   {}", s.blob_bytes);
        println!("bootstrap bytes   {}", s.bootstrap_bytes);
        println!(
            "time              {:.2} s ({:.1} MB/s)",
            s.seconds, s.mb_per_s
        );
        if let (Some(p), Some(t)) = (&pushed, &target) {
            println!(
                "pushed            {t}@{} ({} blobs, {} bytes; {} already there)",
                p.manifest, p.uploaded, p.bytes, p.skipped
            );
        }
    }
    Ok(())
}

/// `src` as a builder source; a `docker://` image is pulled into a temporary layout first (kept
/// alive by the returned guard).
fn local_source(
    src: &str,
    reg: &RegistryArgs,
    progress: &Progress,
) -> anyhow::Result<(Source, Option<TempDir>)> {
    let Some(reference) = registry::parse_reference(src) else {
        return Ok((Source::parse(src)?, None));
    };
    let reference = reference?;
    let client = reg.client(&reference)?;
    let tmp = TempDir::new().context("creating a temporary directory")?;
    let layout = registry::block_on(registry::pull_to_layout(
        &client,
        &reference,
        tmp.path(),
        "pulled",
        progress,
    ))??;
    Ok((Source::Layout(layout), Some(tmp)))
}

/// A Shoal image reference for `src`: itself when it is one, else a conversion into a temporary
/// layout (kept alive by the returned guard).
fn shoal_ref(
    src: &str,
    reg: &RegistryArgs,
    quiet: bool,
) -> anyhow::Result<(LayoutRef, Vec<TempDir>)> {
    let (source, pulled) = local_source(src, reg, &Progress::new(quiet))?;
    let mut guards: Vec<TempDir> = pulled.into_iter().collect();
    if let Source::Layout(r) = &source {
        let (desc, manifest) = shoal_format::oci::resolve(r)?;
        if shoal_format::image::find_bootstrap(desc.digest().as_ref(), &manifest)?.is_some() {
            return Ok((r.clone(), guards));
        }
    }
    let tmp = TempDir::new().context("creating a temporary directory")?;
    let r = LayoutRef {
        dir: tmp.path().to_path_buf(),
        tag: None,
    };
    build::convert(&source, &r, &BuildOptions::default())
        .with_context(|| format!("converting {src}"))?;
    guards.push(tmp);
    Ok((r, guards))
}

fn open_any(
    src: &str,
    reg: &RegistryArgs,
    quiet: bool,
) -> anyhow::Result<(ShoalImage, Vec<TempDir>)> {
    let (r, tmp) = shoal_ref(src, reg, quiet)?;
    let img = ShoalImage::open(&r)?;
    if img.meta.inodes.is_empty() {
        bail!("{src}: image has no inodes");
    }
    Ok((img, tmp))
}

/// The paths of a `--prefetch` file: one per line, in order, a leading `/` dropped; blank lines
/// and lines starting with `#` skipped (the format `shoal fs mount --record-access` writes).
pub fn read_prefetch_list(p: &std::path::Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text =
        std::fs::read(p).with_context(|| format!("reading prefetch list {}", p.display()))?;
    let mut prefetch = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let trimmed = line.strip_prefix(b"/").unwrap_or(line);
        if !trimmed.is_empty() && !line.starts_with(b"#") {
            prefetch.push(trimmed.to_vec());
        }
    }
    Ok(prefetch)
}
