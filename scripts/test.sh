#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the end-to-end tests (the real daemon
# on real sockets, driven by parsec-client and parsec-tool). Run scripts/install-deps.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build without the software provider (feature gating)"
cargo check -p parsec-service --no-default-features --locked
echo "== cargo test"
cargo test --workspace --locked
