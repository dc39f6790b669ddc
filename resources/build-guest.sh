#!/usr/bin/env bash
# Builds the Skiff test guest from Debian's linux-source-6.1 and busybox-static:
#   resources/build/guest/vmlinux         stripped ELF vmlinux (64-bit entry + PVH note)
#   resources/build/guest/initramfs.cpio  uncompressed newc cpio; /init prints SKIFF-GUEST-INIT-OK
#   resources/build/guest/System.map      symbols, to map a guest RIP to a kernel function
#   resources/build/guest/config          the kernel .config that was built
# Inputs: resources/guest/kernel.config (fragment over tinyconfig) and this script.
# The kernel command line lives in resources/guest/cmdline (one line).
#
# Usage: resources/build-guest.sh [--force]     build unless the stamp is current
#        resources/build-guest.sh --print-cmdline
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."   # repo root, from any cwd

FRAGMENT=resources/guest/kernel.config
CMDLINE=resources/guest/cmdline
SRC=resources/build/linux-src
OUT=resources/build/guest
TARBALL=/usr/src/linux-source-6.1.tar.xz
KMAKE=(env KBUILD_BUILD_USER=skiff KBUILD_BUILD_HOST=skiff make -C "$SRC" ARCH=x86_64)

log() { echo "build-guest: $*"; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

# The kernel copies clearcpuid=... into a 128-byte buffer (cpu_parse_early_param):
# a longer list is silently truncated, so refuse it here.
# The list must clear fsrm and erms together (or neither). In 6.1, FSRM removes
# memmove's "size < 32" check ("FSRM implies ERMS") and ERMS adds the jump to
# `rep movsb`. With only erms cleared, memmove(len < 32) underflows the length
# and copies forever. The first such call was printk's prefix strip for
# "smpboot: CPU0: " after "Mountpoint-cache hash table entries". It wrote over
# the brk page tables of the direct map and the boot hung in a page-fault cascade.
check_cmdline() {
    [[ $(wc -l < "$CMDLINE") == 1 ]] || die "$CMDLINE must be exactly one line"
    local ccid
    ccid=$(grep -o 'clearcpuid=[^ ]*' "$CMDLINE" | cut -d= -f2)
    ((${#ccid} <= 127)) || die "clearcpuid list is ${#ccid} chars; the kernel keeps only 127"
}

FORCE=0
case "${1:-}" in
    --print-cmdline) check_cmdline; tr -d '\n' < "$CMDLINE"; echo; exit 0 ;;
    --force) FORCE=1 ;;
    "") ;;
    *) echo "usage: $0 [--force | --print-cmdline]" >&2; exit 2 ;;
esac
check_cmdline
start=$SECONDS

# Serialise concurrent runs (several test suites may call this at once).
mkdir -p "$OUT"
exec 9> resources/build/.build-guest.lock
flock 9

# --- 1. Debian packages (one list for the whole project) ---
resources/install-deps.sh

# --- 2. Skip when nothing changed ---
src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
bb_ver=$(dpkg-query -W -f='${Version}' busybox-static)
stamp=$( { cat "$FRAGMENT" resources/build-guest.sh; echo "$src_ver $bb_ver"; } | sha256sum | cut -d' ' -f1)
if ((!FORCE)) && [[ -f $OUT/stamp && $(<"$OUT/stamp") == "$stamp" && -s $OUT/vmlinux && -s $OUT/initramfs.cpio ]]; then
    log "up to date (linux-source-6.1 $src_ver), nothing to do ($((SECONDS - start)) s)"
    exit 0
fi
rm -f "$OUT/stamp"

# A machine-wide cache keyed by the stamp: another checkout on this machine (a CI clone)
# reuses a guest built from the same inputs instead of spending ~16 min rebuilding it.
CACHE=${SKIFF_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/skiff-guest}/$stamp
ARTIFACTS=(vmlinux initramfs.cpio System.map config)
if ((!FORCE)) && [[ -s $CACHE/vmlinux && -s $CACHE/initramfs.cpio ]]; then
    for f in "${ARTIFACTS[@]}"; do cp "$CACHE/$f" "$OUT/$f"; done
    echo "$stamp" > "$OUT/stamp"
    log "copied from the cache $CACHE ($((SECONDS - start)) s)"
    exit 0
