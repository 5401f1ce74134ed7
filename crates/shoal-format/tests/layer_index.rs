//! `index::Indexer` on layers made here: gzip (two members, small span so that there are many
//! deflate checkpoints), zstd in several frames, zstd in one frame, and a plain tar. Every
//! layer's bootstrap unpacks (each chunk decoded from the ORIGINAL blob and BLAKE3-checked) to
//! exactly the layer's own files, in overlay form: whiteouts as 0/0 character devices, opaque
//! directories with `trusted.overlay.opaque=y`, a hardlink to a lower layer's file copied up.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use shoal_format::bootstrap::Bootstrap;
use shoal_format::index::{artifact, Compression, IndexOptions, Indexer};
use shoal_format::oci::{self, LayoutRef};
use shoal_format::unpack::unpack_meta;

struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }
    fn dir(mut self, path: &str) -> Tar {
        let mut h = Tar::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    fn file(mut self, path: &str, data: &[u8]) -> Tar {
        let mut h = Tar::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn link(mut self, path: &str, target: &str) -> Tar {
        let mut h = Tar::header(tar::EntryType::Link, 0o644, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn xattr_file(mut self, path: &str, data: &[u8], key: &str, value: &[u8]) -> Tar {
        let name = format!("SCHILY.xattr.{key}");
        self.0
            .append_pax_extensions([(name.as_str(), value)])
            .unwrap();
        self.file(path, data)
    }
    fn done(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn text(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .flat_map(|i| {
            format!("{seed}:{} {}\n", i % 613, i.wrapping_mul(2654435761) % 1000).into_bytes()
        })
        .take(n)
        .collect()
}

fn gzip(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(p).unwrap();
        out.extend(e.finish().unwrap());
    }
    out
}

fn zstd_frames(data: &[u8], frames: usize) -> Vec<u8> {
    let step = data.len().div_ceil(frames);
    data.chunks(step)
        .flat_map(|c| zstd::bulk::compress(c, 3).unwrap())
        .collect()
}

/// (path, content) of every regular file under `root`, and the kinds of special files.
fn files(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            if ft.is_dir() {
                let opaque = xattr::get(&p, "trusted.overlay.opaque").ok().flatten();
                out.insert(rel, format!("dir opaque={opaque:?}"));
                stack.push(p);
            } else if ft.is_char_device() {
                out.insert(
                    rel,
                    format!("char {} mode {:o}", md.rdev(), md.mode() & 0o7777),
                );
            } else {
                let data = fs::read(&p).unwrap();
                out.insert(
                    rel,
                    format!("{} bytes {}", data.len(), blake3::hash(&data).to_hex()),
                );
            }
        }
    }
    out
}

fn desc_of(blob: &[u8]) -> (shoal_format::model::Sha256, u64) {
    use sha2::Digest;
    (sha2::Sha256::digest(blob).into(), blob.len() as u64)
}

#[test]
fn every_layer_unpacks_to_its_own_files_decoded_from_the_original_blob() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIP: needs root (device nodes and trusted.* xattrs)");
        return;
    }
    let big = text(3 << 20, 1);
    let l0_tar = Tar::new()
        .dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .dir("data/")
        .file("data/big", &big)
        .link("data/big-again", "data/big")
        .xattr_file("data/tagged", b"tagged\n", "user.shoal", b"v1")
        .dir("gone/")
        .file("gone/file", b"bye\n")
        .dir("opaque/")
        .file("opaque/old", b"old\n")
        .done();
    // Two gzip members: a member boundary in the middle of the stream.
    let half = l0_tar.len() / 2 / 512 * 512;
    let l0 = gzip(&[&l0_tar[..half], &l0_tar[half..]]);

    let l1_tar = Tar::new()
        .dir("etc/")
        .file("etc/.wh.hosts", b"")
        .file("etc/motd", &text(200_000, 2))
        .file(".wh.gone", b"")
        .dir("opaque/")
        .file("opaque/.wh..wh..opq", b"")
        .file("opaque/new", b"new\n")
        .link("data/linked", "data/big")
        .done();
    let l1 = zstd_frames(&l1_tar, 3);

    let l2_tar = Tar::new().file("single/frame", &text(1 << 20, 3)).done();
    let l2 = zstd::bulk::compress(&l2_tar, 3).unwrap();
    let l3 = Tar::new().file("plain/file", &text(300_000, 4)).done();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("index");
    let mut idx = Indexer::new(
        &out,
        IndexOptions {
            chunk_size: 64 << 10,
            span: 64 << 10,
            ..IndexOptions::default()
        },
    )
    .unwrap();
    let layers = [&l0, &l1, &l2, &l3];
    for l in layers {
        let (d, s) = desc_of(l);
        idx.add_layer(&d, s, &l[..]).unwrap();
    }
    let r = &idx.reports;
    assert_eq!(r[0].compression, Compression::Gzip);
    assert!(r[0].checkpoints > 5, "{:?}", r[0]);
    assert_eq!(r[1].compression, Compression::Zstd);
    assert!(r[1].lazy && r[1].checkpoints >= 2, "{:?}", r[1]);
    assert!(
        !r[2].lazy,
        "one zstd frame is read from its start: {:?}",
        r[2]
    );
    assert_eq!(r[3].compression, Compression::None);
    assert_eq!(r[3].checkpoints, 0);
    assert_eq!((r[1].whiteouts, r[1].opaque_dirs), (2, 1));

    // The image: the layers as blobs of a layout, a manifest naming them.
    let image = tmp.path().join("image");
    oci::init_layout(&image).unwrap();
    let mut descs = Vec::new();
    for l in layers {
        descs.push(oci::write_blob(&image, "application/vnd.oci.image.layer.v1.tar", l).unwrap());
    }
    let config =
        oci::write_blob(&image, "application/vnd.oci.image.config.v1+json", b"{}").unwrap();
    let manifest = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(oci_spec::image::MediaType::ImageManifest)
        .config(config)
        .layers(descs)
        .build()
        .unwrap();
    let mdesc = oci::add_manifest(&image, &manifest, "v1").unwrap();
    let opts = *idx.options();
    let adesc = artifact::write(&out, &mdesc, &idx.reports, &opts).unwrap();
    let (found, index) = artifact::find(&out, mdesc.digest().as_ref())
        .unwrap()
        .unwrap();
    assert_eq!(found.digest(), adesc.digest());
    let image_ref = LayoutRef {
        dir: image.clone(),
        tag: Some("v1".into()),
    };

    let unpacked: Vec<BTreeMap<String, String>> = (0..layers.len())
        .map(|i| {
            let l = artifact::open_layer(&image_ref, &out, &index, i).unwrap();
            let files_ = l
                .blob_paths
                .iter()
                .map(|p| fs::File::open(p).unwrap())
                .collect();
            let to = tmp.path().join(format!("layer{i}"));

            unpack_meta(&l.meta, files_, &to).unwrap();
            files(&to)
        })
        .collect();
    let sum = |d: &[u8]| format!("{} bytes {}", d.len(), blake3::hash(d).to_hex());
    assert_eq!(unpacked[0]["data/big"], sum(&big));
    assert_eq!(unpacked[0]["data/big-again"], sum(&big));
    assert_eq!(unpacked[0]["data/tagged"], sum(b"tagged\n"));
    assert_eq!(unpacked[0]["opaque/old"], sum(b"old\n"));
    assert_eq!(unpacked[1]["etc/hosts"], "char 0 mode 0");
    assert_eq!(unpacked[1]["gone"], "char 0 mode 0");
    assert_eq!(unpacked[1]["opaque"], "dir opaque=Some([121])");
    assert_eq!(
        unpacked[1]["data/big"],
        sum(&big),
        "copied up for the hardlink"
    );
    assert_eq!(unpacked[1]["data/linked"], sum(&big));
    assert!(!unpacked[1].contains_key("opaque/.wh..wh..opq"));
    assert_eq!(unpacked[1]["etc/motd"], sum(&text(200_000, 2)));
    assert_eq!(unpacked[2]["single/frame"], sum(&text(1 << 20, 3)));
    assert_eq!(unpacked[3]["plain/file"], sum(&text(300_000, 4)));
    assert_eq!(
        xattr::get(tmp.path().join("layer0/data/tagged"), "user.shoal").unwrap(),
        Some(b"v1".to_vec())
    );
}

