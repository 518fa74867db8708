#!/usr/bin/env bash
# Makes the upstream-store fixtures (service/tests/fixtures/upstream-1.5.0/) with a real
# upstream Parsec 1.5.0 daemon that you provide (this script neither fetches nor builds it;
# docs/migration.md says how the committed fixtures' daemon was built).
#
#   scripts/make-upstream-fixtures.sh /path/to/upstream/parsec OUT_DIR [VARIANT...]
#
# For each variant (key info manager x authenticator) it starts swtpm and a SoftHSM2 token
# of the variant's own, runs the upstream daemon on them with an upstream-style config,
# makes three keys per application in each provider (service/examples/upstream_fixture.rs)
# and stops everything. What is left in OUT_DIR/<variant> is the data an upstream device
# holds: the key info store, Mbed TLS's key files (the daemon's working directory), the
# token, the TPM's state, plus keys.txt (each key's public key and a ciphertext).
set -euo pipefail

upstream=$(realpath "$1")
out=$(realpath -m "$2")
repo=$(cd "$(dirname "$0")/.." && pwd)
cargo build --quiet --manifest-path "$repo/Cargo.toml" -p parsec-service --example upstream_fixture
maker="$repo/target/debug/examples/upstream_fixture"

free_port() {
    python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    t = socket.socket()
    try:
        t.bind(("127.0.0.1", p + 1)); print(p); break
    except OSError:
        pass'
}

variant() {
    local name=$1 manager=$2 auth=$3
    shift 3
    local dir=$out/$name
    rm -rf "$dir"
    mkdir -p "$dir/workdir" "$dir/softhsm/tokens" "$dir/tpm"
    # SoftHSM2: one token, found by its serial number (a slot number changes per run).
    printf 'directories.tokendir = %s/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' \
        "$dir" >"$dir/softhsm2.conf"
    SOFTHSM2_CONF=$dir/softhsm2.conf softhsm2-util --init-token --free --label upstream \
        --pin 1234 --so-pin 5678 >/dev/null
    local serial
    serial=$(SOFTHSM2_CONF=$dir/softhsm2.conf softhsm2-util --show-slots |
        awk '/Serial number:/ && $3 != "" { print $3; exit }')
    local port
    port=$(free_port)
    swtpm socket --tpm2 --tpmstate "dir=$dir/tpm" \
        --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
        --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
        --flags not-need-init,startup-clear &
    local swtpm_pid=$!
    sleep 1
    local store
    if [ "$manager" = OnDisk ]; then
        store="store_path = \"@DIR@/mappings\""
        unset FIXTURE_NAME_PER_PROVIDER
    else
        store="sqlite_db_path = \"@DIR@/kim-mappings/sqlite/sqlite-key-info-manager.sqlite3\""
        # Upstream's SQLite store has one key of a name per application, across providers.
        export FIXTURE_NAME_PER_PROVIDER=1
    fi
    # @DIR@ and @TCTI@ are what a test replaces: where it copied the fixture, its swtpm.
    cat >"$dir/config.toml" <<EOF
# Upstream Parsec 1.5.0's config for this fixture: @DIR@ is the fixture's directory,
# @TCTI@ the swtpm it runs with (scripts/make-upstream-fixtures.sh).
[core_settings]
log_level = "info"
allow_root = true

[listener]
listener_type = "DomainSocket"
timeout = 200
socket_path = "@DIR@/parsec.sock"

[authenticator]
auth_type = "$auth"

[[key_manager]]
name = "manager"
manager_type = "$manager"
$store

[[provider]]
provider_type = "MbedCrypto"
key_info_manager = "manager"

[[provider]]
provider_type = "Pkcs11"
key_info_manager = "manager"
library_path = "/usr/lib/softhsm/libsofthsm2.so"
serial_number = "$serial"
user_pin = "1234"

[[provider]]
provider_type = "Tpm"
key_info_manager = "manager"
tcti = "@TCTI@"
owner_hierarchy_auth = ""
EOF
    sed -e "s|@DIR@|$dir|g" -e "s|@TCTI@|swtpm:host=127.0.0.1,port=$port|" \
        "$dir/config.toml" >"$dir/run.toml"
    : >"$dir/keys.txt"
    # Applications, then optionally `-- <auth_type> <applications...>`: the operator switched
    # the authenticator and the daemon was restarted (one store, two authenticators).
    while :; do
        # Upstream keeps Mbed TLS's key files in its working directory.
        (cd "$dir/workdir" && SOFTHSM2_CONF=$dir/softhsm2.conf exec "$upstream" --config "$dir/run.toml") \
            >>"$dir/upstream.log" 2>&1 &
        local parsec_pid=$!
        for _ in $(seq 100); do [ -S "$dir/parsec.sock" ] && break; sleep 0.1; done
        while [ $# -gt 0 ] && [ "$1" != -- ]; do
            "$maker" "$dir/parsec.sock" "$1" "$dir" 1 2 3
            shift
        done
        kill "$parsec_pid"
        wait "$parsec_pid" || true
        rm -f "$dir/parsec.sock"
        [ $# -gt 1 ] || break
        sed -i "s/^auth_type = .*/auth_type = \"$2\"/" "$dir/run.toml" "$dir/config.toml"
        shift 2
    done
    kill "$swtpm_pid"
    wait "$swtpm_pid" || true
    rm -f "$dir/run.toml" "$dir/parsec.sock" "$dir/tpm/.lock"
    echo "$name: $(wc -l <"$dir/keys.txt") keys"
}

# Variants to make: all, or those named after OUT_DIR.
wanted=("${@:3}")
make() {
    if [ ${#wanted[@]} -eq 0 ] || [[ " ${wanted[*]} " == *" $1 "* ]]; then variant "$@"; fi
}
make ondisk-direct OnDisk Direct direct:alice direct:bob
make ondisk-peer OnDisk UnixPeerCredentials peer
# Direct's "0" and UID 0 are two applications to upstream's SQLite store.
make sqlite-mixed SQLite Direct direct:alice direct:0 -- UnixPeerCredentials peer
