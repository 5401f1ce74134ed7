//! The node's identity (certificate, key, trusted CA) loaded from files and swapped in place
//! when the files change, so new handshakes use the new certificate without a restart.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use tracing::{info, warn};

use crate::files::{self, IdentityPaths};
use crate::{provider, TlsError};

/// How often [`NodeIdentity::spawn_watcher`] looks at the files by default. Kubernetes updates
/// a mounted Secret within about a minute, so this is ample.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// One consistent load of the three files.
struct Loaded {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    /// BLAKE3 over the three files' bytes, to notice any change (mtime alone misses a
    /// Secret's symlink swap when the new files keep old timestamps).
    fingerprint: [u8; 32],
}

/// The node's certificate and key, reloadable; it resolves the certificate for rustls as both
/// server ([`ResolvesServerCert`]) and client ([`ResolvesClientCert`]).
#[derive(Debug)]
pub struct NodeIdentity {
    paths: IdentityPaths,
    current: RwLock<Arc<CertifiedKey>>,
    roots: Arc<RootCertStore>,
    fingerprint: RwLock<[u8; 32]>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").finish_non_exhaustive()
    }
}

fn load(paths: &IdentityPaths) -> Result<Loaded, TlsError> {
    let cert_pem = files::read_small(&paths.cert)?;
    let key_pem = files::read_small(&paths.key)?;
    let ca_pem = files::read_small(&paths.ca)?;
    let chain = files::parse_certs(&paths.cert, &cert_pem)?;
    let key_der = files::parse_key(&paths.key, &key_pem)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::BadPem {
            path: paths.key.clone(),
            reason: format!("unusable private key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    // During a rotation the files change one by one: a key that does not match its
    // certificate is refused here, and the next poll picks up the finished set.
    certified.keys_match().map_err(|e| TlsError::BadPem {
        path: paths.key.clone(),
        reason: format!(
            "does not match the certificate in {}: {e}",
            paths.cert.display()
        ),
    })?;
    let mut roots = RootCertStore::empty();
    for ca in files::parse_certs(&paths.ca, &ca_pem)? {
        roots.add(ca).map_err(|e| TlsError::BadPem {
            path: paths.ca.clone(),
            reason: format!("unusable CA certificate: {e}"),
        })?;
    }
    let mut hasher = blake3::Hasher::new();
    for part in [&cert_pem, &key_pem, &ca_pem] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    Ok(Loaded {
        key: Arc::new(certified),
        roots: Arc::new(roots),
        fingerprint: *hasher.finalize().as_bytes(),
    })
}

impl NodeIdentity {
    /// Loads the identity; every file must be present and consistent.
    pub fn load(paths: IdentityPaths) -> Result<Arc<NodeIdentity>, TlsError> {
        let loaded = load(&paths)?;
        Ok(Arc::new(NodeIdentity {
            paths,
            current: RwLock::new(loaded.key),
            roots: loaded.roots,
            fingerprint: RwLock::new(loaded.fingerprint),
        }))
    }

    /// The files this identity comes from.
    pub fn paths(&self) -> &IdentityPaths {
        &self.paths
    }

    /// The CA roots loaded at start. A new `ca.crt` takes effect at the next restart (the
    /// verifiers are built once); node certificates reload live.
    pub fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }

    /// The certificate and key new handshakes use now.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(k) => Arc::clone(&k),
            // A writer panicked mid-swap; the value inside is still a whole Arc.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Re-reads the files; swaps in the new certificate if they changed and load cleanly.
    /// Returns whether a new certificate is now in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let loaded = load(&self.paths)?;
        let mut fp = self.fingerprint.write().unwrap_or_else(|p| p.into_inner());
        if *fp == loaded.fingerprint {
            return Ok(false);
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded.key;
        *fp = loaded.fingerprint;
        info!(cert = %self.paths.cert.display(), "reloaded node certificate");
        Ok(true)
    }

    /// Polls the files every `interval` on the current tokio runtime and reloads on change;
    /// a failed load is logged and the old certificate kept. The task ends when the last
    /// `Arc` of this identity is dropped.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<NodeIdentity> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(identity) = weak.upgrade() else {
                    return;
                };
                let result =
                    tokio::task::spawn_blocking(move || identity.reload_if_changed()).await;
                match result {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!("keeping the current certificate: {e}"),
                    Err(e) => warn!("certificate reload task failed: {e}"),
                }
            }
        })
    }
}

impl ResolvesServerCert for NodeIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl ResolvesClientCert for NodeIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
