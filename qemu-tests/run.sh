#!/usr/bin/env bash
# Boots an aarch64 appliance in QEMU with a software TPM and tests the Parsec service from
# inside it, twice: a first boot and a reboot on the same TPM state and disk.
#
#   qemu-tests/run.sh [--board DIR] [--timeout SECONDS]
#   qemu-tests/run.sh --power-cuts N [--board DIR]
#   qemu-tests/run.sh --rootfs PATH [--board DIR] [--timeout SECONDS]
#
# Steps (each printed with its time):
#   1. parts: Debian's cloud-arm64 kernel, busybox-static and qemu-system-arm, downloaded
#      once into qemu-tests/.cache (checked by SHA-256), unpacked, never installed;
#   2. build: the service (cross/build.sh, every provider) and parsec-e2e for aarch64;
#   3. initramfs: busybox, the two binaries and the libraries they need (read from their
#      ELF headers, taken from the cross sysroot), the board's kernel modules, users and
#      groups, the board's config.toml as /etc/parsec/config.toml, qemu-tests/guest/init;
#   4. a fresh ext4 disk (it will hold /var/lib: key store and the check's public keys) and
#      a fresh swtpm state;
#   5. boot 1: the guest loads the TPM driver, starts the service as user parsec, runs
#      `parsec-e2e run` as an application user, restarts the service, runs `parsec-e2e check`;
#   6. boot 2 (swtpm restarted on the same state, same disk): `parsec-e2e check` again.
# Each boot's serial console is kept in qemu-tests/out/boot-N.log; every step the guest
# reports is shown as it happens. Exit status 0 only if every step of both boots passed.
# --board defaults to board-configs/qemu-aarch64 (its config.toml and modules are used).
#
# --power-cuts N replaces steps 5 and 6 with the power-cut test: N+1 boots on one disk
# (mounted data=writeback,commit=60 in the guest) and one TPM state. Each boot lists the keys
# that survived, then churns keys on the software and TPM providers, printing every
# acknowledged create and destroy, until the host kills QEMU with SIGKILL at a random moment
# (0.3-3 s into the churn): a power cut, the guest's page cache lost. powercut-check.py then
# checks, boot after boot, that acknowledged keys survived with their public keys and still
# sign, acknowledged destroys held, and the service found nothing to quarantine.
# PARSEC_CUT_SEED fixes the random moments (the seed used is printed).
#
# --rootfs PATH boots an image someone else built (Buildroot's output/images/rootfs.tar, or
# rootfs.ext2/.ext4) instead of steps 2 and 3: its root file system on the virtio disk, its
# own BusyBox init, device manager and init scripts, with Debian's cloud kernel (the image
# brings none here), the board's modules loaded by a small initramfs (guest/rootfs-init, as
# a distribution's initramfs loads its disk driver). The only additions to the image are the
# test's: that kernel's modules, an application user (app, in parsec-clients) and the driver
# guest/rootfs-e2e as /etc/init.d/S99parsec-e2e. Boot 1 checks what the image's init did
# (/dev/tpmrm0 root:tss 0660, the service started by S50parsec), runs `parsec-e2e run`,
# restarts the service through S50parsec and runs `parsec-e2e check`; boot 2 (same disk and
# TPM state) runs `parsec-e2e check`. Unpacking the image keeps its owners: run as root (or
# with fakeroot installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

board="board-configs/qemu-aarch64"
limit=150
cuts=0
rootfs=""
while [ $# -gt 0 ]; do
    case "$1" in
        --board) board=$2; shift 2 ;;
        --timeout) limit=$2; shift 2 ;;
        --power-cuts) cuts=$2; shift 2 ;;
        --rootfs) rootfs=$(realpath "$2"); shift 2 ;;
        -h|--help) sed -n '2,47p' "$0"; exit 0 ;;
        *) echo "qemu-tests/run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -n "$rootfs" ]; then
    [ -f "$rootfs" ] || { echo "qemu-tests/run.sh: --rootfs $rootfs: no such file" >&2; exit 2; }
    [ "$cuts" -eq 0 ] || { echo "qemu-tests/run.sh: --rootfs and --power-cuts do not combine" >&2; exit 2; }
