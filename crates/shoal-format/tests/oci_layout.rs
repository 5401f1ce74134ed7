//! The OCI side of a converted image (docs/format.md, "OCI image"): data blob layers first and the
//! bootstrap last, with the annotations containerd passes to a snapshotter; a standard OCI config
//! carrying the source's platform and runtime config and one diff_id per layer; readers that find
//! the bootstrap by media type and refuse the layout of earlier versions.

use std::path::Path;

use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageManifest, ImageManifestBuilder, MediaType,
};
use shoal_format::build::{convert, BuildOptions, Source};
use shoal_format::image::{find_bootstrap, ShoalImage};
use shoal_format::oci::{self, LayoutRef};
use shoal_format::Error;

/// A tar layer with a multi-chunk file (a few data chunks) and a small one.
fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).expect("append");
    };
    let big: Vec<u8> = (0..(3u32 << 18)).flat_map(|i| i.to_le_bytes()).collect();
    add("bin/app", &big);
    add("etc/motd", b"hello\n");
    b.into_inner().expect("finish tar")
}

const SOURCE_CONFIG: &str = r#"{
  "architecture": "arm64", "variant": "v8", "os": "linux", "created": "2024-01-02T03:04:05Z",
  "author": "someone",
  "config": {"User": "1000:1000", "Env": ["PATH=/bin", "MODE=prod"], "Entrypoint": ["/bin/app"],
             "Cmd": ["--serve"], "WorkingDir": "/srv", "ExposedPorts": {"8080/tcp": {}},
             "Volumes": {"/data": {}}, "Labels": {"team": "shoal"}, "StopSignal": "SIGINT",
             "Healthcheck": {"Test": ["CMD", "true"]}},
  "rootfs": {"type": "layers", "diff_ids": ["sha256:DIFF"]},
  "history": [{"created_by": "build"}]
}"#;

/// An OCI layout holding a plain one-layer image with `SOURCE_CONFIG`.
fn source_layout(dir: &Path) -> LayoutRef {
    oci::init_layout(dir).unwrap();
    let tar = layer();
    let layer = oci::write_blob(dir, "application/vnd.oci.image.layer.v1.tar", &tar).unwrap();
    let config = SOURCE_CONFIG.replace("sha256:DIFF", layer.digest().as_ref());
    let config = oci::write_blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        config.as_bytes(),
    )
    .unwrap();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(vec![layer])
        .build()
        .unwrap();
    oci::add_manifest(dir, &manifest, "src").unwrap();
    LayoutRef {
        dir: dir.to_path_buf(),
        tag: Some("src".into()),
    }
}

fn opts() -> BuildOptions {
    BuildOptions {
        chunk_size: 64 << 10,
        ..BuildOptions::default()
    }
}

fn annotation<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn config_of(r: &LayoutRef, m: &ImageManifest) -> ImageConfiguration {
    ImageConfiguration::from_reader(&oci::read_config(&r.dir, m).unwrap()[..]).unwrap()
}

