#!/usr/bin/env bash
# Checks that psa-crypto-sys's view of the PSA API matches the Mbed TLS it links.
#
#   scripts/mbedtls-abi.sh INCLUDE_DIR [--strict]
#
# psa-crypto-sys 0.12 generates its Rust bindings and compiles its C shim with
# -DMBEDTLS_CONFIG_FILE=<config.h>, a config.h it writes from its own copy of Mbed TLS
# (3.0.0, "crypto" preset), put first on the include path; the library was built with
# INCLUDE_DIR/mbedtls/mbedtls_config.h. The structures' layout depends on the config (which
# hashes, ciphers and drivers are in), so the same probe is compiled both ways:
# - the types the service's calls pass (key attributes and the scalar types) must agree;
# - the multi-part operation structures (hash, MAC, cipher, AEAD, key derivation), which
#   psa-crypto has functions for but the service never calls, are compared too: a
#   difference fails with --strict (scripts/mbedtls.sh's own build) and is a warning
#   otherwise (a build system's Mbed TLS with SHA-3 on, say: meta-parsec, buildroot-ext).
# PSA_CRYPTO_SYS_DIR: psa-crypto-sys's source, where cargo metadata cannot find it (a
# Yocto build's vendored crates). CC: the compiler for the probe (the build machine's).
set -euo pipefail

include=${1:?usage: scripts/mbedtls-abi.sh INCLUDE_DIR [--strict]}
strict=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# psa-crypto-sys's source, where cargo keeps it (fetched if need be), and its config.
sys_dir=${PSA_CRYPTO_SYS_DIR:-}
if [ -z "$sys_dir" ]; then
    command -v cargo >/dev/null || {
        echo "mbedtls-abi: no cargo on PATH to find psa-crypto-sys's source (or set PSA_CRYPTO_SYS_DIR)" >&2
        exit 1
    }
    # cargo metadata downloads and unpacks the locked crates it does not have yet.
    metadata=$(cd "$root" && cargo metadata --format-version 1 --locked) || {
        echo "mbedtls-abi: cargo metadata failed (above): cannot find psa-crypto-sys's source" >&2
        exit 1
    }
    manifest=$(printf '%s' "$metadata" |
        python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="psa-crypto-sys"))')
    sys_dir=$(dirname "$manifest")
fi
[ -f "$sys_dir/vendor/scripts/config.py" ] || {
    echo "mbedtls-abi: $sys_dir has no vendor/scripts/config.py (psa-crypto-sys 0.12's)" >&2
    exit 1
}
mkdir -p "$work/binding"
python3 "$sys_dir/vendor/scripts/config.py" --write "$work/binding/config.h" crypto

cat >"$work/probe.c" <<'EOF'
#include <stdio.h>
#include <stdalign.h>
#include <psa/crypto.h>
#define SHOW(t) printf("%-36s size %3zu align %2zu\n", #t, sizeof(t), alignof(t))
int main(void)
{
    SHOW(psa_key_attributes_t);
    SHOW(psa_key_id_t);
    SHOW(mbedtls_svc_key_id_t);
    SHOW(psa_algorithm_t);
    SHOW(psa_key_type_t);
    SHOW(psa_key_usage_t);
    SHOW(psa_key_lifetime_t);
    SHOW(psa_key_derivation_step_t);
    SHOW(psa_status_t);
    SHOW(psa_ecc_family_t);
    SHOW(psa_dh_family_t);
    /* Multi-part operations: not called by the service. */
    SHOW(psa_key_derivation_operation_t);
    SHOW(psa_cipher_operation_t);
    SHOW(psa_hash_operation_t);
    SHOW(psa_mac_operation_t);
    SHOW(psa_aead_operation_t);
    return 0;
}
EOF
cc=${CC:-cc}
"$cc" -o "$work/library" -I"$include" "$work/probe.c"
"$cc" -o "$work/binding/probe" -I"$work/binding" '-DMBEDTLS_CONFIG_FILE=<config.h>' -I"$include" "$work/probe.c"
"$work/library" >"$work/library.txt"
"$work/binding/probe" >"$work/binding.txt"
# (Only tools Yocto's HOSTTOOLS has: no paste.)
differs=$(diff "$work/library.txt" "$work/binding.txt" | awk '/^</ {printf "%s%s", sep, $2; sep = " "}' || true)
if [ -z "$differs" ]; then
    echo "mbedtls-abi: $(wc -l <"$work/library.txt") PSA types agree between the library's config and psa-crypto-sys's" >&2
    exit 0
fi
diff -u --label "Mbed TLS as built" --label "psa-crypto-sys's view" "$work/library.txt" "$work/binding.txt" >&2 || true
used=$(echo "$differs" | tr ' ' '\n' | grep -v '_operation_t$' | tr '\n' ' ' || true)
used=${used% }
if [ -n "$used" ]; then
    echo "mbedtls-abi: the service passes these with another layout than the library's: $used" >&2
    exit 1
fi
if [ "$strict" = --strict ]; then
    echo "mbedtls-abi: multi-part operation structures differ ($differs): build the library with psa-crypto-sys's choices (scripts/mbedtls.sh)" >&2
    exit 1
fi
echo "mbedtls-abi: warning: multi-part operation structures differ ($differs); the service calls none of their functions" >&2
