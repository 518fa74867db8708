#!/usr/bin/env bash
# Builds the Mbed TLS the software provider links: the 3.6 LTS line from Debian's archive
# (trixie's signed source package: no copy of Mbed TLS lives in this repository), configured
# as psa-crypto-sys configures its own copy (the "crypto" preset) plus a thread-safe PSA core
# (MBEDTLS_THREADING_C, MBEDTLS_THREADING_PTHREAD), optimised for speed, as a static library.
#
#   scripts/mbedtls.sh                    # for this machine: .deps/mbedtls/host
#   scripts/mbedtls.sh aarch64-linux-gnu [SYSROOT]
#                                         # with Debian's cross gcc (against SYSROOT's libc,
#                                         # cross/build.sh's): .deps/mbedtls/aarch64-linux-gnu
#   scripts/mbedtls.sh --print-version    # the version the installed host build has
#
# .cargo/config.toml points psa-crypto-sys at .deps/mbedtls/host (MBEDTLS_LIB_DIR,
# MBEDTLS_INCLUDE_DIR); cross/build.sh sets them to the target's build. The library is
# static (libmbedcrypto.a only), so the service needs no Mbed TLS on the device.
#
# Trust: apt fetches the source's index from an InRelease file it checks against Debian's
# archive keyring (no trusted=yes), and refuses a .dsc or tarball whose SHA-256 differs from
# that index. The version must be at least MIN_VERSION (the oldest with every fix this
# service relies on: docs/security.md); the archive keeps only current versions, so a newer
# patch release is taken when Debian publishes one.
#
# The binding (psa-crypto-sys 0.12) compiles its shim and bindings against its own config
# (Mbed TLS 3.0's "crypto" preset), not the library's: the ABI check at the end compiles the
# same probe of every PSA structure psa-crypto passes by value or pointer under both configs
# and fails if any size or offset differs.
set -euo pipefail

MIN_VERSION=3.6.6
SUITE=trixie

root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
apt_dir="$deps/apt"

log() { echo "mbedtls: $*" >&2; }
die() {
    echo "mbedtls: error: $*" >&2
    exit 1
}

if [ "${1:-}" = "--print-version" ]; then
    cat "$deps/mbedtls/host/VERSION" 2>/dev/null || die "not built: run scripts/mbedtls.sh"
    exit 0
fi
if [ "${1:-}" = "--min-version" ]; then
    echo "$MIN_VERSION"
    exit 0
fi

target=${1:-host}
sysroot=${2:-}
case "$target" in
    host) cc=${CC:-cc} ;;
    aarch64-linux-gnu | arm-linux-gnueabihf) cc=$target-gcc ;;
    *) die "unknown target $target (host, aarch64-linux-gnu, arm-linux-gnueabihf)" ;;
esac
command -v "$cc" >/dev/null || die "no C compiler $cc (scripts/install-deps.sh; cross/build.sh installs Debian's cross gcc)"
for tool in cmake python3 dpkg-source apt-get; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done

# 1. The source package, from a private apt directory: the machine's own sources and lists
# are left as they are.
mkdir -p "$apt_dir/lists/partial" "$apt_dir/sources.list.d" "$apt_dir/src"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring is missing (Debian's debian-archive-keyring package)"
echo "deb-src [signed-by=$keyring] http://deb.debian.org/debian $SUITE main" >"$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1
    -o APT::Sandbox::User="$(id -un)")
# An index older than a day is fetched again (security updates reach the build that way).
if [ -z "$(find "$apt_dir/lists" -name '*Sources*' -mtime -1 2>/dev/null | head -1)" ]; then
    log "fetching $SUITE's source index (signature checked against $keyring)"
    apt-get "${apt_opts[@]}" -q update >"$apt_dir/update.log" 2>&1 ||
        die "apt-get update failed: $(tail -3 "$apt_dir/update.log")"
fi
version=$(apt-cache "${apt_opts[@]}" showsrc mbedtls 2>/dev/null | awk '/^Version:/ {print $2}' | sort -V | tail -1)
[ -n "$version" ] || die "Debian $SUITE lists no mbedtls source"
upstream=${version%%-*}
upstream=${upstream%%+*}
dpkg --compare-versions "$upstream" ge "$MIN_VERSION" ||
    die "Debian $SUITE has Mbed TLS $upstream, older than the pinned minimum $MIN_VERSION"

