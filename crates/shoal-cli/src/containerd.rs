//! `shoal containerd-config`: points containerd at the local peer's registry proxy by writing a
//! `hosts.toml` per registry (and `_default`) under containerd's `config_path`, keeping a backup
//! of what was there; `--remove` puts the backups back.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

/// First line of every file we write: how `--remove` knows a file is ours.
const MARKER: &str = "# Written by `shoal containerd-config`";
/// Suffix of the backup of a hosts.toml that was there before.
const BACKUP: &str = "hosts.toml.shoal-backup";

/// `shoal containerd-config`: send containerd's pulls through the Shoal proxy.
#[derive(Args, Debug)]
pub struct ContainerdConfigArgs {
    /// Registries (`host[:port]`, e.g. `docker.io`) whose pulls go through the proxy;
    /// `_default` covers every registry without a hosts.toml of its own.
    #[arg(required = true)]
    registries: Vec<String>,
    /// The proxy's address as containerd reaches it.
    #[arg(long, default_value = "http://127.0.0.1:4480")]
    proxy: String,
    /// containerd's config file, read for its registry `config_path`.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// The hosts directory to write to, instead of the `config_path` containerd's config names.
    #[arg(long)]
    config_path: Option<PathBuf>,
    /// Restore what was there before (and delete the files this command wrote).
    #[arg(long)]
    remove: bool,
}

/// Runs `shoal containerd-config`.
pub fn run(args: ContainerdConfigArgs) -> anyhow::Result<()> {
    let dir = match &args.config_path {
        Some(d) => d.clone(),
        None => config_path_of(&args.containerd_config)?,
    };
    if !args.proxy.starts_with("http://") && !args.proxy.starts_with("https://") {
        bail!(
            "--proxy {:?} must be an http:// or https:// URL",
            args.proxy
        );
    }
    for r in &args.registries {
        check_registry(r)?;
        let msg = if args.remove {
            remove(&dir, r)?
        } else {
            write(&dir, r, &args.proxy)?
        };
        println!("{msg}");
    }
    if !args.remove {
        print!("{}", allowing_lines(&args.registries));
    }
    Ok(())
}

/// What the peer's config needs so that its proxy serves the registries just configured: the
/// `allowed_origins` line (a registry outside it is answered 403, and containerd then pulls
/// from the registry itself, without Shoal).
fn allowing_lines(registries: &[String]) -> String {
    let named: Vec<&str> = registries
        .iter()
        .map(String::as_str)
        .filter(|r| *r != "_default")
        .collect();
    let mut out = String::from(
        "The peer serves only registries in its allowed_origins (a refused one is answered 403 \
         and containerd then pulls from it without Shoal).\n",
    );
    if !named.is_empty() {
        let quoted: Vec<String> = named.iter().map(|r| format!("{r:?}")).collect();
        out.push_str(&format!(
            "Add to the `shoal peer` config (and to the seeds' and schedulers'):\n  \
             allowed_origins = [{}]\n  (or the flag --allowed-origins={})\n",
            quoted.join(", "),
            named.join(",")
        ));
    }
    if registries.iter().any(|r| r == "_default") {
        out.push_str(
            "_default sends every other registry to the proxy too: list each one the nodes may \
             pull from in allowed_origins.\n",
        );
    }
    out
}

/// The registry `config_path` in containerd's config (v2: the CRI plugin; v3: CRI images).
fn config_path_of(config: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(config).with_context(|| {
        format!(
            "reading containerd's config {} (or pass --config-path DIR)",
            config.display()
        )
    })?;
    let value: toml::Value =
        toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let found = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"]
        .iter()
        .find_map(|plugin| {
            value
                .get("plugins")?
                .get(*plugin)?
                .get("registry")?
                .get("config_path")?
                .as_str()
                .map(str::to_string)
        })
        .filter(|p| !p.is_empty());
    let Some(path) = found else {
        bail!(
            "containerd's config {} sets no registry config_path, so containerd would ignore hosts.toml files.\n\
             Add\n  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"/etc/containerd/certs.d\"\n\
             (containerd 2: [plugins.\"io.containerd.cri.v1.images\".registry]), restart containerd and run this again, \
             or pass --config-path DIR (e.g. for `ctr --hosts-dir DIR`).",
            config.display()
        );
    };
    // Several directories may be listed (`:`-separated); containerd reads the first that has one.
    Ok(PathBuf::from(path.split(':').next().unwrap_or(&path)))
}

/// A registry name safe to use as one directory name.
fn check_registry(r: &str) -> anyhow::Result<()> {
    let ok = r == "_default"
        || (!r.is_empty()
            && r.len() <= 255
            && !r.starts_with('.')
            && r.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            }));
    if !ok {
        bail!("{r:?} is not a registry host[:port] (or _default)");
    }
    Ok(())
}

