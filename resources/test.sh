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
# (--lib --bins --tests: every unit and integration test; benches and doctests are not tests.)
log=resources/build/test.log
cargo test --workspace --locked --lib --bins --tests 2>&1 | tee "$log"
echo "test.sh: finished in $((SECONDS - start)) s"
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
