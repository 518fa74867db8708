#!/usr/bin/env bash
# Makes service/tests/fixtures/mbedtls-3.0/: a key store and Mbed TLS key files written by
# this service as built before issue 26, on the Mbed TLS 3.0.0 psa-crypto-sys vendors, which
# the build on Mbed TLS 3.6 must go on serving (service/tests/mbedtls_upgrade.rs).
#
#   scripts/make-mbedtls30-fixture.sh /path/to/parsec OUT_DIR
#
# The binary is given, not built here: the committed fixture's was commit 004b701 built with
# no MBEDTLS_LIB_DIR (psa-crypto-sys then builds its own 3.0.0), `parsec --version` saying
# "software provider on mbed TLS 3.0.0". Its keys are made by service/examples/upstream_fixture.rs
# (for application "alice", Direct authentication): ecc-sign, rsa-sign and rsa-decrypt,
# with each public key and a ciphertext in OUT_DIR/keys.txt.
set -euo pipefail

bin=$(realpath "$1")
out=$(realpath -m "$2")
repo=$(cd "$(dirname "$0")/.." && pwd)
"$bin" --version | grep -q "mbed TLS 3.0" || {
    echo "make-mbedtls30-fixture: $bin is not linked with Mbed TLS 3.0 ($("$bin" --version))" >&2
    exit 1
}
cargo build --quiet --manifest-path "$repo/Cargo.toml" -p parsec-service --example upstream_fixture
maker="$repo/target/debug/examples/upstream_fixture"

rm -rf "$out"
mkdir -p "$out/store"
cat >"$out/config.toml" <<'EOF'
# The config the fixture was made with: @DIR@ is the fixture's directory
# (scripts/make-mbedtls30-fixture.sh).
[core_settings]
log_level = "info"
allow_root = true

[listener]
listener_type = "DomainSocket"
timeout = 1000
socket_path = "@DIR@/parsec.sock"

[authenticator]
auth_type = "Direct"

[[key_manager]]
name = "on-disk"
manager_type = "OnDisk"
store_path = "@DIR@/store"

[[provider]]
provider_type = "MbedCrypto"
key_info_manager = "on-disk"
EOF
sed "s|@DIR@|$out|g" "$out/config.toml" >"$out/run.toml"
"$bin" --config "$out/run.toml" 2>"$out/service.log" &
pid=$!
for _ in $(seq 100); do [ -S "$out/parsec.sock" ] && break; sleep 0.1; done
"$maker" "$out/parsec.sock" direct:alice "$out" 1
kill -TERM "$pid"
wait "$pid" || true
rm -f "$out/run.toml" "$out/parsec.sock"
"$bin" --version >"$out/VERSION"
echo "make-mbedtls30-fixture: $(wc -l <"$out/keys.txt") keys in $out"
