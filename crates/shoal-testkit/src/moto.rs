//! `MotoS3::start`: Python moto's `moto_server` as an S3-compatible endpoint on a free loopback port.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, need_binaries, TestkitError};

/// A running moto server; killed on drop.
pub struct MotoS3 {
    child: Child,
    port: u16,
    http: reqwest::Client,
}

impl MotoS3 {
    /// Starts `moto_server` and waits until it answers.
    pub async fn start() -> Result<MotoS3, TestkitError> {
        need_binaries(&["moto_server"]).map_err(TestkitError::Missing)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| TestkitError::Setup(format!("spawn moto_server: {e}")))?;
            let mut m = MotoS3 {
                child,
                port,
                http: http.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(st)) = m.child.try_wait() {
                    last = format!("moto_server exited with {st}");
                    break;
                }
                if m.http.get(m.endpoint()).send().await.is_ok() {
                    return Ok(m);
                }
                if Instant::now() > deadline {
                    last = "moto_server did not answer within 30 s".into();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(TestkitError::Setup(last))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), TestkitError> {
        let r = self
            .http
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await
            .map_err(|e| TestkitError::Http(format!("create bucket {bucket}: {e}")))?;
        if !r.status().is_success() {
            return Err(TestkitError::Http(format!(
                "create bucket {bucket}: {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// Stores an object.
    pub async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        data: Vec<u8>,
    ) -> Result<(), TestkitError> {
        let r = self
            .http
            .put(format!("{}/{bucket}/{key}", self.endpoint()))
            .body(data)
            .send()
            .await
            .map_err(|e| TestkitError::Http(format!("put {bucket}/{key}: {e}")))?;
        if !r.status().is_success() {
            return Err(TestkitError::Http(format!(
                "put {bucket}/{key}: {}",
                r.status()
            )));
        }
        Ok(())
    }
}

impl Drop for MotoS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
