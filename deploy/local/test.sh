#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need, then format, lint, tests.
# Tests that need root (FUSE, network namespaces, device nodes) run when this runs as root.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/deps.sh
install_deps

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(default_target_dir)}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# Multi-process tests (chaos-tests) run the `shoal` binary of this build.
cargo build --locked -p shoal-cli
cargo test --workspace --locked --no-fail-fast
echo "== fuzz smoke"
# A short run of every fuzz target (about a minute in all; the long runs are in
# docs/reliability.md). cargo-fuzz needs a nightly toolchain; without one (or with
# SHOAL_FUZZ_SMOKE=stable) the same target bodies run on stable over the corpus and mutations.
FUZZ_TARGETS=(proto/fuzz:frame_decoder peer/fuzz:range_header
    crates/shoal-format/fuzz:bootstrap_load crates/shoal-format/fuzz:tar_layer)
for dir in proto/fuzz peer/fuzz crates/shoal-format/fuzz; do
    # The workspace's lock file: the same dependency versions as the tests above.
    cp Cargo.lock "$dir/Cargo.lock"
done
if [[ ${SHOAL_FUZZ_SMOKE:-} != stable ]] && cargo +nightly fuzz --version >/dev/null 2>&1; then
    for t in "${FUZZ_TARGETS[@]}"; do
        dir=${t%%:*} target=${t##*:}
        # New inputs go to a scratch corpus, not the clone; the sanitizer build is kept beside
        # the main build cache so that later runs reuse it.
        # The tracked seeds (corpus/TARGET/sample*) are read only.
        scratch=$(mktemp -d)
        [[ -d $dir/corpus/$target ]] || { echo "fuzz smoke: no seeds in $dir/corpus/$target" >&2; exit 1; }
        (cd "$dir" && cargo +nightly fuzz run --target-dir "$CARGO_TARGET_DIR/fuzz" \
            "$target" "$scratch" "corpus/$target" -- \
            -max_total_time=15 -max_len=8192 -timeout=10 -print_final_stats=1)
        rm -rf "$scratch"
    done
else
    for dir in proto/fuzz peer/fuzz crates/shoal-format/fuzz; do
        SHOAL_FUZZ_SMOKE_SECS=7 cargo test --manifest-path "$dir/Cargo.toml"
    done
fi
