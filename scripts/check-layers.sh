#!/usr/bin/env bash
# Checks what OEMs add to their BSP without a Yocto or Buildroot build (which cannot run
# here): meta-parsec (crate list vs Cargo.lock, oelint-adv, pyflakes, the kas file against
# kas's schema) and buildroot-ext (kconfiglib: Config.in and every defconfig line). The
# config filter both install with is checked by board-configs/check.sh.
# scripts/install-deps.sh installs the Python tools.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "-- meta-parsec: crate list against Cargo.lock"
python3 meta-parsec/scripts/parsec-crates.py check

echo "-- meta-parsec: oelint-adv (errors fail; warnings shown)"
mapfile -t recipes < <(find meta-parsec -name '*.bb' -o -name '*.bbappend' -o -name '*.inc' | sort)
report=$(oelint-adv --quiet --suppress oelint.vars.homepageping "${recipes[@]}" 2>&1 || true)
echo "$report" | grep -v ':info:' || true
errors=$(echo "$report" | grep -c ':error:' || true)
echo "   ${#recipes[@]} files, $errors errors"
[ "$errors" -eq 0 ]
# What oelint-adv does not look at: old override syntax and PACKAGECONFIG field counts.
if grep -nE '^[A-Za-z_]+_(append|prepend|remove)\b|_\$\{PN\}' "${recipes[@]}"; then
    echo "meta-parsec: old override syntax (use ':')" >&2
    exit 1
fi
if grep -hE '^PACKAGECONFIG\[' "${recipes[@]}" | awk -F'"' '{ n = split($2, f, ","); if (n > 6) { print; bad = 1 } } END { exit bad }'; then :; else
    echo "meta-parsec: a PACKAGECONFIG entry has more than six fields" >&2
    exit 1
fi

echo "-- meta-parsec: pyflakes"
pyflakes meta-parsec/lib meta-parsec/scripts scripts/licences.py buildroot-ext/check.py board-configs/check-select-providers.py qemu-tests/powercut-check.py

echo "-- meta-parsec: kas file against kas's schema"
python3 - <<'PY'
import json, os, yaml, jsonschema, kas
schema = json.load(open(os.path.join(os.path.dirname(kas.__file__), "schema-kas.json")))
for name in sorted(os.listdir("meta-parsec/kas")):
    path = os.path.join("meta-parsec/kas", name)
    jsonschema.validate(yaml.safe_load(open(path)), schema)
    print("   %s: valid" % path)
PY

echo "-- release: one version and the pinned commit across the .deb, the recipe and the Buildroot package; licences"
bash scripts/release.sh check

echo "-- buildroot-ext: kconfiglib"
python3 buildroot-ext/check.py
