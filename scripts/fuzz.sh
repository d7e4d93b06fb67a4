#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for MINUTES minutes each (default 1), or until it
# has made N executions (--runs N; MINUTES, if also given, then caps the time), one process at a
# time, and prints executions and crashes per target. Not part of CI: CI replays the corpus
# on stable (vmm/tests/fuzz_corpus.rs). Needs the nightly toolchain and cargo-fuzz
# (`rustup toolchain install nightly`, `cargo install cargo-fuzz`).
#
#   scripts/fuzz.sh [--runs N] [--sanitizer none] [MINUTES] [TARGET...]
#
# The targets are built with overflow checks and AddressSanitizer (cargo-fuzz's default).
# `--sanitizer none` builds them without it (in fuzz/target/nosan/): 4 to 5 times the executions
# per CPU second. The decoders are safe Rust, where a memory error is a panic the fuzzer sees
# anyway; AddressSanitizer only adds checks for the unsafe code of std and dependencies.
# Runs are niced (nice -n 10): the fuzzer yields the CPU to builds and tests on the same machine.
#
# New inputs go to fuzz/corpus-new/<target>/ (not committed), crashing ones to
# fuzz/artifacts/<target>/, the fuzzer's output to fuzz/logs/<target>.log. A crash found: fix the
# decoder (a typed error, never a panic), copy the input into fuzz/corpus/<target>/ and add a
# regression test next to the decoder.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

runs=
if [ "${1:-}" = --runs ]; then
    runs=${2:-}
    if ! [[ $runs =~ ^[0-9]+$ ]] || [ "$runs" -eq 0 ]; then
        echo "fuzz.sh: --runs takes a whole number of executions (got '$runs')" >&2
        exit 2
    fi
    shift 2
fi
build=(-O --debug-assertions)
if [ "${1:-}" = --sanitizer ]; then
    case ${2:-} in
    address) ;;
    none) build+=(-s none --target-dir target/nosan) ;;
    *)
        echo "fuzz.sh: --sanitizer takes address or none (got '${2:-}')" >&2
        exit 2
        ;;
    esac
    shift 2
fi
if [[ ${1:-} =~ ^[0-9]+$ ]] || [ -z "$runs" ]; then
    minutes=${1:-1}
    shift || true
    if ! [[ $minutes =~ ^[0-9]+$ ]] || [ "$minutes" -eq 0 ]; then
        echo "fuzz.sh: MINUTES must be a whole number of minutes (got '$minutes')" >&2
        exit 2
    fi
    limits=(-max_total_time=$((minutes * 60)))
    what="$minutes min"
else
    limits=()
    what=
fi
if [ -n "$runs" ]; then
    limits+=(-runs="$runs")
    what="${what:+$what or }$runs executions"
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

nice -n 10 cargo +nightly fuzz build "${build[@]}"
mkdir -p logs
summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus-new/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    echo "== $t: $what"
    status=ok
    # -jobs is not used: one fuzzing process, so that a 2-core machine stays usable.
    start=$SECONDS
    if ! nice -n 10 cargo +nightly fuzz run "${build[@]}" "$t" "corpus-new/$t" "corpus/$t" -- \
        "${limits[@]}" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"logs/$t.log" 2>&1; then
        status=FAILED
        failed=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$' || true)
    after=$(find "artifacts/$t" -type f | wc -l)
    line=$(printf '%-16s %12s executions  %5d s  %d new crash file(s)  %s' "$t" "${execs:-?}" \
        $((SECONDS - start)) $((after - before)) "$status")
    echo "$line"
    summary+=("$line")
done
echo
echo "== summary ($what per target; logs in fuzz/logs/, crashes in fuzz/artifacts/)"
printf '%s\n' "${summary[@]}"
exit $failed
