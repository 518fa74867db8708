#!/usr/bin/env bash
# Checks that psa-crypto-sys's view of the PSA API matches the Mbed TLS it links.
#
#   scripts/mbedtls-abi.sh INCLUDE_DIR
#
# psa-crypto-sys 0.12 generates its Rust bindings and compiles its C shim with
# -DMBEDTLS_CONFIG_FILE=<config.h>, a config.h it writes from its own copy of Mbed TLS
# (3.0.0, "crypto" preset), put first on the include path; the library was built with
# INCLUDE_DIR/mbedtls/mbedtls_config.h. The structures' layout depends on the config (which
# hashes, ciphers and drivers are in), so the same probe is compiled both ways and every
# size and alignment of what psa-crypto and this service pass to the library must agree.
set -euo pipefail

include=${1:?usage: scripts/mbedtls-abi.sh INCLUDE_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# psa-crypto-sys's source, where cargo keeps it (fetched if need be), and its config.
manifest=$(cd "$root" && cargo metadata --format-version 1 --locked 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="psa-crypto-sys"))')
sys_dir=$(dirname "$manifest")
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
    SHOW(psa_key_derivation_operation_t);
    SHOW(psa_cipher_operation_t);
    SHOW(psa_hash_operation_t);
    SHOW(psa_mac_operation_t);
    SHOW(psa_aead_operation_t);
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
    return 0;
}
EOF
cc=${CC:-cc}
"$cc" -o "$work/library" -I"$include" "$work/probe.c"
"$cc" -o "$work/binding/probe" -I"$work/binding" '-DMBEDTLS_CONFIG_FILE=<config.h>' -I"$include" "$work/probe.c"
"$work/library" >"$work/library.txt"
"$work/binding/probe" >"$work/binding.txt"
if ! diff -u --label "Mbed TLS as built" --label "psa-crypto-sys's view" "$work/library.txt" "$work/binding.txt"; then
    echo "mbedtls-abi: the layouts above differ: psa-crypto-sys would pass structures of the wrong size" >&2
    exit 1
fi
echo "mbedtls-abi: $(wc -l <"$work/library.txt") PSA types agree between the library's config and psa-crypto-sys's" >&2
