//! Reading and writing PEM files: certificates and keys as a Kubernetes Secret mounts them
//! (`tls.crt`, `tls.key`, `ca.crt`), written atomically with restrictive modes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// File name of a node certificate chain (PEM), as in a `kubernetes.io/tls` Secret.
pub const TLS_CRT: &str = "tls.crt";
/// File name of a node private key (PEM, PKCS#8), as in a `kubernetes.io/tls` Secret.
pub const TLS_KEY: &str = "tls.key";
/// File name of the cluster CA certificate (PEM), in node directories and the CA directory.
pub const CA_CRT: &str = "ca.crt";
/// File name of the cluster CA private key, only in the CA directory.
pub const CA_KEY: &str = "ca.key";

/// Largest PEM file read (a chain of a few certificates is a few KiB).
const MAX_PEM_LEN: u64 = 1 << 20;

/// The three files a node loads its identity from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPaths {
    /// The node's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The node's private key.
    pub key: PathBuf,
    /// The cluster CA certificate(s) to trust.
    pub ca: PathBuf,
}

impl IdentityPaths {
    /// `tls.crt`, `tls.key` and `ca.crt` in `dir` (a mounted Secret).
    pub fn in_dir(dir: &Path) -> Self {
        IdentityPaths {
            cert: dir.join(TLS_CRT),
            key: dir.join(TLS_KEY),
            ca: dir.join(CA_CRT),
        }
    }
}

/// Reads a whole (small) file.
pub(crate) fn read_small(path: &Path) -> Result<Vec<u8>, TlsError> {
    let file = fs::File::open(path).map_err(|e| TlsError::io("reading", path, e))?;
    let mut buf = Vec::new();
    use std::io::Read;
    file.take(MAX_PEM_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| TlsError::io("reading", path, e))?;
    if buf.len() as u64 > MAX_PEM_LEN {
        return Err(TlsError::BadPem {
            path: path.into(),
            reason: format!("larger than {MAX_PEM_LEN} bytes; not a certificate or key file"),
        });
    }
    Ok(buf)
}

/// Parses every certificate in a PEM file; none is an error.
pub(crate) fn parse_certs(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.into(),
            reason: format!("unreadable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            path: path.into(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Parses the first private key in a PEM file.
pub(crate) fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| TlsError::BadPem {
            path: path.into(),
            reason: format!("unreadable PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::BadPem {
            path: path.into(),
            reason: "no PRIVATE KEY block found".into(),
        })
}

/// Reads and parses every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path, &read_small(path)?)
}

/// Reads and parses the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(path, &read_small(path)?)
}

/// Creates `dir` (and parents) if missing; a new directory gets mode `mode`.
pub(crate) fn ensure_dir(dir: &Path, mode: u32) -> Result<(), TlsError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| TlsError::io("creating directory", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| TlsError::io("setting permissions of", dir, e))
}

/// Writes `contents` to `path` with `mode`, atomically: a temporary file in the same directory
/// renamed over the target, so a reloading reader never sees half a file.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let name = path.file_name().ok_or_else(|| {
        TlsError::invalid(
            "output path",
            format!("{} has no file name", path.display()),
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(TlsError::io("writing", path, e));
    }
    Ok(())
}
