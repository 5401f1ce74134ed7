#!/usr/bin/env bash
# Shoal's main job on one machine, no cluster needed: builds a real multi-layer OCI image from files
# already on this machine, converts it to a Shoal image, verifies every hash, unpacks it, checks the
# result against the source image, then pushes it to a real registry on loopback and moves its data
# blob through a swarm (a scheduler, a seed and two peers) and prints what it did; containerd pulls
# through the peers' registry proxies; the image is mounted lazily; and last, containerd's CRI
# (driven as kubelet drives it) starts a container on the lazily mounted image through the
# `shoal` snapshotter.
# SHOAL_BIN=path/to/shoal skips the build of the binary and runs that one.
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
cri_demo() { # the CRI client of the last stage (crates/shoal-testkit/examples/cri_demo.rs)
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(default_target_dir)}"
    cargo build --release --locked -q -p shoal-testkit --example cri_demo
    "$CARGO_TARGET_DIR/release/examples/cri_demo" "$@"
}

work=$(mktemp -d -t shoal-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    # A container shim of ours left by a failed run, then mounts left under the work directory.
    pkill -KILL -f -- "containerd-shim.*-address $work/" 2>/dev/null || true
    findmnt -rn -o TARGET | awk -v w="$work/" 'index($0, w) == 1' | sort -r |
        xargs -r -n1 umount -l 2>/dev/null || true
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
# The image's data blob: the pushed Shoal image's layer of the data blob media type.
read -r blob blob_size < <(python3 - "$work/shoal-pushed" <<'PY'
import json, sys
root = sys.argv[1]
index = json.load(open(f"{root}/index.json"))
algo, hexd = index["manifests"][0]["digest"].split(":")
manifest = json.load(open(f"{root}/blobs/{algo}/{hexd}"))
layer = next(l for l in manifest["layers"]
             if l["mediaType"] == "application/vnd.oci.image.layer.shoal.blob.v1")
print(layer["digest"], layer["size"])
PY
)
echo "data blob: $blob ($blob_size bytes)"

echo "== a cluster CA and node certificates (shoal ca)"
"$shoal" ca init --dir "$work/ca"
for name in shoal-scheduler seed-1 peer-1 peer-2; do
    "$shoal" ca issue --name "$name" --dir "$work/ca" --out "$work/tls/$name" --ip 127.0.0.1
done

echo "== a scheduler, a seed and two peers on loopback, allowed to fetch from that registry only"
# Nothing is allowed by default; a registry on loopback must be listed like any other.
allowed=127.0.0.1:$reg_port
sched_port=$(free_port udp)
sched_metrics=$(free_port tcp)
"$shoal" --log info scheduler --host-id shoal-scheduler --listen "127.0.0.1:$sched_port" \
    --tls-dir "$work/tls/shoal-scheduler" --metrics-listen "127.0.0.1:$sched_metrics" \
    --allowed-origins "$allowed" 2> "$work/logs/scheduler.log" &
pids+=($!)
wait_http "http://127.0.0.1:$sched_metrics/readyz" "$work/logs/scheduler.log"
declare -A metrics_of proxy_of
for name in seed-1 peer-1 peer-2; do
    seed=() proxy=()
    [[ $name == seed-* ]] && seed=(--seed)
    if [[ $name == peer-* ]]; then # the registry proxy, for the containerd stage below
        proxy_of[$name]=127.0.0.1:$(free_port tcp)
        proxy=(--proxy-enabled --proxy-listen "${proxy_of[$name]}")
    fi
    metrics_of[$name]=$(free_port tcp)
    "$shoal" --log info peer "${seed[@]}" "${proxy[@]}" --data-dir "$work/$name" --tls-dir "$work/tls/$name" \
        --listen "127.0.0.1:$(free_port udp)" --scheduler "127.0.0.1:$sched_port" \
        --api-socket "$work/$name/peer.sock" --metrics-listen "127.0.0.1:${metrics_of[$name]}" \
        --cache-bytes $((4 << 30)) --allowed-origins "$allowed" 2> "$work/logs/$name.log" &
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

echo "== a registry nobody listed: peer 1 refuses it (403) without contacting it"
if "$shoal" get "docker://127.0.0.2:$reg_port/demo@$blob" -o "$work/refused.blob" \
    --api "$work/peer-1/peer.sock" 2> "$work/logs/refused.txt"; then
    echo "a registry outside allowed_origins was fetched from" >&2; exit 1
fi
grep -m1 "answered 403" "$work/logs/refused.txt" | sed 's/^ */  /' ||
    { echo "the refusal did not say 403:" >&2; cat "$work/logs/refused.txt" >&2; exit 1; }

echo "== containerd pulls the three-layer image through peer 1's registry proxy, then peer 2's"
image=127.0.0.1:$reg_port/demo-oci:1
skopeo copy --quiet --dest-tls-verify=false "oci:$work/oci:demo" "docker://$image"
# Each node: a private containerd (its own root, state and sockets; no CRI) and a hosts directory
# from `shoal containerd-config` that sends the registry's pulls to that node's proxy.
for n in 1 2; do
    dir=$work/ctrd/$n
    mkdir -p "$dir"
    cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/c.sock"
[ttrpc]
  address = "$dir/c.sock.ttrpc"
[debug]
  address = "$dir/debug.sock"
[metrics]
  address = ""
TOML
    containerd --config "$dir/config.toml" > "$work/logs/containerd-$n.log" 2>&1 &
    pids+=($!)
    "$shoal" containerd-config "127.0.0.1:$reg_port" --proxy "http://${proxy_of[peer-$n]}" \
        --config-path "$dir/certs.d"
done
ctr_of() { local n=$1; shift; ctr --address "$work/ctrd/$n/c.sock" "$@"; }
for n in 1 2; do
    for _ in $(seq 200); do ctr_of "$n" version >/dev/null 2>&1 && break; sleep 0.1; done
    ctr_of "$n" version >/dev/null || { tail -n 30 "$work/logs/containerd-$n.log" >&2; exit 1; }
done
cat "$work/ctrd/1/certs.d/127.0.0.1:$reg_port/hosts.toml"
before_peers=$(metric peer-2 'shoal_peer_download_bytes_total{source="peer"}')
before_origin=$(metric peer-2 'shoal_peer_download_bytes_total{source="origin"}')
for n in 1 2; do
    echo "-- node $n: ctr image pull through ${proxy_of[peer-$n]}, then ctr run"
    start=$(date +%s.%N)
    ctr_of "$n" image pull --snapshotter native --hosts-dir "$work/ctrd/$n/certs.d" "$image" >/dev/null
    echo "pulled in $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
        "$start" "$(date +%s.%N)") s"
    timeout 60 ctr --address "$work/ctrd/$n/c.sock" run --rm --snapshotter native "$image" "demo-$n" \
        /usr/bin/busybox sh -c "echo hello from node $n: \$(ls /usr/bin | wc -l) programs in /usr/bin"
