#!/usr/bin/env bash
# Fuzzes the front end in-process (fuzz/fuzz_targets/front_end.rs) for SECONDS (default 60),
# starting from one real request per opcode (made by parsec-seeds). Needs the nightly
# toolchain and cargo-fuzz (`rustup toolchain install nightly; cargo install cargo-fuzz`).
# A crash, a panic, a leak or an allocation over the RSS limit fails the run; the input that
# caused it is left in fuzz/artifacts/front_end/. Prints executions per second at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
corpus="$PWD/fuzz/corpus/front_end"  # absolute: the provider changes the working directory
mkdir -p "$corpus"
cargo run -q -p parsec-bench --bin parsec-seeds --locked -- "$corpus"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo +nightly fuzz run front_end "$corpus" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=20 \
    -print_final_stats=1 2>&1 | tee "$log" | grep -E "^#[0-9]+ +(INITED|DONE|pulse)|ERROR|panicked|SUMMARY" || true
status=${PIPESTATUS[0]}
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")
echo "fuzz: ${runs:-?} executions in ${seconds} s (${rate:-?}/s), peak RSS ${rss:-?} MB, corpus $(find "$corpus" -type f | wc -l) inputs"
exit "$status"