/// The hosts.toml sending `registry` to `proxy` (containerd adds `?ns=<registry>`).
fn hosts_toml(registry: &str, proxy: &str) -> String {
    let server = match registry {
        "_default" => String::new(),
        "docker.io" => "server = \"https://registry-1.docker.io\"\n".into(),
        r => format!("server = \"https://{r}\"\n"),
    };
    format!(
        "{MARKER}; `shoal containerd-config --remove {registry}` restores the previous file.\n\
         {server}\n[host.\"{proxy}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

fn is_ours(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.starts_with(MARKER))
}

fn write(dir: &Path, registry: &str, proxy: &str) -> anyhow::Result<String> {
    let rdir = dir.join(registry);
    std::fs::create_dir_all(&rdir).with_context(|| format!("creating {}", rdir.display()))?;
    let file = rdir.join("hosts.toml");
    let backup = rdir.join(BACKUP);
    let mut note = String::new();
    if file.exists() && !is_ours(&file) {
        if backup.exists() {
            bail!(
                "{} is not ours and a backup {} already exists: move one of them away first",
                file.display(),
                backup.display()
            );
        }
        std::fs::rename(&file, &backup)
            .with_context(|| format!("backing up {} to {}", file.display(), backup.display()))?;
        note = format!(" (previous file kept as {})", backup.display());
    }
    let tmp = rdir.join(".hosts.toml.shoal-tmp");
    std::fs::write(&tmp, hosts_toml(registry, proxy))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
    Ok(format!(
        "{registry}: pulls go through {proxy}: wrote {}{note}",
        file.display()
    ))
}

fn remove(dir: &Path, registry: &str) -> anyhow::Result<String> {
    let rdir = dir.join(registry);
    let file = rdir.join("hosts.toml");
    let backup = rdir.join(BACKUP);
    if file.exists() && !is_ours(&file) {
        return Ok(format!(
            "{registry}: {} was not written by shoal: left as it is",
            file.display()
        ));
    }
    if backup.exists() {
        std::fs::rename(&backup, &file)
            .with_context(|| format!("restoring {} from {}", file.display(), backup.display()))?;
        return Ok(format!(
            "{registry}: restored {} from the backup",
            file.display()
        ));
    }
    if file.exists() {
        std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        let _ = std::fs::remove_dir(&rdir); // only if empty
        return Ok(format!("{registry}: removed {}", file.display()));
    }
    Ok(format!(
        "{registry}: nothing to remove in {}",
        rdir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_found_or_explained() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("config.toml");
        std::fs::write(&cfg, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/x/certs.d:/y\"\n").unwrap();
        assert_eq!(config_path_of(&cfg).unwrap(), PathBuf::from("/x/certs.d"));
        std::fs::write(
            &cfg,
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/b\"\n",
        )
        .unwrap();
        let err = config_path_of(&cfg).unwrap_err().to_string();
        assert!(err.contains("sets no registry config_path"), "{err}");
    }

    #[test]
    fn write_backup_and_restore() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::create_dir_all(dir.join("docker.io")).unwrap();
        let theirs = "server = \"https://mirror.example\"\n";
        std::fs::write(dir.join("docker.io/hosts.toml"), theirs).unwrap();
        for r in ["docker.io", "_default"] {
            write(dir, r, "http://127.0.0.1:4480").unwrap();
            let t = std::fs::read_to_string(dir.join(r).join("hosts.toml")).unwrap();
            assert!(
                t.contains("[host.\"http://127.0.0.1:4480\"]")
                    && t.contains("\"pull\", \"resolve\"")
            );
            let parsed: toml::Value = toml::from_str(&t).unwrap();
            assert!(parsed.get("host").is_some());
        }
        // Idempotent: writing again keeps the original backup.
        write(dir, "docker.io", "http://127.0.0.1:4480").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("docker.io").join(BACKUP)).unwrap(),
            theirs
        );
        remove(dir, "docker.io").unwrap();
        remove(dir, "_default").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("docker.io/hosts.toml")).unwrap(),
            theirs
        );
        assert!(!dir.join("docker.io").join(BACKUP).exists());
        assert!(!dir.join("_default").exists());
        assert!(check_registry("../etc").is_err() && check_registry("a/b").is_err());
        assert!(check_registry("127.0.0.1:5000").is_ok());
    }

    #[test]
    fn the_allowing_line_lists_what_was_configured() {
        let regs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let out = allowing_lines(&regs(&["docker.io", "127.0.0.1:5000", "_default"]));
        assert!(
            out.contains("allowed_origins = [\"docker.io\", \"127.0.0.1:5000\"]"),
            "{out}"
        );
        assert!(
            out.contains("--allowed-origins=docker.io,127.0.0.1:5000"),
            "{out}"
        );
        assert!(out.contains("_default sends every other registry"), "{out}");
        // The line is what a peer config parses.
        let line = out
            .lines()
            .find(|l| l.contains("allowed_origins ="))
            .unwrap();
        let cfg: shoal_peer::PeerConfig = toml::from_str(line.trim()).unwrap();
        let allowed = cfg.allowed_list().unwrap();
        assert!(allowed.allows_registry("registry-1.docker.io"));
        assert!(allowed.allows_registry("127.0.0.1:5000"));
        let only_default = allowing_lines(&regs(&["_default"]));
        assert!(
            !only_default.contains("allowed_origins = ["),
            "{only_default}"
        );
    }
}
