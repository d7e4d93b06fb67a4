#!/usr/bin/env bash
# The main job: boot the built-in demo guest and live-update it several times through cpr-shim,
# printing the PID before and after, each update's blackout and the guest memory check.
#
#   scripts/demo.sh            # 5 updates of a 256 MiB guest
#   scripts/demo.sh --quick    # the short form scripts/test.sh runs: 2 updates, 64 MiB
#   scripts/demo.sh --help     # every option (--updates N, --memory SIZE, --keep, --verbose...)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bins
exec target/release/live-update-demo "$@"
