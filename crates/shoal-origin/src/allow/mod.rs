//! Which origins a daemon may fetch from: the operator's `allowed_origins` list. Registries by
//! `host[:port]`, S3-compatible endpoints with one bucket (`s3://HOST[:PORT]/BUCKET`), local
//! directories (`dir:/PATH`). An empty list allows nothing.
//!
//! An allowed origin may send a request on elsewhere (a registry's 307 to blob storage, its token
//! service): anywhere except loopback and link-local addresses, also when a DNS name resolves
//! there, unless that address is itself listed (target.rs). Every refusal names the setting to
//! change and is counted by reason (`not_allowed`, `loopback`, `link_local`).

mod target;

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use target::GuardedDns;

use crate::{OriginError, Reference};

/// The config key (and, with dashes, the flag) every refusal points at.
pub const SETTING: &str = "allowed_origins";

/// Whose list it is: refusals say "this peer", "this seed" or "the scheduler".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOwner {
    /// `shoal peer`.
    Peer,
    /// `shoal peer --seed`.
    Seed,
    /// `shoal scheduler`.
    Scheduler,
}

impl ListOwner {
    fn who(self) -> &'static str {
        match self {
            ListOwner::Peer => "this peer",
            ListOwner::Seed => "this seed",
            ListOwner::Scheduler => "the scheduler",
        }
    }

    fn config(self) -> &'static str {
        match self {
            ListOwner::Peer | ListOwner::Seed => "the `shoal peer` config",
            ListOwner::Scheduler => "the `shoal scheduler` config",
        }
    }
}

/// Why something was refused (the `reason` label of the refusal metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The origin is not in the list.
    NotAllowed,
    /// A request sent on to a loopback (or unspecified) address that is not listed.
    Loopback,
    /// A request sent on to a link-local address that is not listed.
    LinkLocal,
}

impl RefusalReason {
    /// Every reason, in label order.
    pub const ALL: [RefusalReason; 3] = [
        RefusalReason::NotAllowed,
        RefusalReason::Loopback,
        RefusalReason::LinkLocal,
    ];

    /// The metric label: `not_allowed`, `loopback`, `link_local`.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::NotAllowed => "not_allowed",
            RefusalReason::Loopback => "loopback",
            RefusalReason::LinkLocal => "link_local",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A refused origin or request target: why, and a message naming the setting to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Why.
    pub reason: RefusalReason,
    /// What to tell the operator (what was refused, and the entry to add to which config).
    pub message: String,
}

/// `host[:port]`: host lower-cased, an IPv6 address without brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    host: String,
    port: Option<u16>,
}

impl Authority {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`.
    pub fn parse(s: &str) -> Result<Authority, String> {
        let (host, port) = match s.strip_prefix('[') {
            Some(rest) => {
                let (v6, after) = rest
                    .split_once(']')
                    .ok_or("an IPv6 address needs its closing ']'")?;
                v6.parse::<std::net::Ipv6Addr>()
                    .map_err(|_| format!("{v6:?} is not an IPv6 address"))?;
                match after {
                    "" => (v6, None),
                    p => (v6, Some(p.strip_prefix(':').ok_or("junk after ']'")?)),
                }
            }
            None => match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            },
        };
        let port = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(format!("port {p:?} is not 1..=65535")),
            },
            None => None,
        };
        let bracketed = s.starts_with('[');
        if host.is_empty()
            || host.len() > 255
            || (!bracketed
                && !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')))
        {
            return Err(format!("{host:?} is not a host name or IP address"));
        }
        Ok(Authority {
            host: canonical_host(&host.to_ascii_lowercase()),
            port,
        })
    }

    /// An authority from a URL's host and explicit port.
    pub(crate) fn of_url(url: &reqwest::Url) -> Option<Authority> {
        let host = url.host_str()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Some(Authority {
            host: canonical_host(&host.to_ascii_lowercase()),
            port: url.port(),
        })
    }

    /// The host (lower case, IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v6 = self.host.contains(':');
        match (v6, self.port) {
            (true, Some(p)) => write!(f, "[{}]:{p}", self.host),
            (true, None) => write!(f, "[{}]", self.host),
            (false, Some(p)) => write!(f, "{}:{p}", self.host),
            (false, None) => f.write_str(&self.host),
        }
    }
}

/// Docker Hub goes by three names; they are one registry.
fn canonical_host(h: &str) -> String {
    match h {
        "docker.io" | "index.docker.io" => "registry-1.docker.io".into(),
        other => other.to_string(),
    }
}

/// One entry of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigin {
    /// An OCI registry: `host[:port]` (or `docker://host[:port]`), any repository.
    Registry(Authority),
    /// An S3-compatible endpoint and one bucket on it: `s3://HOST[:PORT]/BUCKET`.
    S3 {
        /// The endpoint.
        endpoint: Authority,
        /// The bucket.
        bucket: String,
    },
    /// A local directory and everything below it: `dir:/PATH` (or `/PATH`).
    Dir(PathBuf),
}

