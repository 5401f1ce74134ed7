//! Shoal indexes of plain images (`shoal image index`), looked up by the manifest digest
//! containerd's CRI passes with each layer (`cri.manifest-digest`): through the registry's
//! referrers API, else its referrers tag, with the snapshotter's credentials (`docker_config`).
//! An answer is remembered per manifest (an image's layers arrive one Prepare at a time): an
//! index for as long as the snapshotter runs (it never changes for a manifest digest), "none"
//! for `no_index_cache_secs`, so that plain images pay one lookup, not one per layer, and an
//! index pushed later is found by the next pull.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_spec::image::Descriptor;
use shoal_origin::{Reference, RegistryClient, RegistryOptions};

use super::bootstrap::BootstrapSource;
use super::labels::PlainLayer;
use crate::index::FoundIndex;

/// Longest wait for a lookup: a registry that does not answer must not hold up the pull (the
/// layer is then unpacked the ordinary way).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Manifests remembered at most (the oldest answers go first).
const MAX_REMEMBERED: usize = 4096;

/// What is known of one manifest.
#[derive(Clone)]
enum Known {
    Index(Arc<FoundIndex>),
    /// No index (or the lookup failed), until then.
    None(Instant),
}

/// Index lookups and their answers.
pub struct Indexes {
    source: BootstrapSource,
    no_index_for: Duration,
    known: Mutex<HashMap<String, Known>>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for Indexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Indexes").finish_non_exhaustive()
    }
}

impl Indexes {
    /// Lookups with `source`'s registry settings, on `rt`; "no index" kept `no_index_for`.
    pub fn new(
        source: BootstrapSource,
        no_index_for: Duration,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Indexes {
            source,
            no_index_for,
            known: Mutex::new(HashMap::new()),
            rt,
        }
    }

    /// The bootstrap of `layer`'s layer in its image's Shoal index, when the image has one that
    /// lists it. Blocks (call it off the runtime's workers).
    pub fn layer_bootstrap(&self, layer: &PlainLayer) -> Option<Descriptor> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&layer.manifest)
            .cloned();
        let index = match known {
            Some(Known::Index(i)) => i,
            Some(Known::None(until)) if Instant::now() < until => return None,
            _ => {
                let found = self.look_up(&layer.reference, &layer.manifest);
                let k = match &found {
                    Some(i) => Known::Index(Arc::clone(i)),
                    None => Known::None(Instant::now() + self.no_index_for),
                };
                let mut map = self.known.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() >= MAX_REMEMBERED {
                    map.clear();
                }
                map.insert(layer.manifest.clone(), k);
                found?
            }
        };
        index.layer(&layer.layer).cloned()
    }

    fn look_up(&self, reference: &Reference, manifest: &str) -> Option<Arc<FoundIndex>> {
        let opts = RegistryOptions {
            plain_http: self.source.plain_http.iter().cloned().collect(),
            docker_config_path: self.source.docker_config.clone(),
            max_attempts: 2,
            ..RegistryOptions::default()
        };
        let subject: shoal_origin::Digest = manifest.parse().ok()?;
        let image = format!(
            "{}/{}@{manifest}",
            reference.registry(),
            reference.repository()
        );
        let lookup = async {
            let client = RegistryClient::new(opts)?;
            crate::index::find_in_registry(&client, reference, &subject).await
        };
        let started = Instant::now();
        match self
            .rt
            .block_on(async { tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await })
        {
            Ok(Ok(Some(index))) => {
                tracing::info!(%image, index = %index.digest, layers = index.layers.len(),
                    secs = started.elapsed().as_secs_f64(), "a Shoal index: its layers are mounted lazily");
                Some(Arc::new(index))
            }
            Ok(Ok(None)) => {
                tracing::debug!(%image, "no Shoal index: the image is pulled the ordinary way");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(%image, error = %e, "looking for a Shoal index failed: the image is pulled the ordinary way");
                None
            }
            Err(_) => {
                tracing::warn!(%image, secs = LOOKUP_TIMEOUT.as_secs(), "looking for a Shoal index timed out: the image is pulled the ordinary way");
                None
            }
        }
    }
}
