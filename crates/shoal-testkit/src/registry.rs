//! `Registry::start`: Debian's `docker-registry` (CNCF distribution v2) on a free loopback port,
//! with a generated config (anonymous, htpasswd or token auth), its parsed access log, and
//! helpers that push blobs and images with plain HTTP calls (independent of shoal-origin).

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest as _, Sha256};

use crate::token::{self, Issuer, Signer};
use crate::{free_port, need_binaries, TestkitError};

/// How the registry authenticates clients.
#[derive(Debug, Clone, Default)]
pub enum RegistryAuth {
    /// No authentication.
    #[default]
    Anonymous,
    /// htpasswd (bcrypt) basic auth with one user.
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// Bearer tokens from the fixture's issuer; `credentials` are required by the issuer when set.
    Token {
        /// (user, password) the issuer requires, or `None` for anonymous tokens.
        credentials: Option<(String, String)>,
    },
}

/// Options for [`Registry::start`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Authentication mode.
    pub auth: RegistryAuth,
}

/// One line of the registry's access log (Apache combined format on its stdout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// HTTP method.
    pub method: String,
    /// Path with query.
    pub path: String,
    /// Status code.
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
}

/// A running registry; killed on drop.
pub struct Registry {
    child: Child,
    port: u16,
    dir: Option<tempfile::TempDir>,
    log: Arc<Mutex<Vec<String>>>,
    auth: RegistryAuth,
    signer: Option<Arc<Signer>>,
    issuer: Option<Issuer>,
    http: reqwest::Client,
}

