#!/usr/bin/env bash
# Runs the netcheck virtio-net driver guest (vmm/guests/netcheck.S, bzImage flavour) against
# QEMU's own virtio-net-pci (modern only) on a tap in a throw-away network namespace, with a
# host peer on an AF_PACKET socket that sends numbered frames and checks the echoes.
#
#   scripts/netcheck-qemu.sh [GUEST_FRAMES [HOST_FRAMES [HOST_RATE]]]     defaults: 500 400 200
#
# Needs root (network namespace, tap). The work is done by target/release/netcheck-qemu (cargo
# builds it; see tests/src/bin/netcheck-qemu.rs and tests/src/netcheck.rs): it assembles
# netcheck.bzImage with GNU binutils, creates the namespace and the tap, starts the peer, boots
#   ip netns exec NS qemu-system-x86_64 -accel kvm -m 64M -nographic -kernel netcheck.bzImage
#       -append "netcheck.frames=GUEST_FRAMES netcheck.exit_code=0"
#       -netdev tap,id=n0,ifname=TAP,script=no,downscript=no
#       -device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56
#       -device isa-debug-exit,iobase=0x501,iosize=1
# (falling back to TCG if KVM cannot start), waits for the guest's `netcheck: ready` and its
# exit (with a timeout, no fixed sleep), and removes the namespace.
#
# Environment: QEMU (default qemu-system-x86_64), NETCHECK_TIMEOUT (seconds, default 300),
# NETCHECK_DEVICE_OPTIONS (appended to the -device option, e.g. ",event_idx=off,mrg_rxbuf=off"
# or ",vectors=0" for a driver without MSI-X).
#
# Prints the guest's console, then one summary line:
#   netcheck-qemu: ok accel A host-sent H echoed E guest-frames G run-seconds S ...
# Exit status 0 if every host frame was echoed exactly once and every guest frame arrived once
# and in order, 1 otherwise, 2 if QEMU is not installed or namespaces are unavailable.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QEMU=${QEMU:-qemu-system-x86_64}
command -v "$QEMU" >/dev/null 2>&1 || {
    echo "netcheck-qemu: $QEMU is not installed (Debian: apt-get install qemu-system-x86)" >&2
    exit 2
}
(cd "$ROOT" && cargo build --release --quiet -p cpr-tests --bin netcheck-qemu)
exec "$ROOT/target/release/netcheck-qemu" "$@"
