#!/usr/bin/env bash
# Installs the QEMUs that the blackout benchmark compares cpr-vmm against.
#
#   sudo scripts/bench-setup.sh            # install / check (idempotent)
#   sudo scripts/bench-setup.sh status     # only report what is there
#   sudo scripts/bench-setup.sh run WORKDIR CMD [ARGS...]
#                                          # run CMD inside the sid chroot
#
# What it sets up:
#   1. QEMU 10.x on the host (`qemu-system-x86` from bookworm-backports; the
#      backports suite is added in its own file,
#      /etc/apt/sources.list.d/cpr-bench-bookworm-backports.sources, only if
#      no apt source has it yet) and `debootstrap`. QEMU 10.x has the
#      cpr-transfer migration mode.
#   2. A Debian sid chroot with `qemu-system-x86` and `seabios` in it, for a
#      QEMU >= 10.2, which has the cpr-exec mode. The host's apt sources are
#      never pointed at sid; only the chroot's are.
#
# Locations (override through the environment):
#   CPR_BENCH_DIR           /var/tmp/cpr-bench          state directory
#   CPR_BENCH_SID_CHROOT    $CPR_BENCH_DIR/sid           the sid chroot
#   CPR_BENCH_MIRROR        the Debian mirror the host's apt already uses
#
# Entering the chroot (the `run` subcommand, and the benchmark's own Rust code
# in tests/src/qemu_bench.rs, which does the same thing) happens in a private
# mount namespace (`unshare --mount`): /dev, /proc, /sys and the work
# directory are bind-mounted there, at the same paths as outside, so socket
# and file names mean the same on both sides, and the mounts vanish by
# themselves when the last process in the namespace exits; nothing is left
# mounted on the host, whatever happens.
#
# The outcome is printed and written to $CPR_BENCH_DIR/status as key=value
# lines (cpr_transfer=available|unavailable, cpr_exec=..., with reasons).
# If something cannot be installed the script says so and still exits 0: the
# benchmark then marks that comparison unavailable and measures cpr-vmm alone.
set -uo pipefail

BENCH_DIR=${CPR_BENCH_DIR:-/var/tmp/cpr-bench}
CHROOT=${CPR_BENCH_SID_CHROOT:-$BENCH_DIR/sid}
STATUS_FILE=$BENCH_DIR/status
BACKPORTS_FILE=/etc/apt/sources.list.d/cpr-bench-bookworm-backports.sources
DONE_MARK=.cpr-bench-debootstrap-done
export DEBIAN_FRONTEND=noninteractive

log() { printf 'bench-setup: %s\n' "$*" >&2; }

