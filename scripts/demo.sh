#!/usr/bin/env bash
# The main job: boot the built-in demo guest and live-update it several times through cpr-shim,
# printing the PID before and after, each update's blackout and the guest memory check.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bins
exec target/release/live-update-demo "$@"
