#!/usr/bin/env bash
# Checks every board directory: the files a board must have, and its config.toml with the
# service's own parser (`parsec --check-config`, built with every provider). To prove the
# check can fail, each config is also checked with an unknown key added and with a syntax
# error; both must be refused. Then board-configs/select-providers (the filter the Yocto
# recipe and the Buildroot package install each config through) for every set of built
# providers: board-configs/check-select-providers.py.
#
#   board-configs/check.sh [PARSEC-BINARY]     (default: target/debug/parsec, all features)
set -euo pipefail
cd "$(dirname "$0")/.."
parsec=${1:-target/debug/parsec}
if [ -z "${1:-}" ]; then
    cargo build -q -p parsec-service --all-features --locked
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
boards=0
for dir in board-configs/*/; do
    dir=${dir%/}
    board=$(basename "$dir")
    boards=$((boards + 1))
    for file in config.toml README.md kernel.cfg modules; do
        if [ ! -f "$dir/$file" ]; then
            echo "board $board: no $file" >&2
            status=1
        fi
    done
    if ! out=$("$parsec" --check-config "$dir/config.toml" 2>&1); then
        echo "board $board: $out" >&2
        status=1
        continue
    fi
    echo "board $board: $out"
    # Must be refused: an unknown key in [core_settings] ...
    sed 's/^\[core_settings\]$/[core_settings]\nno_such_setting = true/' "$dir/config.toml" > "$scratch/unknown.toml"
    if "$parsec" --check-config "$scratch/unknown.toml" > "$scratch/out" 2>&1; then
        echo "board $board: an unknown key was accepted" >&2
        status=1
    fi
    # ... and a line that is not TOML.
    { cat "$dir/config.toml"; echo 'this line = is not toml = at all'; } > "$scratch/syntax.toml"
    if "$parsec" --check-config "$scratch/syntax.toml" > "$scratch/out" 2>&1; then
        echo "board $board: a syntax error was accepted" >&2
        status=1
    fi
    # Every kernel.cfg line is an option assignment.
    if grep -v '^\s*\(#\|$\)' "$dir/kernel.cfg" | grep -qv '^CONFIG_[A-Z0-9_]*=\(y\|m\|"[^"]*"\|[0-9]*\)$'; then
        echo "board $board: kernel.cfg has a line that is not CONFIG_X=value" >&2
        status=1
    fi
done
echo "board-configs: $boards boards checked, $([ "$status" -eq 0 ] && echo all valid || echo FAILED)"
# What meta-parsec and buildroot-ext install: each config with only the providers built.
python3 board-configs/check-select-providers.py "$parsec" || status=1
exit "$status"
