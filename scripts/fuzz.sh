#!/usr/bin/env bash
# Fuzzes one target in-process for SECONDS (default 60):
#   scripts/fuzz.sh [SECONDS] [TARGET]
# TARGET front_end (the default; fuzz/fuzz_targets/front_end.rs, starting from one real
# request per opcode made by parsec-seeds), key_store_entry (the entry decoder) or
# upstream_sqlite (the reader of upstream's SQLite store, starting from a real one). Needs the
# pinned nightly toolchain ($FUZZ_TOOLCHAIN, default below) and cargo-fuzz; .ci/run installs
# both. A crash, a panic, a leak or an allocation over the RSS limit fails the run; the input
# that caused it is left in fuzz/artifacts/TARGET/. Prints executions per second at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
target="${2:-front_end}"
toolchain="${FUZZ_TOOLCHAIN:-nightly-2026-10-01}"
corpus="$PWD/fuzz/corpus/$target"  # absolute: the provider changes the working directory
mkdir -p "$corpus"
if [ "$target" = front_end ]; then
    cargo run -q -p parsec-bench --bin parsec-seeds --locked -- "$corpus"
elif [ "$target" = upstream_sqlite ]; then
    # A real upstream 1.5.0 database to start from (the SQLite fixture).
    cp service/tests/fixtures/upstream-1.5.0/sqlite-mixed/kim-mappings/sqlite/sqlite-key-info-manager.sqlite3 \
        "$corpus/upstream-1.5.0.sqlite3"
fi
log=$(mktemp)
# The front_end target keeps its service's key store under $TMPDIR: one scratch directory
# per run, removed with the log.
scratch=$(mktemp -d)
trap 'rm -rf "$log" "$scratch"' EXIT
TMPDIR="$scratch" cargo "+$toolchain" fuzz run "$target" "$corpus" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=20 \
    -print_final_stats=1 2>&1 | tee "$log" | grep -E "^#[0-9]+ +(INITED|DONE|pulse)|ERROR|panicked|SUMMARY" || true
status=${PIPESTATUS[0]}
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")
echo "fuzz $target: ${runs:-?} executions in ${seconds} s (${rate:-?}/s), peak RSS ${rss:-?} MB, corpus $(find "$corpus" -type f | wc -l) inputs"
exit "$status"
