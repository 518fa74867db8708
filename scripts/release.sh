#!/usr/bin/env bash
# One version, set once (Cargo.toml's [workspace.package] version), carried by every package:
#
#   scripts/release.sh check          # CI: the .deb, the Yocto recipe and the Buildroot
#                                     # package agree with it and with the release commit
#   scripts/release.sh tarball        # dist/parsec-service-VERSION.tar.gz, from the commit
#                                     # the recipe pins (byte-identical every time)
#   scripts/release.sh pin COMMIT     # after the release commit: pin the recipe to it and
#                                     # record its tarball's sha256 in the Buildroot .hash
#   scripts/release.sh all            # tarball, .debs (scripts/check-debs.sh), SHA256SUMS
#   scripts/release.sh deb-version    # the .debs' version for this tree (a +git snapshot
#                                     # unless the tree is the pinned release)
#
# A release: set the version in Cargo.toml, add a debian/changelog entry and rename the
# recipe (parsec-service_VERSION.bb); commit; `scripts/release.sh pin HEAD` and
# `scripts/release.sh tarball`; run Buildroot's `make parsec-service-source` once without the
# .hash to get the vendored archive's sha256 (the download step makes it:
# buildroot-ext/README.md) and put it in the .hash; commit; `scripts/release.sh all`.
set -euo pipefail
cd "$(dirname "$0")/.."

recipe_dir=meta-parsec/recipes-security/parsec-service
br_mk=buildroot-ext/package/parsec-service/parsec-service.mk
br_hash=buildroot-ext/package/parsec-service/parsec-service.hash

# The workspace version of the Cargo.toml on stdin.
workspace_version() {
    python3 -c 'import sys, tomllib; print(tomllib.loads(sys.stdin.read())["workspace"]["package"]["version"])'
}
version=$(workspace_version < Cargo.toml)
recipe=$recipe_dir/parsec-service_$version.bb
pinned() { sed -n 's/^PARSEC_SRCREV ??= "\([0-9a-f]\{40\}\)"$/\1/p' "$recipe"; }
tarball_name=parsec-service-$version.tar.gz

# The .deb version for this tree: the changelog's when the tree is the pinned release commit
# (the pin files aside), else a snapshot above it: UPSTREAM+gitN.COMMIT-REVISION, N commits
# after the release (a .deb built from main between releases must not claim the release).
deb_version() {
    local base commit n
    base=$(dpkg-parsechangelog -l debian/changelog -S Version)
    commit=$(pinned)
    if [ -n "$commit" ] && git cat-file -e "$commit^{commit}" 2>/dev/null &&
        git diff --quiet "$commit" HEAD -- . ":(exclude)$recipe_dir" ":(exclude)$br_hash" &&
        git diff --quiet HEAD -- .; then
        echo "$base"
        return
    fi
    n=$(git rev-list --count "${commit:-HEAD}..HEAD" 2>/dev/null || echo 0)
    echo "${base%-*}+git$n.$(git rev-parse --short=8 HEAD)-${base##*-}"
}

make_tarball() { # commit output
    git archive --format=tar --prefix="parsec-service-$version/" "$1" | gzip -n -9 > "$2"
}

fail() { echo "release: $*" >&2; exit 1; }

