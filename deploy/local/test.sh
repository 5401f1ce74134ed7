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
cargo test --workspace --locked
