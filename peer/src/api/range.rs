//! The HTTP `Range` header of the local API: one `bytes=` range (first-last, first-, -suffix).

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