fi

# --- 3. Kernel source, re-extracted when the package version changes ---
if [[ ! -f $SRC/.skiff-source-version || $(<"$SRC/.skiff-source-version") != "$src_ver" ]]; then
    log "extracting $TARBALL ($src_ver)"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xJf "$TARBALL" -C "$SRC.tmp" --strip-components=1
    echo "$src_ver" > "$SRC.tmp/.skiff-source-version"
    mv "$SRC.tmp" "$SRC"
fi

# adjust FILE MARKER REGEX REPLACEMENT: sed-replace REGEX (must match exactly one
# line) by REPLACEMENT, which contains MARKER; a file already holding MARKER is
# left alone, so re-runs on an adjusted tree are no-ops.
adjust() {
    local f=$SRC/$1 marker=$2 re=$3 new=$4
    grep -qF -- "$marker" "$f" && return 0
    [[ $(grep -c -- "$re" "$f") == 1 ]] || die "$1: expected one line matching '$re'; source changed?"
    sed -i "s|$re|$new|" "$f"
    grep -qF -- "$marker" "$f" || die "$1: adjustment '$marker' did not apply"
}
# The nested KVM here cannot emulate int3 (KVM_EXIT_INTERNAL_ERROR), and the
# boot-time selftest executes one: drop the call.
adjust arch/x86/kernel/alternative.c 'skiff: int3_selftest' \
    '^[[:space:]]*int3_selftest();$' \
    '\t/* skiff: int3_selftest() removed: int3 is not emulated by our nested KVM */'
# Nor fwait: fpu__drop() runs it when any task exits (kernel threads exit before
# /init starts). It only flushes pending x87 exceptions, which are ignored there
# anyway (exception table entry), so a nop is equivalent.
adjust arch/x86/kernel/fpu/core.c 'skiff: was fwait' \
    '"1: fwait\\n"' \
    '"1: nop\\n" /* skiff: was fwait, not emulated by our nested KVM */'
# Nor vmcall: the hypercall never completes. With 2+ CPUs, KVM_HC_SEND_IPI (PV IPIs)
# hung CPU 0 in kvm_hypercall4 when it woke CPU 1's idle thread ("smpboot: CPU 1
# Converting physical 0 to logical die 1" was the last line), and CPU 1 spun on the
# rq lock. KVM_HC_SCHED_YIELD is the other hypercall this config issues. Keep
# native APIC IPIs and no directed yield; kvm-clock, steal time and PV TLB flush
# use MSRs and shared memory and still work. (`nopv` is no substitute: without
# kvm-clock, LAPIC timer calibration hangs in setup_boot_APIC_clock.)
adjust arch/x86/kernel/kvm.c 'skiff: no PV IPIs' \
    'return (kvm_para_has_feature(KVM_FEATURE_PV_SEND_IPI) \&\&$' \
    'return false \&\& /* skiff: no PV IPIs, vmcall hangs */ (kvm_para_has_feature(KVM_FEATURE_PV_SEND_IPI) \&\&'
adjust arch/x86/kernel/kvm.c 'skiff: no PV sched yield' \
    'return (kvm_para_has_feature(KVM_FEATURE_PV_SCHED_YIELD) \&\&$' \
    'return false \&\& /* skiff: no PV sched yield, vmcall hangs */ (kvm_para_has_feature(KVM_FEATURE_PV_SCHED_YIELD) \&\&'

