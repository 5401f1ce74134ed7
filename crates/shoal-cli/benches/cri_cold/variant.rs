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
}

impl Variant {
    /// Every variant, in the order they run.
    pub const ALL: [Variant; 2] = [Variant::Overlayfs, Variant::Shoal];

    /// Its name in the output and in `CRI_VARIANTS`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Overlayfs => "overlayfs",
            Variant::Shoal => "shoal",
        }
    }

    /// The variants `CRI_VARIANTS` names (all by default).
    pub fn from_env() -> Res<Vec<Variant>> {
        let Ok(list) = std::env::var("CRI_VARIANTS") else {
            return Ok(Variant::ALL.to_vec());
        };
        list.split(',')
            .map(|n| {
                Variant::ALL
                    .into_iter()
                    .find(|v| v.name() == n.trim())
                    .ok_or_else(|| format!("CRI_VARIANTS: no variant {n:?}").into())
            })
            .collect()
    }

    /// containerd's options for this variant.
    pub fn containerd_opts(self, base: ContainerdOpts) -> ContainerdOpts {
        match self {
            Variant::Overlayfs => base,
            Variant::Shoal => base.with_shoal_snapshotter("shoal-snapshotter.sock"),
        }
    }

    /// Starts what runs beside containerd (in its namespace) and points its registry config.
    pub async fn start_helpers(self, ctrd: &Containerd, images: &Images) -> Res<Helpers> {
        match self {
            Variant::Overlayfs => {
                ctrd.add_registry(&images.origin, None)?;
                Ok(Helpers::default())
            }
            Variant::Shoal => {
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
        let (mut plain_gzip, mut shoal_stored) = (0, 0);
        for v in variants {
            match v {
                Variant::Overlayfs => {
                    plain_gzip = image::push_plain(reg, layer, "bench/plain", "v1").await?;
                }
                Variant::Shoal => {
                    let out = work.join("shoal-layout");
                    let list = image::startup_list();
                    shoal_stored =
                        image::convert_shoal(Source::Tar(layer.tar.clone()), &out, &list)?;
                    image::push_layout(reg, &out, "bench/shoal", "v1").await?;
                }
            }
        }
        Ok(Images {
            origin: origin.to_string(),
            sandbox: format!("{origin}/bench/pause:1"),
            plain_gzip,
            shoal_stored,
        })
    }

    /// What was pushed, for the report.
    pub fn describe(&self) -> String {
        format!(
            "plain image gzip layer {:.1} MB, Shoal image {:.1} MB stored",
            self.plain_gzip as f64 / 1e6,
            self.shoal_stored as f64 / 1e6
        )
    }
}