done
sleep 0.5 # the registry writes its access log line after the response
# GETs of each of the image's blobs (config and layers) at the registry, from its access log.
gets=$(python3 - "$work/oci" "$work/logs/registry.log" <<'PY'
import json, re, sys
root, log = sys.argv[1], sys.argv[2]
index = json.load(open(f"{root}/index.json"))
algo, hexd = index["manifests"][0]["digest"].split(":")
manifest = json.load(open(f"{root}/blobs/{algo}/{hexd}"))
blobs = [manifest["config"]["digest"]] + [l["digest"] for l in manifest["layers"]]
count = dict.fromkeys(blobs, 0)
for line in open(log, errors="replace"):
    m = re.search(r'\] "GET (\S+) [^"]*" (\d{3})', line)
    if m and m.group(2).startswith("2"):
        d = m.group(1).split("?")[0].rsplit("/blobs/", 1)[-1]
        if m.group(1).startswith("/v2/demo-oci/blobs/") and d in count:
            count[d] += 1
print("\n".join(f"{d} {n}" for d, n in count.items()))
PY
)
from_peers=$(($(metric peer-2 'shoal_peer_download_bytes_total{source="peer"}') - before_peers))
from_origin=$(($(metric peer-2 'shoal_peer_download_bytes_total{source="origin"}') - before_origin))
echo "registry GETs per blob of the image (two nodes pulled it):"
sed 's/^/  /' <<< "$gets"
echo "peer-2 received $from_peers bytes of the image from peers and $from_origin from the origin"
[[ -n $gets && -z $(awk '$2 != 1' <<< "$gets") && $from_origin == 0 && $from_peers -gt 0 ]] ||
    { echo "the containerd demo did not hold up" >&2; exit 1; }

