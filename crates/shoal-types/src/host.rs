//! A node's name in the cluster.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::IdError;

/// Longest host id in bytes.
pub const MAX_HOST_ID_LEN: usize = 128;

/// A host's stable name in the cluster (normally the node name, as its certificate gives it):
/// 1 to 128 bytes of `A-Z a-z 0-9 . _ : -`. Cheap to clone.
///
/// [`HostId::new`] checks it. A decoded one is not checked by decoding (the protocol checks
/// every id a message carries with [`HostId::validate`] and refuses the message, naming it).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(Arc<str>);

impl HostId {
    /// Checks and wraps a host id.
    pub fn new(id: impl AsRef<str>) -> Result<Self, IdError> {
        let id = HostId(id.as_ref().into());
        id.validate()?;
        Ok(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks length and characters.
    pub fn validate(&self) -> Result<(), IdError> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if self.0.is_empty() || self.0.len() > MAX_HOST_ID_LEN || !self.0.chars().all(ok_char) {
            let shown: String = self.0.chars().take(40).collect();
            return Err(IdError::new(
                "host id",
                format!(
                    "{shown:?} must be 1 to {MAX_HOST_ID_LEN} characters of A-Z a-z 0-9 . _ : -"
                ),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Serialize for HostId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HostId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|s| HostId(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_are_bounded_and_printable() {
        assert!(HostId::new("node-1.zone-a").is_ok());
        assert!(HostId::new(String::from("peer:7")).is_ok());
        for bad in ["", "a b", "a\u{7}", "bad/host"] {
            assert_eq!(HostId::new(bad).unwrap_err().what, "host id", "{bad:?}");
        }
        assert!(HostId::new("x".repeat(MAX_HOST_ID_LEN)).is_ok());
        assert!(HostId::new("x".repeat(MAX_HOST_ID_LEN + 1)).is_err());
    }

    #[test]
    fn a_string_on_the_wire() {
        let h = HostId::new("seed-0").unwrap();
        let wire = postcard::to_allocvec(&h).unwrap();
        assert_eq!(wire, postcard::to_allocvec("seed-0").unwrap());
        assert_eq!(postcard::from_bytes::<HostId>(&wire).unwrap(), h);
        assert_eq!(format!("{h:?}"), "\"seed-0\"");
        // Decoding does not check; the protocol validates what a message carries.
        let raw = postcard::to_allocvec("bad host/").unwrap();
        let decoded: HostId = postcard::from_bytes(&raw).unwrap();
        assert!(decoded.validate().is_err());
    }
}