fi
for file in config.toml modules; do
    [ -f "$board/$file" ] || { echo "qemu-tests/run.sh: $board has no $file" >&2; exit 2; }
done

target=aarch64-unknown-linux-gnu
cache=${PARSEC_QEMU_CACHE:-$PWD/qemu-tests/.cache}
out=$PWD/qemu-tests/out
sysroot=${PARSEC_CROSS_CACHE:-$PWD/cross/.cache}/sysroot/$target
started=$(date +%s%N)
step_started=$started
elapsed() { printf '%d.%01d' $(( ($(date +%s%N) - $1) / 1000000000 )) $(( ($(date +%s%N) - $1) / 100000000 % 10 )); }
step() {
    [ "$step_started" = "$started" ] || printf '   (%s s)\n' "$(elapsed "$step_started")"
    step_started=$(date +%s%N)
    printf '== qemu-tests [%6s s] %s\n' "$(elapsed "$started")" "$*"
}
# shellcheck source=cross/debs.sh
. cross/debs.sh

# ---------------------------------------------------------------------------------------
step "1/6 parts (kernel, busybox, qemu-system-aarch64)"
part() { awk -v role="$1" '$1 == role { print $2 " " $3 " " $4 }' qemu-tests/parts.txt; }
unpack_part() {
    # unpack_part ROLE DIR: the role's package, unpacked into DIR unless already there.
    local package arch tested deb version
    read -r package arch tested <<< "$(part "$1")"
    if ! dpkg --print-foreign-architectures | grep -qx "$arch" && [ "$arch" != "$(dpkg --print-architecture)" ]; then
        # The parts are downloaded as $arch packages: apt needs the architecture known. This
        # changes the build machine's dpkg configuration, so it is said, with how to undo it.
        echo "   note: running 'dpkg --add-architecture $arch' on this machine to download $package:$arch (never installed); undo with 'dpkg --remove-architecture $arch' while no $arch package is installed"
        $debs_sudo dpkg --add-architecture "$arch"
        apt_update
    fi
    if ! apt-cache show "$package:$arch" >/dev/null 2>&1; then apt_update; fi
    deb=$(fetch_deb "$cache/debs" "$package:$arch")
    version=$(dpkg-deb -f "$deb" Version)
    [ "$version" = "$tested" ] || echo "   note: $package is $version here; parts.txt records $tested"
    if [ "$(cat "$2/.parsec-part" 2>/dev/null)" != "$(basename "$deb")" ]; then
        rm -rf "$2"
        mkdir -p "$2"
        dpkg-deb -x "$deb" "$2"
        basename "$deb" > "$2/.parsec-part"
    fi
    echo "   $package $version"
}
unpack_part kernel "$cache/kernel"
unpack_part busybox "$cache/busybox"
unpack_part qemu "$cache/qemu"
kernel=$(find "$cache/kernel/boot" -name 'vmlinuz-*' | head -n1)
kernel_version=${kernel##*/vmlinuz-}
qemu_bin=$cache/qemu/usr/bin/qemu-system-aarch64
qemu_libs=$cache/qemu/usr/lib/x86_64-linux-gnu:$cache/qemu/lib/x86_64-linux-gnu

# qemu-system-arm's libraries this machine lacks: each library package it (or a library
# package unpacked for it) depends on and that is not installed here, until ldd finds all.
installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
library_depends() {
    dpkg-deb -f "$1" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//; s/ //g' | grep '^lib' || true
}
declare -A seen=()
queue=$(library_depends "$(fetch_deb "$cache/debs" "$(part qemu | cut -d' ' -f1)")")
while [ -n "$queue" ]; do
    next=""
    for package in $queue; do
        [ -z "${seen[$package]:-}" ] || continue
        seen[$package]=1
        installed "$package" && continue
        deb=$(fetch_deb "$cache/debs" "$package")
        if [ ! -f "$cache/qemu/.parsec-lib-$package" ]; then
            dpkg-deb -x "$deb" "$cache/qemu"
            touch "$cache/qemu/.parsec-lib-$package"
        fi
        next="$next $(library_depends "$deb")"
    done
    queue=$next
done
missing=$(LD_LIBRARY_PATH=$qemu_libs ldd "$qemu_bin" | awk '/not found/ { print $1 }')
if [ -n "$missing" ]; then
    echo "qemu-tests/run.sh: qemu-system-aarch64 still lacks: $missing" >&2
    exit 1
fi
echo "   $(LD_LIBRARY_PATH=$qemu_libs "$qemu_bin" --version | head -n1); kernel $kernel_version"

if [ -n "$rootfs" ]; then
    # shellcheck source=qemu-tests/image.sh
    . qemu-tests/image.sh
else
# ---------------------------------------------------------------------------------------
step "2/6 build (service and parsec-e2e for $target)"
bash cross/build.sh "$target" --no-check | sed -n 's/^   target/   target/p'
(
    # shellcheck source=cross/env.sh
    . cross/env.sh "$target" "$sysroot"
    cargo build --release --locked --quiet --target "$target" -p parsec-e2e
)
service_bin=target/$target/release/parsec
e2e_bin=target/$target/release/parsec-e2e
[ -x "$e2e_bin" ] || { echo "qemu-tests/run.sh: $e2e_bin was not built" >&2; exit 1; }
echo "   $e2e_bin: $(stat -c %s "$e2e_bin") bytes"

# ---------------------------------------------------------------------------------------
step "3/6 initramfs (board $board)"
rm -rf "$out"
mkdir -p "$out/rootfs"
root=$out/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/parsec,etc/parsec-board,proc,sys,dev,run,tmp,var/lib,var/log,root}
cp "$cache/busybox/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"   # /init's interpreter; /init installs the other applets
install -m 0755 qemu-tests/guest/init "$root/init"
install -m 0755 "$service_bin" "$root/usr/bin/parsec"
install -m 0755 "$e2e_bin" "$root/usr/bin/parsec-e2e"
install -m 0644 "$board/config.toml" "$root/etc/parsec/config.toml"
install -m 0644 "$board/modules" "$root/etc/parsec-board/modules"
install -D -m 0755 sysvinit/parsec "$root/etc/init.d/parsec"

