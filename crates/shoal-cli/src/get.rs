//! `shoal get docker://HOST/REPO@sha256:... -o FILE`: fetches one blob through the local peer
//! (its local API socket), writes it atomically (a temporary file in the target's directory,
//! renamed when the sha256 matches), and prints size, sha256 and time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use shoal_api::Client as ApiClient;
use shoal_types::Digest;

/// The design's default local API socket.
pub const DEFAULT_API_SOCKET: &str = shoal_api::DEFAULT_SOCKET;

/// `shoal get`: fetch a blob through the local peer into a file.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The blob: `docker://HOST/REPO@sha256:<hex>`.
    blob: String,
    /// Output file (written to a temporary file first, renamed once verified).
    #[arg(short, long)]
    output: PathBuf,
    /// The local peer's API socket.
    #[arg(long, env = "SHOAL_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    api: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Splits `docker://HOST/REPO@sha256:<hex>` into the origin reference and the blob digest.
pub fn parse_blob_ref(s: &str) -> anyhow::Result<(String, Digest)> {
    let Some(rest) = s.strip_prefix(crate::registry::SCHEME) else {
        bail!("{s:?}: expected docker://HOST/REPO@sha256:<hex>");
    };
    let Some((repo, digest)) = rest.rsplit_once('@') else {
        bail!("{s:?}: no @sha256:<hex> digest (shoal get fetches a blob by digest)");
    };
    let origin = format!("{}{repo}", crate::registry::SCHEME);
    shoal_origin::Reference::parse(&origin)
        .with_context(|| format!("{origin:?} is not a registry repository reference"))?;
    let digest = Digest::parse(digest).with_context(|| format!("{s:?}: bad blob digest"))?;
    Ok((origin, digest))
}

/// Fails with a clear message when nothing listens on the local API socket.
pub fn check_peer_running(socket: &Path) -> anyhow::Result<()> {
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "the local peer is not reachable at {} ({e}): is `shoal peer` running? (choose the socket with --api)",
            socket.display()
        ),
    }
}

/// What `shoal get` did.
#[derive(Debug, serde::Serialize)]
struct Fetched {
    blob: String,
    size: u64,
    sha256: String,
    seconds: f64,
    output: PathBuf,
}

/// Runs `shoal get`.
pub fn run(args: GetArgs) -> anyhow::Result<()> {
    let (origin, digest) = parse_blob_ref(&args.blob)?;
    check_peer_running(&args.api)?;
    let started = Instant::now();
    let (size, sha256) = crate::registry::block_on(fetch(&args, &origin, &digest))??;
    let seconds = started.elapsed().as_secs_f64();
    let out = Fetched {
        blob: digest.to_string(),
        size,
        sha256,
        seconds,
        output: args.output.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        let mib_s = size as f64 / (1u64 << 20) as f64 / seconds.max(1e-6);
        println!(
            "{}  {} bytes  {:.2} s  {:.1} MiB/s  -> {}",
            out.sha256,
            size,
            seconds,
            mib_s,
            args.output.display()
        );
    }
    Ok(())
}

async fn fetch(args: &GetArgs, origin: &str, digest: &Digest) -> anyhow::Result<(u64, String)> {
    let client = ApiClient::new(&args.api);
    let resp = client
        .blob(digest)
        .source(origin)
        .send()
        .await
        .with_context(|| {
            format!(
                "fetching {digest} through the peer at {}",
                args.api.display()
            )
        })?;
    let dir = match args.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    let mut body = resp.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("reading {digest} from the peer"))?;
        hasher.update(&chunk);
        tmp.write_all(&chunk)
            .with_context(|| format!("writing {}", tmp.path().display()))?;
        n += chunk.len() as u64;
    }
    if let Some(len) = resp.content_length {
        if len != n {
            bail!("the peer ended {digest} after {n} of {len} bytes; nothing written");
        }
    }
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    if got != digest.to_string() {
        bail!("the peer sent bytes with {got}, not {digest}; nothing written");
    }
    tmp.as_file()
        .sync_all()
        .context("syncing the fetched blob")?;
    tmp.persist(&args.output)
        .with_context(|| format!("renaming the blob into {}", args.output.display()))?;
    Ok((n, got))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_references_parse_and_bad_ones_say_why() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let (origin, digest) = parse_blob_ref(&format!("docker://127.0.0.1:5000/a/b@{d}")).unwrap();
        assert_eq!(origin, "docker://127.0.0.1:5000/a/b");
        assert_eq!(digest.to_string(), d);
        assert!(parse_blob_ref("docker://h/r:tag").is_err());
        assert!(parse_blob_ref(&format!("oci:/x@{d}")).is_err());
        assert!(parse_blob_ref("docker://h/r@sha256:zz").is_err());
        let err = check_peer_running(Path::new("/nonexistent/shoal.sock")).unwrap_err();
        assert!(err.to_string().contains("shoal peer"), "{err}");
    }
}
