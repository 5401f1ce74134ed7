//! `shoal fs mount` and `shoal fs umount` as an operator runs them: a converted image with a shell
//! and its libraries is mounted by the real binary, a program from it runs under chroot, reads are
//! served lazily, and umount ends the serving process.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{oci, run, shoal_ok};

/// The shoal process serving a mount; killed (and the mount detached) if the test fails.
struct Served {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mountpoint)
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mounted(mountpoint: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let target = mountpoint.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(target.as_ref()))
}

/// A root tree holding /bin/sh and the libraries it links.
fn shell_tree(root: &Path) {
    let sh = fs::canonicalize("/bin/sh").expect("/bin/sh");
    let mut files = vec![sh.clone()];
    for line in run("ldd", &[sh.to_str().expect("utf-8 path")]).lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dest = root.join(f.strip_prefix("/").expect("absolute"));
        fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        fs::copy(&f, &dest).expect("copy");
    }
    let bin = root.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    if !bin.join("sh").exists() {
        std::os::unix::fs::symlink(&sh, bin.join("sh")).expect("symlink sh");
    }
    fs::write(root.join("greeting"), b"hello from a lazy mount\n").expect("write");
}

#[test]
fn mount_run_a_program_and_umount() {
    let fuse = shoal_testkit::Needs::root(&["fusermount3"]).and_paths(&["/dev/fuse"]);
    if shoal_testkit::require(fuse).is_err() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let tree = tmp.path().join("tree");
    shell_tree(&tree);
    let layout = tmp.path().join("image");
    shoal_ok(&[
        "image",
        "convert",
        "--source",
        tree.to_str().expect("utf-8"),
        "--output",
        &oci(&layout, "v1"),
    ]);
    let mountpoint = tmp.path().join("mnt");
    fs::create_dir(&mountpoint).expect("mkdir mnt");
    let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["fs", "mount", "--no-peer", "--cache-dir"])
        .arg(tmp.path().join("cache"))
        .arg(oci(&layout, "v1"))
        .arg(&mountpoint)
        .stdout(Stdio::null())
        .spawn()
        .expect("starting shoal fs mount");
    let mut served = Served {
        child,
        mountpoint: mountpoint.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mounted(&mountpoint) {
        assert!(
            served.child.try_wait().expect("wait").is_none(),
            "shoal fs mount exited before mounting"
        );
        assert!(Instant::now() < deadline, "no mount after 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }

    assert_eq!(
        fs::read(mountpoint.join("greeting")).expect("read through the mount"),
        b"hello from a lazy mount\n"
    );
    let out = Command::new("chroot")
        .arg(&mountpoint)
        .args([
            "/bin/sh",
            "-c",
            "read line < /greeting; echo \"$line ($0)\"",
        ])
        .output()
        .expect("chroot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a lazy mount (/bin/sh)\n"
    );
    assert!(
        fs::write(mountpoint.join("new"), b"x").is_err(),
        "the mount is read-only"
    );

    shoal_ok(&["fs", "umount", mountpoint.to_str().expect("utf-8")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = served.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "shoal fs mount still running after umount"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "shoal fs mount exited with {status}");
    assert!(!mounted(&mountpoint));
}
