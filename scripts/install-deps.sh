#!/usr/bin/env bash
# Installs what building and testing the service needs on Debian 12:
# cmake and libclang (Mbed TLS and its bindings, built by psa-crypto-sys), libtss2-dev (the
# TPM provider links tpm2-tss), swtpm and tpm2-tools (the TPM provider's tests run against a
# software TPM), softhsm2 and opensc (the PKCS#11 provider's tests use a SoftHSM2 token and
# pkcs11-tool), tpm2-pkcs11 with its tools, tpm2-abrmd (on a private D-Bus: dbus-daemon) and
# NSS's softoken with certutil (the same tests on two more PKCS#11 modules), systemd (socket activation tests and unit checks), openssl (tests verify
# signatures with it), file (cross/check.sh), cpio and e2fsprogs (qemu-tests: the initramfs
# and the guest disk), busybox (the init script is checked with BusyBox's start-stop-daemon,
# as on Buildroot), debhelper, lintian, debootstrap and fakeroot (the bookworm .debs are built,
# linted and installed in clean roots), shellcheck and parsec-tool (a real client the tests drive);
# then Mbed TLS 3.6 for the software provider (scripts/mbedtls.sh).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=(cmake clang libclang-dev pkg-config openssl passwd systemd libtss2-dev swtpm swtpm-tools tpm2-tools softhsm2 opensc libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-abrmd libtss2-tcti-tabrmd0 dbus-daemon libnss3 libnss3-tools file shellcheck cpio e2fsprogs busybox debhelper lintian debootstrap fakeroot dpkg-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# meta-parsec and buildroot-ext checks (scripts/check-layers.sh).
python_tools=(oelint-adv==9.11.2 kconfiglib==14.1.0 kas==5.5 pyflakes==4.1.0 jsonschema PyYAML)
if ! python3 -c "import oelint_adv, kconfiglib, kas, pyflakes, jsonschema, yaml" 2>/dev/null; then
    echo "install-deps: pip install ${python_tools[*]}"
    python3 -m pip install -q --root-user-action=ignore "${python_tools[@]}" 2>/dev/null ||
        python3 -m pip install -q --break-system-packages "${python_tools[@]}"
fi

if ! command -v parsec-tool >/dev/null 2>&1; then
    echo "install-deps: cargo install parsec-tool"
    cargo install --locked parsec-tool --version 0.7.0
fi
if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "install-deps: cargo install cargo-deny"
    cargo install --locked cargo-deny --version 0.20.2
fi
# The software provider's Mbed TLS 3.6, from Debian's signed source (.cargo/config.toml
# points the build at it).
"$(dirname "$0")/mbedtls.sh"
echo "install-deps: done"
