//! Mirror mode: which upstream registry a request is for (containerd's `ns=` query parameter,
//! else the `Shoal-Upstream` header, else the configured default), the upstream URL of a
//! request, and whether the request is a blob by digest.

use std::collections::HashSet;

use http::HeaderMap;
use shoal_proto::Digest;

/// Header naming the upstream registry for clients that cannot add `ns=`.
pub(crate) const UPSTREAM_HEADER: &str = "shoal-upstream";

/// Longest registry host accepted.
const MAX_HOST_LEN: usize = 255;

/// The registry a request goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upstream {
    /// `host[:port]` as requests address it (`docker.io` already mapped to its API host).
    pub host: String,
    /// `http://host` or `https://host`.
    pub base: String,
}

impl Upstream {
    /// The upstream of a request, or why none can be chosen (answered with 400).
    pub fn of(
        query: Option<&str>,
        headers: &HeaderMap,
        default: Option<&str>,
        plain_http: &HashSet<String>,
    ) -> Result<Upstream, String> {
        let from_query = query.and_then(|q| {
            q.split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == "ns")
                .map(|(_, v)| v.to_string())
        });
        let from_header = || {
            headers
                .get(UPSTREAM_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let host = from_query
            .map(|h| crate::api::percent_decode(&h).map_err(|e| e.to_string()))
            .transpose()?
            .or_else(from_header)
            .or_else(|| default.map(str::to_string))
            .ok_or_else(|| {
                "no upstream registry: pass ?ns=<registry> (containerd does), the Shoal-Upstream header, or configure proxy.default_upstream".to_string()
            })?;
        let host = api_host(&host);
        if host.is_empty()
            || host.len() > MAX_HOST_LEN
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        {
            return Err(format!("upstream registry {host:?} is not a host[:port]"));
        }
        let plain = shoal_origin::is_loopback_host(&host) || plain_http.contains(&host);
        let base = format!("{}://{host}", if plain { "http" } else { "https" });
        Ok(Upstream { host, base })
    }

    /// The upstream URL for `path` with `query`, minus the mirror's own `ns=` parameter.
    pub fn url(&self, path: &str, query: Option<&str>) -> String {
        format!("{}{}", self.base, Self::target(path, query))
    }

    /// `path` with `query` minus the mirror's own `ns=` parameter (a request's origin form).
    pub fn target(path: &str, query: Option<&str>) -> String {
        let rest: Vec<&str> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("ns="))
            .collect();
        if rest.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", rest.join("&"))
        }
    }
}

/// Docker Hub's registry name and its API host differ.
fn api_host(name: &str) -> String {
    match name {
        "docker.io" | "index.docker.io" => "registry-1.docker.io".into(),
        other => other.to_string(),
    }
}

/// A blob request: `/v2/<name>/blobs/<digest>` with a sha256 digest; `None` for anything else
/// (uploads, other digest algorithms, manifests, tags...), which passes through.
pub(crate) fn blob_route(path: &str) -> Option<(&str, Digest)> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    if name.is_empty() || name.len() > 255 || !valid_name(name) {
        return None;
    }
    Some((name, Digest::parse(digest).ok()?))
}

/// The repository of a manifest request (`/v2/<name>/manifests/<reference>`).
pub(crate) fn manifest_repository(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, reference) = rest.rsplit_once("/manifests/")?;
    (!reference.is_empty() && name.len() <= 255 && valid_name(name)).then_some(name)
}

/// OCI repository name characters: lowercase alphanumerics and separators `._-/`.
fn valid_name(name: &str) -> bool {
    name.split('/').all(|c| {
        !c.is_empty()
            && c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    #[test]
    fn upstream_choice() {
        let none = HashSet::new();
        let mut h = HeaderMap::new();
        let u = Upstream::of(Some("ns=docker.io"), &h, Some("x.example"), &none).unwrap();
        assert_eq!(u.host, "registry-1.docker.io");
        assert_eq!(u.base, "https://registry-1.docker.io");
        h.insert(UPSTREAM_HEADER, "127.0.0.1:5000".parse().unwrap());
        let u = Upstream::of(None, &h, Some("x.example"), &none).unwrap();
        assert_eq!(u.base, "http://127.0.0.1:5000");
        let u = Upstream::of(Some("a=b"), &HeaderMap::new(), Some("x.example"), &none).unwrap();
        assert_eq!(u.host, "x.example");
        assert!(Upstream::of(None, &HeaderMap::new(), None, &none).is_err());
        assert!(Upstream::of(Some("ns=a/b"), &HeaderMap::new(), None, &none).is_err());
        assert!(Upstream::of(Some("ns=a%40b"), &HeaderMap::new(), None, &none).is_err());
        let plain: HashSet<String> = ["reg.lan:5000".to_string()].into();
        let u = Upstream::of(Some("ns=reg.lan%3A5000"), &HeaderMap::new(), None, &plain).unwrap();
        assert_eq!(u.base, "http://reg.lan:5000");
        assert_eq!(
            u.url("/v2/a/tags/list", Some("ns=reg.lan:5000&n=10")),
            "http://reg.lan:5000/v2/a/tags/list?n=10"
        );
        assert_eq!(u.url("/v2/", Some("ns=x")), "http://reg.lan:5000/v2/");
    }

    #[test]
    fn manifest_repositories() {
        assert_eq!(
            manifest_repository("/v2/library/app/manifests/v1"),
            Some("library/app")
        );
        assert_eq!(manifest_repository("/v2/app/manifests/"), None);
        assert_eq!(manifest_repository("/v2/App/manifests/v1"), None);
        assert_eq!(manifest_repository("/v2/app/blobs/sha256:aa"), None);
    }

    #[test]
    fn blob_routes() {
        let path = format!("/v2/library/busybox/blobs/{D}");
        let (name, d) = blob_route(&path).unwrap();
        assert_eq!(name, "library/busybox");
        assert_eq!(d.to_string(), D);
        assert!(blob_route("/v2/a/blobs/uploads/").is_none());
        assert!(blob_route("/v2/a/manifests/latest").is_none());
        assert!(blob_route(&format!("/v2//blobs/{D}")).is_none());
        assert!(blob_route(&format!("/v2/A/blobs/{D}")).is_none());
        assert!(blob_route("/v2/a/blobs/sha512:00").is_none());
        assert!(blob_route(&format!("/v3/a/blobs/{D}")).is_none());
    }
}
