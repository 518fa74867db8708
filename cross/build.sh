#!/usr/bin/env bash
# Builds parsec-service for an Arm target with every provider, tpm2-tss included, in one
# command:
#
#   cross/build.sh [TARGET] [--features LIST] [--no-check]
#
# TARGET is aarch64-unknown-linux-gnu (default) or armv7-unknown-linux-gnueabihf; LIST
# defaults to all three providers. It
#   1. reads the sysroot recipe cross/targets/TARGET.txt (packages and tested versions);
#   2. installs what the build machine lacks: the Rust target, Debian's cross gcc, the
#      target architecture in dpkg (package lists only: nothing of the target is installed);
#   3. downloads the recipe's .debs into cross/.cache/debs/ARCH (kept, checked by SHA-256);
#   4. unpacks them into cross/.cache/sysroot/TARGET, rewriting absolute symlinks, unless
#      the sysroot's stamp says it was made from exactly these .debs and this recipe;
#   5. builds Mbed TLS 3.6 for TARGET with the cross gcc (scripts/mbedtls.sh), sets the
#      pkg-config wrapper, linker and compiler variables (cross/env.sh) and runs cargo build
#      --release for TARGET;
#   6. checks the binary (cross/check.sh): file, readelf, and a run under qemu user mode.
# Re-running reuses everything and only lets cargo decide what to rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

target=aarch64-unknown-linux-gnu
features="mbed-crypto-provider,tpm-provider,pkcs11-provider"
check=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --features) features=$2; shift 2 ;;
        --no-check) check=no; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) echo "cross/build.sh: unknown option $1" >&2; exit 2 ;;
        *) target=$1; shift ;;
    esac
done
recipe=cross/targets/$target.txt
[ -f "$recipe" ] || { echo "cross/build.sh: no recipe $recipe (targets: $(find cross/targets -name '*.txt' -printf '%f ' | sed 's/\.txt//g'))" >&2; exit 2; }

cache=${PARSEC_CROSS_CACHE:-$PWD/cross/.cache}
started=$(date +%s%N)
step() { printf '== cross %s: %s\n' "$target" "$*"; }
# shellcheck source=cross/debs.sh
. cross/debs.sh
setting() { awk -v key="$1" '$1 == key { print $2 }' "$recipe"; }
debian_arch=$(setting debian_arch)
gcc=$(setting gcc)
gcc_package=$(setting gcc_package)
qemu=$(setting qemu)
generate_bindings=$(setting generate_tss_bindings)
# Package lines: every non-comment line whose first word is not a setting.
packages=$(awk '!/^#/ && NF == 2 && $1 !~ /^(debian_arch|multiarch|gcc|gcc_package|qemu|generate_tss_bindings)$/ { print $1 " " $2 }' "$recipe")

step "build machine"
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
if ! command -v "$gcc" >/dev/null 2>&1; then
    apt_update
    DEBIAN_FRONTEND=noninteractive $debs_sudo apt-get install -y -q --no-install-recommends "$gcc_package" >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx "$debian_arch"; then
    $debs_sudo dpkg --add-architecture "$debian_arch"
    apt_update
fi
first=$(echo "$packages" | head -n1 | cut -d' ' -f1)
if ! apt-cache show "$first:$debian_arch" >/dev/null 2>&1; then
    apt_update
fi

step "packages"
debs=$cache/debs/$debian_arch
used=()
while read -r name tested; do
    deb=$(fetch_deb "$debs" "$name:$debian_arch")
    version=$(dpkg-deb -f "$deb" Version)
    if [ "$version" != "$tested" ]; then
        echo "   note: $name is $version here; $recipe records $tested (update it once this builds and passes)"
    fi
    used+=("$deb")
done <<< "$packages"

step "sysroot"
sysroot=$cache/sysroot/$target
stamp=$( { sha256sum "$recipe"; for deb in "${used[@]}"; do sha256sum "$deb"; done; } | sha256sum | cut -d' ' -f1)
if [ -f "$sysroot/.parsec-sysroot" ] && [ "$(cat "$sysroot/.parsec-sysroot")" = "$stamp" ]; then
    echo "   up to date ($sysroot)"
else
    rm -rf "$sysroot"
    mkdir -p "$sysroot"
    for deb in "${used[@]}"; do
        dpkg-deb -x "$deb" "$sysroot"
    done
    # Debian's -dev packages link absolutely (libm.so -> /lib/.../libm.so.6): inside a
    # sysroot such a link points at the build machine's library, and the linker silently
    # takes the wrong one (or a static one). Make each link relative to the sysroot.
    find "$sysroot" -type l -lname '/*' | while read -r link; do
        ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$sysroot$(readlink "$link")")" "$link"
    done
    for deb in "${used[@]}"; do
        dpkg-deb -f "$deb" Package Version | paste -sd' ' | sed 's/Package: //; s/ Version:/ /'
    done > "$sysroot/.parsec-versions"
    echo "$stamp" > "$sysroot/.parsec-sysroot"
    echo "   made from ${#used[@]} packages ($(du -sh "$sysroot" | cut -f1))"
fi

step "qemu user mode ($qemu)"
qemu_dir=$cache/qemu
if [ ! -x "$qemu_dir/usr/bin/$qemu" ]; then
    mkdir -p "$qemu_dir"
    (cd "$qemu_dir" && apt-get download -q -o APT::Sandbox::User=root qemu-user-static >/dev/null &&
        dpkg-deb -x qemu-user-static_*.deb . && rm -f qemu-user-static_*.deb)
    echo "   unpacked into $qemu_dir (not installed: no conflict with the machine's qemu)"
fi

step "Mbed TLS for $target"
# The software provider's library, built with the cross gcc from Debian's signed source
# (scripts/mbedtls.sh; kept in .deps/mbedtls/MULTIARCH).
multiarch=$(setting multiarch)
scripts/mbedtls.sh "$multiarch" "$sysroot"
export MBEDTLS_LIB_DIR=$PWD/.deps/mbedtls/$multiarch/lib MBEDTLS_INCLUDE_DIR=$PWD/.deps/mbedtls/$multiarch/include

# shellcheck source=cross/env.sh
. cross/env.sh "$target" "$sysroot" "$gcc"
if [ "$generate_bindings" = yes ] && [[ ",$features," == *",tpm-provider,"* ]]; then
    # tss-esapi-sys has no bindings made in advance for this triple.
    features="$features,tpm-generate-bindings"
fi
step "cargo build --release --target $target --features $features"
cargo build --release --locked --target "$target" -p parsec-service --no-default-features --features "$features"
binary=target/$target/release/parsec
echo "   $binary: $(stat -c %s "$binary") bytes"

if [ "$check" = yes ]; then
    step "check"
    bash cross/check.sh "$target" "$binary" "$sysroot" "$qemu_dir/usr/bin/$qemu"
fi
echo "== cross $target: done in $(( ($(date +%s%N) - started) / 1000000 )) ms"
