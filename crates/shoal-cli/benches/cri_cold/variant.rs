//! The ways a container gets its image: what each variant pushes, how its containerd is
//! configured and what runs beside it.

use std::path::Path;

use shoal_format::build::Source;
use shoal_testkit::{Containerd, ContainerdOpts, Registry, ShoalNode};

use crate::image::{self, Layer};
use crate::Res;

/// One way of starting containers from the benchmark image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// containerd's overlayfs snapshotter pulls the plain OCI image (one gzip layer): download,
    /// gunzip and unpack before the container starts. The baseline.
    Overlayfs,
    /// Shoal's snapshotter with the same files converted to a Shoal image (its prefetch list is
    /// the startup list, as `shoal fs mount --record-access` would write it): the pull fetches
    /// the manifest, config and bootstrap through the node's peer, the container starts on the
    /// lazy mount, and the workload's chunks arrive through the peer as they are read.
    Shoal,
    /// Shoal's snapshotter with the plain OCI image itself (the baseline's gzip layer), indexed
    /// with `shoal image index --span SPAN --prefetch` of the converted image's startup list
    /// (issue 24): the pull fetches the manifest, config, index and layer bootstrap; the mount
    /// fetches the listed files' gzip spans at start, and the workload's other reads the spans
    /// they fall in, piece by piece through the node's peer, inflated from their checkpoints.
    Index {
        /// Compressed bytes between gzip checkpoints.
        span: u32,
    },
}

/// The index variant's default span (`shoal image index`'s default).
const DEFAULT_SPAN: u32 = 4 << 20;

impl Variant {
    /// The variants run by default, in order.
    pub const ALL: [Variant; 3] = [
        Variant::Overlayfs,
        Variant::Shoal,
        Variant::Index { span: DEFAULT_SPAN },
    ];

    /// Its name in the output and in `CRI_VARIANTS` (`index@SPAN` for another span).
    pub fn name(self) -> String {
        match self {
            Variant::Overlayfs => "overlayfs".into(),
            Variant::Shoal => "shoal".into(),
            Variant::Index { span } => format!("index@{}", size_name(span)),
        }
    }

    /// The variants `CRI_VARIANTS` names (all by default): `overlayfs`, `shoal`, `index`
    /// (4M spans) or `index@SPAN` (`512K`, `1M`, ...).
    pub fn from_env() -> Res<Vec<Variant>> {
        let Ok(list) = std::env::var("CRI_VARIANTS") else {
            return Ok(Variant::ALL.to_vec());
        };
        list.split(',')
            .map(|n| match n.trim() {
                "overlayfs" => Ok(Variant::Overlayfs),
                "shoal" => Ok(Variant::Shoal),
                "index" => Ok(Variant::Index { span: DEFAULT_SPAN }),
                other => other
                    .strip_prefix("index@")
                    .and_then(parse_size)
                    .map(|span| Variant::Index { span })
                    .ok_or_else(|| format!("CRI_VARIANTS: no variant {n:?}").into()),
            })
            .collect()
    }

    /// containerd's options for this variant.
    pub fn containerd_opts(self, base: ContainerdOpts) -> ContainerdOpts {
        match self {
            Variant::Overlayfs => base,
            Variant::Shoal | Variant::Index { .. } => {
                base.with_shoal_snapshotter("shoal-snapshotter.sock")
            }
        }
    }

    /// Starts what runs beside containerd (in its namespace) and points its registry config.
    pub async fn start_helpers(self, ctrd: &Containerd, images: &Images) -> Res<Helpers> {
        match self {
            Variant::Overlayfs => {
                ctrd.add_registry(&images.origin, None)?;
                Ok(Helpers::default())
            }
            Variant::Shoal | Variant::Index { .. } => {
                let bin = Path::new(env!("CARGO_BIN_EXE_shoal"));
                let shoal = ShoalNode::start(bin, ctrd.dir(), &images.origin, ctrd)?;
                Ok(Helpers { shoal: Some(shoal) })
            }
        }
    }

    /// The image reference a CRI pull of this variant names.
    pub fn image(self, images: &Images) -> String {
        match self {
            Variant::Overlayfs => format!("{}/bench/plain:v1", images.origin),
            Variant::Shoal => format!("{}/bench/shoal:v1", images.origin),
            Variant::Index { span } => format!("{}/{}:v1", images.origin, index_repo(span)),
        }
    }
}

/// Processes a variant runs beside containerd (killed on drop).
#[derive(Default)]
pub struct Helpers {
    /// Shoal's peer and snapshotter (and the lazy mounts' processes).
    pub shoal: Option<ShoalNode>,
}

impl Helpers {
    /// Peak RSS (KiB) of each helper, by name.
    pub fn rss(&self) -> Vec<(String, u64)> {
        self.shoal
            .iter()
            .flat_map(ShoalNode::pids)
            .map(|(n, pid)| (n, crate::round::peak_rss_kib(pid)))
            .collect()
    }

    /// (bytes read, stored bytes fetched) of the lazy mounts, when there are any.
    pub fn lazy_bytes(&self, ctrd: &Containerd) -> Option<(u64, u64)> {
        let shoal = self.shoal.as_ref()?;
        let stats = shoal_fs::snapshotter::read_stats(&shoal.root(ctrd).join("images"));
        Some(stats.iter().fold((0, 0), |(r, f), (_, s)| {
            (r + s.read_bytes, f + s.fetched_peer + s.fetched_origin)
        }))
    }
}

