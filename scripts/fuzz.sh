#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for MINUTES minutes each (default 1), one process
# at a time, and prints executions and crashes per target. Not part of CI: CI replays the corpus
# on stable (vmm/tests/fuzz_corpus.rs). Needs the nightly toolchain and cargo-fuzz
# (`rustup toolchain install nightly`, `cargo install cargo-fuzz`).
#
#   scripts/fuzz.sh [MINUTES] [TARGET...]
#
# New inputs go to fuzz/corpus-new/<target>/ (not committed), crashing ones to
# fuzz/artifacts/<target>/, the fuzzer's output to fuzz/logs/<target>.log. A crash found: fix the
# decoder (a typed error, never a panic), copy the input into fuzz/corpus/<target>/ and add a
# regression test next to the decoder.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

minutes=${1:-1}
shift || true
if ! [[ $minutes =~ ^[0-9]+$ ]] || [ "$minutes" -eq 0 ]; then
    echo "fuzz.sh: MINUTES must be a whole number of minutes (got '$minutes')" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs the nightly toolchain and cargo-fuzz:" >&2
    echo "  rustup toolchain install nightly && cargo install cargo-fuzz" >&2
    exit 2
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build -O --debug-assertions
mkdir -p logs
summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus-new/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    echo "== $t: $minutes min"
    status=ok
    # -jobs is not used: one fuzzing process, so that a 2-core machine stays usable.
    if ! cargo +nightly fuzz run -O --debug-assertions "$t" "corpus-new/$t" "corpus/$t" -- \
        -max_total_time=$((minutes * 60)) -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"logs/$t.log" 2>&1; then
        status=FAILED
        failed=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$' || true)
    after=$(find "artifacts/$t" -type f | wc -l)
    line=$(printf '%-16s %12s executions  %d new crash file(s)  %s' "$t" "${execs:-?}" $((after - before)) "$status")
    echo "$line"
    summary+=("$line")
done
echo
echo "== summary ($minutes min per target; logs in fuzz/logs/, crashes in fuzz/artifacts/)"
printf '%s\n' "${summary[@]}"
exit $failed