echo "== shoal fs mount: the Shoal image from the registry, mounted lazily through peer 1; a program from it run with chroot"
if [[ $(id -u) -ne 0 ]]; then
    echo "(this stage needs root for chroot; skipped)"
    exit 0
fi
mnt=$work/mnt
mkdir -p "$mnt"
"$shoal" --log info fs mount "docker://127.0.0.1:$reg_port/demo:1" "$mnt" \
    --peer-socket "$work/peer-1/peer.sock" --cache-dir "$work/fs-cache" 2> "$work/logs/fs.log" &
fs_pid=$!
pids+=("$fs_pid")
for _ in $(seq 300); do mountpoint -q "$mnt" && break; sleep 0.1; done
mountpoint -q "$mnt" || { echo "the image did not mount; last lines of the fs log:" >&2; tail -n 30 "$work/logs/fs.log" >&2; exit 1; }
findmnt -n -o TARGET,SOURCE,FSTYPE "$mnt"
# busybox is static: it runs from the image alone (no loader or libraries needed from the host).
chroot "$mnt" /usr/bin/busybox sh -c \
    'echo "hello from the lazy mount: $(/usr/bin/busybox ls /usr/bin | /usr/bin/busybox wc -l) programs in /usr/bin, built $(/usr/bin/busybox cat /build-date)"'
[[ $(sha256sum < "$mnt/usr/bin/busybox") == $(sha256sum < /usr/bin/busybox) ]] &&
    echo "/usr/bin/busybox in the mount matches this machine's copy (sha256)"
"$shoal" fs umount "$mnt"
wait "$fs_pid"
# The mount logs what it read and fetched when it ends (key=value fields of its last line).
summary=$(sed 's/\x1b\[[0-9;]*m//g' "$work/logs/fs.log" | grep ' unmounted' | tail -n 1)
field() { grep -o "$1=[0-9.]*" <<< "$summary" | cut -d= -f2; }
read_bytes=$(field read_bytes) fetched_peer=$(field fetched_peer_bytes)
fetched_origin=$(field fetched_origin_bytes) image_bytes=$(field image_stored_bytes)
echo "the mount read $read_bytes bytes of files; it fetched $fetched_peer bytes through peer 1 and" \
    "$fetched_origin from the origin, of the image's $image_bytes stored bytes ($(field image_fetched_percent) %)"
[[ -n $fetched_peer && $fetched_peer -gt 0 && $((fetched_peer + fetched_origin)) -lt $image_bytes ]] ||
    { echo "the lazy mount demo did not hold up" >&2; exit 1; }

echo "== containerd's CRI, as kubelet drives it, starts a container on the lazily mounted image (shoal snapshotter)"
cri_demo "$shoal" "127.0.0.1:$reg_port" "127.0.0.1:$reg_port/demo:1" -- /usr/bin/busybox sh -c \
    'echo "hello from a CRI container on a lazy mount: $(/usr/bin/busybox ls /usr/bin | /usr/bin/busybox wc -l) programs in /usr/bin, built $(/usr/bin/busybox cat /build-date)"'
echo "== done"