# Shared libraries: what each ELF file needs (DT_NEEDED), found in the sysroot, recursively;
# plus the TPM device TCTI, which tpm2-tss's loader opens at run time.
lib_dirs=("$sysroot/lib/aarch64-linux-gnu" "$sysroot/usr/lib/aarch64-linux-gnu")
declare -A copied=()
copy_needed() {
    local needed name dir found
    needed=$(LC_ALL=C readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    for name in $needed; do
        [ -z "${copied[$name]:-}" ] || continue
        found=""
        for dir in "${lib_dirs[@]}"; do
            if [ -e "$dir/$name" ]; then found=$dir/$name; break; fi
        done
        [ -n "$found" ] || { echo "qemu-tests/run.sh: $name (needed by $(basename "$1")) is not in $sysroot" >&2; exit 1; }
        copied[$name]=1
        mkdir -p "$root/usr/lib/aarch64-linux-gnu"
        cp -L "$found" "$root/usr/lib/aarch64-linux-gnu/$name"
        copy_needed "$found"
    done
}
copy_needed "$service_bin"
copy_needed "$e2e_bin"
tcti=libtss2-tcti-device.so.0
cp -L "$sysroot/usr/lib/aarch64-linux-gnu/$tcti" "$root/usr/lib/aarch64-linux-gnu/$tcti"
copy_needed "$root/usr/lib/aarch64-linux-gnu/$tcti"
mkdir -p "$root/lib"
cp -L "$sysroot/lib/ld-linux-aarch64.so.1" "$root/lib/ld-linux-aarch64.so.1"

# The board's kernel options, against the kernel that boots: =m is met by =y, and =y by =m
# when the board's modules file loads that module (the initramfs has no udev).
kernel_config=$cache/kernel/boot/config-$kernel_version
module_for() {
    # CONFIG_TCG_TIS_CORE -> tpm_tis_core.ko (the TPM drivers' Kconfig prefix is TCG_).
    local name
    name=$(echo "${1#CONFIG_}" | tr '[:upper:]' '[:lower:]' | sed 's/^tcg_/tpm_/')
    grep -q "/$name\.ko\$" "$board/modules"
}
while IFS="=" read -r option wanted; do
    have=$(sed -n "s/^$option=//p" "$kernel_config")
    if [ "$have" = "$wanted" ] || { [ "$wanted" = m ] && [ "$have" = y ]; } ||
        { [ "$wanted" = y ] && [ "$have" = m ] && module_for "$option"; }; then
        continue
    fi
    echo "qemu-tests/run.sh: $board/kernel.cfg wants $option=$wanted; kernel $kernel_version has '${have:-not set}'" >&2
    exit 1
done < <(grep -v '^\s*\(#\|$\)' "$board/kernel.cfg")
echo "   kernel options: $(grep -cv '^\s*\(#\|$\)' "$board/kernel.cfg") from $board/kernel.cfg met by $kernel_version"

# The board's kernel modules, from the kernel package.
grep -v '^\s*\(#\|$\)' "$board/modules" | while read -r module; do
    mkdir -p "$root/lib/modules/$kernel_version/$(dirname "$module")"
    cp "$cache/kernel/lib/modules/$kernel_version/$module" "$root/lib/modules/$kernel_version/$module"
done

# Users and groups as the packages (Yocto, Buildroot) create them: the service's own user,
# in tss for /dev/tpmrm0; parsec-clients may use the socket; app is an application.
cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
parsec:x:990:990:Parsec service:/var/lib/parsec:/bin/false
app:x:1000:1000:An application:/tmp:/bin/sh
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
tss:x:991:parsec
parsec:x:990:
parsec-clients:x:992:app
app:x:1000:
EOF
printf 'root:*::0:99999:7:::\nparsec:!::0:99999:7:::\napp:!::0:99999:7:::\n' > "$root/etc/shadow"
chmod 0600 "$root/etc/shadow"

initramfs=$out/initramfs.cpio.gz
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 | gzip -1 > "$initramfs")
echo "   $initramfs: $(stat -c %s "$initramfs") bytes ($(find "$root/usr/lib" -name '*.so*' | wc -l) libraries, $(grep -cv '^\s*\(#\|$\)' "$board/modules") modules)"

