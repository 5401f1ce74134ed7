//! The `Range` header of a blob request and the answer built from it: one builder for the
//! peer's local API and its registry proxy (RFC 9110 section 14).

use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use shoal_types::Digest;

/// What a Range header asks for, resolved against a blob of known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No Range header (or one we answer whole, e.g. several ranges): the whole blob, 200.
    Whole,
    /// Bytes `start..end` (end exclusive), 206.
    Part(u64, u64),
    /// Cannot be satisfied: 416.
    Unsatisfiable,
}

/// Resolves a `Range` header value against `size` (RFC 9110 section 14.1.2). Several ranges are
/// answered whole, as the RFC allows; a header that is not a bytes range is ignored.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeAsk {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix: the last N bytes.
        return match last.parse::<u64>() {
            Ok(0) => RangeAsk::Unsatisfiable,
            Ok(n) if size > 0 => RangeAsk::Part(size.saturating_sub(n), size),
            Ok(_) => RangeAsk::Unsatisfiable,
            Err(_) => RangeAsk::Whole,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return RangeAsk::Whole;
    };
    if start >= size {
        return RangeAsk::Unsatisfiable;
    }
    if last.is_empty() {
        return RangeAsk::Part(start, size);
    }
    match last.parse::<u64>() {
        Ok(l) if l >= start => RangeAsk::Part(start, l.saturating_add(1).min(size)),
        Ok(_) => RangeAsk::Unsatisfiable,
        Err(_) => RangeAsk::Whole,
    }
}

/// The answer to a blob request with an optional `Range` header: its status (200, 206 or
/// 416), the bytes it sends, and its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeAnswer {
    ask: RangeAsk,
    size: u64,
}

impl RangeAnswer {
    /// The answer to `range` (the header's value, if any) for a blob of `size` bytes.
    pub fn new(range: Option<&str>, size: u64) -> Self {
        RangeAnswer {
            ask: parse_range(range, size),
            size,
        }
    }

    /// 200 for the whole blob, 206 for one range, 416 for a range outside it.
    pub fn status(&self) -> StatusCode {
        match self.ask {
            RangeAsk::Whole => StatusCode::OK,
            RangeAsk::Part(..) => StatusCode::PARTIAL_CONTENT,
            RangeAsk::Unsatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
        }
    }

    /// The bytes sent, `start..end` (end exclusive); `None` for a 416 (no body).
    pub fn bytes(&self) -> Option<(u64, u64)> {
        match self.ask {
            RangeAsk::Whole => Some((0, self.size)),
            RangeAsk::Part(start, end) => Some((start, end)),
            RangeAsk::Unsatisfiable => None,
        }
    }

    /// The headers of the answer for `blob`: its length, `Content-Range` (206 and 416),
    /// `Accept-Ranges`, the type, and the blob's digest as `ETag` and `Docker-Content-Digest`.
    pub fn headers(&self, blob: &Digest) -> HeaderMap {
        let mut h = HeaderMap::new();
        let mut set = |name: HeaderName, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        let (start, end) = self.bytes().unwrap_or((0, 0));
        set(header::CONTENT_LENGTH, (end - start).to_string());
        set(header::ACCEPT_RANGES, "bytes".into());
        match self.ask {
            RangeAsk::Part(..) => set(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{}", end.saturating_sub(1), self.size),
            ),
            RangeAsk::Unsatisfiable => {
                set(header::CONTENT_RANGE, format!("bytes */{}", self.size));
                return h;
            }
            RangeAsk::Whole => {}
        }
        set(header::CONTENT_TYPE, "application/octet-stream".into());
        set(header::ETAG, format!("\"{blob}\""));
        set(
            HeaderName::from_static("docker-content-digest"),
            blob.to_string(),
        );
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=0-0"), 10), RangeAsk::Part(0, 1));
        assert_eq!(parse_range(Some("bytes=2-"), 10), RangeAsk::Part(2, 10));
        assert_eq!(parse_range(Some("bytes=-3"), 10), RangeAsk::Part(7, 10));
        assert_eq!(parse_range(Some("bytes=-30"), 10), RangeAsk::Part(0, 10));
        assert_eq!(parse_range(Some("bytes=5-100"), 10), RangeAsk::Part(5, 10));
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-4"), 10), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeAsk::Whole);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=0-"), 0), RangeAsk::Unsatisfiable);
    }

    #[test]
    fn answers_carry_status_bytes_and_headers() {
        let blob = Digest::from_bytes([1; 32]);
        let whole = RangeAnswer::new(None, 10);
        assert_eq!(
            (whole.status(), whole.bytes()),
            (StatusCode::OK, Some((0, 10)))
        );
        let h = whole.headers(&blob);
        assert_eq!(h[header::CONTENT_LENGTH], "10");
        assert!(h.get(header::CONTENT_RANGE).is_none());
        assert_eq!(h["docker-content-digest"], blob.to_string());
        let part = RangeAnswer::new(Some("bytes=2-4"), 10);
        assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
        let h = part.headers(&blob);
        assert_eq!(h[header::CONTENT_LENGTH], "3");
        assert_eq!(h[header::CONTENT_RANGE], "bytes 2-4/10");
        let out = RangeAnswer::new(Some("bytes=10-"), 10);
        assert_eq!(
            (out.status(), out.bytes()),
            (StatusCode::RANGE_NOT_SATISFIABLE, None)
        );
        let h = out.headers(&blob);
        assert_eq!(h[header::CONTENT_RANGE], "bytes */10");
        assert_eq!(h[header::CONTENT_LENGTH], "0");
    }

    proptest::proptest! {
        /// Whatever the header says, a granted range lies inside the blob and is not empty.
        #[test]
        fn granted_ranges_fit_the_blob(header in ".{0,40}", first in 0u64..2000, last in 0u64..2000, size in 0u64..1500) {
            for h in [header, format!("bytes={first}-{last}"), format!("bytes=-{last}"), format!("bytes={first}-")] {
                if let RangeAsk::Part(start, end) = parse_range(Some(&h), size) {
                    proptest::prop_assert!(start < end && end <= size, "{h:?} on {size}: {start}..{end}");
                }
            }
        }
    }
}
