//! Registry authentication: credentials (explicit and docker's config.json), the
//! `WWW-Authenticate` challenge, and bearer tokens cached per (registry, scope).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::OriginError;

/// A user name and password (or token used as password) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl Credentials {
    /// Credentials from a user name and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// The `Authorization: Basic ...` header value.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

impl std::fmt::Debug for Credentials {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Where docker's config.json lives: `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn docker_config_location(docker_config: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
    match (docker_config, home) {
        (Some(d), _) if !d.is_empty() => Some(Path::new(d).join("config.json")),
        (_, Some(h)) if !h.is_empty() => Some(Path::new(h).join(".docker").join("config.json")),
        _ => None,
    }
}

/// Reads the `auths` of a docker config.json into credentials by registry host.
///
/// Entries with `auth` (base64 `user:password`) or `username`/`password` are used; credential
/// helpers (`credsStore`, `credHelpers`) are not run: pass such credentials explicitly.
pub fn load_docker_config(path: &Path) -> Result<HashMap<String, Credentials>, OriginError> {
    let err = |reason: String| OriginError::DockerConfig {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > 4 << 20 {
        return Err(err("larger than 4 MiB".into()));
    }
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let doc: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    let mut out = HashMap::new();
    if doc.get("credsStore").is_some() || doc.get("credHelpers").is_some() {
        tracing::warn!(path = %path.display(), "docker credential helpers are not run; pass those credentials explicitly");
    }
    let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else {
        return Ok(out);
    };
    for (key, entry) in auths {
        let host = normalize_config_host(key);
        let creds = if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| err(format!("auths.{key}.auth is not base64: {e}")))?;
            let raw = String::from_utf8(raw)
                .map_err(|_| err(format!("auths.{key}.auth is not UTF-8")))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| err(format!("auths.{key}.auth is not user:password")))?;
            Credentials::new(u, p)
        } else if let (Some(u), Some(p)) = (
            entry.get("username").and_then(|v| v.as_str()),
            entry.get("password").and_then(|v| v.as_str()),
        ) {
            Credentials::new(u, p)
        } else {
            continue;
        };
        out.insert(host, creds);
    }
    Ok(out)
}

/// `https://host:port/v1/` and `host:port` both name `host:port`.
fn normalize_config_host(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k).to_string()
}

/// What a registry asked for in its `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP basic authentication.
    Basic,
    /// Token authentication: get a token from `realm`.
    Bearer {
        /// Token service URL.
        realm: String,
        /// `service` parameter for the token request.
        service: Option<String>,
        /// `scope` the registry asked for, if any.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value; `None` when it names no scheme we speak.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(|c: char| c.is_whitespace()) {
        Some(i) => (&header[..i], &header[i..]),
        None => (header, ""),
    };
    let params = parse_params(rest);
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        let realm = params.get("realm")?.clone();
        return Some(Challenge::Bearer {
            realm,
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        });
    }
    None
}

/// `k="v", k2=v2` with quoted strings that may hold commas and `\"`.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.to_ascii_lowercase(), value);
    }
    out
}

/// A bearer token and when to stop using it.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token to send as `Authorization: Bearer <value>`.
    pub value: String,
    /// When to fetch a new one (a little before the issuer's expiry).
    pub renew_at: Instant,
}

impl Token {
    /// A token valid for `expires_in` seconds from now (default 60, per the distribution spec).
    pub fn new(value: String, expires_in: Option<u64>) -> Self {
        let secs = expires_in.unwrap_or(60).clamp(1, 24 * 3600);
        // Renew early by a quarter of the lifetime, at most 30 s.
        let margin = (secs / 4).min(30);
        Token {
            value,
            renew_at: Instant::now() + Duration::from_secs(secs - margin),
        }
    }

    /// Whether the token is still worth sending.
    pub fn is_fresh(&self) -> bool {
        Instant::now() < self.renew_at
    }
}

/// The JSON a token service answers (`token` or the OAuth2 `access_token`).
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    /// Docker token field.
    #[serde(default)]
    pub token: Option<String>,
    /// OAuth2 field.
    #[serde(default)]
    pub access_token: Option<String>,
    /// Lifetime in seconds.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge_with_commas_in_scope() {
        let c = parse_challenge(
            r#"Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "http://127.0.0.1:1/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn reads_docker_config_auths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"https://reg.example:5000/v1/":{"auth":"dXNlcjpwYTpzcw=="},"b.example":{"username":"u","password":"p"},"c.example":{}}}"#,
        )
        .unwrap();
        let m = load_docker_config(&p).unwrap();
        assert_eq!(m["reg.example:5000"], Credentials::new("user", "pa:ss"));
        assert_eq!(m["b.example"], Credentials::new("u", "p"));
        assert!(!m.contains_key("c.example"));
        std::fs::write(&p, r#"{"auths":{"x":{"auth":"!!"}}}"#).unwrap();
        assert!(load_docker_config(&p).is_err());
    }

    #[test]
    fn docker_config_env_wins_over_home() {
        assert_eq!(
            docker_config_location(Some("/d"), Some("/h")),
            Some(PathBuf::from("/d/config.json"))
        );
        assert_eq!(
            docker_config_location(None, Some("/h")),
            Some(PathBuf::from("/h/.docker/config.json"))
        );
        assert_eq!(docker_config_location(None, None), None);
    }
}