#[test]
fn converted_image_is_a_standard_oci_image_with_the_bootstrap_last() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source_layout(&tmp.path().join("src"));
    let out = LayoutRef {
        dir: tmp.path().join("out"),
        tag: Some("v1".into()),
    };
    let (meta, stats) = convert(&Source::Layout(src), &out, &opts()).expect("convert");
    let (desc, m) = oci::resolve(&out).unwrap();
    assert_eq!(desc.digest().to_string(), stats.manifest);

    // Layers: every data blob in the bootstrap's order, then the bootstrap.
    let layers = m.layers();
    assert_eq!(layers.len(), meta.blobs.len() + 1);
    for (l, b) in layers.iter().zip(&meta.blobs) {
        assert_eq!(l.media_type().to_string(), oci::MEDIA_BLOB);
        assert!(l
            .media_type()
            .to_string()
            .starts_with("application/vnd.oci.image.layer."));
        assert_eq!(l.digest().to_string(), oci::digest_string(&b.digest));
        assert_eq!(annotation(l, oci::ANN_LAYER), Some(oci::LAYER_BLOB));
        assert_eq!(
            annotation(l, oci::ANN_PIECE_SIZE),
            Some(b.piece_size.to_string().as_str())
        );
    }
    let boot = layers.last().unwrap();
    assert_eq!(boot.media_type().to_string(), oci::MEDIA_BOOTSTRAP);
    assert_eq!(annotation(boot, oci::ANN_LAYER), Some(oci::LAYER_BOOTSTRAP));
    assert_eq!(
        annotation(boot, oci::ANN_LAYER_ROOT),
        Some(stats.root.as_str())
    );
    assert_eq!(find_bootstrap("m", &m).unwrap(), Some(boot));
    let manifest_ann = m.annotations().as_ref().unwrap();
    assert_eq!(manifest_ann[oci::ANN_ROOT], stats.root);
    assert_eq!(manifest_ann[oci::ANN_CHUNK_SIZE], (64 << 10).to_string());

    // Config: OCI, the source's platform and runtime config, one diff_id per layer.
    assert_eq!(*m.config().media_type(), MediaType::ImageConfig);
    let raw: serde_json::Value =
        serde_json::from_slice(&oci::read_config(&out.dir, &m).unwrap()).unwrap();
    assert!(
        raw.get("shoal").is_none(),
        "Shoal facts stay out of the config: {raw}"
    );
    let c = config_of(&out, &m);
    assert_eq!(c.architecture().to_string(), "arm64");
    assert_eq!(c.variant().as_deref(), Some("v8"));
    assert_eq!(c.os().to_string(), "linux");
    assert_eq!(c.created().as_deref(), Some("2024-01-02T03:04:05Z"));
    let rc = c.config().as_ref().expect("runtime config");
    assert_eq!(rc.user().as_deref(), Some("1000:1000"));
    assert_eq!(rc.env().as_deref().unwrap(), ["PATH=/bin", "MODE=prod"]);
    assert_eq!(rc.entrypoint().as_deref().unwrap(), ["/bin/app"]);
    assert_eq!(rc.cmd().as_deref().unwrap(), ["--serve"]);
    assert_eq!(rc.working_dir().as_deref(), Some("/srv"));
    assert_eq!(rc.exposed_ports().as_deref().unwrap(), ["8080/tcp"]);
    assert_eq!(rc.volumes().as_deref().unwrap(), ["/data"]);
    assert_eq!(rc.labels().as_ref().unwrap()["team"], "shoal");
    assert_eq!(rc.stop_signal().as_deref(), Some("SIGINT"));
    assert!(raw["config"].get("Healthcheck").is_none());
    let digests: Vec<String> = layers.iter().map(|l| l.digest().to_string()).collect();
    assert_eq!(c.rootfs().typ(), "layers");
    assert_eq!(*c.rootfs().diff_ids(), digests);
    let history = c.history().as_ref().expect("history");
    assert_eq!(history.len(), layers.len());
    assert!(history.iter().all(|h| h.empty_layer() == Some(false)));

    // The image opens and verifies; converting it again is refused.
    ShoalImage::open(&out).expect("open");
    shoal_format::verify::verify(&out).expect("verify");
    let again = convert(
        &Source::Layout(out.clone()),
        &LayoutRef {
            dir: tmp.path().join("again"),
            tag: None,
        },
        &opts(),
    );
    assert!(
        matches!(&again, Err(Error::BadSource { reason, .. }) if reason.contains("already a Shoal image")),
        "{:?}",
        again.err()
    );
}

