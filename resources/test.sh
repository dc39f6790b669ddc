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
echo "== cargo fuzz (SKIFF_FUZZ_SECONDS=${SKIFF_FUZZ_SECONDS:-60} s per target, 0 to skip)"
# One bounded libFuzzer run per virtio device on the stable toolchain (RUSTC_BOOTSTRAP=1 for
# cargo-fuzz's -Z flags). New inputs go to a scratch corpus; fuzz/corpus/<target> seeds it.
# A crash fails the run and leaves its input in fuzz/artifacts/<target>/.
fuzz_seconds=${SKIFF_FUZZ_SECONDS:-60}
if [ "$fuzz_seconds" -gt 0 ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    for target in virtio_blk virtio_net virtio_rng; do
        mkdir -p "$scratch/$target" "fuzz/corpus/$target"
        (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" \
            "$scratch/$target" "corpus/$target" -- -max_total_time="$fuzz_seconds" 2>&1 | tail -n 3)
    done
fi
echo "test.sh: finished in $((SECONDS - start)) s"
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