check() {
    local deb_version
    deb_version=$(dpkg-parsechangelog -l debian/changelog -S Version 2>/dev/null ||
        sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog)
    [ "${deb_version%-*}" = "$version" ] ||
        fail "debian/changelog is at ${deb_version%-*}, Cargo.toml at $version: add a changelog entry"
    echo "   version $version: Cargo.toml, debian/changelog ($deb_version)"

    [ -f "$recipe" ] || fail "no $recipe: rename the recipe to the version"
    local others
    others=$(find "$recipe_dir" -name 'parsec-service_*.bb' ! -name "parsec-service_$version.bb")
    [ -z "$others" ] || fail "old recipes beside $recipe: $others"
    ! grep -q '^PV' "$recipe" || fail "$recipe sets PV: the file name carries it"
    local commit
    commit=$(pinned)
    [ -n "$commit" ] || fail "$recipe pins no commit (PARSEC_SRCREV ??= \"<40 hex digits>\"); AUTOREV is opt-in only"
    git cat-file -e "$commit^{commit}" 2>/dev/null ||
        fail "the pinned commit $commit is not in this clone (a shallow clone? fetch the history)"
    git merge-base --is-ancestor "$commit" HEAD || fail "the pinned commit $commit is not on this branch"
    local at_commit
    at_commit=$(git show "$commit:Cargo.toml" | workspace_version)
    [ "$at_commit" = "$version" ] || fail "the pinned commit $commit is version $at_commit, not $version"
    echo "   Yocto: $recipe pins ${commit:0:12} (version $at_commit)"

    grep -qx "PARSEC_SERVICE_VERSION = $version" "$br_mk" || fail "$br_mk: PARSEC_SERVICE_VERSION is not $version"
    # shellcheck disable=SC2016 # make's $(...), literally
    grep -qx 'PARSEC_SERVICE_SOURCE = parsec-service-$(PARSEC_SERVICE_VERSION).tar.gz' "$br_mk" ||
        fail "$br_mk: PARSEC_SERVICE_SOURCE is not the release tarball"
    local tmp recorded actual
    tmp=$(mktemp)
    make_tarball "$commit" "$tmp"
    actual=$(sha256sum "$tmp" | cut -d' ' -f1)
    rm -f "$tmp"
    recorded=$(awk -v f="$tarball_name" '$1 == "#" && $2 == "sha256" && $4 == f { print $3 }' "$br_hash")
    [ "$recorded" = "$actual" ] || fail "$br_hash records ${recorded:-nothing} for $tarball_name; git archive of ${commit:0:12} gives $actual"
    local vendored
    vendored=$(awk -v f="$tarball_name" '$1 == "sha256" && $3 == f { print $2 }' "$br_hash")
    if [ -z "$vendored" ] || [ "$vendored" = "$actual" ]; then
        fail "$br_hash has no hash for the vendored $tarball_name (what Buildroot's download step makes and checks: run make parsec-service-source)"
    fi
    echo "   Buildroot: $version, $tarball_name sha256 $actual = git archive of the pinned commit"
    if [ -f "dist/$tarball_name" ]; then
        [ "$(sha256sum "dist/$tarball_name" | cut -d' ' -f1)" = "$actual" ] || fail "dist/$tarball_name differs from the pinned commit's"
    fi
    for deb in dist/parsec-edge_*.deb; do
        [ -f "$deb" ] || continue
        local v
        v=$(dpkg-deb -f "$deb" Version)
        case "$v" in "$version"-* | "$version"+git*) ;; *) fail "$deb is version $v, not $version-* (or a $version+git snapshot)" ;; esac
    done
    python3 scripts/licences.py check
}

case "${1:-check}" in
    check) check ;;
    deb-version) deb_version ;;
    tarball)
        commit=$(pinned)
        [ -n "$commit" ] || fail "$recipe pins no commit"
        mkdir -p dist
        make_tarball "$commit" "dist/$tarball_name"
        echo "dist/$tarball_name: $(sha256sum "dist/$tarball_name" | cut -d' ' -f1) (${commit:0:12})"
        ;;
    pin)
        [ $# -eq 2 ] || fail "usage: scripts/release.sh pin COMMIT"
        commit=$(git rev-parse --verify "$2^{commit}")
        sed -i "s/^PARSEC_SRCREV ??= \".*\"$/PARSEC_SRCREV ??= \"$commit\"/" "$recipe"
        tmp=$(mktemp)
        make_tarball "$commit" "$tmp"
        sum=$(sha256sum "$tmp" | cut -d' ' -f1)
        rm -f "$tmp"
        # Commented: Buildroot checks the vendored archive; this line is for the check above.
        sed -i "/^# sha256 [0-9a-f]\{64\} parsec-service-.*\.tar\.gz$/d" "$br_hash"
        sed -i "4i # sha256 $sum $tarball_name" "$br_hash"
        echo "pinned ${commit:0:12}; $tarball_name sha256 $sum"
        ;;
    all)
        [ "$(deb_version)" = "$(dpkg-parsechangelog -S Version)" ] ||
            fail "this tree is not the pinned release commit $(pinned) (the .debs would be $(deb_version)): pin it first"
        "$0" tarball
        bash scripts/check-debs.sh
        (cd dist && sha256sum "$tarball_name" parsec-edge_"$version"-*.deb > SHA256SUMS && cat SHA256SUMS)
        check
        ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
esac
