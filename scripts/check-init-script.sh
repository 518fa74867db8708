#!/usr/bin/env bash
# The SysV init script (sysvinit/parsec, S50parsec on Buildroot) run for real, as root, with
# dpkg's start-stop-daemon and with BusyBox's (what Buildroot images have):
#   - a config that works: `start` prints OK only once the socket listens, the service runs
#     as the user parsec, its log reaches $LOG; `status`, `stop`;
#   - configs that pass --check-config but cannot start (socket directory that cannot be
#     made; syslog as the log target with no syslog daemon): `start` exits non-zero and
#     prints the service's own reason;
#   - a config that does not pass --check-config: non-zero, with file and line.
# It runs in a private mount namespace with tmpfs over /etc/default, /run and /var/lib, so the
# machine's own files are not touched.
#   scripts/check-init-script.sh [PARSEC_BINARY]   (default target/debug/parsec)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/parsec}")
[ "$(id -u)" -eq 0 ] || {
    echo "check-init-script: needs root (users, mounts); CI runs it as root" >&2
    [ -z "${CI:-}" ] || exit 1
    exit 0
}
command -v busybox >/dev/null || { echo "check-init-script: busybox is missing (scripts/install-deps.sh)" >&2; exit 1; }
getent group parsec-clients >/dev/null || groupadd --system parsec-clients
getent passwd parsec >/dev/null || useradd --system --user-group --no-create-home --home-dir /var/lib/parsec parsec

if [ "${CHECK_INIT_INNER:-}" != 1 ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # BusyBox's start-stop-daemon first in PATH for the second round.
    mkdir -p "$work/busybox-bin"
    ln -s "$(command -v busybox)" "$work/busybox-bin/start-stop-daemon"
    for ssd in dpkg busybox; do
        path=$PATH
        [ "$ssd" = busybox ] && path="$work/busybox-bin:$PATH"
        echo "-- init script with $ssd's start-stop-daemon ($(PATH=$path command -v start-stop-daemon))"
        PATH=$path CHECK_INIT_INNER=1 WORK="$work" unshare --mount --propagation private "$0" "$bin"
    done
    echo "check-init-script: all checks passed with dpkg's and BusyBox's start-stop-daemon"
    exit 0
fi

# Inside the namespace: private /etc/default, /run, /var/lib.
mount -t tmpfs tmpfs /etc/default
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib
script=$(pwd)/sysvinit/parsec
conf=/run/test-config.toml
log=/run/parsec-test.log
cat >/etc/default/parsec <<EOF
DAEMON=$bin
CONFIG=$conf
LOG=$log
START_TIMEOUT=10
DAEMON_ARGS="--config $conf"
EOF
fail() {
    echo "check-init-script: FAIL: $*" >&2
    exit 1
}
# Whatever happens, no service outlives the check.
trap 'sh "$script" stop >/dev/null 2>&1 || true' EXIT
write_config() { # SOCKET LOG_TARGET
    sed -e "s|^socket_path = .*|socket_path = \"$1\"|" \
        -e "s|^log_target = .*|log_target = \"$2\"|" service/config/default.toml >"$conf"
}

# 1. A config that works.
write_config /run/parsec/parsec.sock stderr
out=$(sh "$script" start 2>&1) || fail "start with a working config: $out"
echo "   start: $out"
[ "$out" = "Starting parsec: OK" ] || fail "start printed: $out"
awk '$NF == "/run/parsec/parsec.sock" && $4 == "00010000" { f = 1 } END { exit !f }' /proc/net/unix ||
    fail "OK printed but nothing listens on /run/parsec/parsec.sock"
pid=$(cat /run/parsec.pid)
[ "$(stat -c %U "/proc/$pid")" = parsec ] || fail "the service runs as $(stat -c %U "/proc/$pid"), not parsec"
grep -q "parsec .* starting with" "$log" || fail "the service's log did not reach $log: $(cat "$log")"
echo "   log: $(grep -m1 'starting with' "$log")"
out=$(sh "$script" status) || fail "status: $out"
out=$(sh "$script" stop) || fail "stop: $out"
[ ! -e "/proc/$pid" ] || [ "$(awk '/^State:/ { print $2 }' "/proc/$pid/status")" = Z ] || fail "the service still runs after stop"
if sh "$script" status >/dev/null; then fail "status says running after stop"; fi
out=$(sh "$script" stop) || fail "stop when stopped: exit $? ($out)"
echo "   status, stop, stop again ($out): OK"

# 2. Valid configs that cannot start: start fails with the service's reason.
expect_start_failure() { # WHAT REASON-PATTERN
    set +e
    out=$(sh "$script" start 2>&1)
    status=$?
    set -e
    [ "$status" -ne 0 ] || fail "$1: start exited 0: $out"
    echo "$out" | head -n 1 | grep -q '^Starting parsec: FAIL' || fail "$1: start printed: $out"
    echo "$out" | grep -q -- "$2" || fail "$1: the reason ($2) is not in: $out"
    echo "   $1: exit $status, $(echo "$out" | tr '\n' ' ' | cut -c1-200)"
}
write_config /proc/parsec-nowhere/parsec.sock stderr
"$bin" --check-config "$conf" >/dev/null || fail "the unbindable-socket config should pass --check-config"
expect_start_failure "socket that cannot be made" "/proc/parsec-nowhere"
write_config /run/parsec/parsec.sock syslog
expect_start_failure "syslog without a syslog daemon" "syslog"

# 3. A config that does not pass --check-config.
printf '[core_settings]\nno_such_key = 1\n' >"$conf"
expect_start_failure "invalid config" "no_such_key"