/// The inode at `path` of a loaded bootstrap.
fn ino_at(boot: &Bootstrap, path: &str) -> Option<u32> {
    let mut ino = 0;
    for name in path.split('/') {
        ino = boot.lookup(ino, name.as_bytes()).unwrap()?;
    }
    Some(ino)
}

#[test]
fn each_layer_lists_the_prefetch_paths_it_provides() {
    let l0 = gzip(&[&Tar::new()
        .dir("etc/")
        .file("etc/conf", b"conf v0\n")
        .dir("bin/")
        .file("bin/tool", &text(200_000, 5))
        .link("bin/tool-again", "bin/tool")
        .file("bin/gone", b"soon whiteouted\n")
        .done()]);
    let l1 = Tar::new()
        .dir("etc/")
        .file("etc/conf", b"conf v1\n")
        .dir("bin/")
        .file("bin/.wh.gone", b"")
        .dir("app/")
        .file("app/main", &text(100_000, 6))
        .done();
    let list: Vec<Vec<u8>> = [
        "app/main",
        "etc/conf",
        "bin/tool",
        "bin/tool-again",
        "bin/gone",
        "etc",
    ]
    .iter()
    .map(|p| p.as_bytes().to_vec())
    .collect();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("index");
    let mut idx = Indexer::new(&out, IndexOptions::default()).unwrap();
    idx.set_prefetch(list.clone());
    for l in [&l0, &l1] {
        let (d, s) = desc_of(l);
        idx.add_layer(&d, s, &l[..]).unwrap();
    }
    idx.check_prefetch().unwrap();

    let boots: Vec<Bootstrap> = idx
        .reports
        .iter()
        .map(|r| {
            let digest = r.bootstrap.0.strip_prefix("sha256:").unwrap();
            let bytes = fs::read(out.join("blobs/sha256").join(digest)).unwrap();
            Bootstrap::load(bytes).unwrap()
        })
        .collect();
    let listed = |b: &Bootstrap| b.prefetch().collect::<Vec<u32>>();
    let at = |b: &Bootstrap, paths: &[&str]| -> Vec<u32> {
        paths.iter().map(|p| ino_at(b, p).unwrap()).collect()
    };
    // Layer 0: in list order; the hardlink once (one inode); the directory kept as convert
    // keeps it (the mount's prefetch skips what is not a file).
    assert_eq!(
        listed(&boots[0]),
        at(&boots[0], &["etc/conf", "bin/tool", "bin/gone", "etc"])
    );
    assert_eq!(idx.reports[0].prefetch, 4);
    // Layer 1: what it provides; its whiteout of bin/gone and the absent bin/tool not listed.
    assert_eq!(
        listed(&boots[1]),
        at(&boots[1], &["app/main", "etc/conf", "etc"])
    );
    assert_eq!(idx.reports[1].prefetch, 3);

    // A path in no layer is an error naming it; so is one through a file.
    for bad in ["nowhere/file", "etc/conf/below"] {
        let mut idx = Indexer::new(
            &tmp.path().join(bad.replace('/', "_")),
            IndexOptions::default(),
        )
        .unwrap();
        idx.set_prefetch(vec![b"app/main".to_vec(), bad.as_bytes().to_vec()]);
        for l in [&l0, &l1] {
            let (d, s) = desc_of(l);
            idx.add_layer(&d, s, &l[..]).unwrap();
        }
        let e = idx.check_prefetch().unwrap_err().to_string();
        assert!(e.contains(bad), "{e}");
    }
    // Without a list, no layer has a prefetch table.
    let mut idx = Indexer::new(&tmp.path().join("plain"), IndexOptions::default()).unwrap();
    for l in [&l0, &l1] {
        let (d, s) = desc_of(l);
        idx.add_layer(&d, s, &l[..]).unwrap();
    }
    idx.check_prefetch().unwrap();
    assert!(idx.reports.iter().all(|r| r.prefetch == 0));
}
