#!/usr/bin/env bash
# Builds the bookworm .debs (amd64 natively, arm64 through cross/), runs lintian on each, and
# for each architecture installs the package in a clean bookworm root made by debootstrap
# (arm64: under emulation, qemu user mode through binfmt_misc), as a device would:
#
#   scripts/check-debs.sh [amd64] [arm64]      (default: both; root needed)
#
# In each root: apt installs the .deb (dependencies from Debian's archive); the service
# starts as its own user with its unit's ExecStart line (no systemd runs in a chroot),
# after the package's tmpfiles.d lines; parsec-tool, as a user in parsec-clients, pings,
# creates a key and signs, and openssl verifies the signature; an edited conffile and the
# key survive an upgrade to a newer build; remove keeps the key; purge leaves no file the
# package made (the file lists before the install and after the purge are compared). Then
# (amd64) a device that ran Debian trixie's parsec-service: the package keeps its config
# and serves its key (trixie_device).
# The packages end up in dist/ (scripts/release.sh uses them). Takes ~6 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
top=$PWD
arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(amd64 arm64)
[ "$(id -u)" -eq 0 ] || { echo "check-debs: run as root (debootstrap, chroot)" >&2; exit 1; }
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=${CHECK_DEBS_DIR:-/var/tmp/parsec-check-debs}
# The release's version when this tree is the pinned release, else a +git snapshot above it.
base=$(dpkg-parsechangelog -S Version)
version=$(bash scripts/release.sh deb-version)
newer="$version+rebuild1"
mkdir -p dist "$work"
step() { printf '== debs: %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }
started=$(date +%s)

mounted=()
binfmt=""
cleanup() {
    for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
    if [ -n "$binfmt" ]; then echo -1 > "/proc/sys/fs/binfmt_misc/$binfmt" || true; fi
    [ ! -f "$work/changelog.saved" ] || cp "$work/changelog.saved" "$top/debian/changelog"
    rm -f "$work/changelog.saved"
}
trap cleanup EXIT

# 1. The packages: this version, and a newer build of it for the upgrade.
build() { # arch version
    local arch=$1 v=$2 src=$top
    if [ "$v" != "$base" ]; then
        # The same tree with one more changelog entry (restored at once): cargo has
        # nothing to rebuild.
        local maintainer
        maintainer=$(dpkg-parsechangelog -S Maintainer)
        cp debian/changelog "$work/changelog.saved"
        local why="Rebuild (the upgrade check)."
        [ "$v" = "$newer" ] || why="Snapshot of $(git rev-parse --short=8 HEAD), after the release."
        { printf 'parsec-edge (%s) bookworm; urgency=medium\n\n  * %s\n\n' "$v" "$why"
          printf ' -- %s  %s\n\n' "$maintainer" "$(date -R)"
          cat "$work/changelog.saved"; } > debian/changelog
    fi
    local opts=(-b -us -uc -d)
    [ "$arch" = "$(dpkg --print-architecture)" ] || opts+=(-a"$arch")
    local rc=0
    (cd "$src" && dpkg-buildpackage "${opts[@]}" > "$work/build-$arch-$v.log" 2>&1) || rc=$?
    [ "$v" = "$base" ] || cp "$work/changelog.saved" debian/changelog
    if [ "$rc" -ne 0 ]; then
        tail -30 "$work/build-$arch-$v.log"
        echo "check-debs: build of $arch $v failed ($work/build-$arch-$v.log)" >&2
        exit 1
    fi
    local parent
    parent=$(dirname "$src")
    mv "$parent/parsec-edge_${v}_$arch.deb" dist/
    rm -f "$parent/parsec-edge_${v}_$arch.buildinfo" "$parent/parsec-edge_${v}_$arch.changes"
    if ! (cd "$src" && dpkg-buildpackage -T clean >/dev/null 2>&1); then
        echo "   note: debian/rules clean failed in $src"
    fi
}

for arch in "${arches[@]}"; do
    step "build $arch $version and $newer"
    build "$arch" "$version"
    build "$arch" "$newer"
    deb=dist/parsec-edge_${version}_$arch.deb
    echo "   $deb: $(stat -c %s "$deb") bytes; Depends: $(dpkg-deb -f "$deb" Depends)"

    step "lintian $arch"
    report=$(lintian --display-info "$deb" 2>&1 | grep -v 'running with root privileges' || true)
    while IFS= read -r line; do echo "   $line"; done <<< "$report"
    if echo "$report" | grep -q '^E:'; then
        echo "check-debs: lintian errors in $deb" >&2
        exit 1
    fi
done

# The commented TPM and PKCS#11 sections are valid as they stand once uncommented.
if [ -x target/release/parsec ]; then
    sed 's/^#\(\[\[provider\]\]\|[a-z_]* = \)/\1/; s/@MULTIARCH@/x86_64-linux-gnu/' debian/config.toml > "$work/all-providers.toml"
    target/release/parsec --check-config "$work/all-providers.toml" | sed 's/^/   uncommented: /'
    grep -q 'providers in order: \[tpm-provider, pkcs11-provider, mbed-crypto-provider\]' <(target/release/parsec --check-config "$work/all-providers.toml")
fi

# 2. A clean bookworm root per architecture, and the package's life in it.
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
as_app() { in_root setpriv --reuid=app --regid=app --init-groups env HOME=/home/app \
    PARSEC_SERVICE_ENDPOINT=unix:/run/parsec/parsec.sock "$@"; }
file_list() {
    (cd "$root" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
        -o -path ./tmp -o -path ./var/cache -o -path ./var/lib/apt -o -path ./var/lib/dpkg \
        -o -path ./var/log -o -path ./home/app \) -prune -o -print | sort)
}
start_service() {
    # What systemd would do first: the package's tmpfiles.d lines (d PATH MODE USER GROUP).
    while read -r type path mode user group _; do
        case "$type" in
            d) in_root install -d -m "$mode" -o "$user" -g "$group" "$path" ;;
            ''|'#'*) ;;
            *) echo "check-debs: tmpfiles type $type not handled" >&2; exit 1 ;;
        esac
    done < "$root/usr/lib/tmpfiles.d/parsec.conf"
    local exec_start
    exec_start=$(sed -n 's/^ExecStart=//p' "$root/lib/systemd/system/parsec.service")
    local user
    user=$(sed -n 's/^User=//p' "$root/lib/systemd/system/parsec.service")
    # The working directory an administrator's drop-in gives the unit (systemd's default: /).
    local workdir
    workdir=$(cat "$root"/etc/systemd/system/parsec.service.d/*.conf 2>/dev/null | sed -n 's/^WorkingDirectory=//p' | tail -n 1 || true)
    # The unit's UMask and user; its supplementary group tss comes with --init-groups.
    # shellcheck disable=SC2086
    chroot "$root" /bin/sh -c "cd ${workdir:-/} && umask 0077 && exec setpriv --reuid=$user --regid=$user --init-groups $exec_start" \
        > "$root/tmp/parsec.log" 2>&1 &
    service_pid=$!
    for _ in $(seq 1 100); do
        [ -S "$root/run/parsec/parsec.sock" ] && return 0
        kill -0 "$service_pid" 2>/dev/null || break
        sleep 0.2
    done
    cat "$root/tmp/parsec.log"
    echo "check-debs: the service did not start" >&2
    exit 1
}
stop_service() {
    kill -TERM "$service_pid"
    wait "$service_pid" || { cat "$root/tmp/parsec.log"; echo "check-debs: the service did not stop cleanly" >&2; exit 1; }
}
check() { # description, command...
    local what=$1; shift
    if "$@"; then echo "   ok: $what"; else echo "check-debs: FAILED: $what" >&2; exit 1; fi
}

# A device that ran Debian trixie's parsec-service (1.4.1: SQLite store, UnixPeerCredentials,
# the software provider), with the WorkingDirectory drop-in its software keys need (its unit
# has none, and its user cannot write /); its config edited (a conffile prompt, unanswered, if
# the package did not handle it). Its .debs come from trixie in Debian's archive; its
# libraries are bookworm's of the same sonames (the t64 names differ: --force-depends).
trixie_device() {
    step "$arch: a device that ran Debian trixie's parsec-service"
    local pool=$work/trixie-$arch
    mkdir -p "$pool"
    if [ ! -f "$pool/Packages" ]; then
        curl -fsSL "$mirror/dists/trixie/main/binary-$arch/Packages.xz" | xz -d > "$pool/Packages.tmp"
        mv "$pool/Packages.tmp" "$pool/Packages"
    fi
    local pkg file
    for pkg in parsec-service libmbedcrypto16; do
        file=$(awk -v p="$pkg" '$1 == "Package:" { on = ($2 == p) } on && $1 == "Filename:" { print $2; exit }' "$pool/Packages")
        [ -n "$file" ] || { echo "check-debs: no $pkg in trixie's index" >&2; exit 1; }
        [ -f "$pool/$(basename "$file")" ] || curl -fsSL -o "$pool/$(basename "$file")" "$mirror/$file"
        cp "$pool/$(basename "$file")" "$root/tmp/$pkg.deb"
    done
    {
        in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            libsqlite3-0 libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-tctildr0
        in_root dpkg -i /tmp/libmbedcrypto16.deb
        in_root dpkg --force-depends -i /tmp/parsec-service.deb
    } >> "$work/apt-$arch.log" 2>&1
    mkdir -p "$root/etc/systemd/system/parsec.service.d"
    printf '[Service]\nWorkingDirectory=/var/lib/parsec\n' > "$root/etc/systemd/system/parsec.service.d/keys.conf"
    sed -i 's/^timeout = 200/timeout = 300/' "$root/etc/parsec/config.toml"
    in_root install -d -m 0755 -o parsec -g parsec /run/parsec
    chroot "$root" /bin/sh -c "cd /var/lib/parsec && exec setpriv --reuid=parsec --regid=parsec --init-groups /usr/bin/parsec -c /etc/parsec/config.toml" \
        > "$root/tmp/trixie.log" 2>&1 &
    service_pid=$!
    for _ in $(seq 1 100); do [ -S "$root/run/parsec/parsec.sock" ] && break; sleep 0.2; done
    check "Debian's parsec-service makes a key" as_app parsec-tool create-ecc-key -k trixie-key
    as_app parsec-tool export-public-key -k trixie-key > "$root/tmp/trixie-public.pem"
    stop_service
    rm -f "$root/run/parsec/parsec.sock"
    local db=/var/lib/parsec/kim-mappings/sqlite/sqlite-key-info-manager.sqlite3
    local before
    before=$(sha256sum "$root$db" "$root"/var/lib/parsec/*.psa_its)

    # What apt does for Conflicts: the old package removed, then this one installed.
    in_root dpkg --remove --force-depends parsec-service >> "$work/apt-$arch.log" 2>&1
    check "installed over it without a conffile prompt" \
        sh -c "chroot '$root' dpkg -i /tmp/parsec-edge_${version}_$arch.deb < /dev/null > '$work/trixie-install-$arch.log' 2>&1"
    sed 's/^/   | /' "$work/trixie-install-$arch.log" | grep -v '^   | \(Selecting\|(Reading\|Preparing\|Unpacking\)'
    check "the device's config is kept (Debian's, edited), this package's beside it" sh -c \
        "grep -q '^timeout = 300' '$root/etc/parsec/config.toml' && grep -q sqlite-manager '$root/etc/parsec/config.toml' && [ -f '$root/etc/parsec/config.toml.dpkg-dist' ] && [ ! -e '$root/etc/parsec/config.toml.parsec-service' ]"
    check "config root:parsec 0640" test "$(in_root stat -c "%U:%G %a" /etc/parsec/config.toml)" = "root:parsec 640"
    # In the drop-in's WorkingDirectory, as systemd would start it.
    start_service
    as_app parsec-tool list-keys > "$root/tmp/keys" 2>&1 || true
    check "Debian's key is listed" grep -q trixie-key "$root/tmp/keys"
    as_app parsec-tool sign -k trixie-key "signed after the switch" > "$root/tmp/trixie-sig.b64"
    in_root sh -c "base64 -d /tmp/trixie-sig.b64 > /tmp/trixie-sig.der && printf 'signed after the switch' > /tmp/trixie-msg"
    check "openssl verifies its signature with the key Debian's service exported" sh -c \
        "chroot '$root' openssl dgst -sha256 -verify /tmp/trixie-public.pem -signature /tmp/trixie-sig.der /tmp/trixie-msg | grep -q 'Verified OK'"
    check "a new key beside it" as_app parsec-tool create-ecc-key -k made-here
    stop_service
    check "Debian's store and key files are byte-identical" \
        test "$(sha256sum "$root$db" "$root"/var/lib/parsec/*.psa_its)" = "$before"
    in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q parsec-edge >> "$work/apt-$arch.log" 2>&1
    check "purge keeps Debian's store and key files" \
        test "$(sha256sum "$root$db" "$root"/var/lib/parsec/*.psa_its)" = "$before"
    check "purge removes this service's files beside them" test ! -e "$root$db.overlay"
}

for arch in "${arches[@]}"; do
    root=$work/root-$arch
    step "bookworm root $arch (debootstrap)"
    rm -rf "$root"
    if [ "$arch" = "$(dpkg --print-architecture)" ]; then
        debootstrap --variant=minbase --include=openssl bookworm "$root" "$mirror" > "$work/debootstrap-$arch.log" 2>&1 ||
            { tail -20 "$work/debootstrap-$arch.log"; exit 1; }
        tool=$(command -v parsec-tool)
    else
        qemu=$top/cross/.cache/qemu/usr/bin/qemu-aarch64-static
        [ -x "$qemu" ] || { echo "check-debs: no $qemu (cross/build.sh aarch64-unknown-linux-gnu unpacks it)" >&2; exit 1; }
        mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && [ ! -e /proc/sys/fs/binfmt_misc/parsec-aarch64 ]; then
            # ELF, 64-bit, little-endian, machine 183 (AArch64); F: qemu is opened now, so
            # it need not exist inside the root.
            printf '%s' ':parsec-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$qemu"':F' \
                > /proc/sys/fs/binfmt_misc/register
            binfmt=parsec-aarch64
        fi
        debootstrap --arch="$arch" --foreign --variant=minbase --include=openssl bookworm "$root" "$mirror" \
            > "$work/debootstrap-$arch.log" 2>&1 || { tail -20 "$work/debootstrap-$arch.log"; exit 1; }
        chroot "$root" /debootstrap/debootstrap --second-stage >> "$work/debootstrap-$arch.log" 2>&1 ||
            { tail -20 "$work/debootstrap-$arch.log"; exit 1; }
        tool=$work/parsec-tool-$arch/bin/parsec-tool
        if [ ! -x "$tool" ]; then
            step "parsec-tool 0.7.0 for $arch (cargo install --target, against cross/'s sysroot)"
            # Debian's cross gcc has no libc of its own here (no libc6-dev-arm64-cross): ring's C
            # code needs the sysroot cross/build.sh made, or its headers fall through to the
            # build machine's /usr/include.
            sysroot=$top/cross/.cache/sysroot/aarch64-unknown-linux-gnu
            [ -f "$sysroot/.parsec-sysroot" ] ||
                { echo "check-debs: no $sysroot (cross/build.sh aarch64-unknown-linux-gnu makes it)" >&2; exit 1; }
            (
                # shellcheck source=cross/env.sh
                . "$top/cross/env.sh" aarch64-unknown-linux-gnu "$sysroot"
                cargo install --quiet --locked parsec-tool --version 0.7.0 \
                    --target aarch64-unknown-linux-gnu --root "$work/parsec-tool-$arch"
            )
        fi
    fi
    echo "   $(du -sh "$root" | cut -f1), $(chroot "$root" uname -m)"
    for fs in proc dev; do mount --bind "/$fs" "$root/$fs"; mounted+=("$root/$fs"); done
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # Nothing starts daemons in a chroot (udev from tpm-udev's dependencies).
    printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
    install -m 0755 "$tool" "$root/usr/local/bin/parsec-tool"
    cp "dist/parsec-edge_${version}_$arch.deb" "dist/parsec-edge_${newer}_$arch.deb" "$root/tmp/"
    in_root useradd -m app

    step "$arch: dependencies from the archive, then the package"
    deps=$(dpkg-deb -f "dist/parsec-edge_${version}_$arch.deb" Depends | sed 's/([^)]*)//g; s/,/ /g')
    in_root apt-get update -q > "$work/apt-$arch.log" 2>&1
    # shellcheck disable=SC2086
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $deps >> "$work/apt-$arch.log" 2>&1 ||
        { tail -20 "$work/apt-$arch.log"; exit 1; }
    file_list > "$work/files-before-$arch"
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "/tmp/parsec-edge_${version}_$arch.deb" >> "$work/apt-$arch.log" 2>&1 || { tail -20 "$work/apt-$arch.log"; exit 1; }
    check "parsec is a system user in tss; group parsec-clients exists" \
        sh -c "chroot '$root' id -nG parsec | grep -qw tss && chroot '$root' getent group parsec-clients >/dev/null"
    check "/etc/parsec/config.toml is root:parsec 0640" \
        test "$(in_root stat -c "%U:%G %a" /etc/parsec/config.toml)" = "root:parsec 640"
    in_root adduser --quiet app parsec-clients

    step "$arch: the service as its unit starts it; parsec-tool as a client"
    start_service
    check "the service runs as parsec" test "$(stat -c %u "/proc/$service_pid")" = "$(in_root id -u parsec)"
    check "ping" as_app parsec-tool ping
    check "create-ecc-key" as_app parsec-tool create-ecc-key -k device-key
    as_app parsec-tool sign -k device-key "signed on $arch" > "$root/tmp/signature.b64"
    as_app parsec-tool export-public-key -k device-key > "$root/tmp/public.pem"
    in_root sh -c "base64 -d /tmp/signature.b64 > /tmp/signature.der && printf 'signed on $arch' > /tmp/message"
    check "openssl verifies the signature" sh -c \
        "chroot '$root' openssl dgst -sha256 -verify /tmp/public.pem -signature /tmp/signature.der /tmp/message | grep -q 'Verified OK'"
    stop_service

    step "$arch: an edited conffile, then the upgrade to $newer"
    sed -i 's/^log_level = "info"/log_level = "debug"/' "$root/etc/parsec/config.toml"
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "/tmp/parsec-edge_${newer}_$arch.deb" >> "$work/apt-$arch.log" 2>&1 || { tail -20 "$work/apt-$arch.log"; exit 1; }
    check "version $newer installed" test "$(in_root dpkg-query -W -f "\${Version}" parsec-edge)" = "$newer"
    check "the edit is kept" grep -q '^log_level = "debug"' "$root/etc/parsec/config.toml"
    check "config still root:parsec 0640" test "$(in_root stat -c "%U:%G %a" /etc/parsec/config.toml)" = "root:parsec 640"
    start_service
    as_app parsec-tool list-keys > "$root/tmp/keys" || true
    check "the key is still there" grep -q device-key "$root/tmp/keys"
    stop_service

    step "$arch: remove keeps the keys, purge leaves nothing"
    in_root env DEBIAN_FRONTEND=noninteractive apt-get remove -y -q parsec-edge >> "$work/apt-$arch.log" 2>&1
    check "remove keeps /var/lib/parsec and the config" \
        sh -c "[ -n \"\$(find '$root/var/lib/parsec' -mindepth 1 | head -1)\" ] && [ -f '$root/etc/parsec/config.toml' ]"
    in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q parsec-edge >> "$work/apt-$arch.log" 2>&1
    file_list > "$work/files-after-$arch"
    check "purge: no file left behind (file lists compared)" \
        diff -u "$work/files-before-$arch" "$work/files-after-$arch"
    if [ "$arch" = "$(dpkg --print-architecture)" ]; then
        trixie_device
    fi
    for fs in dev proc; do umount -l "$root/$fs"; done
    mounted=()
done
step "all checks passed (${arches[*]})"