# The Debian mirror the host's apt already uses (deb.debian.org if none).
debian_mirror() {
    if [[ -n ${CPR_BENCH_MIRROR:-} ]]; then
        echo "$CPR_BENCH_MIRROR"
        return
    fi
    local files=() url
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    if ((${#files[@]})); then
        url=$(grep -hvE '^[[:space:]]*#' "${files[@]}" 2>/dev/null |
            grep -oE 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ')
    fi
    url=${url:-http://deb.debian.org/debian}
    echo "${url%/}"
}

# "MAJOR.MINOR.PATCH" of a qemu-system-x86_64 --version output, or empty.
qemu_version_of() { sed -n 's/.*QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1; }

# True if version $1 >= $2 (dotted numbers).
version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]; }

host_qemu_version() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 0
    qemu-system-x86_64 --version 2>/dev/null | qemu_version_of
}

# Runs "$@" inside the chroot in a private mount namespace with /dev, /proc,
# /sys and (if given and not empty) the directory $WORKDIR bind-mounted.
in_chroot() {
    local workdir=${WORKDIR:-}
    # shellcheck disable=SC2016 # expanded by the inner shell
    unshare --mount --propagation private -- /bin/sh -c '
        set -e
        root=$1; work=$2; shift 2
        mount --rbind /dev "$root/dev"
        mount --bind /proc "$root/proc"
        mount --rbind /sys "$root/sys"
        if [ -n "$work" ]; then
            mkdir -p "$root$work"
            mount --bind "$work" "$root$work"
        fi
        exec chroot "$root" "$@"
    ' in-chroot "$CHROOT" "$workdir" "$@"
}

chroot_qemu_version() {
    [[ -x $CHROOT/usr/bin/qemu-system-x86_64 ]] || return 0
    chroot "$CHROOT" /usr/bin/qemu-system-x86_64 --version 2>/dev/null | qemu_version_of
}

# Anything still mounted below the chroot (from an older, interrupted run of
# some other tool); unmounted before the chroot is deleted or rebuilt.
unmount_below_chroot() {
    local m
    awk -v root="$CHROOT" 'index($2, root "/") == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

install_host() {
    local mirror=$1 version
    version=$(host_qemu_version)
    if [[ -n $version ]] && version_ge "$version" 10.0 && command -v debootstrap >/dev/null; then
        log "host QEMU $version and debootstrap already installed"
        return 0
    fi
    if ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports in $BACKPORTS_FILE"
        cat >"$BACKPORTS_FILE" <<EOF
# Added by cpr-vmm's scripts/bench-setup.sh for QEMU 10.x (cpr-transfer).
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    log "apt-get update"
    apt-get update -qq >&2 || log "apt-get update reported errors (continuing)"
    log "installing qemu-system-x86 (bookworm-backports) and debootstrap"
    if ! apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 >&2; then
        log "cannot install qemu-system-x86 from bookworm-backports"
    fi
    if ! command -v debootstrap >/dev/null; then
        apt-get install -y -qq --no-install-recommends debootstrap >&2 ||
            log "cannot install debootstrap"
    fi
}

install_chroot() {
    local mirror=$1 version
    version=$(chroot_qemu_version)
    if [[ -n $version ]] && version_ge "$version" 10.2; then
        log "sid chroot $CHROOT already has QEMU $version"
        return 0
    fi
    if ! command -v debootstrap >/dev/null; then
        log "no debootstrap: cannot build the sid chroot"
        return 1
    fi
    if [[ ! -f $CHROOT/$DONE_MARK ]]; then
        unmount_below_chroot
        if [[ -e $CHROOT ]]; then
            log "removing the incomplete chroot $CHROOT"
            rm -rf --one-file-system "$CHROOT"
        fi
        mkdir -p "$(dirname "$CHROOT")"
        log "debootstrap --variant=minbase sid $CHROOT $mirror"
        if ! debootstrap --variant=minbase sid "$CHROOT" "$mirror" >"$BENCH_DIR/debootstrap.log" 2>&1; then
            log "debootstrap failed; last lines of $BENCH_DIR/debootstrap.log:"
            tail -n 15 "$BENCH_DIR/debootstrap.log" >&2
            return 1
        fi
        touch "$CHROOT/$DONE_MARK"
    fi
    # Nothing may start services inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$CHROOT/usr/sbin/policy-rc.d"
    chmod 755 "$CHROOT/usr/sbin/policy-rc.d"
    cp -L /etc/resolv.conf "$CHROOT/etc/resolv.conf" 2>/dev/null || true
    log "apt-get update in the chroot"
    local apt_opts=()
    if ! in_chroot apt-get update -qq >&2; then
        log "sid index rejected (expired?); retrying with Check-Valid-Until=false"
        apt_opts=(-o Acquire::Check-Valid-Until=false)
        in_chroot apt-get "${apt_opts[@]}" update -qq >&2 || {
            log "apt-get update failed in the chroot"
            return 1
        }
    fi
    log "installing qemu-system-x86 and seabios in the chroot"
    if ! in_chroot apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends \
        qemu-system-x86 seabios >&2; then
        log "apt-get install failed in the chroot"
        return 1
    fi
    in_chroot apt-get clean >&2 || true
}

write_status() {
    local host_version chroot_version transfer exec_mode
    host_version=$(host_qemu_version)
    chroot_version=$(chroot_qemu_version)
    if [[ -z $host_version ]]; then
        transfer="unavailable: no qemu-system-x86_64 on the host"
    elif ! version_ge "$host_version" 10.0; then
        transfer="unavailable: host QEMU $host_version is older than 10.0"
    elif [[ ! -c /dev/kvm ]]; then
        transfer="unavailable: no /dev/kvm"
    else
        transfer=available
    fi
    if [[ -z $chroot_version ]]; then
        exec_mode="unavailable: no QEMU in the sid chroot $CHROOT"
    elif ! version_ge "$chroot_version" 10.2; then
        exec_mode="unavailable: chroot QEMU $chroot_version is older than 10.2"
    elif [[ ! -c /dev/kvm ]]; then
        exec_mode="unavailable: no /dev/kvm"
    else
        exec_mode=available
    fi
    mkdir -p "$BENCH_DIR"
    cat >"$STATUS_FILE" <<EOF
host_qemu=$(command -v qemu-system-x86_64 || true)
host_qemu_version=$host_version
cpr_transfer=$transfer
sid_chroot=$CHROOT
chroot_qemu_version=$chroot_version
cpr_exec=$exec_mode
EOF
    log "status ($STATUS_FILE):"
    sed 's/^/  /' "$STATUS_FILE" >&2
    if [[ $transfer != available || $exec_mode != available ]]; then
        log "QEMU comparison partly UNAVAILABLE (see above); cpr-vmm's own figures are unaffected"
    fi
}

main() {
    local command=${1:-install}
    case $command in
    status)
        write_status
        return 0
        ;;
    run)
        shift
        [[ $# -ge 2 ]] || {
            log "usage: $0 run WORKDIR CMD [ARGS...]"
            return 2
        }
        WORKDIR=$(realpath -m "$1")
        shift
        in_chroot "$@"
        return
        ;;
    install) ;;
    *)
        log "usage: $0 [install|status|run WORKDIR CMD...]"
        return 2
        ;;
    esac
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root to install packages"
        write_status
        return 0
    fi
    mkdir -p "$BENCH_DIR"
    local start=$SECONDS mirror
    mirror=$(debian_mirror)
    log "Debian mirror: $mirror; sid chroot: $CHROOT"
    install_host "$mirror"
    install_chroot "$mirror" || log "the sid chroot is not usable: cpr-exec comparison unavailable"
    write_status
    log "done in $((SECONDS - start)) s"
    return 0
}

main "$@"
