//! Registry credentials the proxy saw containerd send, by repository, kept in memory only (never
//! written anywhere). Kubernetes pull secrets reach containerd and nothing else; containerd sends
//! them to the proxy with its manifest requests. Fetches made later for the same repository
//! without a client in front — a lazy mount's chunk reads, the snapshotter's bootstrap fetch —
//! carry them too, so private images start lazily.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a credential seen once is used for the repository's later fetches (a pod's image is
/// read lazily for as long as it runs; registries expire short-lived tokens themselves).
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// Repositories remembered at most (the oldest goes first).
const MAX_REPOSITORIES: usize = 4096;

/// Credentials by `registry/repository`.
#[derive(Debug, Default)]
pub struct SeenCredentials {
    by_repo: Mutex<HashMap<String, (String, Instant)>>,
}

/// One key for a registry host however it was named (`docker.io` is served by its API host).
fn key(registry: &str, repository: &str) -> String {
    let host = match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    };
    format!("{host}/{repository}")
}

impl SeenCredentials {
    /// Remembers `authorization`, which `registry` accepted for `repository`.
    pub fn remember(&self, registry: &str, repository: &str, authorization: &str) {
        let Ok(mut map) = self.by_repo.lock() else {
            return;
        };
        if map.len() >= MAX_REPOSITORIES {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            key(registry, repository),
            (authorization.to_string(), Instant::now()),
        );
    }

    /// The credential last seen for `repository` of `registry`, if fresh.
    pub fn get(&self, registry: &str, repository: &str) -> Option<String> {
        let map = self.by_repo.lock().ok()?;
        map.get(&key(registry, repository))
            .filter(|(_, at)| at.elapsed() < KEEP)
            .map(|(a, _)| a.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_per_repository_and_registry_alias() {
        let c = SeenCredentials::default();
        c.remember("docker.io", "library/app", "Basic abc");
        assert_eq!(
            c.get("registry-1.docker.io", "library/app").as_deref(),
            Some("Basic abc")
        );
        assert_eq!(c.get("docker.io", "library/other"), None);
        assert_eq!(c.get("other.io", "library/app"), None);
    }
}
