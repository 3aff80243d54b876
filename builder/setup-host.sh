#!/bin/sh
# Installs what aiwimg needs on a Debian 12 (or newer) host, idempotently.
#   builder/setup-host.sh            what `aiwimg build` needs
#   builder/setup-host.sh --tests    plus what the QEMU test suite needs
# Run as root. The image's own tools (systemd-repart, ukify, dracut, ...) come
# from the trixie tools tree that aiwimg makes itself; the host needs little.
set -eu

tests=no
[ "${1:-}" = "--tests" ] && tests=yes
[ "$(id -u)" = 0 ] || { echo "setup-host.sh: run as root (sudo $0 $*)" >&2; exit 1; }

. /etc/os-release
pkgs="mmdebstrap qemu-utils zstd bmap-tools dpkg util-linux ca-certificates musl-tools"
backports_pkgs="mmdebstrap qemu-utils"
if [ "$tests" = yes ]; then
    pkgs="$pkgs qemu-system-x86 ovmf cloud-image-utils genisoimage openssh-client socat e2fsprogs dosfstools mtools postgresql-client redis-tools openssl curl gpg python3"
    backports_pkgs="$backports_pkgs qemu-system-x86"
fi

target_release=""
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    # bookworm's mmdebstrap and QEMU are too old for trixie images and OVMF
    # 4M firmware; bookworm-backports has current ones. Its mirror is the one
    # this host already uses for bookworm (never a host name of ours).
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        [ -n "$uri" ] || { echo "setup-host.sh: cannot find this host's Debian mirror in /etc/apt" >&2; exit 1; }
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
            > /etc/apt/sources.list.d/aiwimg-bookworm-backports.sources
        echo "setup-host.sh: added bookworm-backports from $uri"
    fi
    target_release="bookworm-backports"
fi

missing=""
for p in $pkgs; do
    dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
need_bpo=no
if [ -n "$target_release" ]; then
    # An old mmdebstrap/QEMU from bookworm itself is not enough.
    for p in $backports_pkgs; do
        v=$(dpkg-query -W -f '${Version}' "$p" 2>/dev/null || true)
        case "$v" in *bpo*|*deb13*) ;; *) need_bpo=yes ;; esac
    done
fi
if [ -n "$missing" ] || [ "$need_bpo" = yes ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends $pkgs
    if [ -n "$target_release" ]; then
        apt-get install -y -q --no-install-recommends -t "$target_release" $backports_pkgs
    fi
fi

# The agent is a static musl binary.
if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
        || rustup target add x86_64-unknown-linux-musl
else
    echo "setup-host.sh: rustup not found; install Rust with the x86_64-unknown-linux-musl target" >&2
    exit 1
fi
# The publish tests run moto[server], a test double of EBS and EC2, from
# the package index pip is configured for, in a venv of its own.
if [ "$tests" = yes ]; then
    venv=/var/cache/aiwimg/moto-venv
    if [ ! -x "$venv/bin/moto_server" ] || ! "$venv/bin/python3" -c 'import moto, boto3' 2>/dev/null; then
        mkdir -p /var/cache/aiwimg
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q 'moto[server]'
        echo "setup-host.sh: installed moto[server] into $venv"
    fi
fi
echo "setup-host.sh: host ready ($( [ "$tests" = yes ] && echo build and tests || echo build ))"
