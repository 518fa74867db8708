#!/usr/bin/env bash
# Checks the systemd units: `systemd-analyze verify` must print nothing (it only warns on
# unknown keys, so any output fails), and the sandbox's exposure score must stay low.
# Needs a built daemon (target/debug/parsec): verify insists that ExecStart exists, so the
# units are checked as copies whose ExecStart points at it; nothing else is changed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$PWD/target/debug/parsec"
[ -x "$bin" ] || { echo "check-systemd: build first (cargo build -p parsec-service)"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in systemd/parsec.socket systemd/parsec.service; do
    sed "s#/usr/bin/parsec#$bin#" "$unit" > "$tmp/$(basename "$unit")"
done
out=$(systemd-analyze verify "$tmp/parsec.socket" "$tmp/parsec.service" 2>&1) || true
if [ -n "$out" ]; then
    echo "check-systemd: systemd-analyze verify complains:"
    echo "$out"
    exit 1
fi
echo "check-systemd: systemd-analyze verify: no complaint"
exposure=$(systemd-analyze security --offline=true "$tmp/parsec.service" 2>&1 | sed -n 's/.*Overall exposure level for parsec.service: \([0-9.]*\).*/\1/p')
echo "check-systemd: systemd-analyze security exposure: ${exposure:-unknown} (limit 2.0)"
python3 -c "import sys; sys.exit(0 if float('${exposure:-99}') <= 2.0 else 1)"
