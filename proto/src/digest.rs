//! Content identities on the wire: the OCI blob digest (`sha256:<hex>`) and BLAKE3 piece hashes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ProtoError;

/// A BLAKE3 hash of one piece (or chunk): 32 raw bytes.
pub type Blake3Hash = [u8; 32];

/// The identity of a blob: the SHA-256 of its bytes, written `sha256:<64 lowercase hex>` as in OCI.
///
/// On the wire (postcard) it is the 32 raw bytes; in human-readable formats (JSON, TOML) it is
/// the `sha256:<hex>` string. Other crates use this type for blob identity too.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The prefix of the text form.
    pub const PREFIX: &'static str = "sha256:";

    /// Wraps 32 raw SHA-256 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex characters, without the `sha256:` prefix (e.g. for file names).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses `sha256:<64 hex>`; upper-case hex is refused because OCI digests are lowercase.
    pub fn parse(text: &str) -> Result<Self, ProtoError> {
        let Some(hex_part) = text.strip_prefix(Self::PREFIX) else {
            let shown: String = text.chars().take(80).collect();
            return Err(ProtoError::invalid(
                "blob digest",
                format!("{shown:?} does not start with \"sha256:\""),
            ));
        };
        if hex_part.len() != 64 {
            return Err(ProtoError::invalid(
                "blob digest",
                format!(
                    "expected 64 hex characters after \"sha256:\", found {}",
                    hex_part.len()
                ),
            ));
        }
        if !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ProtoError::invalid(
                "blob digest",
                format!("\"sha256:{hex_part}\" is not lowercase hex"),
            ));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|e| ProtoError::invalid("blob digest", e.to_string()))?;
        Ok(Digest(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            Digest::parse(&text).map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(deserializer).map(Digest)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_formats_the_oci_form() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.as_bytes()[0], 0xe3);
        assert_eq!(format!("{d:?}"), EMPTY);
    }

    #[test]
    fn refuses_bad_text() {
        for bad in [
            "",
            "sha512:e3b0",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            "sha256:é3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
        ] {
            let err = Digest::parse(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    ProtoError::Invalid {
                        field: "blob digest",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn compact_on_the_wire() {
        let d = Digest::parse(EMPTY).unwrap();
        let wire = postcard::to_allocvec(&d).unwrap();
        assert_eq!(wire.as_slice(), d.as_bytes());
        assert_eq!(postcard::from_bytes::<Digest>(&wire).unwrap(), d);
    }
}
