//! The ways a container gets its image: what each variant pushes, how its containerd is
//! configured and what runs beside it. The Shoal snapshotter variant is added here.

use std::path::Path;

use shoal_testkit::{Containerd, ContainerdOpts, NsProcess, Registry};

use crate::image::{self, Layer};
use crate::Res;

/// One way of starting containers from the benchmark image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// containerd's overlayfs snapshotter pulls the plain OCI image (one gzip layer): download,
    /// gunzip and unpack before the container starts. The baseline.
    Overlayfs,
    // Shoal (to add): the converted image (`image::convert_shoal` of the same layer, pushed with
    // `image::push_layout` as "bench/shoal" in `Images::push`); `ContainerdOpts::
    // with_shoal_snapshotter(...)` in `containerd_opts`; in `start_helpers`, `shoal peer` (its
    // registry proxy) and `shoal snapshotter` spawned in containerd's namespace
    // (`ctrd.ns().spawn`) and `ctrd.add_registry(origin, Some(proxy URL))`; `image` names
    // "bench/shoal". The round then also reports bytes fetched ÷ bytes read and the
    // snapshotter's RSS (`Helpers::rss`).
}

impl Variant {
    /// Every variant, in the order they run.
    pub const ALL: [Variant; 1] = [Variant::Overlayfs];

    /// Its name in the output and in `CRI_VARIANTS`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Overlayfs => "overlayfs",
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
        }
    }

    /// Starts what runs beside containerd (in its namespace) and points its registry config.
    pub async fn start_helpers(self, ctrd: &Containerd, images: &Images) -> Res<Helpers> {
        match self {
            Variant::Overlayfs => {
                ctrd.add_registry(&images.origin, None)?;
                Ok(Helpers::default())
            }
        }
    }

    /// The image reference a CRI pull of this variant names.
    pub fn image(self, images: &Images) -> String {
        match self {
            Variant::Overlayfs => format!("{}/bench/plain:v1", images.origin),
        }
    }
}

/// Processes a variant runs beside containerd (killed on drop).
#[derive(Default)]
pub struct Helpers {
    /// The processes.
    pub procs: Vec<NsProcess>,
}

impl Helpers {
    /// Peak RSS (KiB) of each helper, by name.
    pub fn rss(&self) -> Vec<(String, u64)> {
        self.procs
            .iter()
            .map(|p| (p.name().to_string(), crate::round::peak_rss_kib(p.pid())))
            .collect()
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
        let mut plain_gzip = 0;
        for v in variants {
            match v {
                Variant::Overlayfs => {
                    plain_gzip = image::push_plain(reg, layer, "bench/plain", "v1").await?;
                }
            }
        }
        Ok(Images {
            origin: origin.to_string(),
            sandbox: format!("{origin}/bench/pause:1"),
            plain_gzip,
        })
    }

    /// What was pushed, for the report.
    pub fn describe(&self) -> String {
        format!(
            "plain image gzip layer {:.1} MB",
            self.plain_gzip as f64 / 1e6
        )
    }
}
