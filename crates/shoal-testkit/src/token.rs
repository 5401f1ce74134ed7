//! A small token issuer for the registry's `auth: token` mode: it signs ES256 JWTs with a key
//! whose self-signed certificate the registry trusts (`rootcertbundle`), and counts its hits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::http::{self, Server};
use crate::TestkitError;

/// Issuer name written into tokens and the registry config.
pub const ISSUER: &str = "shoal-testkit-issuer";
/// Service name written into tokens and the registry config.
pub const SERVICE: &str = "shoal-testkit-registry";

/// Signs tokens; shared by the issuer server and the fixture's own pushes.
pub struct Signer {
    key: EcdsaKeyPair,
    cert_der_b64: String,
    /// PEM of the self-signed certificate (the registry's root bundle).
    pub cert_pem: String,
    rng: SystemRandom,
}

impl Signer {
    /// A new P-256 key and self-signed certificate.
    pub fn generate() -> Result<Self, TestkitError> {
        let err = |e: String| TestkitError::Setup(format!("token signing key: {e}"));
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| err(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec!["shoal-token-issuer".to_string()])
            .map_err(|e| err(e.to_string()))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&kp).map_err(|e| err(e.to_string()))?;
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &kp.serialize_der(), &rng)
                .map_err(|e| err(e.to_string()))?;
        Ok(Signer {
            key,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(cert.der()),
            cert_pem: cert.pem(),
            rng,
        })
    }

    /// A JWT granting `actions` on `repository`, valid from now for `lifetime_secs`
    /// (negative: already expired).
    pub fn token(
        &self,
        subject: &str,
        access: &[(String, Vec<String>)],
        lifetime_secs: i64,
    ) -> Result<String, TestkitError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.cert_der_b64]});
        let access: Vec<_> = access
            .iter()
            .map(|(name, actions)| serde_json::json!({"type": "repository", "name": name, "actions": actions}))
            .collect();
        let (nbf, exp) = if lifetime_secs < 0 {
            (now + lifetime_secs * 2, now + lifetime_secs)
        } else {
            (now - 10, now + lifetime_secs)
        };
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE,
            "exp": exp, "nbf": nbf, "iat": nbf,
            "jti": format!("{now}-{}", rand_u64(&self.rng)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| TestkitError::Setup("signing a token failed".into()))?;
        Ok(format!("{signing_input}.{}", b64.encode(sig.as_ref())))
    }
}

fn rand_u64(rng: &SystemRandom) -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(rng, &mut b);
    u64::from_le_bytes(b)
}

/// Counters and switches of a running issuer.
#[derive(Default, Debug)]
pub struct IssuerState {
    /// Token requests answered (any status).
    pub hits: AtomicUsize,
    /// The next N tokens are issued already expired (the client believes them good for 300 s).
    pub stale_next: AtomicUsize,
}

/// The running issuer.
pub struct Issuer {
    /// Counters and switches.
    pub state: Arc<IssuerState>,
    /// The HTTP server (`/token`).
    pub server: Server,
}

/// Starts the issuer; `credentials` (user, password) are required when given.
pub async fn start_issuer(
    signer: Arc<Signer>,
    credentials: Option<(String, String)>,
) -> Result<Issuer, TestkitError> {
    let state = Arc::new(IssuerState::default());
    let st = state.clone();
    let handler: http::Handler = Arc::new(move |req| {
        let signer = signer.clone();
        let st = st.clone();
        let creds = credentials.clone();
        Box::pin(async move {
            st.hits.fetch_add(1, Ordering::SeqCst);
            let mut subject = "anonymous".to_string();
            if let Some((u, p)) = &creds {
                let want = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                );
                let got = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if got != want {
                    return http::text(401, "bad credentials");
                }
                subject = u.clone();
            }
            let query = req.uri().query().unwrap_or("");
            let mut access = Vec::new();
            for (k, v) in form_pairs(query) {
                if k == "scope" {
                    // repository:NAME:ACTIONS
                    let mut parts = v.splitn(3, ':');
                    if let (Some("repository"), Some(name), Some(actions)) =
                        (parts.next(), parts.next(), parts.next())
                    {
                        access.push((
                            name.to_string(),
                            actions.split(',').map(str::to_string).collect(),
                        ));
                    }
                }
            }
            let stale = st
                .stale_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let lifetime = if stale { -3600 } else { 300 };
            match signer.token(&subject, &access, lifetime) {
                Ok(t) => http::text(
                    200,
                    serde_json::json!({"token": t, "access_token": t, "expires_in": 300})
                        .to_string(),
                ),
                Err(e) => http::text(500, e.to_string()),
            }
        })
    });
    let server = http::serve(handler)
        .await
        .map_err(|e| TestkitError::Setup(format!("token issuer listen: {e}")))?;
    Ok(Issuer { state, server })
}

/// Decodes `a=b&c=d` with `%XX` and `+`.
pub fn form_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_token_query() {
        let p = form_pairs("service=reg&scope=repository%3Aa%2Fb%3Apull%2Cpush&x=%zz");
        assert_eq!(p[1], ("scope".into(), "repository:a/b:pull,push".into()));
        assert_eq!(p[2], ("x".into(), "%zz".into()));
    }

    #[test]
    fn tokens_are_three_base64url_parts_with_x5c() {
        let s = Signer::generate().unwrap();
        let t = s
            .token("u", &[("a".into(), vec!["pull".into()])], 60)
            .unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[0])
            .unwrap();
        let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["x5c"].as_array().map(Vec::len), Some(1));
    }
}