# ---------------------------------------------------------------------------------------
step "4/6 disk and TPM state (fresh)"
disk=$out/disk.img
truncate -s 64M "$disk"
mkfs.ext4 -q -F -L parsec-var-lib "$disk"
mkdir -p "$out/tpm-state"
echo "   $disk (ext4, 64 MiB, sparse), swtpm state in $out/tpm-state"
fi

swtpm_pid=""
# shellcheck disable=SC2317 # run by the trap
cleanup() { [ -z "$swtpm_pid" ] || kill "$swtpm_pid" 2>/dev/null || true; }
trap cleanup EXIT

# start_swtpm NAME: swtpm on the kept state for one boot (log swtpm-NAME.log); it exits when
# QEMU disconnects (--terminate), as a device keeps its TPM across reboots.
start_swtpm() {
    rm -f "$out/swtpm.sock"
    swtpm socket --tpm2 --tpmstate "dir=$out/tpm-state" \
        --ctrl "type=unixio,path=$out/swtpm.sock" --terminate \
        --log "file=$out/swtpm-$1.log" &
    swtpm_pid=$!
    local i=0
    while [ ! -S "$out/swtpm.sock" ]; do
        i=$((i + 1))
        [ "$i" -le 100 ] || { echo "qemu-tests/run.sh: swtpm did not start (see $out/swtpm-$1.log)" >&2; return 1; }
        sleep 0.05
    done
}

