#!/usr/bin/env bash
# Boots the Skiff test guest (Linux 6.1 + busybox initramfs) with the serial console on this
# terminal and a QMP socket. Installs and builds what is missing first.
#   resources/run.sh [extra skiff arguments...]
# Ctrl-A x quits. The QMP socket is $SKIFF_QMP (default /tmp/skiff-qmp.sock).
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."   # repo root, from any cwd

resources/install-deps.sh
resources/build-guest.sh
cargo build --release --locked -p skiff

qmp=${SKIFF_QMP:-/tmp/skiff-qmp.sock}
echo "run.sh: QMP on unix:$qmp; Ctrl-A x quits" >&2
exec target/release/skiff \
    --kernel resources/build/guest/vmlinux \
    --initrd resources/build/guest/initramfs.cpio \
    --cmdline "$(resources/build-guest.sh --print-cmdline)" \
    --memory 512M --cpus 2 \
    --qmp "unix:$qmp" \
    "$@"
