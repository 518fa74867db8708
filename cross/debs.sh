# shellcheck shell=bash
# Sourced, not run: Debian packages downloaded once, kept, and checked before each reuse.
# Used by cross/build.sh (sysroots) and qemu-tests/run.sh (the QEMU appliance).
#
#   apt_update                 apt-get update, retried (as root or through sudo)
#   fetch_deb DIR PACKAGE[:ARCH]
#                              prints the path of the package's .deb in DIR, downloading it
#                              first unless DIR holds one whose SHA-256 matches DIR/SHA256SUMS

debs_sudo=""
if [ "$(id -u)" -ne 0 ]; then debs_sudo="sudo"; fi

# A mirror caught mid-sync fails one index now and then: retry, then go on with what apt
# has (a package that is really missing fails clearly at its download).
apt_update() {
    local try
    for try in 1 2 3; do
        if $debs_sudo apt-get update -q >/dev/null; then return 0; fi
        sleep $((try * 5))
    done
    echo "   warning: apt-get update reported errors; going on with the package lists it has" >&2
}

fetch_deb() {
    local dir=$1 package=$2 name file
    name=${package%%:*}
    mkdir -p "$dir"
    touch "$dir/SHA256SUMS"
    for file in "$dir/${name}"_*.deb; do
        [ -f "$file" ] || continue
        if grep -q "  $(basename "$file")\$" "$dir/SHA256SUMS" &&
            (cd "$dir" && grep "  $(basename "$file")\$" SHA256SUMS | sha256sum --check --status); then
            echo "$file"
            return 0
        fi
        rm -f "$file"
    done
    (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$package" >/dev/null) || {
        echo "fetch_deb: apt-get download $package failed" >&2
        return 1
    }
    file=$(find "$dir" -maxdepth 1 -name "${name}_*.deb" | head -n1)
    grep -v "  $(basename "$file")\$" "$dir/SHA256SUMS" > "$dir/SHA256SUMS.new" || true
    (cd "$dir" && sha256sum "$(basename "$file")") >> "$dir/SHA256SUMS.new"
    mv "$dir/SHA256SUMS.new" "$dir/SHA256SUMS"
    echo "   downloaded $(basename "$file")" >&2
    echo "$file"
}