# guest_command KERNEL-ARGS...: the QEMU command line of the appliance (TPM, disk) into the
# array guest (env execs QEMU, so a background guest's $! is QEMU's PID).
# shellcheck disable=SC2054 # QEMU's option values are comma-separated
guest_command() {
    guest=(env "LD_LIBRARY_PATH=$qemu_libs" "$qemu_bin"
        -M virt -cpu cortex-a57 -m 512 -nographic -no-reboot -nic none
        -kernel "$kernel" -initrd "$initramfs"
        -append "console=ttyAMA0 quiet loglevel=3 panic=-1 $*"
        -chardev "socket,id=chrtpm,path=$out/swtpm.sock"
        -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis-device,tpmdev=tpm0
        -drive "file=$disk,format=raw,if=none,id=data" -device virtio-blk-device,drive=data)
}

# boot N MODE: starts swtpm on the kept state, boots the guest, shows its steps as they come.
boot() {
    local n=$1 mode=$2 log=$out/boot-$1.log boot_started status line
    boot_started=$(date +%s%N)
    start_swtpm "$n"
    guest_command "parsec_e2e=$mode"
    set +e +o pipefail
    timeout "$limit" "${guest[@]}" < /dev/null 2>&1 | while IFS= read -r line; do
            line=${line%$'\r'}
            printf '%s\n' "$line" >> "$log"
            case "$line" in
                "PARSEC-E2E step="*)
                    awk -v b="$n" -v t="$(elapsed "$boot_started")" '{
                        name = $2; sub(/^step=/, "", name); result = $3; sub(/^result=/, "", result)
                        ms = $4; sub(/^ms=/, "", ms); detail = substr($0, index($0, " detail=") + 8)
                        printf "   boot %s %6s s  %-24s %-4s %6s ms  %s\n", b, t, name, result, ms, substr(detail, 1, 90)
                    }' <<< "$line" ;;
                "PARSEC-E2E summary"*|"PARSEC-E2E guest-done"*) echo "   boot $n ${line#PARSEC-E2E }" ;;
            esac
        done
    status=${PIPESTATUS[0]}
    set -e -o pipefail
    wait "$swtpm_pid" 2>/dev/null || true
    swtpm_pid=""
    if [ "$status" -eq 124 ]; then
        echo "   boot $n: no power-off within $limit s (console: $log)"
    fi
    echo "   boot $n: $(elapsed "$boot_started") s, qemu exit status $status, console log $log"
}

# The steps each boot must report, besides guest-done with failed=0.
required_first="boot modules tpm-device key-store-disk service-start connect ping list-providers create-ecc sign-verify-ecc verify-with-public-ecc create-rsa sign-verify-rsa create-rsa-enc encrypt-decrypt-rsa-enc encrypt-with-public-rsa-enc attestation destroy service-stop service-restart list-kept-keys still-signs-ecc still-signs-rsa still-decrypts-rsa-enc"
required_reboot="boot modules tpm-device key-store-disk service-start connect list-kept-keys saved-public-ecc still-signs-ecc saved-public-rsa still-signs-rsa saved-public-rsa-enc still-decrypts-rsa-enc service-stop"
if [ -n "$rootfs" ]; then
    # The image's init starts and stops the service; the initramfs loads the modules and
    # mounts the image (root-disk); the driver checks the device node and the running service.
    required_first="boot modules root-disk tpm-device service-start connect ping list-providers create-ecc sign-verify-ecc verify-with-public-ecc create-rsa sign-verify-rsa create-rsa-enc encrypt-decrypt-rsa-enc encrypt-with-public-rsa-enc attestation destroy service-restart list-kept-keys still-signs-ecc still-signs-rsa still-decrypts-rsa-enc service-stop"
    required_reboot="boot modules root-disk tpm-device service-start connect list-kept-keys saved-public-ecc still-signs-ecc saved-public-rsa still-signs-rsa saved-public-rsa-enc still-decrypts-rsa-enc service-stop"