out="$deps/mbedtls/$target"
if [ -f "$out/VERSION" ] && [ "$(cat "$out/VERSION")" = "$upstream" ] && [ -f "$out/lib/libmbedcrypto.a" ]; then
    log "Mbed TLS $upstream for $target is in $out"
    exit 0
fi

src="$apt_dir/src/mbedtls-$upstream"
if [ ! -d "$src" ]; then
    log "downloading mbedtls $version (checked against the signed index)"
    (cd "$apt_dir/src" && apt-get "${apt_opts[@]}" -q source --download-only "mbedtls=$version" >/dev/null)
    dsc="$apt_dir/src/mbedtls_${version#*:}.dsc"
    (cd "$apt_dir/src" && dpkg-source --no-check -x "$dsc" "$src" >/dev/null)
fi

# 2. Configure: the "crypto" preset (no TLS, X.509 or networking, as psa-crypto-sys's own
# copy), a thread-safe PSA core. SHA-3 (new in 3.5, on by default in 3.6) stays off as in
# psa-crypto-sys's 3.0 config: its 144-byte block makes the MAC and key-derivation
# structures 16 bytes larger than the binding thinks (the ABI check catches that).
build="$deps/build/mbedtls-$upstream-$target"
rm -rf "$build"
mkdir -p "$build"
config="$src/include/mbedtls/mbedtls_config.h"
python3 "$src/scripts/config.py" -f "$config" crypto
python3 "$src/scripts/config.py" -f "$config" set MBEDTLS_THREADING_C
python3 "$src/scripts/config.py" -f "$config" set MBEDTLS_THREADING_PTHREAD
python3 "$src/scripts/config.py" -f "$config" unset MBEDTLS_SHA3_C

# 3. Build: static, position-independent (it ends up in a PIE), cmake's Release (-O2) plus
# -O3 for the bignum and ECP code paths it covers.
cmake_args=(-S "$src" -B "$build/cmake" -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS_RELEASE="-O3"
    -DENABLE_TESTING=OFF -DENABLE_PROGRAMS=OFF -DMBEDTLS_FATAL_WARNINGS=OFF
    -DUSE_SHARED_MBEDTLS_LIBRARY=OFF -DUSE_STATIC_MBEDTLS_LIBRARY=ON
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DCMAKE_C_COMPILER="$cc"
    -DCMAKE_INSTALL_PREFIX="$out.new" -DCMAKE_INSTALL_LIBDIR=lib)
if [ "$target" != host ]; then
    cmake_args+=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR="${target%%-*}")
    if [ -n "$sysroot" ]; then
        cmake_args+=(-DCMAKE_SYSROOT="$sysroot")
    fi
fi
log "building Mbed TLS $upstream for $target"
cmake "${cmake_args[@]}" >"$build/configure.log" 2>&1 || die "cmake failed: $build/configure.log"
cmake --build "$build/cmake" -j"$(nproc)" >"$build/build.log" 2>&1 || die "build failed: $build/build.log"
rm -rf "$out.new"
cmake --install "$build/cmake" >"$build/install.log" 2>&1 || die "install failed: $build/install.log"
# Only the crypto library is used (the preset leaves the TLS and X.509 ones empty).
rm -f "$out.new/lib/libmbedtls.a" "$out.new/lib/libmbedx509.a"

# 4. The ABI check (host compiler: it compares two configs, the same for every target).
"$root/scripts/mbedtls-abi.sh" "$out.new/include" --strict ||
    die "psa-crypto-sys would see other PSA structures than Mbed TLS $upstream: see above"

echo "$upstream" >"$out.new/VERSION"
echo "$version" >"$out.new/DEBIAN_VERSION"
rm -rf "$out"
mv "$out.new" "$out"
# psa-crypto-sys reruns its build script when psa/crypto.h changes, not when the library
# does: a new version must look new to it.
touch "$out/include/psa/crypto.h"
log "Mbed TLS $upstream ($version) for $target in $out"