impl Registry {
    /// Starts `docker-registry` and waits until `/v2/` answers.
    pub async fn start(opts: RegistryOpts) -> Result<Registry, TestkitError> {
        need_binaries(&["docker-registry"]).map_err(TestkitError::Missing)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().map_err(|e| TestkitError::Setup(format!("temp dir: {e}")))?;
        let mut auth_yaml = String::new();
        let (mut signer, mut issuer) = (None, None);
        match &opts.auth {
            RegistryAuth::Anonymous => {}
            RegistryAuth::Basic { user, password } => {
                need_binaries(&["htpasswd"]).map_err(TestkitError::Missing)?;
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .map_err(|e| TestkitError::Setup(format!("htpasswd: {e}")))?;
                if !out.status.success() {
                    return Err(TestkitError::Setup(format!(
                        "htpasswd failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )));
                }
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, &out.stdout)
                    .map_err(|e| TestkitError::Setup(e.to_string()))?;
                auth_yaml = format!(
                    "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
                    path.display()
                );
            }
            RegistryAuth::Token { credentials } => {
                let s = Arc::new(Signer::generate()?);
                let bundle = dir.path().join("token-root.pem");
                std::fs::write(&bundle, &s.cert_pem)
                    .map_err(|e| TestkitError::Setup(e.to_string()))?;
                let iss = token::start_issuer(s.clone(), credentials.clone()).await?;
                auth_yaml = format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    iss.server.addr,
                    token::SERVICE,
                    token::ISSUER,
                    bundle.display()
                );
                signer = Some(s);
                issuer = Some(iss);
            }
        }
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| TestkitError::Setup(format!("HTTP client: {e}")))?;
        // A port picked by binding can be taken before the registry binds it: try a few.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let config = format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: shoal-testkit-secret\n{auth_yaml}",
                data = dir.path().join("data").display(),
            );
            let cfg_path = dir.path().join("config.yml");
            std::fs::write(&cfg_path, config).map_err(|e| TestkitError::Setup(e.to_string()))?;
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| TestkitError::Setup(format!("spawn docker-registry: {e}")))?;
            let log = Arc::new(Mutex::new(Vec::new()));
            if let Some(out) = child.stdout.take() {
                pump_lines(out, log.clone());
            }
            if let Some(err) = child.stderr.take() {
                pump_lines(err, log.clone());
            }
            let mut reg = Registry {
                child,
                port,
                dir: None,
                log,
                auth: opts.auth.clone(),
                signer: None,
                issuer: None,
                http: http.clone(),
            };
            match reg.wait_ready().await {
                Ok(()) => {
                    reg.dir = Some(dir);
                    reg.signer = signer;
                    reg.issuer = issuer;
                    return Ok(reg);
                }
                Err(e) => last_err = format!("{e}; log: {}", reg.log_tail(20)),
            }
        }
        Err(TestkitError::Setup(format!(
            "docker-registry did not start: {last_err}"
        )))
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("docker-registry exited with {status}"));
            }
            if let Ok(r) = self.http.get(format!("{}/v2/", self.url())).send().await {
                if r.status().as_u16() == 200 || r.status().as_u16() == 401 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err("no answer on /v2/ within 15 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `docker-registry` process id (for its CPU time in benches).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:PORT/REPO:TAG`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("docker://{}/{repo}:{tag}", self.host())
    }

    /// `127.0.0.1:PORT` of the token issuer (the realm's host), in token mode.
    pub fn issuer_host(&self) -> Option<String> {
        self.issuer.as_ref().map(|i| i.server.addr.to_string())
    }

    /// Token requests the issuer has answered (token mode; 0 otherwise).
    pub fn token_requests(&self) -> usize {
        self.issuer
            .as_ref()
            .map_or(0, |i| i.state.hits.load(Ordering::SeqCst))
    }

    /// The next `n` tokens are issued already expired (the registry refuses them).
    pub fn issue_stale_tokens(&self, n: usize) {
        if let Some(i) = &self.issuer {
            i.state.stale_next.store(n, Ordering::SeqCst);
        }
    }

    /// The last `n` lines the registry printed.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        log[log.len().saturating_sub(n)..].join("\n")
    }

    /// The file holding blob `digest` (`sha256:<hex>`) in the registry's storage, if it holds
    /// it: tests flip its bytes to play a registry that serves bad bytes.
    pub fn blob_file(&self, digest: &str) -> Option<std::path::PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        let p = self
            .dir
            .as_ref()?
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(hex.get(..2)?)
            .join(hex)
            .join("data");
        p.is_file().then_some(p)
    }

    /// The access log so far (waits briefly so lines of finished requests are in).
    pub async fn access_log(&self) -> Vec<AccessEntry> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        log.iter().filter_map(|l| parse_access_line(l)).collect()
    }

    /// Bytes of blob `digest` the registry sent in successful GETs (full and Range).
    pub async fn blob_bytes_served(&self, digest: &str) -> u64 {
        let needle = format!("/blobs/{digest}");
        self.access_log()
            .await
            .iter()
            .filter(|e| {
                e.method == "GET"
                    && (200..300).contains(&e.status)
                    && e.path.split('?').next().unwrap_or("").ends_with(&needle)
            })
            .map(|e| e.bytes)
            .sum()
    }

    /// Authorization header for the fixture's own pushes.
    fn admin_auth(&self, repo: &str) -> Result<Option<String>, TestkitError> {
        Ok(match &self.auth {
            RegistryAuth::Anonymous => None,
            RegistryAuth::Basic { user, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            RegistryAuth::Token { .. } => {
                let s = self
                    .signer
                    .as_ref()
                    .ok_or_else(|| TestkitError::Setup("no signer".into()))?;
                Some(format!(
                    "Bearer {}",
                    s.token(
                        "testkit-admin",
                        &[(repo.to_string(), vec!["pull".into(), "push".into()])],
                        300
                    )?
                ))
            }
        })
    }

    fn req(
        &self,
        m: reqwest::Method,
        url: String,
        repo: &str,
    ) -> Result<reqwest::RequestBuilder, TestkitError> {
        let mut rb = self.http.request(m, url);
        if let Some(a) = self.admin_auth(repo)? {
            rb = rb.header("authorization", a);
        }
        Ok(rb)
    }

    /// Pushes a blob (monolithic upload) and returns its digest `sha256:...`.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> Result<String, TestkitError> {
        let digest = sha256_digest(data);
        let resp = self
            .req(
                reqwest::Method::POST,
                format!("{}/v2/{repo}/blobs/uploads/", self.url()),
                repo,
            )?
            .send()
            .await
            .map_err(|e| TestkitError::Http(format!("upload start: {e}")))?;
        if resp.status().as_u16() != 202 {
            return Err(TestkitError::Http(format!(
                "upload start answered {}",
                resp.status()
            )));
        }
        let loc = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| TestkitError::Http("upload start without Location".into()))?;
        let mut url = reqwest::Url::parse(&self.url())
            .and_then(|b| b.join(loc))
            .map_err(|e| TestkitError::Http(format!("Location: {e}")))?;
        url.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .req(reqwest::Method::PUT, url.to_string(), repo)?
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .map_err(|e| TestkitError::Http(format!("upload: {e}")))?;
        if resp.status().as_u16() != 201 {
            return Err(TestkitError::Http(format!(
                "upload answered {}",
                resp.status()
            )));
        }
        Ok(digest)
    }

    /// Pushes a manifest or index under `tag_or_digest`; returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        tag_or_digest: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String, TestkitError> {
        let resp = self
            .req(
                reqwest::Method::PUT,
                format!("{}/v2/{repo}/manifests/{tag_or_digest}", self.url()),
                repo,
            )?
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .map_err(|e| TestkitError::Http(format!("manifest push: {e}")))?;
        if resp.status().as_u16() != 201 {
            let st = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(TestkitError::Http(format!(
                "manifest push answered {st}: {body}"
            )));
        }
        Ok(sha256_digest(bytes))
    }

    /// Pushes an image with one layer of `layer_size` pseudo-random bytes (from `seed`) and a
    /// config for `os/arch`, tagged `tag`.
    pub async fn push_random_image(
        &self,
        repo: &str,
        tag: &str,
        layer_size: usize,
        seed: u64,
    ) -> Result<TestImage, TestkitError> {
        self.push_image_for(repo, tag, random_bytes(layer_size, seed), "linux", "amd64")
            .await
    }

    /// Pushes an image with the given layer bytes and config platform, tagged `tag`.
    pub async fn push_image_for(
        &self,
        repo: &str,
        tag: &str,
        layer: Vec<u8>,
        os: &str,
        arch: &str,
    ) -> Result<TestImage, TestkitError> {
        let layer_digest = self.push_blob(repo, &layer).await?;
        let config = serde_json::json!({
            "architecture": arch, "os": os,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "config": {}
        })
        .to_string()
        .into_bytes();
        let config_digest = self.push_blob(repo, &config).await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}]
        })
        .to_string()
        .into_bytes();
        let manifest_digest = self
            .push_manifest(
                repo,
                tag,
                "application/vnd.oci.image.manifest.v1+json",
                &manifest,
            )
            .await?;
        Ok(TestImage {
            manifest_digest,
            manifest,
            config_digest,
            layer_digest,
            layer,
        })
    }
}