fi
verdict() {
    local n=$1 mode=$2 required=$3 log=$out/boot-$1.log problems="" name
    grep -q "^PARSEC-E2E guest-done boot=$mode failed=0\$" "$log" || problems="$problems no 'guest-done failed=0';"
    if [ -n "$rootfs" ] && ! grep -q '^Starting parsec: OK$' "$log"; then
        problems="$problems the image's S50parsec did not print 'Starting parsec: OK';"
    fi
    if grep -q '^PARSEC-E2E step=.* result=fail' "$log"; then
        problems="$problems failed: $(grep '^PARSEC-E2E step=.* result=fail' "$log" | awk '{ sub(/^step=/, "", $2); printf "%s ", $2 }');"
    fi
    local missing=""
    for name in $required; do
        grep -q "^PARSEC-E2E step=$name result=pass " "$log" || missing="$missing $name"
    done
    [ -z "$missing" ] || problems="$problems $(wc -w <<< "$missing") required steps did not pass (${missing:1:120});"
    printf 'boot=%s mode=%s steps=%s failed=%s result=%s\n' "$n" "$mode" \
        "$(grep -c '^PARSEC-E2E step=' "$log")" "$(grep -c '^PARSEC-E2E step=.* result=fail' "$log")" \
        "$([ -z "$problems" ] && echo pass || echo fail)" >> "$out/result.txt"
    if [ -n "$problems" ]; then
        echo "   boot $n FAILED:$problems (console: $log)"
        return 1
    fi
}

# powercut_boot N: boots in power-cut mode, and pulls the plug at a random moment of the churn.
powercut_boot() {
    local n=$1 log=$out/cut-$1.log qemu_pid i delay
    rm -f "$log"
    start_swtpm "cut-$n"
    guest_command "parsec_e2e=powercut parsec_cut=$n"
    "${guest[@]}" < /dev/null > "$log" 2>&1 &
    qemu_pid=$!
    i=0
    while ! grep -q '^PARSEC-CUT churn-started' "$log" && kill -0 "$qemu_pid" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -le 1200 ] || break
        sleep 0.05
    done
    delay=$(( RANDOM % 2700 + 300 ))
    sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
    kill -KILL "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    wait "$swtpm_pid" 2>/dev/null || true
    swtpm_pid=""
    printf '   boot %2d: %s kept keys listed, power cut %4d ms into the churn after %s acknowledged operations\n' "$n" \
        "$(grep -c '^PARSEC-CUT have ' "$log")" "$delay" "$(grep -c '^PARSEC-CUT ack ' "$log")"
}

if [ "$cuts" -gt 0 ]; then
    seed=${PARSEC_CUT_SEED:-$$}
    RANDOM=$seed
    step "5/6 power cuts: $cuts cuts, $((cuts + 1)) boots on one disk and TPM state (seed $seed)"
    logs=()
    for n in $(seq 0 "$cuts"); do
        powercut_boot "$n"
        logs+=("$out/cut-$n.log")
    done
    step "6/6 check every boot's keys against what was acknowledged before each cut"
    status=0
    python3 qemu-tests/powercut-check.py "${logs[@]}" || status=1
    step_started=$started
    echo "== qemu-tests power cuts: $([ "$status" -eq 0 ] && echo PASS || echo FAIL) in $(elapsed "$started") s (consoles: $out/cut-N.log)"
    exit "$status"
fi

: > "$out/result.txt"
overall=0
step "5/6 boot 1: start the service, run the end-to-end check, restart, check the keys"
boot 1 first
verdict 1 first "$required_first" || overall=1

step "6/6 boot 2 (reboot: same TPM state, same disk): the first boot's keys still sign"
if [ "$overall" -eq 0 ]; then
    boot 2 reboot
    verdict 2 reboot "$required_reboot" || overall=1
else
    echo "   skipped: boot 1 failed"
    echo "boot=2 mode=reboot steps=0 failed=0 result=not-run" >> "$out/result.txt"
fi
step_started=$started
total=$(elapsed "$started")
echo "== qemu-tests: $([ "$overall" -eq 0 ] && echo PASS || echo FAIL) in $total s (results: $out/result.txt)"
sed 's/^/   /' "$out/result.txt"
exit "$overall"