impl AllowedOrigin {
    /// Parses one entry; the error says what form was expected.
    pub fn parse(entry: &str) -> Result<AllowedOrigin, String> {
        let e = entry.trim();
        let bad = |why: String| {
            format!(
                "{SETTING} entry {entry:?}: {why} (expected HOST[:PORT] for a registry, \
                 s3://HOST[:PORT]/BUCKET, or dir:/PATH)"
            )
        };
        if let Some(path) = e.strip_prefix("dir:").or(e.starts_with('/').then_some(e)) {
            return plain_absolute(Path::new(path))
                .map(AllowedOrigin::Dir)
                .map_err(bad);
        }
        if let Some(rest) = e.strip_prefix("s3://") {
            let (endpoint, bucket) = rest
                .split_once('/')
                .ok_or_else(|| bad("no bucket after the endpoint".into()))?;
            if !valid_bucket(bucket) {
                return Err(bad(format!("{bucket:?} is not an S3 bucket name")));
            }
            let endpoint = Authority::parse(endpoint).map_err(bad)?;
            return Ok(AllowedOrigin::S3 {
                endpoint,
                bucket: bucket.to_string(),
            });
        }
        let host = e.strip_prefix("docker://").unwrap_or(e);
        if host.contains("://") {
            return Err(bad("unknown scheme".into()));
        }
        if host.contains('/') {
            return Err(bad(
                "a registry is allowed as a whole: list its host[:port] without a repository"
                    .into(),
            ));
        }
        Authority::parse(host)
            .map(AllowedOrigin::Registry)
            .map_err(bad)
    }
}

impl std::fmt::Display for AllowedOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllowedOrigin::Registry(a) => write!(f, "{a}"),
            AllowedOrigin::S3 { endpoint, bucket } => write!(f, "s3://{endpoint}/{bucket}"),
            AllowedOrigin::Dir(p) => write!(f, "dir:{}", p.display()),
        }
    }
}

/// S3 bucket names: 3 to 63 of `a-z 0-9 . -`.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-'))
}

/// An absolute path without `.` or `..` components (so a prefix check means "inside").
fn plain_absolute(p: &Path) -> Result<PathBuf, String> {
    if !p.is_absolute() {
        return Err(format!("{} is not an absolute path", p.display()));
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => return Err(format!("{} has a '..' component", p.display())),
        }
    }
    Ok(out)
}

/// The operator's list of allowed origins, and the refusals counted so far. Share one per
/// daemon (`Arc`): the counters are its metrics.
#[derive(Debug)]
pub struct AllowedOrigins {
    entries: Vec<AllowedOrigin>,
    owner: ListOwner,
    refused: [AtomicU64; 3],
}

