//! Names from outside (host ids, blob digests), validated once, and the dense keys used inside.

use std::fmt;
use std::sync::Arc;

use crate::error::SchedulerError;

/// Longest accepted host id, in bytes (a DNS name or certificate common name fits).
pub const MAX_HOST_ID_LEN: usize = 253;
/// Longest accepted blob digest, in bytes (sha512 in hex is 135).
pub const MAX_DIGEST_LEN: usize = 255;

/// A host's stable name, as the host's certificate gives it; cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(Arc<str>);

impl HostId {
    /// Validates a host id: 1..=253 bytes, no whitespace or control characters.
    pub fn new(id: &str) -> Result<Self, SchedulerError> {
        let bad = |reason| SchedulerError::InvalidHostId {
            id: id.chars().take(80).collect(),
            reason,
        };
        if id.is_empty() {
            return Err(bad("empty"));
        }
        if id.len() > MAX_HOST_ID_LEN {
            return Err(bad("longer than 253 bytes"));
        }
        if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("contains whitespace or control characters"));
        }
        Ok(Self(id.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostId({})", self.0)
    }
}

/// A task is one blob, named by its OCI digest (`sha256:<hex>`); cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(Arc<str>);

impl TaskId {
    /// Validates an OCI digest: `algorithm:encoded` per the OCI image spec grammar, with
    /// sha256/sha512 held to their exact lowercase-hex lengths.
    pub fn new(digest: &str) -> Result<Self, SchedulerError> {
        let bad = |reason| SchedulerError::InvalidDigest {
            digest: digest.chars().take(80).collect(),
            reason,
        };
        if digest.len() > MAX_DIGEST_LEN {
            return Err(bad("longer than 255 bytes"));
        }
        let (algo, encoded) = digest.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let algo_ok = !algo.is_empty()
            && algo.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'+' | b'.' | b'_' | b'-')
            });
        if !algo_ok {
            return Err(bad("bad algorithm name"));
        }
        let hex_len = match algo {
            "sha256" => Some(64),
            "sha512" => Some(128),
            _ => None,
        };
        match hex_len {
            Some(n) => {
                let lower_hex = encoded
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if encoded.len() != n || !lower_hex {
                    return Err(bad(
                        "encoded part is not lowercase hex of the algorithm's length",
                    ));
                }
            }
            None => {
                let ok = !encoded.is_empty()
                    && encoded
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
                if !ok {
                    return Err(bad("bad encoded part"));
                }
            }
        }
        Ok(Self(digest.into()))
    }

    /// The digest as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0)
    }
}

slotmap::new_key_type! {
    /// Dense generational key of a host inside the scheduler; a stale key finds nothing.
    pub(crate) struct HostKey;
    /// Dense generational key of a task inside the scheduler.
    pub(crate) struct TaskKey;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_are_bounded_and_printable() {
        assert!(HostId::new("node-1.zone-a").is_ok());
        assert!(HostId::new("").is_err());
        assert!(HostId::new("a b").is_err());
        assert!(HostId::new("a\u{7}").is_err());
        assert!(HostId::new(&"x".repeat(254)).is_err());
    }

    #[test]
    fn digests_follow_the_oci_grammar() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(TaskId::new(&good).map(|t| t.to_string()), Ok(good.clone()));
        assert!(TaskId::new(&format!("sha512:{}", "0".repeat(128))).is_ok());
        assert!(TaskId::new("sha256:abc").is_err());
        assert!(TaskId::new(&format!("sha256:{}", "AB".repeat(32))).is_err());
        assert!(TaskId::new(&"ab".repeat(32)).is_err());
        assert!(TaskId::new(":abc").is_err());
        assert!(TaskId::new("blake3:").is_err());
        assert!(TaskId::new("blake3:zz_=").is_ok());
    }
}
