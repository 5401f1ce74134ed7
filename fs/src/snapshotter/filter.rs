//! containerd's filter language, as List (Walk) requests carry it: each request filter is a
//! comma-separated list of selectors that must all match (`<fieldpath><op><value>`, or a bare
//! fieldpath for "present"); the request matches a snapshot when any of its filters does.
//! Operators: `==`, `!=`, `~=` (regular expression). Field paths of a snapshot: `kind`, `name`,
//! `parent`, `labels.<key>` (key segments joined by `.`, or one quoted segment).
//!
//! containerd itself sends `labels."containerd.io/snapshot.ref"==<chain id>,parent=="<name>"`
//! while unpacking onto a remote snapshotter, so this must match containerd's grammar exactly.

use regex::Regex;

use super::state::{Kind, Snapshot};

/// Longest filter accepted (containerd's are a few hundred bytes).
const MAX_FILTER_LEN: usize = 4096;

/// Why a filter string was refused.
#[derive(Debug, thiserror::Error)]
#[error("filter {filter:?}: {reason} at byte {at}")]
pub struct FilterError {
    filter: String,
    reason: String,
    at: usize,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Parsed filters: matches when any filter matches (an empty list matches everything).
#[derive(Debug, Default)]
pub struct Filters {
    any: Vec<Vec<Selector>>,
}

impl Filters {
    /// Parses every filter string of a request.
    pub fn parse(filters: &[String]) -> Result<Filters, FilterError> {
        let any = filters
            .iter()
            .filter(|f| !f.is_empty())
            .map(|f| Parser::new(f).selectors())
            .collect::<Result<_, _>>()?;
        Ok(Filters { any })
    }

    /// True when `s` (named `name`) passes.
    pub fn matches(&self, name: &str, s: &Snapshot) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|sel| sel.matches(name, s)))
    }
}

impl Selector {
    fn matches(&self, name: &str, s: &Snapshot) -> bool {
        let value = field(&self.path, name, s);
        match (&self.op, value) {
            (Op::Present, v) => v.is_some(),
            (Op::Equal(want), v) => v.is_some_and(|v| v == *want),
            (Op::NotEqual(want), v) => v.is_none_or(|v| v != *want),
            (Op::Matches(re), v) => v.is_some_and(|v| re.is_match(v)),
        }
    }
}

/// The value at `path` of snapshot `name`, as containerd's snapshot adaptor defines it.
fn field<'a>(path: &[String], name: &'a str, s: &'a Snapshot) -> Option<&'a str> {
    match path.first().map(String::as_str)? {
        "kind" => Some(match s.kind {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }),
        "name" => Some(name),
        "parent" => Some(s.parent.as_deref().unwrap_or("")),
        "labels" if path.len() > 1 => s.labels.get(&path[1..].join(".")).map(String::as_str),
        _ => None,
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser { text, pos: 0 }
    }

    fn err<T>(&self, reason: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError {
            filter: self.text.chars().take(200).collect(),
            reason: reason.into(),
            at: self.pos,
        })
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn selectors(mut self) -> Result<Vec<Selector>, FilterError> {
        if self.text.len() > MAX_FILTER_LEN {
            return self.err(format!("longer than {MAX_FILTER_LEN} bytes"));
        }
        let mut out = Vec::new();
        loop {
            self.skip_space();
            out.push(self.selector()?);
            self.skip_space();
            match self.peek() {
                None => return Ok(out),
                Some(',') => self.pos += 1,
                Some(c) => return self.err(format!("expected ',' or the end, found {c:?}")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_space();
        let rest = &self.text[self.pos..];
        let op = ["==", "!=", "~="].into_iter().find(|o| rest.starts_with(o));
        let Some(op) = op else {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        };
        self.pos += 2;
        self.skip_space();
        let value = self.value()?;
        let op = match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => match Regex::new(&value) {
                Ok(re) => Op::Matches(re),
                Err(e) => return self.err(format!("bad regular expression: {e}")),
            },
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        if matches!(self.peek(), Some('"' | '/')) {
            return self.quoted();
        }
        let start = self.pos;
        match self.peek() {
            Some(c) if c.is_ascii_alphabetic() => self.pos += 1,
            _ => return self.err("expected a field name"),
        }
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        Ok(self.text[start..self.pos].to_string())
    }

    fn value(&mut self) -> Result<String, FilterError> {
        if matches!(self.peek(), Some('"' | '/')) {
            return self.quoted();
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c != ',' && !c.is_whitespace()) {
            self.pos += self.peek().map_or(1, char::len_utf8);
        }
        if start == self.pos {
            return self.err("expected a value");
        }
        Ok(self.text[start..self.pos].to_string())
    }

    /// A `"..."` (Go escapes) or `/.../` string.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let Some(quote) = self.peek() else {
            return self.err("expected a quoted string");
        };
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return self.err("unterminated quoted string");
            };
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\\' => {
                    let Some(e) = self.peek() else {
                        return self.err("unterminated escape");
                    };
                    self.pos += e.len_utf8();
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        // `\/` inside /.../ and `\"`, `\\` stand for themselves; regex escapes
                        // such as `\d` are kept for the regex engine.
                        e if e == quote || e == '\\' => out.push(e),
                        e => {
                            out.push('\\');
                            out.push(e);
                        }
                    }
                }
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn snap(kind: Kind, parent: Option<&str>, labels: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::new(1, kind, parent.map(str::to_string), BTreeMap::new());
        s.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s
    }

    fn f(filters: &[&str]) -> Filters {
        Filters::parse(&filters.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn containerds_remote_snapshot_lookup_matches() {
        let s = snap(
            Kind::Committed,
            Some("k8s.io/3/sha256:aa"),
            &[("containerd.io/snapshot.ref", "sha256:bb")],
        );
        let hit = r#"labels."containerd.io/snapshot.ref"==sha256:bb,parent=="k8s.io/3/sha256:aa""#;
        assert!(f(&[hit]).matches("x", &s));
        let other =
            r#"labels."containerd.io/snapshot.ref"==sha256:bb,parent=="k8s.io/4/sha256:aa""#;
        assert!(!f(&[other]).matches("x", &s));
        assert!(
            f(&[other, "kind==committed"]).matches("x", &s),
            "filters are ORed"
        );
    }

    #[test]
    fn operators_and_paths() {
        let s = snap(Kind::Active, None, &[("a.b", "v1"), ("c", "x")]);
        assert!(f(&["labels.a.b==v1"]).matches("n", &s));
        assert!(f(&["labels.a.b"]).matches("n", &s));
        assert!(!f(&["labels.zz"]).matches("n", &s));
        assert!(f(&["labels.zz!=q"]).matches("n", &s));
        assert!(f(&["name~=/^n$/", "kind==view"]).matches("n", &s));
        assert!(f(&["parent==\"\""]).matches("n", &s));
        assert!(f(&[]).matches("n", &s));
        assert!(f(&[" kind == active , labels.c==x "]).matches("n", &s));
    }

    #[test]
    fn bad_filters_are_errors_not_panics() {
        for bad in [
            "==x",
            "kind==",
            "labels.\"unterminated",
            "name~=/(/",
            "kind==a b",
            "9kind==a",
            "kind==a,,",
        ] {
            assert!(
                Filters::parse(&[bad.to_string()]).is_err(),
                "{bad:?} should be refused"
            );
        }
        let long = "a".repeat(MAX_FILTER_LEN + 1);
        assert!(Filters::parse(&[long]).is_err());
    }
}
