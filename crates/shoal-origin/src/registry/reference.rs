//! `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]` references, parsed and checked before any request.

use std::fmt;
use std::net::IpAddr;

use crate::{Digest, OriginError};

/// An image in a registry: host, repository and a tag or digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses `docker://HOST[:PORT]/REPO[:TAG|@sha256:...]` (the `docker://` prefix is optional).
    ///
    /// The host is required: Shoal never guesses a default registry.
    pub fn parse(input: &str) -> Result<Self, OriginError> {
        let bad = |reason: &str| OriginError::InvalidReference {
            reference: input.to_string(),
            reason: reason.to_string(),
        };
        if input.len() > 4096 {
            return Err(bad("longer than 4096 bytes"));
        }
        let rest = input.strip_prefix("docker://").unwrap_or(input);
        let (name, digest) = match rest.split_once('@') {
            Some((n, d)) => (
                n,
                Some(d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?),
            ),
            None => (rest, None),
        };
        let (registry, path) = name
            .split_once('/')
            .ok_or_else(|| bad("no repository after the registry host"))?;
        if !is_registry_host(registry) {
            return Err(bad(
                "the first component must be a registry host (with a '.' or a port, or localhost)",
            ));
        }
        // A tag follows the last ':' after the last '/'.
        let last = path.rsplit('/').next().unwrap_or(path);
        let (repository, tag) = match last.rfind(':') {
            Some(i) => {
                let cut = path.len() - last.len() + i;
                (&path[..cut], Some(&path[cut + 1..]))
            }
            None => (path, None),
        };
        if !is_repository(repository) {
            return Err(bad(
                "repository must be lowercase [a-z0-9] components separated by '/', '.', '_' or '-'",
            ));
        }
        if let Some(t) = tag {
            if !is_tag(t) {
                return Err(bad("tag must be [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        Ok(Reference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// A reference to another tag or digest in the same repository.
    pub fn with_digest(&self, digest: Digest) -> Self {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// A reference to `tag` in the same repository.
    pub fn with_tag(&self, tag: &str) -> Result<Self, OriginError> {
        if !is_tag(tag) {
            return Err(OriginError::InvalidReference {
                reference: format!("{}/{}:{tag}", self.registry, self.repository),
                reason: "tag must be [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}".into(),
            });
        }
        Ok(Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// Registry host with optional port (`127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path (`team/app`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if one was given.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if one was given.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What goes after `/manifests/`: the digest if known, else the tag, else `latest`.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "docker://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = OriginError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// Whether `host` (with optional port) is a loopback address or localhost, which speak plain
/// HTTP by default as docker and containerd assume.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = strip_port(host);
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let ip = bare.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|a| a.is_loopback())
        .unwrap_or(false)
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return match rest.find(']') {
            Some(i) => &host[..i + 2],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

fn is_registry_host(h: &str) -> bool {
    if h.is_empty() || h.len() > 255 {
        return false;
    }
    let ok_chars = h
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    ok_chars && (h.contains('.') || h.contains(':') || strip_port(h) == "localhost")
}

fn is_repository(r: &str) -> bool {
    if r.is_empty() || r.len() > 255 {
        return false;
    }
    r.split('/').all(|comp| {
        !comp.is_empty()
            && comp.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
            && comp.starts_with(|c: char| c.is_ascii_alphanumeric())
            && comp.ends_with(|c: char| c.is_ascii_alphanumeric())
    })
}

fn is_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tag_digest_and_port() {
        let r = Reference::parse("docker://127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.manifest_ref(), "v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("reg.example:443/app@{d}")).unwrap();
        assert_eq!(r.manifest_ref(), d);
        assert_eq!(r.tag(), None);
        let r = Reference::parse("localhost/app").unwrap();
        assert_eq!(r.manifest_ref(), "latest");
        assert_eq!(r.to_string(), "docker://localhost/app");
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "docker://app:v1",
            "docker://noregistry/app",
            "docker://reg.example/App",
            "docker://reg.example/a//b",
            "docker://reg.example/../x",
            "docker://reg.example/app:bad tag",
            "docker://reg.example/app@sha256:xyz",
            "docker://reg.example/",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
        assert!(!is_loopback_host("reg.example"));
    }
}
