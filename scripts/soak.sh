#!/usr/bin/env bash
# The soak (not part of CI; about 4 minutes here): 1,000 consecutive live updates of a memcheck,
# a heartbeat and a blkcheck VM (2 vCPUs each), alternating the two builds and the shim and
# direct paths, with memory, console, disk and resource checks every 50 updates and at the end.
# Extra arguments go to the soak binary (e.g. --updates 200, --guests memcheck, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run --release -p cpr-tests --bin soak -- "$@"