impl AllowedOrigins {
    /// Parses every entry of `list` (as written in `allowed_origins`).
    pub fn parse(list: &[String], owner: ListOwner) -> Result<AllowedOrigins, OriginError> {
        let entries = list
            .iter()
            .map(|e| AllowedOrigin::parse(e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(OriginError::Config)?;
        Ok(AllowedOrigins {
            entries,
            owner,
            refused: Default::default(),
        })
    }

    /// The entries.
    pub fn entries(&self) -> &[AllowedOrigin] {
        &self.entries
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What a daemon with an empty list logs at start.
    pub fn empty_warning(&self) -> Option<String> {
        self.is_empty().then(|| {
            format!(
                "{SETTING} is empty: {} fetches from no origin (registry, S3 or directory); list \
                 the registries it may pull from in {SETTING} in {} (flag --allowed-origins)",
                self.owner.who(),
                self.owner.config()
            )
        })
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> [(RefusalReason, u64); 3] {
        RefusalReason::ALL.map(|r| (r, self.refused[r.index()].load(Ordering::Relaxed)))
    }

    /// A counted refusal whose message ends with what to add where.
    pub(crate) fn refuse(&self, reason: RefusalReason, what: String, add: &str) -> Refusal {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
        Refusal {
            reason,
            message: format!(
                "{what}: add \"{add}\" to {SETTING} in {} (flag --allowed-origins) to allow it",
                self.owner.config()
            ),
        }
    }

    fn not_allowed(&self, what: String, add: &str) -> Refusal {
        let what = format!("{what} is not an allowed origin of {}", self.owner.who());
        self.refuse(RefusalReason::NotAllowed, what, add)
    }

    /// Whether the registry `host[:port]` is listed.
    pub fn allows_registry(&self, host: &str) -> bool {
        Authority::parse(host).is_ok_and(|a| {
            self.entries
                .iter()
                .any(|e| matches!(e, AllowedOrigin::Registry(r) if *r == a))
        })
    }

    /// The registry `host[:port]`, or a refusal naming it.
    pub fn check_registry(&self, host: &str) -> Result<(), Refusal> {
        if self.allows_registry(host) {
            return Ok(());
        }
        self.denied(format!("registry {host}"), host)
    }

    /// The bucket `bucket` of the S3 endpoint `endpoint` (`host[:port]`), or a refusal.
    pub fn check_s3(&self, endpoint: &str, bucket: &str) -> Result<(), Refusal> {
        let ok = Authority::parse(endpoint).is_ok_and(|a| {
            self.entries.iter().any(
                |e| matches!(e, AllowedOrigin::S3 { endpoint: ep, bucket: b } if *ep == a && b == bucket),
            )
        });
        if ok {
            return Ok(());
        }
        let entry = format!("s3://{endpoint}/{bucket}");
        self.denied(format!("S3 bucket {entry}"), &entry)
    }

    /// The local directory `path` (inside a listed one), or a refusal.
    pub fn check_dir(&self, path: &Path) -> Result<(), Refusal> {
        let entry = format!("dir:{}", path.display());
        let Ok(path) = plain_absolute(path) else {
            return self.denied(format!("directory {}", path.display()), &entry);
        };
        let inside = self
            .entries
            .iter()
            .any(|e| matches!(e, AllowedOrigin::Dir(d) if path.starts_with(d)));
        if inside {
            return Ok(());
        }
        self.denied(format!("directory {}", path.display()), &entry)
    }

    /// An origin reference as tasks carry it: `docker://HOST[:PORT]/REPO`,
    /// `s3://HOST[:PORT]/BUCKET[/PREFIX]` or `dir:/PATH`. One that does not parse is refused
    /// as not allowed too (it could name nothing this list allows).
    pub fn check_reference(&self, reference: &str) -> Result<(), Refusal> {
        if let Some(rest) = reference.strip_prefix("s3://") {
            let mut parts = rest.splitn(3, '/');
            return match (parts.next(), parts.next()) {
                (Some(ep), Some(bucket)) if !ep.is_empty() => self.check_s3(ep, bucket),
                _ => self.unparsable(reference),
            };
        }
        if let Some(path) = reference.strip_prefix("dir:") {
            return self.check_dir(Path::new(path));
        }
        match Reference::parse(reference) {
            Ok(r) => self.check_registry(r.registry()),
            Err(_) => self.unparsable(reference),
        }
    }

    fn unparsable(&self, reference: &str) -> Result<(), Refusal> {
        let shown: String = reference.chars().take(200).collect();
        let what = format!(
            "origin {shown:?} is not docker://HOST[:PORT]/REPO, s3://HOST[:PORT]/BUCKET or \
             dir:/PATH, so it"
        );
        Err(self.not_allowed(what, "HOST[:PORT]"))
    }

    fn denied(&self, what: String, add: &str) -> Result<(), Refusal> {
        Err(self.not_allowed(what, add))
    }

    /// Whether `authority` (host and explicit port) is listed as a registry or an S3 endpoint:
    /// then requests may go there even when it is a loopback or link-local address.
    pub(crate) fn lists_authority(&self, a: &Authority) -> bool {
        self.entries.iter().any(|e| match e {
            AllowedOrigin::Registry(r) => r == a,
            AllowedOrigin::S3 { endpoint, .. } => endpoint == a,
            AllowedOrigin::Dir(_) => false,
        })
    }

    /// Whether `host` is listed with any port (the DNS guard lets its addresses through).
    pub(crate) fn lists_host(&self, host: &str) -> bool {
        let host = canonical_host(&host.to_ascii_lowercase());
        self.entries.iter().any(|e| match e {
            AllowedOrigin::Registry(r) => r.host == host,
            AllowedOrigin::S3 { endpoint, .. } => endpoint.host == host,
            AllowedOrigin::Dir(_) => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowedOrigins {
        let v: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        AllowedOrigins::parse(&v, ListOwner::Peer).unwrap()
    }

    #[test]
    fn entries_parse_and_bad_ones_say_what_was_expected() {
        let l = list(&[
            "registry.example",
            "docker://127.0.0.1:5000",
            "[::1]:5000",
            "docker.io",
            "s3://minio.lan:9000/layers",
            "dir:/srv/blobs/",
            "/mnt/nas",
        ]);
        let shown: Vec<String> = l.entries().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "registry.example",
                "127.0.0.1:5000",
                "[::1]:5000",
                "registry-1.docker.io",
                "s3://minio.lan:9000/layers",
                "dir:/srv/blobs",
                "dir:/mnt/nas",
            ]
        );
        for bad in [
            "",
            "reg.example/team",
            "http://reg.example",
            "reg.example:0",
            "reg.example:99999",
            "reg example",
            "s3://minio.lan",
            "s3://minio.lan/UPPER",
            "dir:relative",
            "dir:/srv/../etc",
            "[::1",
            "::1",
        ] {
            let err = AllowedOrigins::parse(&[bad.to_string()], ListOwner::Peer).unwrap_err();
            assert!(
                err.to_string().contains("allowed_origins entry"),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("HOST[:PORT]"), "{bad}: {err}");
        }
    }

    #[test]
    fn registries_match_host_and_port_exactly() {
        let l = list(&["reg.example", "127.0.0.1:5000", "[::1]:5000", "docker.io"]);
        assert!(l.allows_registry("reg.example"));
        assert!(l.allows_registry("REG.example"));
        assert!(!l.allows_registry("reg.example:5000"));
        assert!(!l.allows_registry("other.example"));
        assert!(!l.allows_registry("sub.reg.example"));
        assert!(l.allows_registry("127.0.0.1:5000"));
        assert!(!l.allows_registry("127.0.0.1:5001"));
        assert!(!l.allows_registry("127.0.0.1"));
        assert!(l.allows_registry("[::1]:5000"));
        assert!(l.allows_registry("registry-1.docker.io"));
        assert!(l.allows_registry("index.docker.io"));
        for ok in [
            "docker://reg.example/team/app",
            "docker://127.0.0.1:5000/a@sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        ] {
            l.check_reference(ok).unwrap();
        }
        assert_eq!(l.refusals()[0].1, 0, "nothing refused yet");
    }

    #[test]
    fn refusals_name_the_origin_the_entry_and_the_setting_and_are_counted() {
        let l = list(&["reg.example"]);
        let r = l
            .check_reference("docker://169.254.169.254/latest/app")
            .unwrap_err();
        assert_eq!(r.reason, RefusalReason::NotAllowed);
        for part in [
            "registry 169.254.169.254",
            "not an allowed origin of this peer",
            "add \"169.254.169.254\" to allowed_origins",
            "`shoal peer` config",
            "--allowed-origins",
        ] {
            assert!(r.message.contains(part), "{part:?} missing in {r}");
        }
        let s = AllowedOrigins::parse(&[], ListOwner::Scheduler).unwrap();
        let r = s.check_registry("reg.example").unwrap_err();
        assert!(r.message.contains("of the scheduler"), "{r}");
        assert!(r.message.contains("`shoal scheduler` config"), "{r}");
        assert!(s
            .empty_warning()
            .unwrap()
            .contains("allowed_origins is empty"));
        assert!(l.empty_warning().is_none());
        // Unparsable references are refused, never guessed at.
        for bad in ["docker://app", "ftp://x/y", "s3://", "docker://a@b/c"] {
            let r = l.check_reference(bad).unwrap_err();
            assert_eq!(r.reason, RefusalReason::NotAllowed, "{bad}");
        }
        assert_eq!(l.refusals()[0], (RefusalReason::NotAllowed, 5));
        assert_eq!(l.refusals()[1].1 + l.refusals()[2].1, 0);
    }

    #[test]
    fn s3_buckets_and_directories() {
        let l = list(&["s3://minio.lan:9000/layers", "dir:/srv/blobs"]);
        l.check_s3("minio.lan:9000", "layers").unwrap();
        l.check_reference("s3://minio.lan:9000/layers/prefix/x")
            .unwrap();
        assert!(l.check_s3("minio.lan:9000", "other").is_err());
        assert!(l.check_s3("minio.lan", "layers").is_err());
        l.check_dir(Path::new("/srv/blobs")).unwrap();
        l.check_reference("dir:/srv/blobs/sha256").unwrap();
        assert!(l.check_dir(Path::new("/srv/blobs-other")).is_err());
        assert!(l.check_dir(Path::new("/srv/blobs/../../etc")).is_err());
        assert!(l.check_dir(Path::new("srv/blobs")).is_err());
        // An S3 endpoint is not a registry.
        assert!(!l.allows_registry("minio.lan:9000"));
    }
}
