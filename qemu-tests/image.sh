# shellcheck shell=bash disable=SC2154 # variables set by run.sh, which sources this
# Sourced by qemu-tests/run.sh for --rootfs PATH: steps 2-4 for an image built elsewhere
# (Buildroot's rootfs.tar, rootfs.ext2 or rootfs.ext4). Sets initramfs and disk for the boots.
# Uses from run.sh: rootfs, board, cache, out, kernel_version, step.

step "2/6 image ($rootfs)"
rm -rf "$out"
mkdir -p "$out"
image_root=$out/image-root
# Owners matter (the service's user, its config's group): as root, or under fakeroot, which
# then also makes the disk so the owners it recorded reach the file system.
as_owner=()
if [ "$(id -u)" -ne 0 ]; then
    command -v fakeroot >/dev/null || { echo "qemu-tests/run.sh: --rootfs needs root or fakeroot (file owners)" >&2; exit 1; }
    as_owner=(fakeroot -s "$out/fakeroot.state" -i "$out/fakeroot.state" --)
    : > "$out/fakeroot.state"
fi
mkdir -p "$image_root"
case "$rootfs" in
    *.tar|*.tar.gz|*.tar.xz) "${as_owner[@]}" tar -xf "$rootfs" -C "$image_root" ;;
    *.ext2|*.ext3|*.ext4) "${as_owner[@]}" debugfs -R "rdump / $image_root" "$rootfs" >/dev/null 2>&1 ;;
    *) echo "qemu-tests/run.sh: --rootfs $rootfs: a .tar or .ext2/3/4 image" >&2; exit 2 ;;
esac
for file in sbin/init etc/init.d/rcS etc/init.d/S50parsec usr/bin/parsec usr/bin/parsec-e2e etc/parsec/config.toml; do
    [ -e "$image_root/$file" ] || { echo "qemu-tests/run.sh: the image has no /$file" >&2; exit 1; }
done
grep -q '^parsec-clients:' "$image_root/etc/group" || { echo "qemu-tests/run.sh: the image has no group parsec-clients" >&2; exit 1; }
echo "   $(du -sh "$image_root" | cut -f1) unpacked; $(head -n1 "$image_root/etc/os-release" 2>/dev/null || echo 'no /etc/os-release'); init scripts: $(cd "$image_root/etc/init.d" && echo S??*)"
echo "   its parsec: $(stat -c %s "$image_root/usr/bin/parsec") bytes; config $(stat -c '%a uid %u gid %g' "$image_root/etc/parsec/config.toml" 2>/dev/null); $(sed -n '1p' "$image_root/etc/parsec/config.toml" | cut -c1-100)"

# The test's additions, nothing else: an application user in parsec-clients, and the driver
# that runs last among the init scripts. (The kernel's modules are loaded by the initramfs.)
# shellcheck disable=SC2016 # the script's own variables, expanded by the inner sh
"${as_owner[@]}" sh -eu -c '
    root=$1 driver=$2
    install -m 0755 "$driver" "$root/etc/init.d/S99parsec-e2e"
    grep -q "^app:" "$root/etc/passwd" || echo "app:x:1000:1000:An application:/tmp:/bin/sh" >> "$root/etc/passwd"
    grep -q "^app:" "$root/etc/group" || echo "app:x:1000:" >> "$root/etc/group"
    [ ! -f "$root/etc/shadow" ] || grep -q "^app:" "$root/etc/shadow" || echo "app:!::0:99999:7:::" >> "$root/etc/shadow"
    sed -i "s/^\(parsec-clients:[^:]*:[^:]*:\)\(.\+\)$/\1\2,app/; s/^\(parsec-clients:[^:]*:[^:]*:\)$/\1app/" "$root/etc/group"
' sh "$image_root" qemu-tests/guest/rootfs-e2e
echo "   added: user app ($(grep '^parsec-clients:' "$image_root/etc/group")), /etc/init.d/S99parsec-e2e"

step "3/6 initramfs (board $board modules, then the image's /sbin/init)"
ramfs=$out/initramfs-root
mkdir -p "$ramfs"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,newroot,etc/parsec-board}
cp "$cache/busybox/bin/busybox" "$ramfs/bin/busybox"
ln -s busybox "$ramfs/bin/sh"
install -m 0755 qemu-tests/guest/rootfs-init "$ramfs/init"
install -m 0644 "$board/modules" "$ramfs/etc/parsec-board/modules"
grep -v '^\s*\(#\|$\)' "$board/modules" | while read -r module; do
    mkdir -p "$ramfs/lib/modules/$kernel_version/$(dirname "$module")"
    cp "$cache/kernel/lib/modules/$kernel_version/$module" "$ramfs/lib/modules/$kernel_version/$module"
done
initramfs=$out/initramfs.cpio.gz
(cd "$ramfs" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 | gzip -1 > "$initramfs")
echo "   $initramfs: $(stat -c %s "$initramfs") bytes"

step "4/6 disk (the image, as ext4) and TPM state (fresh)"
disk=$out/disk.img
size_mb=$(( $(du -sm "$image_root" | cut -f1) * 2 + 64 ))
truncate -s "${size_mb}M" "$disk"
"${as_owner[@]}" mkfs.ext4 -q -F -L rootfs -d "$image_root" "$disk"
mkdir -p "$out/tpm-state"
echo "   $disk (ext4, $size_mb MiB, sparse), swtpm state in $out/tpm-state"
