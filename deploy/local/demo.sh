#!/usr/bin/env bash
# Shoal's main job on one machine, no cluster needed: builds a real multi-layer OCI image from files
# already on this machine, converts it to a Shoal image, verifies every hash, unpacks it, checks the
# result against the source image, and prints what it did.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/deps.sh
install_deps

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(default_target_dir)}"
echo "== building shoal (release)"
cargo build --release --locked -p shoal-cli
shoal="$CARGO_TARGET_DIR/release/shoal"

work=$(mktemp -d -t shoal-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootless=()
[[ $(id -u) -eq 0 ]] || rootless=(--rootless)

echo "== building a three-layer OCI image from this machine's files (umoci)"
umoci init --layout "$work/oci"
umoci new --image "$work/oci:demo"
umoci unpack "${rootless[@]}" --image "$work/oci:demo" "$work/bundle"
rootfs="$work/bundle/rootfs"
# Layer 1: programs and their documentation.
mkdir -p "$rootfs/usr/bin" "$rootfs/usr/share"
cp -a /usr/bin/. "$rootfs/usr/bin/"
cp -a /usr/share/doc "$rootfs/usr/share/doc"
umoci repack --image "$work/oci:demo" "$work/bundle"
# Layer 2: a language runtime's library tree, a deletion (a whiteout), and a hardlink.
python_lib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir -p "$rootfs/usr/lib/python3"
cp -a "$python_lib/." "$rootfs/usr/lib/python3/"
rm -rf "$rootfs/usr/share/doc/git"
ln -f "$rootfs/usr/bin/env" "$rootfs/usr/bin/env-hardlink"
umoci repack --image "$work/oci:demo" "$work/bundle"
# Layer 3: an opaque directory replacement and a changed file.
rm -rf "$rootfs/usr/share/doc"
mkdir -p "$rootfs/usr/share/doc"
echo "replaced in layer 3" > "$rootfs/usr/share/doc/README"
date -u > "$rootfs/etc-build-date"
umoci repack --image "$work/oci:demo" "$work/bundle"

echo "== shoal image convert"
"$shoal" image convert --source "oci:$work/oci:demo" --output "oci:$work/shoal:demo"
echo "== shoal image inspect"
"$shoal" image inspect "oci:$work/shoal:demo"
echo "== shoal image verify"
"$shoal" image verify "oci:$work/shoal:demo"
echo "== shoal image unpack, compared with umoci unpack of the source image"
"$shoal" image unpack "oci:$work/shoal:demo" --to "$work/unpacked"
umoci unpack "${rootless[@]}" --image "$work/oci:demo" "$work/reference"
diff -r --no-dereference "$work/reference/rootfs" "$work/unpacked"
echo "identical trees: $(find "$work/unpacked" | wc -l) entries"
echo "source layers:   $(du -sh "$work/oci/blobs" | cut -f1)   shoal image: $(du -sh "$work/shoal/blobs" | cut -f1)"
