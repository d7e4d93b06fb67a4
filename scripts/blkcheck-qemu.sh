#!/usr/bin/env bash
# Runs the blkcheck virtio-blk driver guest (vmm/guests/blkcheck.S, bzImage flavour) against
# QEMU's own virtio-blk-pci (modern only), then checks the disk image on the host.
#
#   scripts/blkcheck-qemu.sh [PASSES [DEPTH [DISK_MIB]]]     defaults: 3 8 4
#
# Steps: assemble blkcheck.bzImage with GNU binutils; make a DISK_MIB MiB raw image; boot
#   qemu-system-x86_64 -m 64M -nographic -kernel blkcheck.bzImage
#       -append "blkcheck.passes=PASSES blkcheck.depth=DEPTH"
#       -drive file=disk.img,format=raw,if=none,id=d0
#       -device virtio-blk-pci,drive=d0,disable-legacy=on
#       -device isa-debug-exit,iobase=0x501,iosize=1
# with KVM (falling back to TCG if KVM cannot start), wait (polling the console, with a
# timeout, no fixed sleep) until the guest printed PASSES pass lines and exited; then run
# target/release/blkcheck-image (cargo builds it) on the image with the last completed pass.
#
# Environment: BLKCHECK_TIMEOUT (seconds, default 300), BLKCHECK_ACCEL (kvm or tcg; default:
# try kvm, then tcg), BLKCHECK_WORKDIR (default: a new temporary directory, removed on success),
# QEMU (default qemu-system-x86_64).
#
# Prints the guest's console, then one summary line:
#   blkcheck-qemu: ok accel A passes P requests R io-seconds S requests/s X wall-seconds W
# (io-seconds: from the guest's capacity line to its exit; wall-seconds include the boot)
# Exit status 0 if the guest completed PASSES passes without mismatch or I/O error and the image
# check passed, 1 otherwise, 2 if QEMU is not installed.
set -euo pipefail

