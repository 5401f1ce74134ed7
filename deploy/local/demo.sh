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
rootfs="$work/bundle/rootfs"
# umoci repack adds one layer over the image the bundle was unpacked from: unpack before each layer.
layer() {
    rm -rf "$work/bundle"
    umoci unpack "${rootless[@]}" --image "$work/oci:demo" "$work/bundle" >/dev/null
    "$@"
    umoci repack --image "$work/oci:demo" "$work/bundle"
}
layer1() { # programs and their documentation
    mkdir -p "$rootfs/usr/bin" "$rootfs/usr/share"
    cp -a /usr/bin/. "$rootfs/usr/bin/"
    cp -a /usr/share/doc "$rootfs/usr/share/doc"
}
layer2() { # a deletion (a whiteout), a hardlink, a symlink, a new file
    rm -rf "$rootfs/usr/share/doc/git"
    ln -f "$rootfs/usr/bin/env" "$rootfs/usr/bin/env-hardlink"
    ln -sf ../bin/env "$rootfs/usr/share/env-link"
    date -u > "$rootfs/build-date"
}
layer3() { # a directory replaced wholesale
    rm -rf "$rootfs/usr/share/doc"
    mkdir -p "$rootfs/usr/share/doc"
    echo "replaced in layer 3" > "$rootfs/usr/share/doc/README"
}
layer layer1
layer layer2
layer layer3

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
