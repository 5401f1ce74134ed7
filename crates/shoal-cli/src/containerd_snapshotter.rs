//! `shoal containerd-config --snapshotter`: adds the `shoal` proxy snapshotter to containerd's
//! config.toml and makes it the CRI's snapshotter with snapshot annotations on (so layer digests
//! and the image reference reach the snapshotter), as Dragonfly's dfinit does for its mirror. The
//! file is edited in place (comments and layout kept) after a backup of the original;
//! `--remove` puts the backup back.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use toml_edit::{value, DocumentMut, Item, Table};

/// Suffix of the backup of containerd's config as it was before the first change.
const BACKUP_SUFFIX: &str = "shoal-backup";

/// The backup of `config`.
fn backup_of(config: &Path) -> PathBuf {
    let mut name = config.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(BACKUP_SUFFIX);
    config.with_file_name(name)
}

/// The table at `path`, created (implicit, so no empty headers are written) where missing.
fn table<'a>(doc: &'a mut DocumentMut, path: &[&str]) -> anyhow::Result<&'a mut Table> {
    let mut t = doc.as_table_mut();
    for key in path {
        let item = t.entry(key).or_insert_with(|| {
            let mut new = Table::new();
            new.set_implicit(true);
            Item::Table(new)
        });
        t = item
            .as_table_mut()
            .with_context(|| format!("`{key}` in containerd's config is not a table"))?;
    }
    Ok(t)
}

/// The config text with the snapshotter added (containerd config version 2 or 3).
pub fn add(text: &str, socket: &Path) -> anyhow::Result<String> {
    let mut doc: DocumentMut = text.parse().context("parsing containerd's config")?;
    let version = match doc.get("version").and_then(Item::as_integer) {
        None if text.trim().is_empty() => {
            doc["version"] = value(2);
            2
        }
        None | Some(1) => bail!(
            "containerd's config is version 1 (no `version = 2` line): convert it with \
             `containerd config migrate` first"
        ),
        Some(v) => v,
    };
    let proxy = table(&mut doc, &["proxy_plugins", "shoal"])?;
    proxy["type"] = value("snapshot");
    proxy["address"] = value(socket.display().to_string());
    let cri: &[&str] = match version {
        2 => &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        3 => &["plugins", "io.containerd.cri.v1.images"],
        v => bail!("containerd config version {v} is not known to this command"),
    };
    let cri = table(&mut doc, cri)?;
    cri["snapshotter"] = value("shoal");
    cri["disable_snapshot_annotations"] = value(false);
    Ok(doc.to_string())
}

/// Writes the snapshotter into `config` (keeping a backup of the original) and says what to do.
pub fn install(config: &Path, socket: &Path) -> anyhow::Result<String> {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", config.display())),
    };
    let new = add(&text, socket)?;
    let backup = backup_of(config);
    if !backup.exists() {
        // The first change keeps the operator's original; later runs must not overwrite it.
        std::fs::write(&backup, &text)
            .with_context(|| format!("writing the backup {}", backup.display()))?;
    }
    write_atomic(config, &new)?;
    Ok(format!(
        "{}: containerd's CRI now uses the `shoal` snapshotter at {} (backup: {}); restart \
         containerd, and run `shoal snapshotter` before it",
        config.display(),
        socket.display(),
        backup.display()
    ))
}

/// Restores the backup `install` kept.
pub fn uninstall(config: &Path) -> anyhow::Result<String> {
    let backup = backup_of(config);
    let text = std::fs::read_to_string(&backup).with_context(|| {
        format!(
            "no backup {} to restore (was `--snapshotter` ever applied to {}?)",
            backup.display(),
            config.display()
        )
    })?;
    write_atomic(config, &text)?;
    std::fs::remove_file(&backup)
        .with_context(|| format!("removing the backup {}", backup.display()))?;
    Ok(format!(
        "{}: restored as it was before `--snapshotter`; restart containerd",
        config.display()
    ))
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_snapshotter_and_keeps_the_rest() {
        let before = "version = 2\n# keep me\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"overlayfs\"\n";
        let after = add(before, Path::new("/run/shoal/snapshotter.sock")).unwrap();
        assert!(after.contains("# keep me") && after.contains("sandbox_image = \"pause:3\""));
        let v: toml::Value = toml::from_str(&after).unwrap();
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(cri["snapshotter"].as_str(), Some("shoal"));
        assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
        assert_eq!(
            v["proxy_plugins"]["shoal"]["type"].as_str(),
            Some("snapshot")
        );
        assert_eq!(
            add(&after, Path::new("/run/shoal/snapshotter.sock")).unwrap(),
            after,
            "idempotent"
        );

        let v3 = add("version = 3\n", Path::new("/s.sock")).unwrap();
        let v: toml::Value = toml::from_str(&v3).unwrap();
        assert_eq!(
            v["plugins"]["io.containerd.cri.v1.images"]["snapshotter"].as_str(),
            Some("shoal")
        );
        assert!(add("", Path::new("/s.sock"))
            .unwrap()
            .starts_with("version = 2"));
        assert!(
            add("[plugins]\n", Path::new("/s.sock")).is_err(),
            "version 1 is refused"
        );
        assert!(add("version = 2\nproxy_plugins = 3\n", Path::new("/s.sock")).is_err());
    }

    #[test]
    fn install_keeps_the_first_backup_and_remove_restores_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, "version = 2\n# original\n").unwrap();
        install(&cfg, Path::new("/a.sock")).unwrap();
        install(&cfg, Path::new("/b.sock")).unwrap();
        assert!(std::fs::read_to_string(&cfg).unwrap().contains("/b.sock"));
        uninstall(&cfg).unwrap();
        assert_eq!(
            std::fs::read_to_string(&cfg).unwrap(),
            "version = 2\n# original\n"
        );
        assert!(uninstall(&cfg).is_err(), "nothing left to restore");
    }
}
