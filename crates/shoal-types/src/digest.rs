//! A blob's identity: the SHA-256 of its bytes, `sha256:<64 lowercase hex>` as OCI writes it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::IdError;

/// The identity of a blob: the SHA-256 of its bytes, written `sha256:<64 lowercase hex>`.
///
/// On the wire (postcard) it is the 32 raw bytes; in human-readable formats (JSON, TOML) it is
/// the `sha256:<hex>` string. Its hex form is also the blob's file name in the store, so a
/// parsed digest can never name a path outside it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The prefix of the text form.
    pub const PREFIX: &'static str = "sha256:";

    /// Wraps 32 raw SHA-256 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(data).into())
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
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let bad = |reason: String| IdError::new("blob digest", reason);
        let Some(hex_part) = text.strip_prefix(Self::PREFIX) else {
            let shown: String = text.chars().take(80).collect();
            return Err(bad(format!("{shown:?} does not start with \"sha256:\"")));
        };
        if hex_part.len() != 64 {
            return Err(bad(format!(
                "expected 64 hex characters after \"sha256:\", found {}",
                hex_part.len()
            )));
        }
        if !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad(format!("\"sha256:{hex_part}\" is not lowercase hex")));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|e| bad(e.to_string()))?;
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
    type Err = IdError;
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
        assert_eq!(Digest::of(b""), d);
        assert_eq!(d.hex().len(), 64);
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
            "sha256:../../../../etc/passwd",
        ] {
            let err = Digest::parse(bad).unwrap_err();
            assert_eq!(err.what, "blob digest", "{bad}: {err}");
        }
    }

    #[test]
    fn compact_on_the_wire_and_text_in_json() {
        let d = Digest::parse(EMPTY).unwrap();
        let wire = postcard::to_allocvec(&d).unwrap();
        assert_eq!(wire.as_slice(), d.as_bytes());
        assert_eq!(postcard::from_bytes::<Digest>(&wire).unwrap(), d);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:00\"").is_err());
    }
}
