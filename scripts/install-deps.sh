#!/usr/bin/env bash
# Installs what the project needs from Debian on a fresh machine (cargo fetches the crates).
# Idempotent: does nothing when everything is already there.
set -euo pipefail

missing=()
for tool in as ld objcopy; do
    command -v "$tool" >/dev/null 2>&1 || missing+=(binutils)
done
command -v cc >/dev/null 2>&1 || missing+=(gcc)

if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The test script runs rustfmt and clippy; a toolchain installed without them gets them here.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
        echo "installing: rustfmt and clippy (rustup components)" >&2
        rustup component add rustfmt clippy
    else
        echo "warning: cargo fmt / cargo clippy are missing and there is no rustup to add them" >&2
    fi
fi

if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "warning: /dev/kvm is not accessible to $(id -un); the VMM needs it" >&2
fi
