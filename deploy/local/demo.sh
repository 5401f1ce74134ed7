#!/usr/bin/env bash
# Shoal's main job on one machine, no cluster needed: builds a real multi-layer OCI image from files
# already on this machine, converts it to a Shoal image, verifies every hash, unpacks it, checks the
# result against the source image, then pushes it to a real registry on loopback and moves its data
# blob through a swarm (a scheduler, a seed and two peers) and prints what it did.
# SHOAL_BIN=path/to/shoal skips the build and runs that binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/deps.sh
install_deps

if [[ -n ${SHOAL_BIN:-} ]]; then
    shoal=$SHOAL_BIN
else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(default_target_dir)}"
    echo "== building shoal (release)"
    cargo build --release --locked -p shoal-cli
    shoal="$CARGO_TARGET_DIR/release/shoal"
fi

work=$(mktemp -d -t shoal-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
# A loopback port that was free a moment ago (tcp or udp).
free_port() {
    python3 -c 'import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' "$1"
}
# Waits until http://ADDR/PATH answers 2xx, or fails showing LOG.
wait_http() {
    local url=$1 log=$2
    for _ in $(seq 300); do
        curl -sf -o /dev/null "$url" && return 0
        sleep 0.1
    done
    echo "no answer from $url; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    return 1
}
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

echo "== a registry on loopback (docker-registry with a generated config), the image pushed to it"
reg_port=$(free_port tcp)
mkdir -p "$work/logs"
cat > "$work/registry.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$reg_port
YAML
docker-registry serve "$work/registry.yml" > "$work/logs/registry.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$reg_port/v2/" "$work/logs/registry.log"
"$shoal" image convert --source "oci:$work/oci:demo" --output "oci:$work/shoal-pushed:demo" \
    --target "docker://127.0.0.1:$reg_port/demo:1"
# The image's data blob: the largest layer of the pushed Shoal image.
read -r blob blob_size < <(python3 - "$work/shoal-pushed" <<'PY'
import json, sys
root = sys.argv[1]
index = json.load(open(f"{root}/index.json"))
algo, hexd = index["manifests"][0]["digest"].split(":")
manifest = json.load(open(f"{root}/blobs/{algo}/{hexd}"))
layer = max(manifest["layers"], key=lambda l: l["size"])
print(layer["digest"], layer["size"])
PY
)
echo "data blob: $blob ($blob_size bytes)"

echo "== a cluster CA and node certificates (shoal ca)"
"$shoal" ca init --dir "$work/ca"
for name in shoal-scheduler seed-1 peer-1 peer-2; do
    "$shoal" ca issue --name "$name" --dir "$work/ca" --out "$work/tls/$name" --ip 127.0.0.1
done

echo "== a scheduler, a seed and two peers on loopback"
sched_port=$(free_port udp)
sched_metrics=$(free_port tcp)
"$shoal" --log info scheduler --host-id shoal-scheduler --listen "127.0.0.1:$sched_port" \
    --tls-dir "$work/tls/shoal-scheduler" --metrics-listen "127.0.0.1:$sched_metrics" \
    2> "$work/logs/scheduler.log" &
pids+=($!)
wait_http "http://127.0.0.1:$sched_metrics/readyz" "$work/logs/scheduler.log"
declare -A metrics_of
for name in seed-1 peer-1 peer-2; do
    seed=()
    [[ $name == seed-* ]] && seed=(--seed)
    metrics_of[$name]=$(free_port tcp)
    "$shoal" --log info peer "${seed[@]}" --data-dir "$work/$name" --tls-dir "$work/tls/$name" \
        --listen "127.0.0.1:$(free_port udp)" --scheduler "127.0.0.1:$sched_port" \
        --api-socket "$work/$name/peer.sock" --metrics-listen "127.0.0.1:${metrics_of[$name]}" \
        --cache-bytes $((4 << 30)) 2> "$work/logs/$name.log" &
    pids+=($!)
    wait_http "http://127.0.0.1:${metrics_of[$name]}/readyz" "$work/logs/$name.log"
done

echo "== shoal get of the data blob through peer 1, then peer 2"
for name in peer-1 peer-2; do
    "$shoal" get "docker://127.0.0.1:$reg_port/demo@$blob" -o "$work/$name.blob" \
        --api "$work/$name/peer.sock"
done
sleep 0.5 # the registry writes its access log line, and the peer its sha256 check, after the response
"$shoal" status --api "$work/peer-2/peer.sock"
# Bytes of the blob the registry sent, from its access log (combined format: "GET PATH ..." STATUS BYTES).
served=$(python3 - "$work/logs/registry.log" "/v2/demo/blobs/$blob" <<'PY'
import re, sys
total = 0
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r'\] "GET (\S+) [^"]*" (\d{3}) (\d+)', line)
    if m and m.group(1).split("?")[0] == sys.argv[2] and m.group(2).startswith("2"):
        total += int(m.group(3))
print(total)
PY
)
metric() {
    curl -sf "http://127.0.0.1:${metrics_of[$1]}/metrics" |
        awk -v m="$2" 'index($0, m " ") == 1 { print $2 }'
}
from_peers=$(metric peer-2 'shoal_peer_download_bytes_total{source="peer"}')
from_origin=$(metric peer-2 'shoal_peer_download_bytes_total{source="origin"}')
ok=yes
for name in peer-1 peer-2; do
    got="sha256:$(sha256sum "$work/$name.blob" | cut -d' ' -f1)"
    if [[ $got == "$blob" ]]; then match=match; else match=MISMATCH; ok=no; fi
    echo "$name got $got: $match"
done
echo "registry served $served bytes of the $blob_size-byte blob (two peers fetched it)"
echo "peer-2 received $from_peers bytes from peers and $from_origin from the origin"
[[ $ok == yes && $served == "$blob_size" ]] || { echo "the swarm demo did not hold up" >&2; exit 1; }
