#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests that start real VMMs on /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bins
cargo test --release --workspace -- --test-threads=2 "$@"
