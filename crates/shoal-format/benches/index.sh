#!/usr/bin/env bash
# `shoal image index` throughput beside `shoal image convert` of the same gzip image, and beside
# the floor any index of that image needs (reading and inflating the layer once: `gzip -dc`),
# all in the same run, alternating which goes first (docs/benchmarks.md, "Layer index").
#
# The image: one deterministic rootfs layer from this machine's files (/usr/lib, /usr/bin,
# /usr/share, /usr/libexec in sorted order, files under 64 MiB, until TARGET_MB), tarred, put into
# an OCI layout by `umoci raw add-layer` (which gzips it, as image builders do). Usage:
#   crates/shoal-format/benches/index.sh [TARGET_MB] [ROUNDS]   (default 400, 3)
# Needs: a release build (`cargo build --release -p shoal-cli`), GNU tar, gzip, umoci, GNU time.
# Prints per round wall and CPU (user + system) seconds, then medians and ratios.
set -euo pipefail

TARGET_MB=${1:-400}
ROUNDS=${2:-3}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
SHOAL=${SHOAL:-${CARGO_TARGET_DIR:-$ROOT/target}/release/shoal}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/shoal-index-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

[ -x "$SHOAL" ] || { echo "build first: cargo build --release -p shoal-cli (looked for $SHOAL)" >&2; exit 1; }

find /usr/lib /usr/bin /usr/share /usr/libexec -xdev -type f -size -64M -printf '%s %p\n' 2>/dev/null \
  | LC_ALL=C sort -k2 \
  | awk -v cap=$((TARGET_MB * 1000000)) '!full && sum + $1 > cap { full = 1 } !full { sum += $1; print $2 }' \
  > "$WORK/files"
tar --numeric-owner -C / --files-from=<(sed 's|^/||' "$WORK/files") -cf "$WORK/layer.tar" 2>/dev/null
BYTES=$(stat -c %s "$WORK/layer.tar")
umoci init --layout "$WORK/img" >/dev/null
umoci new --image "$WORK/img:t" >/dev/null
umoci raw add-layer --image "$WORK/img:t" "$WORK/layer.tar" >/dev/null
rm "$WORK/layer.tar"
LAYER=$(ls -S "$WORK/img/blobs/sha256" | head -n 1)
GZ="$WORK/img/blobs/sha256/$LAYER"
GZ_BYTES=$(stat -c %s "$GZ")
sync
cat "$GZ" > /dev/null # warm the page cache for every contender

# Runs "$@" under GNU time; prints "wall cpu" (cpu = user + system).
timed() {
    /usr/bin/time -f '%e %U %S' -o "$WORK/t" "$@" > "$WORK/out" 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
    awk '{ printf "%.3f %.3f\n", $1, $2 + $3 }' "$WORK/t"
}
floor() { timed sh -c "gzip -dc '$GZ' > /dev/null"; }
index() { rm -rf "$WORK/idx"; timed "$SHOAL" image index "oci:$WORK/img:t" --output "oci:$WORK/idx" --json; cp "$WORK/out" "$WORK/index.json"; }
convert() { rm -rf "$WORK/conv"; timed "$SHOAL" image convert --source "oci:$WORK/img:t" --output "oci:$WORK/conv:t" --json; }

echo "machine: nproc=$(nproc), cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "input: one gzip layer of $GZ_BYTES bytes, $BYTES bytes of tar, $(wc -l < "$WORK/files") files"
: > "$WORK/rounds"
for r in $(seq "$ROUNDS"); do
    if (( r % 2 )); then order="floor index convert"; else order="convert index floor"; fi
    for what in $order; do
        read -r wall cpu < <($what)
        echo "$r $what $wall $cpu" >> "$WORK/rounds"
        printf 'round %d %-8s wall %7.2f s  cpu %7.2f s  %7.1f MB/s of tar\n' "$r" "$what" "$wall" "$cpu" \
            "$(awk -v b="$BYTES" -v s="$wall" 'BEGIN { print b / 1e6 / s }')"
    done
done
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for what in floor index convert; do
    w=$(awk -v k="$what" '$2 == k { print $3 }' "$WORK/rounds" | median)
    c=$(awk -v k="$what" '$2 == k { print $4 }' "$WORK/rounds" | median)
    lo=$(awk -v k="$what" '$2 == k { print $3 }' "$WORK/rounds" | sort -n | head -n1)
    hi=$(awk -v k="$what" '$2 == k { print $3 }' "$WORK/rounds" | sort -n | tail -n1)
    printf 'median %-8s wall %7.2f s (%.2f..%.2f)  cpu %7.2f s  %7.1f MB/s of tar\n' "$what" "$w" "$lo" "$hi" "$c" \
        "$(awk -v b="$BYTES" -v s="$w" 'BEGIN { print b / 1e6 / s }')"
    eval "${what}_wall=$w ${what}_cpu=$c"
done
# shellcheck disable=SC2154
awk -v i="$index_wall" -v c="$convert_wall" -v f="$floor_wall" -v ic="$index_cpu" -v cc="$convert_cpu" -v fc="$floor_cpu" 'BEGIN {
    printf "index / convert: wall %.2fx, cpu %.2fx (index is %.1fx faster)\n", i / c, ic / cc, c / i
    printf "index / floor (gzip -dc): wall %.2fx, cpu %.2fx\n", i / f, ic / fc
}'
python3 - "$WORK/index.json" "$GZ_BYTES" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["layers"][0]
print(f"index: {r['index_bytes']} bytes = {100 * r['ratio']:.2f} % of the image; "
      f"{l['checkpoints']} checkpoints, bootstrap {l['bootstrap'][1]} bytes, side blob "
      f"{l['side_blob'][1] if l['side_blob'] else 0} bytes")
PY
