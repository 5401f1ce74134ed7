//! The cluster CA: create it once (`shoal ca init`), then issue node certificates that are
//! valid as both TLS server and TLS client (`shoal ca issue`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::ServerName;
use time::{Duration, OffsetDateTime};
use tracing::info;

use crate::files::{self, CA_CRT, CA_KEY, TLS_CRT, TLS_KEY};
use crate::TlsError;

/// Default lifetime of the cluster CA: 10 years.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default lifetime of a node certificate: 1 year.
pub const DEFAULT_NODE_DAYS: u32 = 365;
/// Longest accepted lifetime, CA or node: 100 years.
pub const MAX_DAYS: u32 = 36500;
/// Certificates start this long before "now", so nodes with a slightly slow clock accept them.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// The cluster CA: its certificate and its signing key.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// What `ca issue` puts in a node certificate.
#[derive(Debug, Clone)]
pub struct NodeCertRequest {
    /// The node name: the certificate's common name and first DNS name; peers connect with it
    /// as the TLS server name.
    pub name: String,
    /// More DNS names (e.g. a Service name).
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl NodeCertRequest {
    /// A request for `name`, valid from now (less a little clock skew) for `days` days.
    pub fn new(name: impl Into<String>, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        NodeCertRequest {
            name: name.into(),
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - CLOCK_SKEW,
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// A freshly issued node certificate, in PEM.
pub struct IssuedCert {
    /// The node certificate chain (leaf only; the CA is in `ca_pem`).
    pub cert_pem: String,
    /// The node private key (PKCS#8).
    pub key_pem: String,
    /// The cluster CA certificate.
    pub ca_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes `tls.crt` (0644), `tls.key` (0600) and `ca.crt` (0644) into `dir` (created 0700
    /// if missing), each atomically so a running node reloads whole files.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        files::ensure_dir(dir, 0o700)?;
        files::write_atomic(&dir.join(TLS_KEY), self.key_pem.as_bytes(), 0o600)?;
        files::write_atomic(&dir.join(CA_CRT), self.ca_pem.as_bytes(), 0o644)?;
        // The certificate last: a reloader that sees it also sees its key.
        files::write_atomic(&dir.join(TLS_CRT), self.cert_pem.as_bytes(), 0o644)?;
        Ok(())
    }
}

fn check_days(days: u32) -> Result<(), TlsError> {
    if days == 0 || days > MAX_DAYS {
        return Err(TlsError::invalid(
            "validity",
            format!("{days} days; choose 1 to {MAX_DAYS}"),
        ));
    }
    Ok(())
}

fn check_dns_name(name: &str) -> Result<(), TlsError> {
    match ServerName::try_from(name) {
        Ok(ServerName::DnsName(_)) => Ok(()),
        _ => Err(TlsError::invalid(
            "DNS name",
            format!("{name:?} is not a valid DNS name (use --ip for addresses)"),
        )),
    }
}

impl ClusterCa {
    /// Creates a new self-signed CA valid for `days` days and writes `ca.crt` (0644) and
    /// `ca.key` (0600) into `dir` (created 0700). Refuses to replace an existing `ca.key`.
    pub fn init(dir: &Path, common_name: &str, days: u32) -> Result<ClusterCa, TlsError> {
        check_days(days)?;
        if common_name.is_empty() || common_name.len() > 64 {
            return Err(TlsError::invalid("CA name", "must be 1 to 64 characters"));
        }
        let key_path = dir.join(CA_KEY);
        if key_path.exists() {
            return Err(TlsError::CaExists(key_path));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Shoal");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::days(i64::from(days));
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();

        files::ensure_dir(dir, 0o700)?;
        files::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        files::write_atomic(&dir.join(CA_CRT), cert_pem.as_bytes(), 0o644)?;
        info!(dir = %dir.display(), days, "created cluster CA");
        Ok(ClusterCa {
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA from `ca.crt` and `ca.key` in `dir`.
    pub fn load(dir: &Path) -> Result<ClusterCa, TlsError> {
        let cert_path = dir.join(CA_CRT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = read_text(&cert_path)?;
        let key_pem = read_text(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::BadPem {
            path: key_path.clone(),
            reason: format!("not a usable CA key: {e}"),
        })?;
        // The CA certificate's public key must be this key's, or nothing we sign would verify.
        let der = files::parse_certs(&cert_path, cert_pem.as_bytes())?;
        let first = der.first().ok_or_else(|| TlsError::BadPem {
            path: cert_path.clone(),
            reason: "no certificate".into(),
        })?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(first).map_err(|e| TlsError::BadPem {
                path: cert_path.clone(),
                reason: format!("not an X.509 certificate: {e}"),
            })?;
        if parsed.public_key().raw != key.subject_public_key_info() {
            return Err(TlsError::BadPem {
                path: key_path,
                reason: format!(
                    "this key does not belong to the CA certificate {}",
                    cert_path.display()
                ),
            });
        }
        if !parsed.is_ca() {
            return Err(TlsError::BadPem {
                path: cert_path,
                reason: "not a CA certificate (basicConstraints CA:FALSE)".into(),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::BadPem {
            path: cert_path,
            reason: format!("unusable CA certificate: {e}"),
        })?;
        Ok(ClusterCa { cert_pem, issuer })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a node certificate (ECDSA P-256, server and client auth) for `req`.
    pub fn issue(&self, req: &NodeCertRequest) -> Result<IssuedCert, TlsError> {
        check_dns_name(&req.name)?;
        if req.not_after <= req.not_before {
            return Err(TlsError::invalid(
                "validity",
                "not_after must be after not_before",
            ));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.name.as_str());
        dn.push(DnType::OrganizationName, "Shoal");
        params.distinguished_name = dn;
        let mut sans = vec![SanType::DnsName(req.name.as_str().try_into()?)];
        for name in &req.dns {
            check_dns_name(name)?;
            if *name != req.name {
                sans.push(SanType::DnsName(name.as_str().try_into()?));
            }
        }
        sans.extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = req.not_before;
        params.not_after = req.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        info!(node = %req.name, not_after = %req.not_after, "issued node certificate");
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    let bytes = files::read_small(path)?;
    String::from_utf8(bytes).map_err(|_| TlsError::BadPem {
        path: PathBuf::from(path),
        reason: "not UTF-8 text".into(),
    })
}
