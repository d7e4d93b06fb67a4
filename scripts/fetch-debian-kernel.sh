#!/usr/bin/env bash
# Fetches a real Debian kernel for the Linux-boot tests, without installing it.
#
#   scripts/fetch-debian-kernel.sh DIR
#
# Downloads the linux-image-*-cloud-amd64 package with `apt-get download` (the version Debian's
# linux-image-cloud-amd64 meta-package points at, or $DEBIAN_KERNEL_PACKAGE), takes the bzImage
# (/boot/vmlinuz-*) out of it, and decompresses the kernel inside into an uncompressed ELF
# vmlinux the way the kernel's scripts/extract-vmlinux does (the Debian 6.1 cloud kernel's
# payload is LZ4; gzip, xz and zstd payloads work too when their tools are installed).
#
# Writes DIR/bzImage, DIR/vmlinux and DIR/package (the package's name and version), and prints
# the vmlinux path on stdout. A DIR that already holds both files is reused.
#
# Exit status: 0 done; 2 the package cannot be had (no apt, no network, not in the package
# lists): tests should skip, with the message on stderr; 1 anything else went wrong.
set -euo pipefail

die() { echo "fetch-debian-kernel: $*" >&2; exit 1; }
unavailable() { echo "fetch-debian-kernel: cannot get the Debian kernel package: $*" >&2; exit 2; }

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 1; }
mkdir -p "$1" || die "cannot create $1"
out=$(cd "$1" && pwd)

if [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ]; then
    echo "$out/vmlinux"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || unavailable "apt-get is not installed (not a Debian system?)"
command -v dpkg-deb >/dev/null 2>&1 || unavailable "dpkg-deb is not installed"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"; else return 1; fi
}

# The package lists may be empty on a fresh machine: refresh them once if the meta-package is
# unknown.
meta=linux-image-cloud-amd64
if ! apt-cache show "$meta" >/dev/null 2>&1; then
    as_root apt-get update -qq >/dev/null 2>&1 || true
fi
pkg=${DEBIAN_KERNEL_PACKAGE:-}
if [ -z "$pkg" ]; then
    pkg=$(apt-cache depends "$meta" 2>/dev/null \
        | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ && !found { print $2; found = 1 }')
fi
[ -n "$pkg" ] || unavailable "apt does not know $meta (is deb.debian.org in the sources and reachable?)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "fetch-debian-kernel: downloading $pkg" >&2
if ! (cd "$tmp" && apt-get download "$pkg" >"$tmp/download.log" 2>&1); then
    cat "$tmp/download.log" >&2
    unavailable "apt-get download $pkg failed"
fi
debs=("$tmp"/*.deb)
deb=${debs[0]}
[ -f "$deb" ] || unavailable "apt-get download $pkg produced no .deb"

mkdir "$tmp/x"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/x" --wildcards './boot/vmlinuz-*' \
    || die "$deb has no /boot/vmlinuz-*"
images=("$tmp"/x/boot/vmlinuz-*)
bzimage=${images[0]}

# Read a little-endian integer of $2 bytes at offset $1 of the bzImage.
le() { od -An -t "u$2" -j "$1" -N "$2" --endian=little "$bzimage" | tr -d ' '; }

[ "$(dd if="$bzimage" bs=1 skip=$((0x202)) count=4 2>/dev/null)" = "HdrS" ] \
    || die "$bzimage has no bzImage setup header"
version=$(le $((0x206)) 2)
[ "$version" -ge $((0x208)) ] || die "$bzimage uses boot protocol $version, before payload_offset (2.08)"
setup_sects=$(le $((0x1f1)) 1)
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_offset=$(le $((0x248)) 4)
payload_length=$(le $((0x24c)) 4)
start=$(( (setup_sects + 1) * 512 + payload_offset ))
dd if="$bzimage" of="$tmp/payload" iflag=skip_bytes,count_bytes skip="$start" \
    count="$payload_length" status=none

# Pick the decompressor by the payload's magic, as extract-vmlinux does.
magic=$(od -An -t x1 -N 6 "$tmp/payload" | tr -d ' \n')
case "$magic" in
    02214c18*) tool=lz4;   cmd=(lz4 -dc) ;;
    1f8b*)     tool=gzip;  cmd=(gzip -dc) ;;
    fd377a585a00) tool=xz-utils; cmd=(xz -dc) ;;
    28b52ffd*) tool=zstd;  cmd=(zstd -dc) ;;
    *) die "unknown kernel payload compression (magic $magic)" ;;
esac
if ! command -v "${cmd[0]}" >/dev/null 2>&1; then
    echo "fetch-debian-kernel: installing $tool" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$tool" \
        >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log" >&2; die "cannot install $tool"; }
fi
# The payload ends with the kernel's appended size word, which some decompressors report as
# trailing garbage: like extract-vmlinux, judge by the result, not the exit status.
"${cmd[@]}" <"$tmp/payload" >"$tmp/vmlinux" 2>"$tmp/decompress.log" || true
if [ "$(od -An -t x1 -N 4 "$tmp/vmlinux" | tr -d ' \n')" != "7f454c46" ]; then
    cat "$tmp/decompress.log" >&2
    die "decompressing the $tool payload of $bzimage did not give an ELF vmlinux"
fi

cp "$bzimage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
mv "$tmp/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
dpkg-deb -f "$deb" Package Version >"$out/package"
echo "fetch-debian-kernel: $(tr '\n' ' ' <"$out/package")-> $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)" >&2
echo "$out/vmlinux"
