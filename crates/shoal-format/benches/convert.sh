#!/usr/bin/env bash
# Conversion throughput of `shoal image convert` on a >= 500 MB rootfs layer, beside the baseline
# `tar -x` + `zstd -T0` of the same layer, measured in the same run (docs/benchmarks.md,
# "Image conversion (issue 2)").
#
# The rootfs is deterministic for a given machine: /usr/lib, /usr/bin, /usr/share and /usr/libexec
# in sorted order, files under 64 MiB, until TARGET_MB; then a second copy of the first 15% of it
# under dup/ (duplicated data, as layers and packages have). Usage:
#   crates/shoal-format/benches/convert.sh [TARGET_MB]   (default 560)
# Needs: a release build (`cargo build --release -p shoal-cli`), GNU tar, zstd.
set -euo pipefail

TARGET_MB=${1:-560}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
SHOAL=${SHOAL:-${CARGO_TARGET_DIR:-$ROOT/target}/release/shoal}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/shoal-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

[ -x "$SHOAL" ] || { echo "build first: cargo build --release -p shoal-cli (looked for $SHOAL)" >&2; exit 1; }

# 1. The file list: sorted, regular files only, capped at TARGET_MB.
find /usr/lib /usr/bin /usr/share /usr/libexec -xdev -type f -size -64M -printf '%s %p\n' 2>/dev/null \
  | LC_ALL=C sort -k2 \
  | awk -v cap=$((TARGET_MB * 1000000 * 85 / 100)) '!full && sum + $1 > cap { full = 1 } !full { sum += $1; print $2 }' \
  > "$WORK/files"
DUP=$(( $(wc -l < "$WORK/files") * 15 / 100 ))
mkdir -p "$WORK/rootfs"
tar -C / --files-from=<(sed 's|^/||' "$WORK/files") -cf - 2>/dev/null | tar -C "$WORK/rootfs" -xf -
mkdir -p "$WORK/rootfs/dup"
head -n "$DUP" "$WORK/files" | sed 's|^/||' | tar -C / --files-from=- -cf - 2>/dev/null | tar -C "$WORK/rootfs/dup" -xf -
tar --numeric-owner -C "$WORK/rootfs" -cf "$WORK/layer.tar" .
rm -rf "$WORK/rootfs"
BYTES=$(stat -c %s "$WORK/layer.tar")
FILES=$(tar -tf "$WORK/layer.tar" | wc -l)
sync
cat "$WORK/layer.tar" > /dev/null   # warm the page cache for both contenders

now() { date +%s.%N; }
mbps() { awk -v b="$BYTES" -v s="$1" 'BEGIN { printf "%.1f", b / 1e6 / s }'; }

# 2. Baseline: tar -x of the layer, then zstd -T0 (level 3) of the same layer.
mkdir -p "$WORK/x"
t0=$(now); tar -C "$WORK/x" -xf "$WORK/layer.tar"; t1=$(now)
zstd -q -T0 -3 -f "$WORK/layer.tar" -o "$WORK/layer.tar.zst"; t2=$(now)
rm -rf "$WORK/x"
TAR_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
ZSTD_S=$(awk -v a="$t1" -v b="$t2" 'BEGIN { print b - a }')
BASE_S=$(awk -v a="$t0" -v b="$t2" 'BEGIN { print b - a }')
ZSTD_SIZE=$(stat -c %s "$WORK/layer.tar.zst")

# 3. shoal image convert of the same layer (defaults: 1 MiB chunks, zstd level 3).
t0=$(now)
"$SHOAL" image convert --source "$WORK/layer.tar" --output "oci:$WORK/out:bench" --json > "$WORK/stats.json"
t1=$(now)
SHOAL_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
BLOB=$(sed -n 's/.*"blob_bytes": *\([0-9]*\).*/\1/p' "$WORK/stats.json")
DEDUP=$(sed -n 's/.*"dedup_ratio": *\([0-9.]*\).*/\1/p' "$WORK/stats.json")

echo "machine: nproc=$(nproc), cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "input: layer.tar $BYTES bytes, $FILES entries (uncompressed)"
printf 'baseline tar -x:            %6.2f s  %s MB/s\n' "$TAR_S" "$(mbps "$TAR_S")"
printf 'baseline zstd -T0 -3:       %6.2f s  %s MB/s  -> %s bytes\n' "$ZSTD_S" "$(mbps "$ZSTD_S")" "$ZSTD_SIZE"
printf 'baseline tar -x + zstd -T0: %6.2f s  %s MB/s\n' "$BASE_S" "$(mbps "$BASE_S")"
printf 'shoal image convert:        %6.2f s  %s MB/s  -> data blob %s bytes, dedup %s\n' "$SHOAL_S" "$(mbps "$SHOAL_S")" "$BLOB" "$DEDUP"
awk -v a="$BASE_S" -v b="$SHOAL_S" 'BEGIN { printf "shoal / baseline throughput: %.2fx\n", a / b }'
