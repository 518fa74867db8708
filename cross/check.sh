#!/usr/bin/env bash
# Checks a cross-built parsec binary:
#
#   cross/check.sh TARGET BINARY SYSROOT QEMU
#
# - `file`: the right architecture;
# - `readelf -d`: every NEEDED library is one the target image provides (the C library, the
#   compiler runtime and tpm2-tss) and is present in the sysroot;
# - under qemu user mode with the sysroot as library prefix: `--version`, then the daemon on
#   the software provider, answering the build machine's parsec-tool through its socket
#   (ping, create a key, sign), and a clean exit on SIGTERM.
set -euo pipefail
target=$1 binary=$2 sysroot=$3 qemu=$4

case "$target" in
    aarch64-unknown-linux-gnu) arch_pattern="ELF 64-bit LSB .*ARM aarch64" ;;
    armv7-unknown-linux-gnueabihf) arch_pattern="ELF 32-bit LSB .*ARM, EABI5" ;;
    *) echo "check: no expectation for $target" >&2; exit 2 ;;
esac
description=$(file -b "$binary")
if ! grep -Eq "$arch_pattern" <<< "$description"; then
    echo "check: $binary is not what $target runs: $description" >&2
    exit 1
fi
echo "   file: $description"

# What a device image with the service provides: glibc, libgcc_s and tpm2-tss.
allowed="libc.so.6 libm.so.6 libgcc_s.so.1 libtss2-esys.so.0 libtss2-tctildr.so.0 libtss2-mu.so.0 ld-linux-aarch64.so.1 ld-linux-armhf.so.3"
needed=$(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
for lib in $needed; do
    if ! grep -qw -- "$lib" <<< "$allowed"; then
        echo "check: $binary needs $lib, which the target image does not provide" >&2
        exit 1
    fi
    if [ -z "$(find "$sysroot/lib" "$sysroot/usr/lib" -name "$lib" 2>/dev/null | head -n1)" ]; then
        echo "check: $lib is not in the sysroot $sysroot" >&2
        exit 1
    fi
done
echo "   NEEDED: $(tr '\n' ' ' <<< "$needed")"

run() { "$qemu" -L "$sysroot" "$binary" "$@"; }
version=$(run --version)
echo "   under $(basename "$qemu"): $version"
if [[ "$version" == *"software provider on"* ]]; then
    # The Mbed TLS linked in is at least the pinned minimum, and thread-safe.
    bash "$(dirname "$0")/../scripts/check-mbedtls.sh" "$binary" "$qemu" -L "$sysroot" | sed 's/^/   /'
fi

dir=$(mktemp -d)
cleanup() {
    if [ -n "${pid:-}" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT
cat > "$dir/config.toml" <<EOF
[core_settings]
log_level = "info"
allow_root = true
[listener]
listener_type = "DomainSocket"
timeout = 5000
socket_path = "$dir/parsec.sock"
[authenticator]
auth_type = "Direct"
[[key_manager]]
name = "on-disk"
manager_type = "OnDisk"
store_path = "$dir/store"
[[provider]]
provider_type = "MbedCrypto"
key_info_manager = "on-disk"
EOF
# qemu itself in the background (not a shell function), so that $! is the daemon.
"$qemu" -L "$sysroot" "$binary" --config "$dir/config.toml" 2> "$dir/log" &
pid=$!
for _ in $(seq 1 300); do
    [ -S "$dir/parsec.sock" ] && break
    sleep 0.1
done
if [ ! -S "$dir/parsec.sock" ]; then
    echo "check: the daemon did not start under qemu; its log:" >&2
    cat "$dir/log" >&2
    exit 1
fi
export PARSEC_SERVICE_ENDPOINT="unix:$dir/parsec.sock"
parsec-tool ping >/dev/null 2>&1
parsec-tool create-ecc-key -k cross-check >/dev/null 2>&1
signature=$(parsec-tool sign -k cross-check "signed by an emulated $target daemon" 2>/dev/null)
[ -n "$signature" ] || { echo "check: no signature" >&2; cat "$dir/log" >&2; exit 1; }
echo "   the host's parsec-tool: ping, create-ecc-key and sign answered by the emulated daemon"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
if [ "$status" -ne 0 ]; then
    echo "check: the daemon exited with $status on SIGTERM" >&2
    cat "$dir/log" >&2
    exit 1
fi
echo "   SIGTERM: clean exit"