# --- 4. Configure: tinyconfig + fragment, then check every line stuck ---
# (kconfig's "override: reassigning" warnings are expected: kept in kconfig.log)
"${KMAKE[@]}" -s tinyconfig > "$OUT/kconfig.log" 2>&1 || { cat "$OUT/kconfig.log"; die "tinyconfig failed"; }
cat "$FRAGMENT" >> "$SRC/.config"
"${KMAKE[@]}" -s olddefconfig >> "$OUT/kconfig.log" 2>&1 || { cat "$OUT/kconfig.log"; die "olddefconfig failed"; }
bad=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        name=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        name=${BASH_REMATCH[1]} want=n
    else
        continue
    fi
    got=$(sed -nE "s/^$name=(.*)/\1/p; s/^# $name is not set/n/p" "$SRC/.config")
    [[ ${got:-n} == "$want" ]] || bad+=("$name (asked $want, got ${got:-n})")
done < "$FRAGMENT"
if ((${#bad[@]})); then
    printf 'build-guest: not in the final .config: %s\n' "${bad[@]}" >&2
    die "olddefconfig dropped ${#bad[@]} requested option(s); fix $FRAGMENT"
fi
log "kernel config: all $(grep -cE '^(CONFIG_|# CONFIG_)' "$FRAGMENT") requested options verified"

# --- 5. Build vmlinux ---
log "building vmlinux with -j$(nproc)"
"${KMAKE[@]}" -j"$(nproc)" vmlinux
# --strip-all keeps the program headers and the .notes section (PT_NOTE, PVH entry)
objcopy --strip-all "$SRC/vmlinux" "$OUT/vmlinux.tmp"
mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
cp "$SRC/System.map" "$OUT/System.map"
cp "$SRC/.config" "$OUT/config"

# --- 6. initramfs (newc, uncompressed), packed by the kernel's gen_init_cpio ---
work=$OUT/initramfs.d
rm -rf "$work"
mkdir -p "$work"
cat > "$work/init" <<'EOF'
#!/bin/busybox sh
# Skiff test guest /init (PID 1): mount the basics, print the marker, then power
# off (default), reboot (skiff.init=reboot) or run a shell (skiff.init=shell).
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
exec < /dev/console > /dev/console 2>&1
echo SKIFF-GUEST-INIT-OK
case " $(cat /proc/cmdline) " in
    *" skiff.init=shell "*) exec sh ;;
    *" skiff.init=reboot "*) exec reboot -f ;;
    *) exec poweroff -f ;;
esac
EOF
cat > "$work/list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /root 0700 0 0
dir /tmp 1777 0 0
dir /bin 0755 0 0
file /bin/busybox /bin/busybox 0755 0 0
slink /bin/sh busybox 0777 0 0
file /init $work/init 0755 0 0
EOF
gcc -O2 -o "$work/gen_init_cpio" "$SRC/usr/gen_init_cpio.c"
"$work/gen_init_cpio" -t 0 "$work/list" > "$OUT/initramfs.cpio.tmp"
mv "$OUT/initramfs.cpio.tmp" "$OUT/initramfs.cpio"
rm -rf "$work"

# --- 7. Report and stamp ---
# PVH entry = ELF note "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY); this readelf
# prints it as "Unknown note type: (0x00000012)"
notes=$(readelf -n "$OUT/vmlinux")
if grep -qE '^ +Xen .*(\(0x00000012\)|PHYS32_ENTRY)' <<< "$notes"; then
    pvh=present
else
    pvh=MISSING
fi
log "vmlinux $(stat -c %s "$OUT/vmlinux") bytes, entry $(readelf -h "$OUT/vmlinux" | awk '/Entry/ {print $4}'), PVH note $pvh"
log "initramfs.cpio $(stat -c %s "$OUT/initramfs.cpio") bytes ($(cpio -it < "$OUT/initramfs.cpio" 2>/dev/null | wc -l) entries)"
echo "$stamp" > "$OUT/stamp"
if mkdir -p "$CACHE.tmp" && cp "${ARTIFACTS[@]/#/$OUT/}" "$CACHE.tmp/"; then
    rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE" && log "cached in $CACHE"
else
    log "warning: could not fill the cache $CACHE"
fi
log "done in $((SECONDS - start)) s"
