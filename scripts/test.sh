#!/usr/bin/env bash
# Runs every test: unit tests, the end-to-end tests that start real VMMs on /dev/kvm, and the
# demo (README's first command) in its short form.
#
# A test whose prerequisite is missing (root, a tmpfs mount, huge pages, the Debian kernel
# package) fails under CI (CI=true); elsewhere it is recorded in $target/test-skips.txt, printed
# at the end of this script. Extra arguments go to `cargo test` (e.g. a test-name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Style and lints first: CI enforces them (the lint set is in the root Cargo.toml).
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --bins

target=${CARGO_TARGET_DIR:-${CARGO_BUILD_TARGET_DIR:-target}}
skips=$target/test-skips.txt
rm -f "$skips"

status=0
cargo test --release --workspace -- --test-threads=2 "$@" || status=$?

# The main job, short: two live updates of a 64 MiB memcheck guest, then its memory check.
if [ $# -eq 0 ]; then
    echo "--- scripts/demo.sh --quick" >&2
    scripts/demo.sh --quick || status=$?
fi

if [ -s "$skips" ]; then
    {
        echo
        echo "=== $(wc -l <"$skips") test(s) SKIPPED because a prerequisite is missing (under CI=true they fail):"
        sed 's/^/  /' "$skips"
    } >&2
fi
if [ "$status" -ne 0 ]; then
    echo "=== FAILED (exit status $status)" >&2
fi
exit "$status"
