# shellcheck shell=bash
# Sourced, not run: sets what cargo and the -sys crates' build scripts need to build
# parsec-service for TARGET against the libraries in SYSROOT.
#
#   . cross/env.sh TARGET SYSROOT [C-COMPILER]
#
# SYSROOT can be the one cross/build.sh prepares, a Yocto SDK's $SDKTARGETSYSROOT or
# Buildroot's output/staging. C-COMPILER defaults to Debian's cross gcc for TARGET; give
# the SDK's or Buildroot's (e.g. aarch64-poky-linux-gcc, aarch64-buildroot-linux-gnu-gcc).
# What it sets (TRIPLE = TARGET with - as _; TRIPLE_UPPER likewise, upper case):
#   PKG_CONFIG_<TRIPLE>                 cross/pkg-config-cross, the sysroot-only pkg-config
#   PARSEC_CROSS_SYSROOT, PARSEC_CROSS_MULTIARCH   read by that wrapper
#   CARGO_TARGET_<TRIPLE_UPPER>_LINKER  the cross C compiler, which links
#   CARGO_TARGET_<TRIPLE_UPPER>_RUSTFLAGS  -C link-arg=--sysroot=SYSROOT
#   CC_<TRIPLE>, CFLAGS_<TRIPLE>        the cross C compiler and --sysroot, for Mbed TLS
#                                       (psa-crypto-sys builds it with cmake)
#   BINDGEN_EXTRA_CLANG_ARGS_<TRIPLE>   --sysroot and include paths, for bindgen

parsec_cross_target=${1:?usage: . cross/env.sh TARGET SYSROOT [C-COMPILER]}
parsec_cross_sysroot=${2:?usage: . cross/env.sh TARGET SYSROOT [C-COMPILER]}
case "$parsec_cross_target" in
    aarch64-unknown-linux-gnu) parsec_cross_multiarch=aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) parsec_cross_multiarch=arm-linux-gnueabihf ;;
    *) parsec_cross_multiarch=${PARSEC_CROSS_MULTIARCH:-} ;;
esac
parsec_cross_cc=${3:-${parsec_cross_multiarch:+$parsec_cross_multiarch-gcc}}
parsec_cross_lower=$(printf %s "$parsec_cross_target" | tr - _)
parsec_cross_upper=$(printf %s "$parsec_cross_lower" | tr '[:lower:]' '[:upper:]')
parsec_cross_dir=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)

export PARSEC_CROSS_SYSROOT="$parsec_cross_sysroot"
export PARSEC_CROSS_MULTIARCH="$parsec_cross_multiarch"
export "PKG_CONFIG_${parsec_cross_lower}=$parsec_cross_dir/pkg-config-cross"
export "CARGO_TARGET_${parsec_cross_upper}_LINKER=$parsec_cross_cc"
export "CARGO_TARGET_${parsec_cross_upper}_RUSTFLAGS=-C link-arg=--sysroot=$parsec_cross_sysroot"
export "CC_${parsec_cross_lower}=$parsec_cross_cc"
export "CFLAGS_${parsec_cross_lower}=--sysroot=$parsec_cross_sysroot"
parsec_cross_includes="-I$parsec_cross_sysroot/usr/include"
if [ -n "$parsec_cross_multiarch" ]; then
    parsec_cross_includes="$parsec_cross_includes -I$parsec_cross_sysroot/usr/include/$parsec_cross_multiarch"
fi
export "BINDGEN_EXTRA_CLANG_ARGS_${parsec_cross_lower}=--sysroot=$parsec_cross_sysroot $parsec_cross_includes"
unset parsec_cross_target parsec_cross_sysroot parsec_cross_multiarch parsec_cross_cc \
    parsec_cross_lower parsec_cross_upper parsec_cross_dir parsec_cross_includes
