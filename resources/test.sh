#!/usr/bin/env bash
# Installs what is missing, builds the test guest, and runs every Skiff test: formatting,
# lints, unit tests, and the integration tests that boot guests on the real /dev/kvm.
# This is the README's test command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."   # repo root, from any cwd

start=$SECONDS
resources/install-deps.sh
resources/build-guest.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# The integration tests boot real guests; they print SKIPPED lines (never a pass) when this
# host cannot run what they need.
cargo test --workspace --locked
echo "test.sh: all tests passed in $((SECONDS - start)) s"
