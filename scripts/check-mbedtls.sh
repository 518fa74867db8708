#!/usr/bin/env bash
# Fails if a parsec binary's software provider is linked with an Mbed TLS older than the
# pinned minimum (scripts/mbedtls.sh --min-version: the oldest release with every security
# fix this service relies on, CVE-2024-23170's RSA timing fix among them, docs/security.md)
# or one whose PSA core is not thread-safe. The version is the library's own answer
# (`parsec --version`).
#
#   scripts/check-mbedtls.sh BINARY [RUNNER...]   # RUNNER: e.g. qemu-aarch64-static -L SYSROOT
set -euo pipefail

binary=${1:?usage: scripts/check-mbedtls.sh BINARY [RUNNER...]}
shift
minimum=$("$(dirname "$0")/mbedtls.sh" --min-version)
text=$("$@" "$binary" --version)
version=$(printf '%s\n' "$text" | sed -n 's/.*software provider on [Mm]bed TLS \([0-9][0-9.]*\).*/\1/p')
if [ -z "$version" ]; then
    echo "check-mbedtls: $binary does not name its Mbed TLS: $text" >&2
    exit 1
fi
if ! dpkg --compare-versions "$version" ge "$minimum"; then
    echo "check-mbedtls: $binary is linked with Mbed TLS $version, older than the pinned minimum $minimum" >&2
    exit 1
fi
case "$text" in
    *"not thread-safe"*)
        echo "check-mbedtls: $binary's Mbed TLS $version is not thread-safe (MBEDTLS_THREADING_C): one crypto thread" >&2
        exit 1
        ;;
esac
echo "check-mbedtls: $binary: Mbed TLS $version (minimum $minimum), thread-safe"