/// What [`Registry::push_random_image`] pushed.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// Digest of the manifest.
    pub manifest_digest: String,
    /// Manifest bytes.
    pub manifest: Vec<u8>,
    /// Digest of the config blob.
    pub config_digest: String,
    /// Digest of the layer blob.
    pub layer_digest: String,
    /// Layer bytes.
    pub layer: Vec<u8>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump_lines<R: std::io::Read + Send + 'static>(r: R, log: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut l) = log.lock() {
                l.push(line);
            }
        }
    });
}

/// Parses `IP - - [date] "GET /path HTTP/1.1" 200 1234 "ref" "agent"`.
pub fn parse_access_line(line: &str) -> Option<AccessEntry> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let end = rest.find('"')?;
    let mut req = rest[..end].split(' ');
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let mut tail = rest[end + 1..].split_whitespace();
    let status = tail.next()?.parse().ok()?;
    let bytes = tail.next()?.parse().unwrap_or(0);
    Some(AccessEntry {
        method,
        path,
        status,
        bytes,
    })
}

/// `sha256:<hex>` of bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `len` pseudo-random bytes (xorshift64*, fast and reproducible from `seed`).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_access_log_lines() {
        let l = r#"127.0.0.1 - - [23/Nov/2026:16:10:15 +0000] "GET /v2/x/blobs/sha256:ab?ns=a HTTP/1.1" 206 1234 "" "curl/7.88.1""#;
        assert_eq!(
            parse_access_line(l),
            Some(AccessEntry {
                method: "GET".into(),
                path: "/v2/x/blobs/sha256:ab?ns=a".into(),
                status: 206,
                bytes: 1234
            })
        );
        assert_eq!(parse_access_line("time=\"x\" level=info msg=\"y\""), None);
    }

    #[test]
    fn random_bytes_are_reproducible() {
        assert_eq!(random_bytes(1000, 5), random_bytes(1000, 5));
        assert_ne!(random_bytes(1000, 5), random_bytes(1000, 6));
        assert_eq!(random_bytes(13, 1).len(), 13);
    }
}