PASSES=${1:-3}
DEPTH=${2:-8}
DISK_MIB=${3:-4}
TIMEOUT=${BLKCHECK_TIMEOUT:-300}
QEMU=${QEMU:-qemu-system-x86_64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GUESTS=$ROOT/vmm/guests

log() { printf 'blkcheck-qemu: %s\n' "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

command -v "$QEMU" >/dev/null 2>&1 || {
    log "$QEMU is not installed (Debian: apt-get install qemu-system-x86)"
    exit 2
}

if [[ -n ${BLKCHECK_WORKDIR:-} ]]; then
    WORK=$BLKCHECK_WORKDIR
    mkdir -p "$WORK"
    KEEP=1
else
    WORK=$(mktemp -d /tmp/blkcheck-qemu.XXXXXX)
    KEEP=0
fi
QEMU_PID=
cleanup() {
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# 1. The bzImage (the same commands as vmm/build.rs).
as --64 --defsym BZIMAGE=1 -I "$GUESTS" -o "$WORK/blkcheck-bz.o" "$GUESTS/blkcheck.S"
ld -m elf_x86_64 -nostdlib -static --build-id=none -T "$GUESTS/blkcheck-bz.ld" \
    -o "$WORK/blkcheck-bz.elf" "$WORK/blkcheck-bz.o"
objcopy -O binary "$WORK/blkcheck-bz.elf" "$WORK/blkcheck.bzImage"

# 2. The checker.
(cd "$ROOT" && cargo build --release --quiet -p cpr-tests --bin blkcheck-image)
CHECKER=$ROOT/target/release/blkcheck-image

# 3. A fresh disk.
rm -f "$WORK/disk.img"
truncate -s "${DISK_MIB}M" "$WORK/disk.img"

# 4. Boot; the guest exits through isa-debug-exit after PASSES passes: QEMU's status is then
#    (code << 1) | 1 with code 0 = clean, 0x22 = mismatches or I/O errors.
run_qemu() { # accel
    local accel=$1
    : >"$WORK/console.txt"
    "$QEMU" -accel "$accel" -m 64M -nographic -no-reboot -monitor none \
        -kernel "$WORK/blkcheck.bzImage" \
        -append "blkcheck.passes=$PASSES blkcheck.depth=$DEPTH blkcheck.exit_code=0" \
        -drive "file=$WORK/disk.img,format=raw,if=none,id=d0" \
        -device virtio-blk-pci,drive=d0,disable-legacy=on \
        -device isa-debug-exit,iobase=0x501,iosize=1 \
        </dev/null >"$WORK/console.txt" 2>"$WORK/qemu-stderr.txt" &
    QEMU_PID=$!
    local start now
    start=$(date +%s.%N)
    STATUS=
    IO_START=
    while :; do
        # The workload starts right after the capacity line.
        if [[ -z $IO_START ]] && grep -q 'blkcheck: capacity' "$WORK/console.txt"; then
            IO_START=$(date +%s.%N)
        fi
        if ! kill -0 "$QEMU_PID" 2>/dev/null; then
            set +e
            wait "$QEMU_PID"
            STATUS=$?
            set -e
            QEMU_PID=
            break
        fi
        now=$(date +%s)
        if ((now - ${start%.*} > TIMEOUT)); then
            log "timeout after ${TIMEOUT}s"
            cleanup
            QEMU_PID=
            break
        fi
        sleep 0.2 # poll interval; the loop ends on the guest's exit or the timeout
    done
    now=$(date +%s.%N)
    ELAPSED=$(awk -v a="$start" -v b="$now" 'BEGIN { printf "%.2f", b - a }')
    IO_SECONDS=$(awk -v a="${IO_START:-$start}" -v b="$now" 'BEGIN { printf "%.2f", b - a }')
}

ACCELS=${BLKCHECK_ACCEL:-kvm tcg}
ACCEL=
for a in $ACCELS; do
    run_qemu "$a"
    if grep -q '^blkcheck: pci ' "$WORK/console.txt"; then
        ACCEL=$a
        break
    fi
    log "QEMU with -accel $a did not run the guest: $(head -c 300 "$WORK/qemu-stderr.txt")"
done
tr -d '\r' <"$WORK/console.txt" | grep '^blkcheck: ' || true
[[ -n $ACCEL ]] || die "QEMU did not boot the guest with any of: $ACCELS"

PASS_LINES=$(tr -d '\r' <"$WORK/console.txt" | grep -c '^blkcheck: pass [0-9]* done' || true)
LAST=$(tr -d '\r' <"$WORK/console.txt" | sed -n 's/^blkcheck: pass \([0-9]*\) done.*/\1/p' | tail -n1)
TOTAL=$(tr -d '\r' <"$WORK/console.txt" | sed -n 's/^blkcheck: pass .* total \([0-9]*\) .*/\1/p' | tail -n1)
LAST=${LAST:-0}
TOTAL=${TOTAL:-0}
if tr -d '\r' <"$WORK/console.txt" | grep -q '^blkcheck: MISMATCH'; then
    die "the guest saw mismatched sectors"
fi
if tr -d '\r' <"$WORK/console.txt" | grep -q '^blkcheck: \(FAILED\|I/O error\)'; then
    die "the guest reported a device failure or I/O errors"
fi
((PASS_LINES >= PASSES)) || die "only $PASS_LINES of $PASSES passes completed"
[[ ${STATUS:-} == 1 ]] || die "QEMU exited with status ${STATUS:-none}, expected 1 (guest exit code 0)"

"$CHECKER" "$WORK/disk.img" "$LAST" || die "the disk image check failed"

# Requests per second from the capacity line (the workload's start, seen within the 0.2 s poll
# interval) to the guest's exit after its last pass. (The guest's own tick counts are not a
# clock on a slow, nested host: the periodic LAPIC timer coalesces ticks there.)
RATE=$(awk -v r="$TOTAL" -v t="$IO_SECONDS" 'BEGIN { if (t > 0) printf "%.0f", r / t; else print "n/a" }')
echo "blkcheck-qemu: ok accel $ACCEL passes $LAST requests $TOTAL io-seconds $IO_SECONDS" \
    "requests/s $RATE wall-seconds $ELAPSED"
((KEEP)) || rm -rf "$WORK"