#[test]
fn a_directory_source_gets_this_hosts_platform_and_no_runtime_config() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), b"hi\n").unwrap();
    let out = LayoutRef {
        dir: tmp.path().join("out"),
        tag: None,
    };
    convert(&Source::Dir(tree), &out, &opts()).expect("convert");
    let (_, m) = oci::resolve(&out).unwrap();
    let c = config_of(&out, &m);
    assert_eq!(*c.architecture(), oci_spec::image::Arch::default());
    assert_eq!(*c.os(), oci_spec::image::Os::default());
    assert!(c.config().is_none());
    assert_eq!(c.rootfs().diff_ids().len(), m.layers().len());
    shoal_format::verify::verify(&out).expect("verify");
}

/// Rewrites the manifest of `r` through `edit` under tag `tag`.
fn rewrite(r: &LayoutRef, tag: &str, edit: impl FnOnce(&mut ImageManifest)) -> LayoutRef {
    let (_, mut m) = oci::resolve(r).unwrap();
    edit(&mut m);
    oci::add_manifest(&r.dir, &m, tag).unwrap();
    LayoutRef {
        dir: r.dir.clone(),
        tag: Some(tag.into()),
    }
}

#[test]
fn readers_find_the_bootstrap_by_media_type_and_refuse_the_old_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source_layout(&tmp.path().join("src"));
    let out = LayoutRef {
        dir: tmp.path().join("out"),
        tag: Some("v1".into()),
    };
    convert(&Source::Layout(src), &out, &opts()).expect("convert");

    // The earlier layout: Shoal config, bootstrap first, Shoal media types.
    let old = rewrite(&out, "old", |m| {
        let mut layers = m.layers().clone();
        layers.rotate_right(1);
        for (i, l) in layers.iter_mut().enumerate() {
            let t = if i == 0 {
                "application/vnd.shoal.image.bootstrap.v1"
            } else {
                "application/vnd.shoal.image.blob.v1"
            };
            l.set_media_type(MediaType::from(t));
        }
        m.set_layers(layers);
        let mut config = m.config().clone();
        config.set_media_type(MediaType::from(
            "application/vnd.shoal.image.config.v1+json",
        ));
        m.set_config(config);
    });
    for err in [
        ShoalImage::open(&old).err().map(|e| e.to_string()),
        shoal_format::verify::verify(&old)
            .err()
            .map(|e| e.to_string()),
    ] {
        let err = err.expect("the old layout is refused");
        assert!(
            err.contains("earlier Shoal versions") && err.contains("shoal image convert"),
            "{err}"
        );
    }

    // The bootstrap moved first: still found by its media type, but verify names the layout.
    let moved = rewrite(&out, "moved", |m| {
        let mut layers = m.layers().clone();
        layers.rotate_right(1);
        m.set_layers(layers);
    });
    ShoalImage::open(&moved).expect("found by media type");
    let err = shoal_format::verify::verify(&moved)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not its last layer"), "{err}");

    // Two bootstraps, or data blobs without one: refused.
    let (_, m) = oci::resolve(&out).unwrap();
    let boot = m.layers().last().unwrap().clone();
    let mut twice = m.clone();
    twice.set_layers(vec![boot.clone(), boot]);
    let err = find_bootstrap("twice", &twice).unwrap_err().to_string();
    assert!(err.contains("2 Shoal bootstrap layers"), "{err}");
    let mut headless = m.clone();
    headless.set_layers(m.layers()[..m.layers().len() - 1].to_vec());
    let err = find_bootstrap("headless", &headless)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no bootstrap layer"), "{err}");

    // A config whose diff_ids do not match the layers: verify refuses it.
    let bad_config = rewrite(&out, "diff", |m| {
        let bytes = oci::read_config(&out.dir, m).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["rootfs"]["diff_ids"].as_array_mut().unwrap().reverse();
        let d = oci::write_blob(
            &out.dir,
            "application/vnd.oci.image.config.v1+json",
            v.to_string().as_bytes(),
        )
        .unwrap();
        m.set_config(d);
    });
    let err = shoal_format::verify::verify(&bad_config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diff_ids"), "{err}");
}
