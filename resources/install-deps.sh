#!/usr/bin/env bash
# Installs what building and testing Skiff needs on a fresh Debian machine, and nothing that
# is already there. Safe to run again. Needs root (or sudo) for apt-get.
set -euo pipefail

# Debian packages: the guest kernel's build (see build-guest.sh), QEMU for side-by-side
# figures and QMP comparisons, iasl to check the ACPI tables Skiff generates.
packages=(
    build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils
    linux-source-6.1 busybox-static
    qemu-system-x86
    acpica-tools
    python3 python3-venv
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    echo "install-deps: installing ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "install-deps: cargo is missing; install a Rust toolchain (rustup) first" >&2
    exit 1
fi

# Python's qemu.qmp (QMPClient, qmp-shell), pinned, in a venv for the third-party client tests
# in tests/qmp.rs. Recreated only when missing or at another version.
qemu_qmp_version=0.0.6
venv="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/build/venv"
if ! "$venv/bin/python" -c "import sys, importlib.metadata as m; sys.exit(m.version('qemu.qmp') != '$qemu_qmp_version')" 2>/dev/null; then
    echo "install-deps: creating $venv with qemu.qmp==$qemu_qmp_version"
    python3 -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "qemu.qmp==$qemu_qmp_version"
fi

# cargo-fuzz for the bounded fuzzing runs in test.sh. It builds with the stable toolchain
# when RUSTC_BOOTSTRAP=1 lets it use the nightly-only flags (-Z sanitizer=address); pinned.
cargo_fuzz_version=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$cargo_fuzz_version" ]; then
    echo "install-deps: installing cargo-fuzz $cargo_fuzz_version"
    cargo install --quiet --locked --version "$cargo_fuzz_version" cargo-fuzz
fi
