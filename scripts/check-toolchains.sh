#!/usr/bin/env bash
# The toolchain policy, checked: the lowest Rust of each build system we support builds the
# service and the on-device end-to-end tool, with every provider (and the generated tpm2-tss
# bindings Yocto's and Buildroot's triples need), from the committed Cargo.lock.
#
#   scripts/check-toolchains.sh            every toolchain in the table
#   scripts/check-toolchains.sh 1.75.0     one of them
#
# The workspace's rust-version must be the lowest of the table (it is what cargo's resolver
# honours when the lock is updated: .cargo/config.toml sets incompatible-rust-versions =
# "fallback"). The table is the single place these versions are written; docs/toolchains.md
# says where each comes from.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# version  build system (the Rust its release ships; the lowest it can have)
table="1.75.0 Yocto-5.0-scarthgap(meta/recipes-devtools/rust/rust_1.75.0.bb)
1.88.0 Buildroot-2026.02-LTS(package/rust-bin,package/rust)
1.94.1 Yocto-6.0-wrynose(meta/recipes-devtools/rust/rust_1.94.1.bb)"

lowest=$(printf '%s\n' "$table" | awk '{ print $1 }' | sort -V | head -n1)
declared=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
# rust-version may omit the patch level ("1.75" means 1.75.0).
case "$lowest" in
    "$declared" | "$declared".0) ;;
    *)
        echo "check-toolchains: Cargo.toml declares rust-version = \"$declared\", the lowest supported toolchain is $lowest" >&2
        exit 1
        ;;
esac
grep -q '^incompatible-rust-versions = "fallback"' .cargo/config.toml || {
    echo "check-toolchains: .cargo/config.toml must set [resolver] incompatible-rust-versions = \"fallback\"" >&2
    exit 1
}

wanted=("$@")
failures=0
while read -r version system; do
    if [ "${#wanted[@]}" -gt 0 ] && [[ ! " ${wanted[*]} " == *" $version "* ]]; then continue; fi
    echo "== Rust $version ($system)"
    rustup toolchain list | grep -q "^$version-" ||
        rustup toolchain install "$version" --profile minimal --no-self-update
    start=$(date +%s)
    # A target directory per toolchain: nothing built by one compiler is reused by another.
    if cargo "+$version" build --locked --target-dir "target/toolchain-$version" \
        -p parsec-service -p parsec-e2e --features parsec-service/tpm-provider,parsec-service/pkcs11-provider,parsec-service/tpm-generate-bindings,parsec-service/mbed-crypto-provider; then
        echo "check-toolchains: Rust $version builds the locked tree with every provider ($(($(date +%s) - start)) s)"
    else
        echo "check-toolchains: Rust $version ($system) does NOT build the locked tree" >&2
        failures=$((failures + 1))
    fi
    # ~1.1 GiB each: removed once checked, so that CI's disk peak stays low (keep them with
    # KEEP_TOOLCHAIN_TARGETS=1 for faster re-runs).
    [ "${KEEP_TOOLCHAIN_TARGETS:-0}" = 1 ] || rm -rf "target/toolchain-$version"
done <<<"$table"
[ "$failures" -eq 0 ]