/// `512K`, `4M`: a span's size as `shoal image index --span` takes it.
fn size_name(n: u32) -> String {
    if n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else {
        format!("{}K", n >> 10)
    }
}

/// `512K`, `4M` (or bytes) as a number of bytes.
fn parse_size(s: &str) -> Option<u32> {
    let (num, mul) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<u32>().ok()?.checked_mul(mul)
}

/// The repository of the plain image indexed at `span` (one per span: each holds one index).
fn index_repo(span: u32) -> String {
    format!("bench/index-{}", size_name(span).to_lowercase())
}

/// What `shoal image index` reported for one span.
pub struct Indexed {
    /// The span.
    pub span: u32,
    /// Bytes of the index (manifest, config, bootstrap, checkpoint windows).
    pub index_bytes: u64,
    /// `index_bytes` ÷ the image's bytes.
    pub ratio: f64,
    /// Seconds it took.
    pub seconds: f64,
    /// Uncompressed tar MB/s.
    pub mb_per_s: f64,
}

/// The images every variant pulls, pushed once.
pub struct Images {
    /// `host:port` of the registry as the client host reaches it (the relay in the origin host).
    pub origin: String,
    /// The sandbox image's reference.
    pub sandbox: String,
    /// Size of the plain image's gzip layer.
    pub plain_gzip: u64,
    /// Stored size of the converted image's blobs (bootstrap included).
    pub shoal_stored: u64,
    /// Seconds `shoal image convert` of the tar took (in this process), and the tar's bytes.
    pub convert: Option<(f64, u64)>,
    /// Each index variant's index.
    pub indexes: Vec<Indexed>,
}

impl Images {
    /// Pushes the sandbox image and each variant's image of `layer`.
    pub async fn push(
        reg: &Registry,
        layer: &Layer,
        work: &Path,
        origin: &str,
        variants: &[Variant],
    ) -> Res<Images> {
        let pause = shoal_testkit::sandbox_image(&work.join("pause"))?;
        pause.push(reg, "bench/pause", "1").await?;
        let (mut plain_gzip, mut shoal_stored, mut convert) = (0, 0, None);
        let mut indexes = Vec::new();
        for v in variants {
            match *v {
                Variant::Overlayfs => {
                    plain_gzip = image::push_plain(reg, layer, "bench/plain", "v1").await?;
                }
                Variant::Shoal => {
                    let out = work.join("shoal-layout");
                    let list = image::startup_list();
                    let t = std::time::Instant::now();
                    shoal_stored =
                        image::convert_shoal(Source::Tar(layer.tar.clone()), &out, &list)?;
                    let tar = std::fs::metadata(&layer.tar).map_or(0, |m| m.len());
                    convert = Some((t.elapsed().as_secs_f64(), tar));
                    image::push_layout(reg, &out, "bench/shoal", "v1").await?;
                }
                Variant::Index { span } => {
                    let repo = index_repo(span);
                    plain_gzip = image::push_plain(reg, layer, &repo, "v1").await?;
                    let target = format!("docker://{}/{repo}:v1", reg.host());
                    // The converted image's prefetch list, so both start from the same guess.
                    let list = work.join("startup.list");
                    std::fs::write(&list, image::startup_list().join("\n") + "\n")?;
                    indexes.push(index(&target, span, &list)?);
                }
            }
        }
        Ok(Images {
            origin: origin.to_string(),
            sandbox: format!("{origin}/bench/pause:1"),
            plain_gzip,
            shoal_stored,
            convert,
            indexes,
        })
    }

    /// What was pushed, for the report.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "plain image gzip layer {:.1} MB, Shoal image {:.1} MB stored",
            self.plain_gzip as f64 / 1e6,
            self.shoal_stored as f64 / 1e6
        );
        if let Some((secs, tar)) = self.convert {
            out += &format!(
                "; shoal image convert {secs:.1} s ({:.1} MB/s of tar)",
                tar as f64 / 1e6 / secs
            );
        }
        for i in &self.indexes {
            out += &format!(
                "; index at {} spans {:.2} MB ({:.2} % of the image), shoal image index {:.1} s ({:.1} MB/s of tar)",
                size_name(i.span),
                i.index_bytes as f64 / 1e6,
                100.0 * i.ratio,
                i.seconds,
                i.mb_per_s
            );
        }
        out
    }
}

/// Runs `shoal image index --span SPAN --prefetch LIST` of `target` (pushing the index beside
/// it).
fn index(target: &str, span: u32, list: &Path) -> Res<Indexed> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["image", "index", target, "--json", "--span"])
        .arg(size_name(span))
        .arg("--prefetch")
        .arg(list)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "shoal image index {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let f = |k: &str| {
        r[k].as_f64()
            .ok_or_else(|| format!("index report without {k}: {r}"))
    };
    Ok(Indexed {
        span,
        index_bytes: f("index_bytes")? as u64,
        ratio: f("ratio")?,
        seconds: f("seconds")?,
        mb_per_s: f("mb_per_s")?,
    })
}
