#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the end-to-end tests (the real daemon
# on real sockets, driven by parsec-client and parsec-tool). Run scripts/install-deps.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "== shellcheck"
shellcheck -x cross/*.sh cross/pkg-config-cross scripts/*.sh .ci/run qemu-tests/run.sh qemu-tests/image.sh qemu-tests/guest/init qemu-tests/guest/rootfs-init qemu-tests/guest/rootfs-e2e board-configs/check.sh board-configs/select-providers sysvinit/parsec \
    buildroot-ext/board/raspberrypi4-64/post-build-tpm.sh
echo "== cargo deny: licences, bans, sources"
cargo deny check licenses bans sources
echo "== toolchain policy: the lowest Rust of Yocto scarthgap and wrynose and Buildroot's LTS build the locked tree"
bash scripts/check-toolchains.sh
echo "== feature gating: no provider, and each provider alone"
cargo check -p parsec-service --no-default-features --locked
cargo check -p parsec-service --no-default-features --features tpm-provider --locked
cargo check -p parsec-service --no-default-features --features pkcs11-provider --locked
echo "== systemd units"
cargo build -p parsec-service --locked
echo "== Mbed TLS: the linked library is at least the pinned minimum, and thread-safe"
bash scripts/check-mbedtls.sh target/debug/parsec
bash scripts/check-systemd.sh
echo "== init script: start waits for the socket, reports failure with the reason, logs to its file"
bash scripts/check-init-script.sh target/debug/parsec
echo "== stress: 64 clients, 1000 idle connections, the connection cap (answers checked)"
cargo build -p parsec-bench --locked
./target/debug/parsec-stress --daemon target/debug/parsec --rounds 3
echo "== cross: aarch64 and armv7 with every provider, checked under qemu user mode"
bash cross/build.sh aarch64-unknown-linux-gnu
bash cross/build.sh armv7-unknown-linux-gnueabihf
echo "== Debian bookworm packages (amd64, arm64): lintian, install, upgrade, remove, purge in debootstrap roots"
if [ "$(id -u)" -eq 0 ]; then
    bash scripts/check-debs.sh
else
    echo "   skipped: needs root (debootstrap, chroot); run as root to include it"
fi
echo "== board configs: each board's files, its config.toml through parsec --check-config"
bash board-configs/check.sh
echo "== meta-parsec and buildroot-ext: crate list, oelint-adv, pyflakes, kas schema, kconfiglib, release values"
bash scripts/check-layers.sh
echo "== qemu-tests: the aarch64 appliance in QEMU with swtpm, first boot and reboot"
bash qemu-tests/run.sh
echo "== qemu-tests: 20 power cuts during key churn (software and TPM providers), every acknowledged key checked"
bash qemu-tests/run.sh --power-cuts 20
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Unit and end-to-end tests with every provider built in (doc examples are not tests here).
# The TPM provider's tests start their own swtpm instances, the PKCS#11 provider's their
# own SoftHSM2 tokens.
# (No errexit here: the summary line must be printed when tests fail too.)
set +e +o pipefail
cargo test --workspace --all-features --locked --no-fail-fast --lib --bins --tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e -o pipefail
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
